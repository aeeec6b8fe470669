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
    /// Bridge ifindex -> its (gateway) IPv6 address, `[u32; 4]` in network
    /// order: the source IPv6 hairpin traffic is masqueraded to with `snat`.
    /// A map of its own, so BRIDGES keeps its layout.
    pub const BRIDGES6: &str = "BRIDGES6";
    /// Client-side tuple of a hairpin flow -> its rewritten source.
    pub const HP_ORIG: &str = "HP_ORIG";
    /// Reply tuple as it leaves the target pod -> [`HpReply`](super::HpReply).
    pub const HP_REPLY: &str = "HP_REPLY";
    /// [`SockRevKey`](super::SockRevKey) -> [`SockRevValue`](super::SockRevValue):
    /// what a node-local socket redirected to a pod believes it talks to.
    pub const SOCK_REVERSE: &str = "SOCK_REVERSE";
    /// [0]: the netns cookie of the agent's namespace, the only one whose
    /// sockets the cgroup hooks rewrite.
    pub const SOCK_NETNS: &str = "SOCK_NETNS";
    /// [`RateKey`](super::RateKey) -> [`RateBucket`](super::RateBucket):
    /// the token buckets of ebpf-bandwidth.
    pub const RATE_BUCKETS: &str = "RATE_BUCKETS";
    /// ebpf-firewall: host veth ifindex -> [`FwAttach`](super::FwAttach).
    pub const FW_ATTACH: &str = "FW_ATTACH";
    /// ebpf-firewall: pod address -> [`FwEndpoint`](super::FwEndpoint).
    pub const FW_ENDPOINTS: &str = "FW_ENDPOINTS";
    /// ebpf-firewall: bridges hosting firewalled pods (ifindex -> 1).
    pub const FW_BRIDGES: &str = "FW_BRIDGES";
    /// ebpf-firewall: LPM trie [`FwCidrKey`](super::FwCidrKey) -> [`FwRegion`](super::FwRegion).
    pub const FW_CIDRS: &str = "FW_CIDRS";
    /// ebpf-firewall: LPM trie [`FwPortKey`](super::FwPortKey) -> [`FwVerdict`](super::FwVerdict).
    pub const FW_PORTS: &str = "FW_PORTS";
    /// ebpf-firewall: connection tracking [`FwCtKey`](super::FwCtKey) -> [`FwCtEntry`](super::FwCtEntry).
    pub const FW_CT: &str = "FW_CT";
    /// ebpf-firewall: verdicts of fragmented datagrams [`FwFragKey`](super::FwFragKey) -> action.
    pub const FW_FRAGS: &str = "FW_FRAGS";
    /// Fragmented datagrams the NAT programs (masquerade, hostPort) translated:
    /// [`NatFragKey`](super::NatFragKey) -> [`NatFragPorts`](super::NatFragPorts),
    /// so the fragments after the first get the same translation.
    pub const NAT_FRAGS: &str = "NAT_FRAGS";
    /// ebpf-firewall: per-CPU per-attachment counters (ifindex -> [`FwStats`](super::FwStats)).
    pub const FW_STATS: &str = "FW_STATS";
    /// ebpf-firewall: per-CPU rule hits [`FwRuleKey`](super::FwRuleKey) -> packets.
    pub const FW_RULE_HITS: &str = "FW_RULE_HITS";
}

