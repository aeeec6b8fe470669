//! Rewriting addresses and ports in place with incremental checksum
//! updates (bpf_l3_csum_replace / bpf_l4_csum_replace): no full recompute
//! over variable-length data, and the L4 helper with BPF_F_PSEUDO_HDR keeps
//! CHECKSUM_PARTIAL skbs (veth) right as well.
//!
//! A fragment after the first of a datagram (`Frag::Later`) has no
//! transport header: only its address and the IPv4 header checksum change.
//! The transport checksum, in the first fragment, covers the whole datagram
//! and is updated there (pseudo-header included). IPv6 likewise, with no
//! header checksum: a later fragment only gets its new address.
use aya_ebpf::{
    bindings::{BPF_F_MARK_ENFORCE, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    programs::TcContext,
};

use crate::{
    frag::Frag,
    parsing::{
        IcmpError, Ipv4Packet, Ipv6Packet, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IP_CSUM,
        IP_DADDR, IP_SADDR,
    },
};

// BPF_F_MARK_ENFORCE updates a zero checksum too (IPv6 UDP: zero is never
// "no checksum"); BPF_F_RECOMPUTE_CSUM (bpf_skb_store_bytes) keeps
// skb->csum (CHECKSUM_COMPLETE) in step with the bytes written.

/// Rewrites one address and one port (ICMP: the echo id) with incremental
/// checksum updates. The L4 helper with BPF_F_PSEUDO_HDR keeps the checksum
/// right for CHECKSUM_PARTIAL skbs from veths as well. A later fragment
/// gets the address only.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    pkt: &Ipv4Packet,
    addr_field: usize,
    old_addr: u32,
    new_addr: u32,
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), ()> {
    if pkt.frag == Frag::Later {
        ctx.l3_csum_replace(pkt.l3 + IP_CSUM, old_addr as u64, new_addr as u64, 4)
            .map_err(|_| ())?;
        return ctx.store(pkt.l3 + addr_field, &new_addr, 0).map_err(|_| ());
    }
    let csum_off = pkt.l4_csum_off();
    match pkt.proto {
        IPPROTO_TCP => {
            ctx.l4_csum_replace(
                csum_off,
                old_addr as u64,
                new_addr as u64,
                u64::from(BPF_F_PSEUDO_HDR) | 4,
            )
            .map_err(|_| ())?;
            ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, 2)
                .map_err(|_| ())?;
        }
        IPPROTO_UDP => {
            if pkt.l4_csum != 0 {
                let f = u64::from(BPF_F_MARK_MANGLED_0);
                ctx.l4_csum_replace(
                    csum_off,
                    old_addr as u64,
                    new_addr as u64,
                    f | u64::from(BPF_F_PSEUDO_HDR) | 4,
                )
                .map_err(|_| ())?;
                ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, f | 2)
                    .map_err(|_| ())?;
            }
        }
        _ => {
            // ICMP: no pseudo-header, only the identifier is covered.
            ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, 2)
                .map_err(|_| ())?;
        }
    }
    ctx.l3_csum_replace(pkt.l3 + IP_CSUM, old_addr as u64, new_addr as u64, 4)
        .map_err(|_| ())?;
    ctx.store(pkt.l3 + addr_field, &new_addr, 0)
        .map_err(|_| ())?;
    ctx.store(port_off, &new_port, 0).map_err(|_| ())?;
    Ok(())
}

