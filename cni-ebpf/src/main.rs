//! Kernel-side programs of the CNI datapath, one module per concern:
//! `parsing` (headers), `conntrack` (NAT bindings), `nat` (masquerade),
//! `counters` (per-interface counters), `stats` (datapath counters).
#![no_std]
#![no_main]

mod conntrack;
mod counters;
mod nat;
mod parsing;
mod stats;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path; this is never called.
    loop {}
}
