//! Header parsing: just enough of Ethernet, IPv4, IPv6, TCP, UDP, ICMP and
//! ICMPv6 to find a connection tuple and the offsets the rewriters need. A
//! fragment after the first (IPv4, and IPv6 behind its Fragment header)
//! gets the ports of its first fragment from `frag`.
//!
//! The one parser of every program, TC and XDP alike: it reads through
//! [`Packet`], which TC implements with bpf_skb_load_bytes (bounds checked
//! by the helper, so variable offsets such as IPv4 options stay
//! verifier-friendly) and XDP with a bounds-checked direct read.
use aya_ebpf::programs::{TcContext, XdpContext};

use cni_ebpf_common::{FAMILY_V4, FAMILY_V6};

use crate::frag::{self, Frag};

// Packet-format and socket-API values the kernel defines outside the BPF
// UAPI, so `aya_ebpf::bindings` does not have them; every program takes
// them from here. (TC_ACT_*, BPF_* flags and BPF_FIB_LKUP_RET_* come from
// `aya_ebpf::bindings`.)

pub const ETH_HLEN: usize = 14;
/// Offset of the EtherType in the Ethernet header.
pub const ETH_PROTO: usize = 12;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;

/// Address families (bpf_fib_lookup, bpf_redirect_neigh).
pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;
/// Socket types (bpf_sock_addr.type).
pub const SOCK_STREAM: u32 = 1;
pub const SOCK_DGRAM: u32 = 2;

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_ICMPV6: u8 = 58;

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROB: u8 = 12;

pub const ICMP6_DEST_UNREACH: u8 = 1;
pub const ICMP6_PACKET_TOO_BIG: u8 = 2;
pub const ICMP6_TIME_EXCEEDED: u8 = 3;
pub const ICMP6_PARAM_PROBLEM: u8 = 4;
pub const ICMP6_ECHO_REQUEST: u8 = 128;
pub const ICMP6_ECHO_REPLY: u8 = 129;

/// Offsets of IPv4 header fields, relative to the start of the IP header.
pub const IP_TOS: usize = 1;
pub const IP_ID: usize = 4;
pub const IP_FRAG_OFF: usize = 6;
pub const IP_TTL: usize = 8;
pub const IP_PROTO: usize = 9;
pub const IP_CSUM: usize = 10;
pub const IP_SADDR: usize = 12;
pub const IP_DADDR: usize = 16;

/// Length of the fixed IPv6 header, and offsets of its fields relative to
/// its start.
pub const IP6_HLEN: usize = 40;
pub const IP6_NEXTHDR: usize = 6;
pub const IP6_HOPLIMIT: usize = 7;
pub const IP6_SADDR: usize = 8;
pub const IP6_DADDR: usize = 24;

pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
pub const TCP_FLAG_ACK: u8 = 0x10;

/// Bounds-checked reads from the frame a program runs on.
pub trait Packet {
    /// The `T` at byte `off` of the frame, or `None` past its end.
    fn read<T>(&self, off: usize) -> Option<T>;
}

impl Packet for TcContext {
    #[inline(always)]
    fn read<T>(&self, off: usize) -> Option<T> {
        self.load(off).ok()
    }
}

impl Packet for XdpContext {
    #[inline(always)]
    fn read<T>(&self, off: usize) -> Option<T> {
        ptr_at::<T>(self, off).map(|p| {
            // SAFETY: `ptr_at` checked that the whole `T` lies inside the
            // packet; packet data has no alignment guarantee.
            unsafe { core::ptr::read_unaligned(p) }
        })
    }
}

/// A pointer to the `T` at byte `off` of an XDP frame, checked against
/// its end (for reads, and for writes after a helper moved the data).
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// The EtherType of the frame (host order).
#[inline(always)]
pub fn ethertype<C: Packet>(ctx: &C) -> Option<u16> {
    Some(u16::from_be(ctx.read::<u16>(ETH_PROTO)?))
}

/// fe80::/10, network order.
#[inline(always)]
pub fn is_link_local6(addr: &[u32; 4]) -> bool {
    u32::from_be(addr[0]) >> 22 == 0x3fa
}

