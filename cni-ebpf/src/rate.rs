//! Rate limits of ebpf-bandwidth: a token bucket per pod veth and direction,
//! enforced by policing (drop when the bucket is empty). This kernel has no
//! sch_fq, so there is nothing to pace into; no qdisc, no ifb.
//!
//! Run by the veth programs (`veth.rs`): on the host veth's TC egress for
//! what the pod receives (`ingressRate`), on its TC ingress for what the
//! pod sends (`egressRate`).
//!
//! The bucket is a GCRA: its only state is `tat_ns`, the time at which it is
//! full again. A packet passes while the debt `tat_ns - now` is below the
//! depth, and adds its cost `bytes * 8e9 / rate` ns to `tat_ns` (a packet may
//! overdraw by its own size, so a 64 KiB GSO packet never starves behind a
//! smaller depth; the long-run rate is exact either way). Both CPUs update
//! `tat_ns` with atomic adds (BPF_ATOMIC, written as inline assembly: the
//! BPF target's `core` has no read-modify-write atomics), and a refused
//! packet gives its cost back, so concurrent packets are never lost from
//! the account; moving an idle bucket's `tat_ns` up to `now` is a
//! compare-and-swap, so two CPUs doing it at once cannot undo a charge.
//!
//! A packet costs its length as TC sees it (the Ethernet frame; a GSO
//! aggregate counts its payload and one set of headers).
use core::arch::asm;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::HashMap,
    programs::TcContext,
};
use cni_ebpf_common::{stat, RateBucket, RateKey};

use crate::stats::bump;

/// Two buckets per pod at most.
const RATE_ENTRIES: u32 = 16384;
/// Bits per byte times nanoseconds per second: cost_ns = bytes * this / bps.
/// A packet is at most a few hundred KiB (BIG TCP), so the product stays
/// far below 2^64.
const BIT_NS_PER_BYTE_SEC: u64 = 8 * 1_000_000_000;

#[map(name = "RATE_BUCKETS")]
static RATE_BUCKETS: HashMap<RateKey, RateBucket> = HashMap::pinned(RATE_ENTRIES, 0);

/// Polices one packet of `direction` (`rate_dir`) on the veth that runs
/// the program; a veth without a bucket for it passes.
#[inline(always)]
pub fn police(ctx: &TcContext, direction: u8) -> i32 {
    // SAFETY: __sk_buff is valid for the duration of the program.
    let (ifindex, len) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).len) };
    let key = RateKey {
        ifindex,
        direction,
        _pad: [0; 3],
    };
    let Some(b) = RATE_BUCKETS.get_ptr_mut(&key) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: `b` comes from a map lookup and stays valid for this run;
    // every field another CPU writes meanwhile is accessed atomically.
    unsafe {
        let rate = (*b).rate_bps;
        if rate == 0 {
            return TC_ACT_UNSPEC;
        }
        let bytes = u64::from(len);
        let cost = bytes * BIT_NS_PER_BYTE_SEC / rate;
        let now = bpf_ktime_get_ns();
        let tat = &raw mut (*b).tat_ns;
        let seen = core::ptr::read_volatile(tat);
        if seen < now {
            cmpxchg(tat, seen, now);
        }
        let before = fetch_add(tat, cost);
        if before > now.wrapping_add((*b).depth_ns) {
            add(tat, cost.wrapping_neg());
            add(&raw mut (*b).dropped_packets, 1);
            add(&raw mut (*b).dropped_bytes, bytes);
            bump(stat::RATE_DROPPED);
            return TC_ACT_SHOT;
        }
        add(&raw mut (*b).passed_packets, 1);
        add(&raw mut (*b).passed_bytes, bytes);
    }
    TC_ACT_UNSPEC
}

/// `*p += v`, atomically (BPF_ATOMIC BPF_ADD).
#[inline(always)]
unsafe fn add(p: *mut u64, v: u64) {
    // SAFETY: the caller passes a valid, aligned map value pointer.
    unsafe {
        asm!("lock *(u64 *)({p} + 0) += {v}", p = in(reg) p, v = in(reg) v, options(nostack))
    };
}

/// `*p += v`, atomically, returning the previous value (BPF_ADD | BPF_FETCH).
#[inline(always)]
unsafe fn fetch_add(p: *mut u64, v: u64) -> u64 {
    let mut v = v;
    // SAFETY: the caller passes a valid, aligned map value pointer.
    unsafe {
        asm!("{v} = atomic_fetch_add((u64 *)({p} + 0), {v})", p = in(reg) p, v = inout(reg) v, options(nostack))
    };
    v
}

/// Compare-and-swap (BPF_CMPXCHG); returns the previous value.
#[inline(always)]
unsafe fn cmpxchg(p: *mut u64, expected: u64, new: u64) -> u64 {
    let mut r0 = expected;
    // SAFETY: the caller passes a valid, aligned map value pointer.
    unsafe {
        asm!("r0 = cmpxchg_64({p} + 0, r0, {new})", p = in(reg) p, new = in(reg) new, inout("r0") r0, options(nostack))
    };
    r0
}
