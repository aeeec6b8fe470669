//! Per-CPU datapath counters, summed by the agent.
use aya_ebpf::{macros::map, maps::PerCpuArray};
use cni_ebpf_common::stat;

#[map(name = "STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stat::COUNT, 0);

#[inline(always)]
pub fn bump(index: u32) {
    if let Some(v) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *v += 1 };
    }
}