/// The fields of an IPv4 header (at least 20 bytes) every parser reads.
pub struct Ipv4Header {
    /// Offset of what follows the header (options included).
    pub l4: usize,
    pub proto: u8,
    /// Addresses in network byte order.
    pub saddr: u32,
    pub daddr: u32,
    /// IP identification (network order).
    pub id: u16,
    pub frag: Frag,
}

/// Reads the IPv4 header at `l3`; `None` if it is not one (version, IHL).
#[inline(always)]
pub fn ipv4_header<C: Packet>(ctx: &C, l3: usize) -> Option<Ipv4Header> {
    let vihl: u8 = ctx.read(l3)?;
    if vihl >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(vihl & 0x0f) * 4;
    if ihl < 20 {
        return None;
    }
    let frag = frag::position(u16::from_be(ctx.read::<u16>(l3 + IP_FRAG_OFF)?));
    let id: u16 = ctx.read(l3 + IP_ID)?;
    let proto: u8 = ctx.read(l3 + IP_PROTO)?;
    let saddr: u32 = ctx.read(l3 + IP_SADDR)?;
    let daddr: u32 = ctx.read(l3 + IP_DADDR)?;
    Some(Ipv4Header {
        l4: l3 + ihl,
        proto,
        saddr,
        daddr,
        id,
        frag,
    })
}

/// An IPv4 packet with a transport header we can translate.
pub struct Ipv4Packet {
    /// Offset of the IPv4 header in the skb.
    pub l3: usize,
    /// Offset of the transport header in the skb.
    pub l4: usize,
    pub proto: u8,
    /// Addresses in network byte order.
    pub saddr: u32,
    pub daddr: u32,
    /// Ports (network byte order); for ICMP echo, `sport` = `dport` = id.
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte (0 for other protocols).
    pub tcp_flags: u8,
    /// ICMP type (0 for other protocols).
    pub icmp_type: u8,
    /// The transport checksum as found (UDP uses 0 for "none").
    pub l4_csum: u16,
    /// Fragment position. A `Frag::Later` packet has no transport header:
    /// its ports and ICMP type are its first fragment's (`frag::recall`),
    /// `l4` points at payload, and only its addresses may be rewritten.
    pub frag: Frag,
    /// IP identification (network order).
    pub id: u16,
}

impl Ipv4Packet {
    /// Offset of the transport checksum field in the skb.
    pub fn l4_csum_off(&self) -> usize {
        self.l4
            + match self.proto {
                IPPROTO_TCP => 16,
                IPPROTO_UDP => 6,
                _ => 2,
            }
    }
    /// Offset of the source port (ICMP: the echo identifier).
    pub fn sport_off(&self) -> usize {
        self.l4 + if self.proto == IPPROTO_ICMP { 4 } else { 0 }
    }
    /// Offset of the destination port (ICMP: the echo identifier).
    pub fn dport_off(&self) -> usize {
        self.l4 + if self.proto == IPPROTO_ICMP { 4 } else { 2 }
    }
}

/// Parses an Ethernet frame carrying IPv4 TCP, UDP or ICMP echo. Returns
/// `None` for anything else, including a fragment after the first whose
/// first fragment no NAT program translated with these addresses (or that
/// overtook it): without its ports there is nothing to match it with.
#[inline(always)]
pub fn parse_ipv4<C: Packet>(ctx: &C) -> Option<Ipv4Packet> {
    if ethertype(ctx)? != ETH_P_IP {
        return None;
    }
    let l3 = ETH_HLEN;
    let Ipv4Header {
        l4,
        proto,
        saddr,
        daddr,
        id,
        frag,
    } = ipv4_header(ctx, l3)?;
    let mut pkt = Ipv4Packet {
        l3,
        l4,
        proto,
        saddr,
        daddr,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        icmp_type: 0,
        l4_csum: 0,
        frag,
        id,
    };
    if frag == Frag::Later {
        let first = frag::recall(saddr, daddr, id, proto)?;
        pkt.sport = first.sport;
        pkt.dport = first.dport;
        pkt.icmp_type = first.icmp_type;
        return Some(pkt);
    }
    match proto {
        IPPROTO_TCP => {
            pkt.sport = ctx.read(l4)?;
            pkt.dport = ctx.read(l4 + 2)?;
            pkt.tcp_flags = ctx.read(l4 + 13)?;
        }
        IPPROTO_UDP => {
            pkt.sport = ctx.read(l4)?;
            pkt.dport = ctx.read(l4 + 2)?;
            pkt.l4_csum = ctx.read(l4 + 6)?;
        }
        IPPROTO_ICMP => {
            pkt.icmp_type = ctx.read(l4)?;
            // Echo carries the identifier that stands in for a port; errors
            // carry the offending packet's header (see `IcmpError`).
            if pkt.icmp_type == ICMP_ECHO_REQUEST || pkt.icmp_type == ICMP_ECHO_REPLY {
                let id: u16 = ctx.read(l4 + 4)?;
                pkt.sport = id;
                pkt.dport = id;
            } else if pkt.icmp_type != ICMP_DEST_UNREACH && pkt.icmp_type != ICMP_TIME_EXCEEDED {
                return None;
            }
        }
        _ => return None,
    }
    Some(pkt)
}

