//! ebpf-firewall: isolation, anti-spoofing and stateful rules served by the
//! eBPF datapath (the reference firewall plugin's role, without iptables).
use std::process::ExitCode;

use cni_agent::{plugins::firewall::FirewallPlugin, spec::skel};

fn main() -> ExitCode {
    skel::run(&FirewallPlugin::new())
}