/// Names of the programs in the eBPF object.
pub mod prog_names {
    /// TC program that counts packets per interface and always passes them.
    pub const TC_COUNT: &str = "tc_count";
    /// Uplink TC egress: source NAT of pod traffic leaving the node.
    pub const SNAT_EGRESS: &str = "snat_egress";
    /// Uplink TC ingress: reverse translation of replies to masqueraded flows.
    pub const SNAT_INGRESS: &str = "snat_ingress";
    /// Uplink TC egress: source NAT of pod IPv6 traffic leaving the node.
    pub const SNAT6_EGRESS: &str = "snat6_egress";
    /// Uplink TC ingress: reverse translation of IPv6 replies (and ICMPv6
    /// errors) to masqueraded flows.
    pub const SNAT6_INGRESS: &str = "snat6_ingress";
    /// Uplink TC ingress: hostPort DNAT.
    pub const HOSTPORT_INGRESS: &str = "hostport_ingress";
    /// Uplink TC egress: hostPort replies get node:hostPort back.
    pub const HOSTPORT_EGRESS: &str = "hostport_egress";
    /// Uplink TC ingress: IPv6 hostPort DNAT.
    pub const HOSTPORT6_INGRESS: &str = "hostport6_ingress";
    /// Uplink TC egress: IPv6 hostPort replies get [node]:hostPort back.
    pub const HOSTPORT6_EGRESS: &str = "hostport6_egress";
    /// Uplink XDP: hostPort DNAT, IPv4 and IPv6 (alternative to the TC ones).
    pub const HOSTPORT_XDP: &str = "hostport_xdp";
    /// Bridge TC ingress (pods -> host stack): hostPort replies and hairpin.
    pub const BRIDGE_FROM_PODS: &str = "bridge_from_pods";
    /// Bridge TC ingress: the same for IPv6.
    pub const BRIDGE6_FROM_PODS: &str = "bridge6_from_pods";
    /// cgroup connect4: node-local clients of a hostPort (TCP and UDP).
    pub const HOSTPORT_CONNECT4: &str = "hostport_connect4";
    /// cgroup sendmsg4: node-local unconnected UDP clients of a hostPort.
    pub const HOSTPORT_SENDMSG4: &str = "hostport_sendmsg4";
    /// cgroup recvmsg4: replies to those clients come from node:hostPort.
    pub const HOSTPORT_RECVMSG4: &str = "hostport_recvmsg4";
    /// cgroup getpeername4: a redirected socket's peer is node:hostPort.
    pub const HOSTPORT_GETPEERNAME4: &str = "hostport_getpeername4";
    /// cgroup connect6: node-local IPv6 clients of a hostPort (and IPv4
    /// ones on dual-stack sockets, through v4-mapped addresses).
    pub const HOSTPORT_CONNECT6: &str = "hostport_connect6";
    /// cgroup sendmsg6: unconnected IPv6 UDP clients of a hostPort.
    pub const HOSTPORT_SENDMSG6: &str = "hostport_sendmsg6";
    /// cgroup recvmsg6: replies to those clients come from [node]:hostPort.
    pub const HOSTPORT_RECVMSG6: &str = "hostport_recvmsg6";
    /// cgroup getpeername6: a redirected socket's peer is [node]:hostPort.
    pub const HOSTPORT_GETPEERNAME6: &str = "hostport_getpeername6";
    /// Host veth TC ingress (what the pod sends): ebpf-firewall's
    /// anti-spoofing and egress rules, then ebpf-bandwidth's egress rate.
    pub const VETH_FROM_POD: &str = "veth_from_pod";
    /// Host veth TC egress (what the pod receives): ebpf-firewall's
    /// ingress rules and ingressPolicy, then ebpf-bandwidth's ingress rate.
    pub const VETH_TO_POD: &str = "veth_to_pod";
    /// Bridge TC ingress: forwards firewalled pods' traffic past the host
    /// stack (and its FORWARD chain).
    pub const FW_BRIDGE_FORWARD: &str = "fw_bridge_forward";
    /// Uplink TC ingress, after the NAT programs: forwards traffic for
    /// firewalled pods past the host stack.
    pub const FW_UPLINK_INGRESS: &str = "fw_uplink_ingress";
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
    /// Address masqueraded IPv4 traffic leaves with (network byte order);
    /// 0 on an uplink without IPv4.
    pub addr_v4: u32,
    /// Address masqueraded IPv6 traffic leaves with; all zero on an uplink
    /// without a global IPv6 address.
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

/// Direction of a rate limit, as [`RateKey::direction`] holds it.
pub mod rate_dir {
    /// Traffic into the pod (host veth TC egress): `ingressRate`.
    pub const TO_POD: u8 = 1;
    /// Traffic out of the pod (host veth TC ingress): `egressRate`.
    pub const FROM_POD: u8 = 2;
}

/// One rate limit: a pod's host-side veth and a direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RateKey {
    pub ifindex: u32,
    /// [`rate_dir`] value.
    pub direction: u8,
    pub _pad: [u8; 3],
}

