//! loopback: the sandbox's `lo`, up (the plugin containerd runs for every pod).
use std::process::ExitCode;

use cni_agent::{plugins::loopback::LoopbackPlugin, spec::skel};

fn main() -> ExitCode {
    skel::run(&LoopbackPlugin)
}
