//! Per-interface traffic counters: the smallest useful program, and the one
//! the foundation tests load and attach through tcx.
use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    macros::{classifier, map},
    maps::HashMap,
    programs::TcContext,
};
use cni_ebpf_common::TrafficCounters;

/// ifindex -> counters. Entries are created by the program on first packet.
#[map(name = "IF_COUNTERS")]
static IF_COUNTERS: HashMap<u32, TrafficCounters> = HashMap::with_max_entries(4096, 0);

/// Counts every packet and passes it on to the next program (TC_ACT_UNSPEC = TCX_NEXT), so it
/// never changes what other programs on the same hook decide.
#[classifier]
pub fn tc_count(ctx: TcContext) -> i32 {
    // SAFETY: __sk_buff is valid for the duration of the program.
    let (ifindex, len) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).len) };
    match IF_COUNTERS.get_ptr_mut(&ifindex) {
        // SAFETY: a valid map value pointer for this run.
        Some(c) => unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(len);
        },
        None => {
            let c = TrafficCounters {
                packets: 1,
                bytes: u64::from(len),
            };
            let _ = IF_COUNTERS.insert(&ifindex, &c, 0);
        }
    }
    TC_ACT_UNSPEC
}