/// A token bucket kept as a GCRA "theoretical arrival time": the bucket is
/// full while `tat_ns <= now`, and a packet passes while `tat_ns - now`
/// (the debt) is below `depth_ns`, adding its cost `bytes * 8e9 / rate` to
/// `tat_ns`. One timestamp is the whole state, so the programs update it
/// with atomic adds, and userspace writes the configuration and a full
/// bucket in one map update.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateBucket {
    /// Rate in bits per second (non-zero).
    pub rate_bps: u64,
    /// Bucket depth as the time the rate takes to earn it, in ns.
    pub depth_ns: u64,
    /// bpf_ktime_get_ns() at which the bucket is full again.
    pub tat_ns: u64,
    pub passed_packets: u64,
    pub passed_bytes: u64,
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
    /// Name of the device (NUL-padded), so an entry whose device is gone
    /// (and whose ifindex may be reused) is recognised as someone else's.
    pub ifname: [u8; 16],
}

/// ebpf-firewall constants shared by both sides.
pub mod fw {
    /// `ingressPolicy` values ([`FwAttach::ingress_policy`](super::FwAttach)).
    pub const POLICY_OPEN: u8 = 0;
    pub const POLICY_SAME_BRIDGE: u8 = 1;
    pub const POLICY_ISOLATED: u8 = 2;
    /// Actions. `ACTION_NONE` in a verdict means "no rule matched": the
    /// direction's default applies.
    pub const ACTION_NONE: u8 = 0;
    pub const ACTION_ALLOW: u8 = 1;
    pub const ACTION_DENY: u8 = 2;
    /// Directions, from the pod's point of view: `INGRESS` = what it
    /// receives (host veth TC egress), `EGRESS` = what it sends.
    pub const DIR_INGRESS: u8 = 1;
    pub const DIR_EGRESS: u8 = 2;
    /// Rule index that stands for "the default action" in rule counters.
    pub const RULE_DEFAULT: u16 = 0xffff;
    /// Upper bound on rules per direction (the plugin refuses more).
    pub const MAX_RULES: usize = 4096;
    /// Bits of [`FwAttach::flags`](super::FwAttach).
    pub const FLAG_BYPASS: u8 = 1;
    /// Bits of [`FwCtEntry::state`](super::FwCtEntry).
    pub const CT_REPLIED: u8 = 1;
    pub const CT_FIN_EGRESS: u8 = 2;
    pub const CT_FIN_INGRESS: u8 = 4;
    pub const CT_RST: u8 = 8;
    /// Slots of [`FwStats::counters`](super::FwStats).
    pub const STAT_INGRESS_ALLOWED: usize = 0;
    pub const STAT_INGRESS_DROPPED: usize = 1;
    pub const STAT_EGRESS_ALLOWED: usize = 2;
    pub const STAT_EGRESS_DROPPED: usize = 3;
    /// Of the allowed packets, those of an already tracked connection.
    pub const STAT_INGRESS_ESTABLISHED: usize = 4;
    pub const STAT_EGRESS_ESTABLISHED: usize = 5;
    /// New connections refused by `ingressPolicy`.
    pub const STAT_POLICY_DROPPED: usize = 6;
    pub const STAT_SPOOFED_IP: usize = 7;
    pub const STAT_SPOOFED_MAC: usize = 8;
    pub const STAT_SPOOFED_ARP: usize = 9;
    /// Frames from the pod that are neither IPv4, IPv6 nor ARP (or tagged).
    pub const STAT_OTHER_DROPPED: usize = 10;
    /// Packets to or from the pod forwarded past the host stack.
    pub const STAT_FORWARDED: usize = 11;
    /// IPv6 neighbour discovery from the pod claiming what is not its own
    /// (an advertised target or link-layer address), or a router's message.
    pub const STAT_SPOOFED_ND: usize = 12;
    pub const STAT_SLOTS: usize = 16;
    /// Names of the used slots, as the agent reports them.
    pub const STAT_NAMES: [(usize, &str); 13] = [
        (STAT_INGRESS_ALLOWED, "ingressAllowed"),
        (STAT_INGRESS_DROPPED, "ingressDropped"),
        (STAT_EGRESS_ALLOWED, "egressAllowed"),
        (STAT_EGRESS_DROPPED, "egressDropped"),
        (STAT_INGRESS_ESTABLISHED, "ingressEstablished"),
        (STAT_EGRESS_ESTABLISHED, "egressEstablished"),
        (STAT_POLICY_DROPPED, "policyDropped"),
        (STAT_SPOOFED_IP, "spoofedIp"),
        (STAT_SPOOFED_MAC, "spoofedMac"),
        (STAT_SPOOFED_ARP, "spoofedArp"),
        (STAT_OTHER_DROPPED, "otherDropped"),
        (STAT_FORWARDED, "forwarded"),
        (STAT_SPOOFED_ND, "spoofedNd"),
    ];
}

