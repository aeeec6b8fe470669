//! Map keys and values shared by the kernel-side programs (`cni-ebpf`) and
//! userspace (`cni-agent`). Every type here is `#[repr(C)]`, has no padding
//! holes the verifier would reject reading, and is defined only here so both
//! sides agree on the layout.
#![no_std]

/// Bumped whenever the layout of any pinned map changes. The agent stores it
/// next to its pins and refuses to reuse maps written by another layout.
pub const MAP_LAYOUT_VERSION: u32 = 1;

/// Names of the maps in the eBPF object, as userspace looks them up.
pub mod map_names {
    /// Per-interface packet/byte counters, keyed by ifindex.
    pub const IF_COUNTERS: &str = "IF_COUNTERS";
}

/// Names of the programs in the eBPF object.
pub mod prog_names {
    /// TC program that counts packets per interface and always passes them.
    pub const TC_COUNT: &str = "tc_count";
}

/// Packet and byte counters of one interface, as seen by a TC program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(feature = "user")]
// SAFETY: plain-old-data, `#[repr(C)]`, no padding.
unsafe impl aya::Pod for TrafficCounters {}
