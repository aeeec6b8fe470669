//! ebpf-bandwidth: pod rate limits served by the eBPF datapath.
use std::process::ExitCode;

use cni_agent::{plugins::bandwidth::BandwidthPlugin, spec::skel};

fn main() -> ExitCode {
    skel::run(&BandwidthPlugin::new())
}