/// One firewalled attachment, keyed by its host veth's ifindex.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwAttach {
    /// The pod's MAC: the only source MAC its frames (and ARP) may carry.
    pub mac: [u8; 6],
    /// `fw::POLICY_*`.
    pub ingress_policy: u8,
    /// Default `fw::ACTION_*` of each direction.
    pub ingress_default: u8,
    pub egress_default: u8,
    /// `fw::FLAG_*`.
    pub flags: u8,
    /// Set afresh by each ADD of a firewall on the veth: a tracked
    /// connection counts only under the cookie it was opened with, so the
    /// ones a DEL left behind for the agent's sweeper never let anything
    /// through on a later attachment of the same ifindex.
    pub cookie: u16,
    /// The bridge the pod is on (for `ingressPolicy`).
    pub bridge_ifindex: u32,
    pub ingress_rules: u16,
    pub egress_rules: u16,
    /// Name of the host veth (NUL-padded): an entry whose device is gone
    /// (and whose ifindex may be reused) is recognised as someone else's.
    pub ifname: [u8; 16],
}

/// A firewalled pod's address: where it lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwEndpoint {
    /// Host veth of the pod.
    pub ifindex: u32,
    pub bridge_ifindex: u32,
    /// `fw::FLAG_*` (the bypass applies per attachment).
    pub flags: u8,
    pub _pad: [u8; 3],
}

/// Data of an FW_CIDRS key (after the LPM prefix length): the remote
/// address of a connection, per attachment and direction. The prefix
/// length is 64 (ifindex..pad, always matched) + the CIDR's length.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwCidrKey {
    pub ifindex: u32,
    pub dir: u8,
    pub family: u8,
    pub _pad: [u8; 2],
    pub addr: [u32; 4],
}

/// What one rule decides: its index in the direction's list and action.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwVerdict {
    pub rule: u16,
    /// `fw::ACTION_*`.
    pub action: u8,
    pub _pad: u8,
}

/// The compiled rules for remote addresses whose most specific rule CIDR
/// is this entry's: the region whose port verdicts FW_PORTS holds, and the
/// verdicts of the protocols without ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwRegion {
    pub region: u16,
    pub _pad: u16,
    pub icmp: FwVerdict,
    /// Any protocol other than TCP, UDP and ICMP.
    pub other: FwVerdict,
}

/// Data of an FW_PORTS key: prefix length 64 + the port prefix (0..16).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwPortKey {
    pub ifindex: u32,
    pub dir: u8,
    pub proto: u8,
    pub region: u16,
    /// Destination port of the connection's first packet, network order.
    pub port: u16,
    pub _pad: u16,
}

/// A connection of one firewalled attachment, the same key from both
/// directions (pod side and remote side). Ports in network order; ICMP
/// echo uses the identifier for both.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FwCtKey {
    pub ifindex: u32,
    pub proto: u8,
    pub family: u8,
    pub pod_port: u16,
    pub remote_port: u16,
    pub _pad: u16,
    pub pod: [u32; 4],
    pub remote: [u32; 4],
}

/// A tracked connection: allowed when it was opened, so both directions
/// pass until it expires.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwCtEntry {
    pub last_seen_ns: u64,
    /// `fw::DIR_*` of the packet that opened it.
    pub origin: u8,
    /// `fw::CT_*` bits.
    pub state: u8,
    /// The attachment's [`FwAttach::cookie`] when it was opened.
    pub cookie: u16,
    pub _pad: [u8; 4],
}

/// A fragmented datagram: non-first fragments carry no ports, so they
/// get the verdict of their first fragment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FwFragKey {
    pub ifindex: u32,
    /// IP identification, network order.
    pub id: u16,
    pub proto: u8,
    pub family: u8,
    pub src: [u32; 4],
    pub dst: [u32; 4],
}

/// A fragmented datagram as one NAT program saw it before translating it
/// (addresses as they were at that hook): only its first fragment carries
/// the transport header, so the others are matched by this key instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatFragKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// IP identification as found in the packet (IPv4: the 16-bit field in
    /// network order, zero-extended; room for IPv6's 32-bit one).
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// What the first fragment of a datagram said, for the fragments after it:
/// its ports (network order; ICMP echo: the identifier in both), which is
/// all the NAT lookups need.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatFragPorts {
    pub sport: u16,
    pub dport: u16,
    /// ICMP type of the first fragment (0 for TCP and UDP).
    pub icmp_type: u8,
    pub _pad: [u8; 3],
    /// bpf_ktime_get_ns() when the first fragment passed: an entry older
    /// than the reassembly timeout belongs to an earlier datagram.
    pub first_seen_ns: u64,
}