/// The packet quoted inside an ICMP error (destination unreachable, e.g.
/// fragmentation needed, or time exceeded): its IPv4 header and the first
/// bytes of its transport header.
pub struct IcmpError {
    /// Offset of the quoted IPv4 header.
    pub l3: usize,
    /// Offset of the quoted transport header.
    pub l4: usize,
    pub proto: u8,
    pub saddr: u32,
    pub daddr: u32,
    /// Quoted ports (network byte order); ICMP echo: both are the id.
    pub sport: u16,
    pub dport: u16,
}

impl IcmpError {
    /// Offset of the quoted source port (ICMP echo: the identifier).
    pub fn sport_off(&self) -> usize {
        self.l4 + if self.proto == IPPROTO_ICMP { 4 } else { 0 }
    }
    /// Offset of the quoted destination port (ICMP echo: the identifier).
    pub fn dport_off(&self) -> usize {
        self.l4 + if self.proto == IPPROTO_ICMP { 4 } else { 2 }
    }
}

/// Whether `pkt` is an ICMP error whose quoted header we can read: not a
/// fragment after the first (an error quotes a header right after its
/// own, which such a fragment does not have).
#[inline(always)]
pub fn is_icmp_error(pkt: &Ipv4Packet) -> bool {
    pkt.proto == IPPROTO_ICMP
        && pkt.frag != Frag::Later
        && (pkt.icmp_type == ICMP_DEST_UNREACH || pkt.icmp_type == ICMP_TIME_EXCEEDED)
}

/// Parses the packet quoted by the ICMP error `outer`.
#[inline(always)]
pub fn parse_icmp_error<C: Packet>(ctx: &C, outer: &Ipv4Packet) -> Option<IcmpError> {
    let l3 = outer.l4 + 8;
    let h = ipv4_header(ctx, l3)?;
    // A quoted fragment after the first has payload where ports would be.
    if h.frag == Frag::Later {
        return None;
    }
    let (proto, saddr, daddr, l4) = (h.proto, h.saddr, h.daddr, h.l4);
    let (sport, dport) = quoted_ports(ctx, proto, l4, IPPROTO_ICMP)??;
    Some(IcmpError {
        l3,
        l4,
        proto,
        saddr,
        daddr,
        sport,
        dport,
    })
}

/// An IPv6 packet with a transport header we can translate, right behind
/// the fixed header or behind a Fragment header there. Its IPv6 header
/// sits right after Ethernet.
pub struct Ipv6Packet {
    /// Offset of the transport header in the skb.
    pub l4: usize,
    pub proto: u8,
    /// Addresses as they sit in the packet (network byte order words).
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    /// Ports (network byte order); for ICMPv6 echo, `sport` = `dport` = id.
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte (0 for other protocols).
    pub tcp_flags: u8,
    /// ICMPv6 type (0 for other protocols).
    pub icmp_type: u8,
    /// Fragment position (Fragment header). A `Frag::Later` packet has no
    /// transport header: its ports and ICMPv6 type are its first
    /// fragment's (`frag::recall6`), and only its addresses may be
    /// rewritten.
    /// A first fragment is `Frag::None` here, as a whole packet:
    /// `frag::translated6` finds its Fragment header again.
    pub frag: Frag,
}

