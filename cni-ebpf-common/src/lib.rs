//! Map keys and values shared by the kernel-side programs (`cni-ebpf`) and
//! userspace (`cni-agent`). Every type here is `#[repr(C)]` with explicit
//! padding fields, so both sides agree on the layout byte for byte and the
//! kernel never reads uninitialised holes.
//!
//! Addresses are `[u32; 4]` in network byte order as they sit in the packet:
//! IPv4 uses word 0 and leaves the rest zero, so every key is ready for IPv6.
#![no_std]

/// Bumped whenever the layout of any pinned map changes. The agent keeps it
/// next to its pins and refuses to reuse maps written by another layout.
pub const MAP_LAYOUT_VERSION: u32 = 1;

/// Names of the maps in the eBPF object, as userspace looks them up.
pub mod map_names {
    /// Per-interface packet/byte counters, keyed by ifindex.
    pub const IF_COUNTERS: &str = "IF_COUNTERS";
    /// Uplink ifindex -> [`UplinkConfig`](super::UplinkConfig).
    pub const UPLINKS: &str = "UPLINKS";
    /// Pod address -> [`MasqPolicy`](super::MasqPolicy): sources to masquerade.
    pub const MASQ_SOURCES: &str = "MASQ_SOURCES";
    /// Original (pod-side) tuple -> translated address/port.
    pub const SNAT_ORIG: &str = "SNAT_ORIG";
    /// Reply tuple as it arrives on the uplink -> original address/port.
    pub const SNAT_REPLY: &str = "SNAT_REPLY";
    /// Per-CPU datapath counters indexed by [`stat`](super::stat).
    pub const STATS: &str = "STATS";
}

/// Names of the programs in the eBPF object.
pub mod prog_names {
    /// TC program that counts packets per interface and always passes them.
    pub const TC_COUNT: &str = "tc_count";
    /// Uplink TC egress: source NAT of pod traffic leaving the node.
    pub const SNAT_EGRESS: &str = "snat_egress";
    /// Uplink TC ingress: reverse translation of replies to masqueraded flows.
    pub const SNAT_INGRESS: &str = "snat_ingress";
}

/// Address family tags used in keys (not the kernel's AF_* numbers, which
/// differ between the two).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// Packet and byte counters of one interface, as seen by a TC program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    pub packets: u64,
    pub bytes: u64,
}

/// An IP address as a map key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpKey {
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// What the masquerade does for one pod source address (the reference adds
/// one iptables chain per pod with the same two rules: traffic to the pod's
/// own network is left alone, traffic to multicast is left alone, everything
/// else leaving through an uplink is masqueraded).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MasqPolicy {
    /// The network (subnet) of the pod: destinations inside it are not NATed.
    pub exclude_addr: [u32; 4],
    pub exclude_prefix_len: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// One uplink as the datapath needs it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UplinkConfig {
    /// Address masqueraded traffic leaves with (network byte order).
    pub addr_v4: u32,
    pub addr_v6: [u32; 4],
    /// Inclusive range of source ports handed out by the SNAT (host order).
    pub port_min: u16,
    pub port_max: u16,
}

/// A connection tuple. Ports are in network byte order; for ICMP echo the
/// identifier stands in for the port on the side that is translated (the
/// other port is 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// One half of a NAT binding: the address/port to write into the packet,
/// plus what the programs saw of the connection so the agent can expire it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatEntry {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    /// `ct_state::*` bits seen in the direction of this half.
    pub state: u8,
    pub _pad: u8,
    pub _pad2: u32,
    /// bpf_ktime_get_ns() of the last packet in this direction.
    pub last_seen_ns: u64,
}

/// Connection-state bits kept in [`NatEntry::state`].
pub mod ct_state {
    pub const SYN: u8 = 1;
    pub const FIN: u8 = 2;
    pub const RST: u8 = 4;
    /// A packet of the reply direction arrived.
    pub const REPLIED: u8 = 8;
}

/// Indexes into the per-CPU STATS array.
pub mod stat {
    /// New masquerade bindings created.
    pub const SNAT_NEW: u32 = 0;
    /// Packets dropped because no source port was free.
    pub const SNAT_NO_PORT: u32 = 1;
    /// Packets translated on the way out.
    pub const SNAT_XLATE: u32 = 2;
    /// Replies translated back.
    pub const SNAT_REPLY_XLATE: u32 = 3;
    /// Missing original halves re-created from their reply half (LRU eviction).
    pub const SNAT_REPAIRED: u32 = 4;
    /// ICMP errors about masqueraded packets translated back to the pod.
    pub const SNAT_ICMP_ERROR_XLATE: u32 = 5;
    /// Number of slots in the array.
    pub const COUNT: u32 = 16;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are plain-old-data, `#[repr(C)]`, without
    // implicit padding.
    unsafe impl aya::Pod for super::TrafficCounters {}
    unsafe impl aya::Pod for super::IpKey {}
    unsafe impl aya::Pod for super::MasqPolicy {}
    unsafe impl aya::Pod for super::UplinkConfig {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::NatEntry {}
}