/// HC' = ~(~HC + ~m + m') (RFC 1624) over 16-bit words as they sit in
/// memory (the ones'-complement sum does not care about byte order if all
/// words agree): for checksums no helper can update — a quoted header's
/// inside an ICMP error, or any at XDP, where there is no skb.
#[inline(always)]
pub fn csum_update(csum: u16, old: &[u16], new: &[u16]) -> u16 {
    let mut sum = u32::from(!csum);
    for w in old {
        sum += u32::from(!*w);
    }
    for w in new {
        sum += u32::from(*w);
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The two 16-bit words of a 32-bit value, in memory order.
#[inline(always)]
pub fn halves(v: u32) -> [u16; 2] {
    let b = v.to_ne_bytes();
    [
        u16::from_ne_bytes([b[0], b[1]]),
        u16::from_ne_bytes([b[2], b[3]]),
    ]
}

/// Which end of the packet quoted in an ICMP error a translation changes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Quoted {
    /// The quoted source: an error coming back about a packet whose
    /// source was translated on its way out (masquerade, hostPort reply).
    /// The outer destination changes with it.
    Source,
    /// The quoted destination: an error a pod sends about a packet whose
    /// destination was translated on its way in (hostPort DNAT). The outer
    /// source changes with it.
    Destination,
}

/// Translates an IPv4 ICMP error about a translated flow, as netfilter's
/// ICMP reply translation does, so the receiver matches it with its own
/// socket: the quoted packet's address and port on `side` become
/// `new_addr`/`new_port`, and so does the outer address on the other side
/// (the error travels against the packet it quotes).
///
/// Checksums: the quoted IPv4 header's; the quoted transport checksum when
/// the quote holds it (TCP only when the whole header is quoted, UDP unless
/// 0 for "none", an echo's for its identifier), with the pseudo-header
/// change for TCP and UDP; the ICMP checksum, which has no pseudo-header
/// and covers all those bytes, gets every change, so the message's sum —
/// and skb->csum of a CHECKSUM_COMPLETE packet — stays right; the outer
/// header's for its address.
#[inline(always)]
pub fn rewrite_icmp_error(
    ctx: &TcContext,
    outer: &Ipv4Packet,
    inner: &IcmpError,
    side: Quoted,
    new_addr: u32,
    new_port: u16,
) -> Result<(), ()> {
    let (field, old_addr, port_off, old_port, outer_field, old_outer) = match side {
        Quoted::Source => (
            IP_SADDR,
            inner.saddr,
            inner.sport_off(),
            inner.sport,
            IP_DADDR,
            outer.daddr,
        ),
        Quoted::Destination => (
            IP_DADDR,
            inner.daddr,
            inner.dport_off(),
            inner.dport,
            IP_SADDR,
            outer.saddr,
        ),
    };
    let icmp_csum = outer.l4 + 2;
    quoted_l4_csum(
        ctx,
        outer,
        inner,
        (old_addr, new_addr),
        (old_port, new_port),
    )?;

    let inner_csum_off = inner.l3 + IP_CSUM;
    let old_inner_csum: u16 = ctx.load(inner_csum_off).map_err(|_| ())?;
    ctx.l3_csum_replace(inner_csum_off, old_addr as u64, new_addr as u64, 4)
        .map_err(|_| ())?;
    let new_inner_csum: u16 = ctx.load(inner_csum_off).map_err(|_| ())?;
    ctx.l4_csum_replace(icmp_csum, old_addr as u64, new_addr as u64, 4)
        .map_err(|_| ())?;
    ctx.l4_csum_replace(icmp_csum, old_inner_csum as u64, new_inner_csum as u64, 2)
        .map_err(|_| ())?;
    ctx.l4_csum_replace(icmp_csum, old_port as u64, new_port as u64, 2)
        .map_err(|_| ())?;
    ctx.store(inner.l3 + field, &new_addr, 0).map_err(|_| ())?;
    ctx.store(port_off, &new_port, 0).map_err(|_| ())?;

    ctx.l3_csum_replace(outer.l3 + IP_CSUM, old_outer as u64, new_addr as u64, 4)
        .map_err(|_| ())?;
    ctx.store(outer.l3 + outer_field, &new_addr, 0)
        .map_err(|_| ())
}

/// The quoted transport checksum of `rewrite_icmp_error`, computed here
/// (the helpers only update the checksum of the packet itself) and its
/// change added to the ICMP checksum. Nothing when the quote ends before
/// the field (an error need only quote 8 bytes of TCP) or a UDP checksum
/// is 0; a UDP result of 0 is written as 0xffff.
#[inline(always)]
fn quoted_l4_csum(
    ctx: &TcContext,
    outer: &Ipv4Packet,
    inner: &IcmpError,
    addr: (u32, u32),
    port: (u16, u16),
) -> Result<(), ()> {
    let off = inner.l4
        + match inner.proto {
            IPPROTO_TCP => 16,
            IPPROTO_UDP => 6,
            _ => 2,
        };
    // Within the outer datagram, not just the frame (Ethernet padding).
    let total: u16 = ctx.load(outer.l3 + 2).map_err(|_| ())?;
    if off + 2 > outer.l3 + usize::from(u16::from_be(total)) {
        return Ok(());
    }
    let Ok(old) = ctx.load::<u16>(off) else {
        return Ok(());
    };
    if inner.proto == IPPROTO_UDP && old == 0 {
        return Ok(());
    }
    let (a, b) = (halves(addr.0), halves(addr.1));
    let mut new = if inner.proto == IPPROTO_ICMP {
        csum_update(old, &[port.0], &[port.1])
    } else {
        csum_update(old, &[a[0], a[1], port.0], &[b[0], b[1], port.1])
    };
    if new == 0 && inner.proto == IPPROTO_UDP {
        new = 0xffff;
    }
    ctx.store(off, &new, 0).map_err(|_| ())?;
    ctx.l4_csum_replace(outer.l4 + 2, old as u64, new as u64, 2)
        .map_err(|_| ())
}

/// Updates only the transport checksum for an address and port that were
/// already rewritten elsewhere (by the XDP program, which cannot do it
/// right for partial checksums).
#[inline(always)]
pub fn fix_l4_csum(
    ctx: &TcContext,
    pkt: &Ipv4Packet,
    old_addr: u32,
    new_addr: u32,
    old_port: u16,
    new_port: u16,
) -> Result<(), ()> {
    if pkt.frag == Frag::Later {
        return Ok(());
    }
    let csum_off = pkt.l4_csum_off();
    let mangled = if pkt.proto == IPPROTO_UDP {
        if pkt.l4_csum == 0 {
            return Ok(());
        }
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    ctx.l4_csum_replace(
        csum_off,
        old_addr as u64,
        new_addr as u64,
        mangled | u64::from(BPF_F_PSEUDO_HDR) | 4,
    )
    .map_err(|_| ())?;
    ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, mangled | 2)
        .map_err(|_| ())
}

/// Updates the transport checksum at `csum_off` for a 128-bit value that
/// changes from `old` to `new`, one 32-bit word at a time. `flags` carries
/// BPF_F_PSEUDO_HDR when the value is an address of the pseudo-header.
#[inline(always)]
pub fn csum_replace_128(
    ctx: &TcContext,
    csum_off: usize,
    old: &[u32; 4],
    new: &[u32; 4],
    flags: u64,
) -> Result<(), ()> {
    // Unconditional: an unchanged word is a no-op for the helper, and a
    // branch per word would multiply the paths the verifier walks.
    for i in 0..4 {
        ctx.l4_csum_replace(csum_off, old[i] as u64, new[i] as u64, flags | 4)
            .map_err(|_| ())?;
    }
    Ok(())
}

/// IPv6: rewrites one address (the field at `addr_off`) and one port (ICMPv6:
/// the echo id) with incremental checksum updates. IPv6 has no header
/// checksum, so the address only moves the transport checksum, through the
/// pseudo-header — for ICMPv6 too, unlike ICMPv4. UDP over IPv6 must never
/// carry a zero checksum: a result of zero is written as 0xffff, and a zero
/// found (invalid anyway) is updated like any other value.
///
/// skb->csum (CHECKSUM_COMPLETE, received packets) covers the address bytes
/// and the checksum field: the pseudo-header update accounts for the field,
/// and the address store with BPF_F_RECOMPUTE_CSUM for the address, so
/// both changes are accounted for (without an IPv4 header checksum
/// absorbing the address change, a plain store would leave skb->csum off).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn rewrite6(
    ctx: &TcContext,
    pkt: &Ipv6Packet,
    addr_off: usize,
    old_addr: &[u32; 4],
    new_addr: &[u32; 4],
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), ()> {
    // A later fragment: no transport header, and no checksum covers the
    // address here (the first fragment's took the pseudo-header change).
    if pkt.frag == Frag::Later {
        return ctx
            .store(addr_off, new_addr, u64::from(BPF_F_RECOMPUTE_CSUM))
            .map_err(|_| ());
    }
    let csum_off = pkt.l4_csum_off();
    let mangled = if pkt.proto == IPPROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0) | u64::from(BPF_F_MARK_ENFORCE)
    } else {
        0
    };
    csum_replace_128(
        ctx,
        csum_off,
        old_addr,
        new_addr,
        mangled | u64::from(BPF_F_PSEUDO_HDR),
    )?;
    if old_port != new_port {
        ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, mangled | 2)
            .map_err(|_| ())?;
        ctx.store(port_off, &new_port, 0).map_err(|_| ())?;
    }
    ctx.store(addr_off, new_addr, u64::from(BPF_F_RECOMPUTE_CSUM))
        .map_err(|_| ())
}

/// IPv6: updates only the transport checksum for a destination address and
/// port the XDP program already rewrote (it cannot tell a partial checksum
/// from a complete one; the helper here can). UDP as in `rewrite6`: zero is
/// never written.
#[inline(always)]
pub fn fix_l4_csum6(
    ctx: &TcContext,
    pkt: &Ipv6Packet,
    old_addr: &[u32; 4],
    new_addr: &[u32; 4],
    old_port: u16,
    new_port: u16,
) -> Result<(), ()> {
    if pkt.frag == Frag::Later {
        return Ok(());
    }
    let csum_off = pkt.l4_csum_off();
    let mangled = if pkt.proto == IPPROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0) | u64::from(BPF_F_MARK_ENFORCE)
    } else {
        0
    };
    csum_replace_128(
        ctx,
        csum_off,
        old_addr,
        new_addr,
        mangled | u64::from(BPF_F_PSEUDO_HDR),
    )?;
    ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, mangled | 2)
        .map_err(|_| ())
}
