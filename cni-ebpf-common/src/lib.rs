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
    /// [`HostPortKey`](super::HostPortKey) -> [`HostPortTarget`](super::HostPortTarget).
    pub const HOSTPORTS: &str = "HOSTPORTS";
    /// Addresses of the node (any interface) -> 1: what "the node" is for
    /// hostPort mappings without a hostIP.
    pub const NODE_ADDRS: &str = "NODE_ADDRS";
    /// Bridge ifindex -> [`BridgeInfo`](super::BridgeInfo).
    pub const BRIDGES: &str = "BRIDGES";
    /// Client-side tuple of a hairpin flow -> its rewritten source.
    pub const HP_ORIG: &str = "HP_ORIG";
    /// Reply tuple as it leaves the target pod -> [`HpReply`](super::HpReply).
    pub const HP_REPLY: &str = "HP_REPLY";
}

/// Names of the programs in the eBPF object.
pub mod prog_names {
    /// TC program that counts packets per interface and always passes them.
    pub const TC_COUNT: &str = "tc_count";
    /// Uplink TC egress: source NAT of pod traffic leaving the node.
    pub const SNAT_EGRESS: &str = "snat_egress";
    /// Uplink TC ingress: reverse translation of replies to masqueraded flows.
    pub const SNAT_INGRESS: &str = "snat_ingress";
    /// Uplink TC ingress: hostPort DNAT.
    pub const HOSTPORT_INGRESS: &str = "hostport_ingress";
    /// Uplink TC egress: hostPort replies get node:hostPort back.
    pub const HOSTPORT_EGRESS: &str = "hostport_egress";
    /// Uplink XDP: hostPort DNAT (alternative to the TC one).
    pub const HOSTPORT_XDP: &str = "hostport_xdp";
    /// Bridge TC ingress (pods -> host stack): hostPort replies and hairpin.
    pub const BRIDGE_FROM_PODS: &str = "bridge_from_pods";
    /// cgroup connect4: node-local clients of a hostPort (TCP and UDP).
    pub const HOSTPORT_CONNECT4: &str = "hostport_connect4";
    /// cgroup sendmsg4: node-local unconnected UDP clients of a hostPort.
    pub const HOSTPORT_SENDMSG4: &str = "hostport_sendmsg4";
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

/// A hostPort as the datapath keys it: an all-zero `addr` means every
/// address of the node (no hostIP in the mapping).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HostPortKey {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// Where a hostPort goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostPortTarget {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    /// `hostport_flags::*`.
    pub flags: u8,
    pub family: u8,
}

/// Bits of [`HostPortTarget::flags`].
pub mod hostport_flags {
    /// Masquerade hairpin traffic (a pod reaching a hostPort) to the
    /// bridge address, as the reference's `snat` option does.
    pub const SNAT: u8 = 1;
}

/// A bridge the `bridge_from_pods` program runs on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BridgeInfo {
    /// The bridge's (gateway) IPv4 address, network byte order: the source
    /// hairpin traffic is masqueraded to.
    pub addr_v4: u32,
    pub _pad: u32,
}

/// How to rewrite a reply leaving a hostPort's target pod: its source
/// becomes (node address, hostPort), its destination the original client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HpReply {
    pub src_addr: [u32; 4],
    pub dst_addr: [u32; 4],
    /// Network byte order.
    pub src_port: u16,
    pub dst_port: u16,
    pub state: u8,
    /// 1 for a hairpin flow (client is a pod of this node): translated and
    /// redirected on the bridge; 0 for an external client: translated on
    /// the uplink's egress.
    pub hairpin: u8,
    pub _pad: [u8; 2],
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
    /// Packets DNATed to a hostPort target (uplink, TC or XDP).
    pub const HOSTPORT_DNAT: u32 = 6;
    /// hostPort replies translated back.
    pub const HOSTPORT_REPLY: u32 = 7;
    /// Hairpin connections (a pod to a hostPort) translated.
    pub const HOSTPORT_HAIRPIN: u32 = 8;
    /// Node-local connects/sends redirected by the cgroup hooks.
    pub const HOSTPORT_SOCK: u32 = 9;
    /// Hairpin packets dropped for lack of a free source port.
    pub const HOSTPORT_NO_PORT: u32 = 10;
    /// Of HOSTPORT_DNAT, those translated by the XDP program.
    pub const HOSTPORT_DNAT_XDP: u32 = 11;

    /// Names of the slots, as the agent reports them.
    pub const NAMES: [(u32, &str); 12] = [
        (SNAT_NEW, "snatNew"),
        (SNAT_NO_PORT, "snatNoPort"),
        (SNAT_XLATE, "snatTranslated"),
        (SNAT_REPLY_XLATE, "snatRepliesTranslated"),
        (SNAT_REPAIRED, "snatRepaired"),
        (SNAT_ICMP_ERROR_XLATE, "snatIcmpErrorsTranslated"),
        (HOSTPORT_DNAT, "hostPortDnat"),
        (HOSTPORT_REPLY, "hostPortReplies"),
        (HOSTPORT_HAIRPIN, "hostPortHairpin"),
        (HOSTPORT_SOCK, "hostPortSocket"),
        (HOSTPORT_NO_PORT, "hostPortNoPort"),
        (HOSTPORT_DNAT_XDP, "hostPortDnatXdp"),
    ];
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
    unsafe impl aya::Pod for super::HostPortKey {}
    unsafe impl aya::Pod for super::HostPortTarget {}
    unsafe impl aya::Pod for super::BridgeInfo {}
    unsafe impl aya::Pod for super::HpReply {}
}
