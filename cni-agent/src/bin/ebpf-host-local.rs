//! ebpf-host-local: host-local compatible IPAM plugin (see
//! `cni_agent::plugins::host_local`).

use std::process::ExitCode;

use cni_agent::plugins::host_local::HostLocal;
use cni_agent::spec::skel;

fn main() -> ExitCode {
    skel::run(&HostLocal)
}
