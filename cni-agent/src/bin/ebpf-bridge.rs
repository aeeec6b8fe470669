//! ebpf-bridge: bridge + veth CNI plugin (see `cni_agent::plugins::bridge`).

use std::process::ExitCode;

use cni_agent::plugins::bridge::BridgePlugin;
use cni_agent::spec::skel;

fn main() -> ExitCode {
    skel::run(&BridgePlugin)
}