impl Ipv6Packet {
    /// Offset of the transport checksum field in the skb.
    pub fn l4_csum_off(&self) -> usize {
        self.l4
            + match self.proto {
                IPPROTO_TCP => 16,
                IPPROTO_UDP => 6,
                _ => 2,
            }
    }
    /// Offset of the source port (ICMPv6: the echo identifier).
    pub fn sport_off(&self) -> usize {
        self.l4 + if self.proto == IPPROTO_ICMPV6 { 4 } else { 0 }
    }
    /// Offset of the destination port (ICMPv6: the echo identifier).
    pub fn dport_off(&self) -> usize {
        self.l4 + if self.proto == IPPROTO_ICMPV6 { 4 } else { 2 }
    }
}

/// Whether an ICMPv6 type is an error that quotes the offending packet.
#[inline(always)]
pub fn is_icmp6_error(t: u8) -> bool {
    t == ICMP6_DEST_UNREACH
        || t == ICMP6_PACKET_TOO_BIG
        || t == ICMP6_TIME_EXCEEDED
        || t == ICMP6_PARAM_PROBLEM
}

/// Where [`ext_headers6`] found the upper-layer header.
pub struct Ext6 {
    /// The upper-layer protocol (a Fragment header's next header).
    pub proto: u8,
    /// Offset of the upper-layer header (a later fragment: of its data).
    pub l4: usize,
    /// Offset of the Fragment header, 0 if there is none.
    pub frag_hdr: usize,
}

/// Finds the upper-layer header of the IPv6 packet right after Ethernet:
/// right behind the fixed header, or behind a Fragment header there (as a
/// fragmenting sender puts it, with no other extension header). Other
/// extension headers are not followed: a loop over variable-length
/// headers multiplied the paths the verifier walks in snat6_egress (from
/// about 245k to 880k instructions of its 1M), so they pass untranslated.
/// Nothing behind a Fragment header is followed either: a later fragment
/// has no headers there, and every fragment of a datagram must name the
/// same protocol for `frag`'s key.
#[inline(always)]
pub fn ext_headers6<C: Packet>(ctx: &C) -> Option<Ext6> {
    let proto: u8 = ctx.read(ETH_HLEN + IP6_NEXTHDR)?;
    let l4 = ETH_HLEN + IP6_HLEN;
    if proto != IPPROTO_FRAGMENT {
        return Some(Ext6 {
            proto,
            l4,
            frag_hdr: 0,
        });
    }
    // Next header, reserved, offset/flags, identification.
    Some(Ext6 {
        proto: ctx.read(l4)?,
        l4: l4 + 8,
        frag_hdr: l4,
    })
}

/// Parses an Ethernet frame carrying IPv6 with TCP, UDP, ICMPv6 echo or an
/// ICMPv6 error, right behind the fixed header or a Fragment header
/// (`ext_headers6`). A fragment after the first gets its first fragment's
/// ports, if a NAT program translated that one with these addresses
/// (`frag::recall6`). Returns `None` for anything else: other ICMPv6
/// (neighbour discovery, MLD, ...), other extension headers, a fragment
/// whose first fragment was not translated here. Those pass untranslated.
#[inline(always)]
pub fn parse_ipv6<C: Packet>(ctx: &C) -> Option<Ipv6Packet> {
    if ethertype(ctx)? != ETH_P_IPV6 {
        return None;
    }
    let l3 = ETH_HLEN;
    let v: u8 = ctx.read(l3)?;
    if v >> 4 != 6 {
        return None;
    }
    let w = ext_headers6(ctx)?;
    let (proto, l4) = (w.proto, w.l4);
    // A first fragment is parsed as a whole packet (`Frag::None`): a
    // constant that differed between the two would make the verifier walk
    // everything after this twice; `frag::translated6` tells them apart.
    let mut frag = Frag::None;
    let mut id = 0u32;
    if w.frag_hdr != 0 {
        let off_m = u16::from_be(ctx.read::<u16>(w.frag_hdr + 2)?);
        if frag::position6(off_m) == Frag::Later {
            frag = Frag::Later;
            id = ctx.read(w.frag_hdr + 4)?;
        }
    }
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_ICMPV6 {
        return None;
    }
    let saddr: [u32; 4] = ctx.read(l3 + IP6_SADDR)?;
    let daddr: [u32; 4] = ctx.read(l3 + IP6_DADDR)?;
    let mut pkt = Ipv6Packet {
        l4,
        proto,
        saddr,
        daddr,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        icmp_type: 0,
        frag,
    };
    if frag == Frag::Later {
        let first = frag::recall6(&pkt.saddr, &pkt.daddr, id, proto)?;
        pkt.sport = first.sport;
        pkt.dport = first.dport;
        pkt.icmp_type = first.icmp_type;
        return Some(pkt);
    }
    match proto {
        IPPROTO_TCP => {
            pkt.sport = ctx.read(l4)?;
            pkt.dport = ctx.read(l4 + 2)?;
            pkt.tcp_flags = ctx.read(l4 + 13)?;
        }
        IPPROTO_UDP => {
            pkt.sport = ctx.read(l4)?;
            pkt.dport = ctx.read(l4 + 2)?;
        }
        _ => {
            pkt.icmp_type = ctx.read(l4)?;
            if pkt.icmp_type == ICMP6_ECHO_REQUEST || pkt.icmp_type == ICMP6_ECHO_REPLY {
                let id: u16 = ctx.read(l4 + 4)?;
                pkt.sport = id;
                pkt.dport = id;
            } else if !is_icmp6_error(pkt.icmp_type) {
                return None;
            }
        }
    }
    Some(pkt)
}

