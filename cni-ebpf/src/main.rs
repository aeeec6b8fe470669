//! Kernel-side programs of the CNI datapath, one module per concern:
//! `parsing` (headers), `rewrite` (checksummed rewrites), `conntrack` (NAT
//! bindings), `frag` (fragments after the first get their first fragment's
//! translation), `nat` (masquerade), `nat6` (IPv6 masquerade, programs of
//! its own), `hostport` (hostPort DNAT and hairpin), `sock` (node-local
//! hostPort clients), `counters` (per-interface counters), `stats`
//! (datapath counters); ebpf-firewall: `policy` (rules, ingressPolicy,
//! connection tracking), `spoof` (anti-spoofing), `forward` (forwarding
//! past the host stack).
#![no_std]
#![no_main]
// BPF_ATOMIC read-modify-write (rate.rs) is only reachable through asm!.
#![feature(asm_experimental_arch)]

mod conntrack;
mod counters;
mod forward;
mod frag;
mod hostport;
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path; this is never called.
    loop {}
}
