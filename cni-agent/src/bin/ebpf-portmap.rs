//! ebpf-portmap: hostPort mappings served by the eBPF datapath.
use std::process::ExitCode;

use cni_agent::{plugins::portmap::PortmapPlugin, spec::skel};

fn main() -> ExitCode {
    skel::run(&PortmapPlugin::new())
}
