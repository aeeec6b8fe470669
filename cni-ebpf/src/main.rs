//! Kernel-side programs of the CNI datapath, one module per concern:
//! `parsing` (headers), `rewrite` (checksummed rewrites), `conntrack` (NAT
//! bindings), `nat` (masquerade), `hostport` (hostPort DNAT and hairpin),
//! `sock` (node-local hostPort clients), `counters` (per-interface
//! counters), `stats` (datapath counters).
#![no_std]
#![no_main]

mod conntrack;
mod counters;
mod hostport;
mod hostport_xdp;
mod nat;
mod parsing;
mod rewrite;
mod sock;
mod stats;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path; this is never called.
    loop {}
}