/// The packet quoted inside an ICMPv6 error: its IPv6 header and the first
/// bytes of its transport header (the error quotes as much of the packet as
/// fits in the minimum MTU, so the ports are always there).
pub struct Icmp6Error {
    /// Offset of the quoted IPv6 header.
    pub l3: usize,
    /// Offset of the quoted transport header.
    pub l4: usize,
    pub proto: u8,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    /// Quoted ports (network byte order); ICMPv6 echo: both are the id.
    pub sport: u16,
    pub dport: u16,
}

impl Icmp6Error {
    /// Offset of the quoted source port (ICMPv6 echo: the identifier).
    pub fn sport_off(&self) -> usize {
        self.l4 + if self.proto == IPPROTO_ICMPV6 { 4 } else { 0 }
    }
}

/// Parses the packet quoted by the ICMPv6 error `outer`. A quoted packet
/// with an extension header (a fragment, above all) is not parsed.
#[inline(always)]
pub fn parse_icmp6_error<C: Packet>(ctx: &C, outer: &Ipv6Packet) -> Option<Icmp6Error> {
    let l3 = outer.l4 + 8;
    let v: u8 = ctx.read(l3)?;
    if v >> 4 != 6 {
        return None;
    }
    let proto: u8 = ctx.read(l3 + IP6_NEXTHDR)?;
    let saddr: [u32; 4] = ctx.read(l3 + IP6_SADDR)?;
    let daddr: [u32; 4] = ctx.read(l3 + IP6_DADDR)?;
    let l4 = l3 + IP6_HLEN;
    let (sport, dport) = quoted_ports(ctx, proto, l4, IPPROTO_ICMPV6)??;
    Some(Icmp6Error {
        l3,
        l4,
        proto,
        saddr,
        daddr,
        sport,
        dport,
    })
}

/// The header after an IPv6 hop-by-hop options header at `l4` (its
/// protocol and offset), or `proto` and `l4` themselves if `proto` is not
/// one: the firewall and anti-spoofing follow this one extension header.
#[inline(always)]
pub fn skip_hop_by_hop<C: Packet>(ctx: &C, proto: u8, l4: usize) -> Option<(u8, usize)> {
    if proto != IPPROTO_HOPOPTS {
        return Some((proto, l4));
    }
    let h: [u8; 2] = ctx.read(l4)?;
    Some((h[0], l4 + (usize::from(h[1]) + 1) * 8))
}

/// The ports of a quoted transport header at `l4`: TCP or UDP ports, the
/// identifier of an echo of protocol `echo` (ICMP or ICMPv6) for both;
/// `Some(None)` for other protocols, `None` if the quote is cut short.
#[inline(always)]
fn quoted_ports<C: Packet>(ctx: &C, proto: u8, l4: usize, echo: u8) -> Option<Option<(u16, u16)>> {
    if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
        return Some(Some((ctx.read(l4)?, ctx.read(l4 + 2)?)));
    }
    if proto == echo {
        let id: u16 = ctx.read(l4 + 4)?;
        return Some(Some((id, id)));
    }
    Some(None)
}