/// Per-attachment counters (`fw::STAT_*` slots), per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwStats {
    pub counters: [u64; fw::STAT_SLOTS],
}

/// One rule's hit counter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FwRuleKey {
    pub ifindex: u32,
    pub dir: u8,
    pub _pad: u8,
    /// Index in the direction's rule list, or `fw::RULE_DEFAULT`.
    pub rule: u16,
}

/// A node-local socket redirected to a pod, and the pod endpoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    /// bpf_get_socket_cookie() of the client socket.
    pub cookie: u64,
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: u32,
}

/// The address and port the client socket asked for (node:hostPort).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevValue {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Handed from the XDP hostPort DNAT to the TC program behind it in the
/// packet's XDP metadata: what XDP rewrote, so TC can update the transport
/// checksum with the kernel's helper — XDP cannot tell a partial checksum
/// (veth, locally generated) from a complete one, TC's helper can.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpDnatMeta {
    /// [`XDP_DNAT_MAGIC`] when present.
    pub magic: u32,
    /// Destination address and port before the rewrite (network order).
    pub old_daddr: u32,
    pub old_dport: u16,
    pub _pad: u16,
}

pub const XDP_DNAT_MAGIC: u32 = 0xd7a7_0001;

/// [`XdpDnatMeta`] for an IPv6 packet: the old destination is 128 bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpDnat6Meta {
    /// [`XDP_DNAT6_MAGIC`] when present.
    pub magic: u32,
    /// Destination address and port before the rewrite (network order).
    pub old_daddr: [u32; 4],
    pub old_dport: u16,
    pub _pad: u16,
}

pub const XDP_DNAT6_MAGIC: u32 = 0xd7a7_0006;

/// Connection-state bits kept in [`NatEntry::state`].
pub mod ct_state {
    pub const SYN: u8 = 1;
    pub const FIN: u8 = 2;
    pub const RST: u8 = 4;
    /// A packet of the reply direction arrived.
    pub const REPLIED: u8 = 8;
    /// Not a translation: a UDP flow that a remote opened to a pod's own
    /// address (routed to the node). Its replies must leave untranslated,
    /// as conntrack-based MASQUERADE only translates what a pod originates;
    /// the entry (pod tuple -> the pod's own address and port) says so.
    pub const INBOUND: u8 = 16;
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
    /// Packets dropped by an ebpf-bandwidth rate limit (both directions).
    pub const RATE_DROPPED: u32 = 12;
    /// ebpf-firewall: packets forwarded past the host stack (bridge or
    /// uplink to their next hop).
    pub const FW_FORWARDED: u32 = 13;
    /// ebpf-firewall: packets dropped by anti-spoofing (all attachments).
    pub const FW_SPOOFED: u32 = 14;
    /// ebpf-firewall: packets dropped by rules, defaults or ingressPolicy.
    pub const FW_DROPPED: u32 = 15;
    /// New masquerade bindings that took over the port of a closed
    /// connection (RST, or FIN both ways) instead of waiting for expiry.
    pub const SNAT_PORT_REUSED: u32 = 16;
    /// New masquerade bindings that kept the pod's own source port.
    pub const SNAT_PORT_KEPT: u32 = 17;
    /// Connections of the node itself translated because a pod's binding
    /// held their tuple (netfilter does the same for local connections).
    pub const SNAT_NODE_FLOW: u32 = 18;
    /// Candidate ports passed over because a socket of the node or a
    /// hostPort uses them.
    pub const SNAT_PORT_IN_USE: u32 = 19;
    /// First fragments of datagrams translated by the masquerade or hostPort
    /// programs, remembered (NAT_FRAGS) for the fragments after them.
    pub const FRAG_FIRST: u32 = 20;
    /// Fragments after the first translated from what their first fragment
    /// left in NAT_FRAGS (addresses only: they carry no transport header).
    pub const FRAG_TRANSLATED: u32 = 21;
    /// Of SNAT_XLATE, the IPv6 packets.
    pub const SNAT6_XLATE: u32 = 22;
    /// Of SNAT_REPLY_XLATE, the IPv6 packets.
    pub const SNAT6_REPLY_XLATE: u32 = 23;
    /// ICMP and ICMPv6 errors about hostPort flows translated (both
    /// directions).
    pub const HOSTPORT_ICMP_ERROR_XLATE: u32 = 24;

