//! The programs on a pod's host veth, one per direction, shared by
//! ebpf-firewall and ebpf-bandwidth: each plugin only writes its map
//! entries, and the first of them to ADD attaches the programs.
//!
//! Why one program rather than one per plugin: every tcx attach swaps the
//! device's program array and waits out an RCU grace period (11–19 ms
//! here) under RTNL, so four attaches per pod were most of its ADD. A
//! veth with neither plugin has no program at all.
//!
//! Policy runs before the rate limit: a packet the firewall refuses never
//! spends the pod's budget.
use aya_ebpf::{bindings::TC_ACT_SHOT, macros::classifier, programs::TcContext};
use cni_ebpf_common::rate_dir;

use crate::{policy, rate};

/// Host veth TC ingress: what the pod sends.
#[classifier]
pub fn veth_from_pod(ctx: TcContext) -> i32 {
    match policy::from_pod(&ctx) {
        TC_ACT_SHOT => TC_ACT_SHOT,
        _ => rate::police(&ctx, rate_dir::FROM_POD),
    }
}

/// Host veth TC egress: what the pod receives.
#[classifier]
pub fn veth_to_pod(ctx: TcContext) -> i32 {
    match policy::to_pod(&ctx) {
        TC_ACT_SHOT => TC_ACT_SHOT,
        _ => rate::police(&ctx, rate_dir::TO_POD),
    }
}