/// An IP packet as the firewall sees it: any protocol; ports for TCP
/// and UDP, the identifier for ICMP(v6) echo, nothing for the rest.
/// Addresses in network order, an IPv4 address in the first word.
pub struct Flow {
    pub l4: usize,
    pub family: u8,
    pub proto: u8,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    /// Network order.
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub icmp_error: bool,
    pub frag: Frag,
    /// IP identification (network order; IPv6: its low 16 bits), for
    /// fragments.
    pub id: u16,
    /// ICMPv6 neighbour, router or multicast listener discovery.
    pub ndp: bool,
}

#[inline(always)]
pub fn parse_flow<C: Packet>(ctx: &C) -> Option<Flow> {
    let h = ipv4_header(ctx, ETH_HLEN)?;
    let mut f = Flow {
        l4: h.l4,
        family: FAMILY_V4,
        proto: h.proto,
        saddr: [h.saddr, 0, 0, 0],
        daddr: [h.daddr, 0, 0, 0],
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        icmp_error: false,
        frag: h.frag,
        id: h.id,
        ndp: false,
    };
    if h.frag == Frag::Later {
        return Some(f);
    }
    flow_ports(ctx, &mut f)?;
    Some(f)
}

/// The IPv6 counterpart of [`parse_flow`]: the fixed header, at most a
/// hop-by-hop options header and then at most a fragment header before the
/// transport header.
#[inline(always)]
pub fn parse_flow6<C: Packet>(ctx: &C) -> Option<Flow> {
    let l3 = ETH_HLEN;
    let vtc: u8 = ctx.read(l3)?;
    if vtc >> 4 != 6 {
        return None;
    }
    let mut f = Flow {
        l4: l3 + IP6_HLEN,
        family: FAMILY_V6,
        proto: ctx.read(l3 + IP6_NEXTHDR)?,
        saddr: ctx.read(l3 + IP6_SADDR)?,
        daddr: ctx.read(l3 + IP6_DADDR)?,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        icmp_error: false,
        frag: Frag::None,
        id: 0,
        ndp: false,
    };
    // Every MLD message carries one (a router alert).
    (f.proto, f.l4) = skip_hop_by_hop(ctx, f.proto, f.l4)?;
    if f.proto == IPPROTO_FRAGMENT {
        let off_m = u16::from_be(ctx.read::<u16>(f.l4 + 2)?);
        f.proto = ctx.read(f.l4)?;
        // The low half of the 32-bit identification, network order.
        f.id = ctx.read(f.l4 + 6)?;
        f.l4 += 8;
        f.frag = frag::position6(off_m);
        if f.frag == Frag::Later {
            return Some(f);
        }
    }
    flow_ports(ctx, &mut f)?;
    Some(f)
}

/// Ports (or echo identifier) and flags of a first fragment or whole
/// packet.
#[inline(always)]
fn flow_ports<C: Packet>(ctx: &C, f: &mut Flow) -> Option<()> {
    match f.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            f.sport = ctx.read(f.l4)?;
            f.dport = ctx.read(f.l4 + 2)?;
            if f.proto == IPPROTO_TCP {
                f.tcp_flags = ctx.read(f.l4 + 13)?;
            }
        }
        IPPROTO_ICMP => {
            let t: u8 = ctx.read(f.l4)?;
            if t == ICMP_ECHO_REQUEST || t == ICMP_ECHO_REPLY {
                let id: u16 = ctx.read(f.l4 + 4)?;
                f.sport = id;
                f.dport = id;
            } else {
                f.icmp_error =
                    t == ICMP_DEST_UNREACH || t == ICMP_TIME_EXCEEDED || t == ICMP_PARAMETER_PROB;
            }
        }
        IPPROTO_ICMPV6 => {
            let t: u8 = ctx.read(f.l4)?;
            if t == ICMP6_ECHO_REQUEST || t == ICMP6_ECHO_REPLY {
                let id: u16 = ctx.read(f.l4 + 4)?;
                f.sport = id;
                f.dport = id;
            } else {
                // Destination unreachable, packet too big, time
                // exceeded, parameter problem.
                f.icmp_error = (1..=ICMP6_PARAM_PROBLEM).contains(&t);
                // Neighbour and router discovery, and multicast listener
                // discovery (queries, reports, done, v2 reports), which
                // a snooping bridge needs to deliver solicited-node
                // multicast: link-scoped control the link needs.
                f.ndp = (130..=137).contains(&t) || t == 143;
            }
        }
        _ => {}
    }
    Some(())
}