    /// Names of the slots, as the agent reports them.
    pub const NAMES: [(u32, &str); 25] = [
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
        (RATE_DROPPED, "rateLimitDropped"),
        (FW_FORWARDED, "firewallForwarded"),
        (FW_SPOOFED, "firewallSpoofed"),
        (FW_DROPPED, "firewallDropped"),
        (SNAT_PORT_REUSED, "snatPortReused"),
        (SNAT_PORT_KEPT, "snatPortKept"),
        (SNAT_NODE_FLOW, "snatNodeFlows"),
        (SNAT_PORT_IN_USE, "snatPortInUse"),
        (FRAG_FIRST, "fragFirstRemembered"),
        (FRAG_TRANSLATED, "fragTranslated"),
        (SNAT6_XLATE, "snatV6Translated"),
        (SNAT6_REPLY_XLATE, "snatV6RepliesTranslated"),
        (HOSTPORT_ICMP_ERROR_XLATE, "hostPortIcmpErrorsTranslated"),
    ];
    /// Number of slots in the array (room to grow without a new layout).
    pub const COUNT: u32 = 32;
}

/// The layout of every shared type, asserted at compile time: the kernel
/// and the agent read the same bytes, and pinned maps outlive the agent
/// that created them, so a size that changes must come with a new
/// [`MAP_LAYOUT_VERSION`], never by accident.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<TrafficCounters>() == 16);
    assert!(size_of::<IpKey>() == 20);
    assert!(size_of::<MasqPolicy>() == 20);
    assert!(size_of::<UplinkConfig>() == 24);
    assert!(size_of::<CtKey>() == 40);
    assert!(size_of::<NatEntry>() == 32);
    assert!(size_of::<HostPortKey>() == 20);
    assert!(size_of::<HostPortTarget>() == 20);
    assert!(size_of::<BridgeInfo>() == 8);
    assert!(size_of::<HpReply>() == 48);
    assert!(size_of::<RateKey>() == 8);
    assert!(size_of::<RateBucket>() == 72);
    assert!(size_of::<FwAttach>() == 36);
    assert!(size_of::<FwEndpoint>() == 12);
    assert!(size_of::<FwCidrKey>() == 24);
    assert!(size_of::<FwVerdict>() == 4);
    assert!(size_of::<FwRegion>() == 12);
    assert!(size_of::<FwPortKey>() == 12);
    assert!(size_of::<FwCtKey>() == 44);
    assert!(size_of::<FwCtEntry>() == 16);
    assert!(size_of::<FwFragKey>() == 40);
    assert!(size_of::<NatFragKey>() == 40);
    assert!(size_of::<NatFragPorts>() == 16);
    assert!(size_of::<FwStats>() == 128);
    assert!(size_of::<FwRuleKey>() == 8);
    assert!(size_of::<SockRevKey>() == 32);
    assert!(size_of::<SockRevValue>() == 24);
    assert!(size_of::<XdpDnatMeta>() == 12);
    assert!(size_of::<XdpDnat6Meta>() == 24);
};

#[cfg(feature = "user")]
mod pod {
    /// `aya::Pod` for each type: the SAFETY argument is the same for all.
    macro_rules! pod {
        ($($t:ty),* $(,)?) => {$(
            // SAFETY: plain-old-data, `#[repr(C)]`, no implicit padding (the
            // sizes above are the sums of the fields), any bit pattern valid.
            unsafe impl aya::Pod for $t {}
        )*};
    }

    pod!(
        super::TrafficCounters,
        super::IpKey,
        super::MasqPolicy,
        super::UplinkConfig,
        super::CtKey,
        super::NatEntry,
        super::HostPortKey,
        super::HostPortTarget,
        super::BridgeInfo,
        super::HpReply,
        super::RateKey,
        super::RateBucket,
        super::FwAttach,
        super::FwEndpoint,
        super::FwCidrKey,
        super::FwVerdict,
        super::FwRegion,
        super::FwPortKey,
        super::FwCtKey,
        super::FwCtEntry,
        super::FwFragKey,
        super::NatFragKey,
        super::NatFragPorts,
        super::FwStats,
        super::FwRuleKey,
        super::SockRevKey,
        super::SockRevValue,
    );
}
