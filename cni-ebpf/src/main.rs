//! Kernel-side programs of the CNI datapath, one module per concern:
//! `parsing` (the one L3/L4 parser of every program, TC and XDP, and the
//! packet-format constants `aya_ebpf::bindings` lacks), `rewrite` (checksummed rewrites), `conntrack` (NAT
//! bindings), `frag` (fragments after the first get their first fragment's
//! translation), `nat` (masquerade), `nat6` (IPv6 masquerade, programs of
//! its own), `hostport` (hostPort DNAT and hairpin), `hostport6` (the same for
//! IPv6, programs of its own), `sock` (node-local
//! hostPort clients), `counters` (per-interface counters), `stats`
//! (datapath counters); ebpf-firewall: `policy` (rules, ingressPolicy,
//! connection tracking), `spoof` (anti-spoofing), `forward` (forwarding
//! past the host stack); ebpf-bandwidth: `rate` (token buckets); `veth`
//! (the host veth's programs, which run the policy and the rate limit).
#![no_std]
#![no_main]
// BPF_ATOMIC read-modify-write (rate.rs) is only reachable through asm!.
#![feature(asm_experimental_arch)]
// Map keys are passed by reference on purpose: aya's maps take
// `impl Borrow<K>`, and a key passed by value is copied onto the 512-byte
// BPF stack at each call (the IPv6 programs then exceed it).
#![allow(clippy::needless_borrows_for_generic_args)]

use aya_ebpf::bindings::TC_ACT_UNSPEC;

/// tcx: let the next program (or the stack) decide.
pub(crate) const NEXT: i32 = TC_ACT_UNSPEC;

mod conntrack;
mod counters;
mod forward;
mod frag;
mod hostport;
mod hostport6;
mod hostport_xdp;
mod nat;
mod nat6;
mod parsing;
mod policy;
mod rate;
mod rewrite;
mod sock;
mod spoof;
mod stats;
mod veth;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path; this is never called.
    loop {}
}