/// The connection an ICMP(v6) error (`f`) quotes, as the firewall keys it.
pub struct QuotedFlow {
    pub proto: u8,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
}

/// Reads the packet quoted by the ICMP(v6) error `f`: 8 bytes into the
/// message, no IPv6 extension headers followed in it; ports for TCP and
/// UDP, the identifier for echo, none (0) for other protocols.
#[inline(always)]
pub fn quoted_flow<C: Packet>(ctx: &C, f: &Flow) -> Option<QuotedFlow> {
    let l3 = f.l4 + 8;
    let (proto, saddr, daddr, l4, echo) = if f.family == FAMILY_V6 {
        let proto: u8 = ctx.read(l3 + IP6_NEXTHDR)?;
        let saddr: [u32; 4] = ctx.read(l3 + IP6_SADDR)?;
        let daddr: [u32; 4] = ctx.read(l3 + IP6_DADDR)?;
        (proto, saddr, daddr, l3 + IP6_HLEN, IPPROTO_ICMPV6)
    } else {
        let vihl: u8 = ctx.read(l3)?;
        if vihl >> 4 != 4 {
            return None;
        }
        let proto: u8 = ctx.read(l3 + IP_PROTO)?;
        let saddr: u32 = ctx.read(l3 + IP_SADDR)?;
        let daddr: u32 = ctx.read(l3 + IP_DADDR)?;
        let l4 = l3 + usize::from(vihl & 0x0f) * 4;
        (proto, [saddr, 0, 0, 0], [daddr, 0, 0, 0], l4, IPPROTO_ICMP)
    };
    let (sport, dport) = quoted_ports(ctx, proto, l4, echo)?.unwrap_or((0, 0));
    Some(QuotedFlow {
        proto,
        saddr,
        daddr,
        sport,
        dport,
    })
}

/// The IPv4 header fields routing needs (`forward`).
pub struct Route {
    pub saddr: u32,
    pub daddr: u32,
    pub proto: u8,
    pub tos: u8,
    /// TTL and protocol as the 16-bit word the checksum covers.
    pub ttl_proto: u16,
    pub ttl: u8,
}

/// Reads what routing an IPv4 frame needs; any protocol, options or not.
#[inline(always)]
pub fn parse_route<C: Packet>(ctx: &C) -> Option<Route> {
    if ethertype(ctx)? != ETH_P_IP {
        return None;
    }
    let l3 = ETH_HLEN;
    let vihl: u8 = ctx.read(l3)?;
    if vihl >> 4 != 4 {
        return None;
    }
    let ttl_proto: u16 = ctx.read(l3 + IP_TTL)?;
    let [ttl, proto] = ttl_proto.to_ne_bytes();
    Some(Route {
        saddr: ctx.read(l3 + IP_SADDR)?,
        daddr: ctx.read(l3 + IP_DADDR)?,
        proto,
        tos: ctx.read(l3 + IP_TOS)?,
        ttl_proto,
        ttl,
    })
}

/// The IPv6 header fields routing needs (addresses in network order).
pub struct Route6 {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub proto: u8,
    pub hop_limit: u8,
    /// Version, traffic class and flow label, network order.
    pub flowinfo: u32,
}

/// [`parse_route`] for IPv6. Link-local and multicast destinations, which
/// are not routed, are `None`.
#[inline(always)]
pub fn parse_route6<C: Packet>(ctx: &C) -> Option<Route6> {
    if ethertype(ctx)? != ETH_P_IPV6 {
        return None;
    }
    let l3 = ETH_HLEN;
    let flowinfo: u32 = ctx.read(l3)?;
    if u32::from_be(flowinfo) >> 28 != 6 {
        return None;
    }
    let r = Route6 {
        saddr: ctx.read(l3 + IP6_SADDR)?,
        daddr: ctx.read(l3 + IP6_DADDR)?,
        proto: ctx.read(l3 + IP6_NEXTHDR)?,
        hop_limit: ctx.read(l3 + IP6_HOPLIMIT)?,
        flowinfo,
    };
    if is_link_local6(&r.daddr) || u32::from_be(r.daddr[0]) >> 24 == 0xff {
        return None;
    }
    Some(r)
}
