//! hostPort DNAT at XDP on the uplink: the lookup and the rewrite of the
//! destination happen here, before an skb exists; the IPv4 header checksum
//! is updated incrementally (RFC 1624). The transport checksum is not: XDP
//! cannot tell whether the frame carries a complete checksum (from a wire)
//! or a partial one (from a veth peer's stack), and the two need different
//! updates. The old destination goes to the TC program behind this one in
//! the XDP metadata, and it updates the checksum with the kernel's helper,
//! which knows. The TC program also catches what this one passes on
//! untranslated (IPv4 options), so both modes give the same results.
//!
//! ICMP errors are not looked at here: they pass to `hostport_ingress`,
//! which translates those about hostPort flows in both modes (they are
//! rare, and their quoted headers and checksums want the skb helpers).
//!
//! A fragment after the first gets the translation of its first fragment
//! (`frag`): its destination and header checksum only, and no metadata
//! (it has no transport checksum), so TC leaves it alone.
//!
//! IPv6 (one XDP program per device, so both families are here): the same
//! lookup (`hostport6::lookup6`) and rewrite of the destination, no header
//! checksum to update, and the old destination handed to
//! `hostport6_ingress` in an [`XdpDnat6Meta`]. Only packets whose fixed
//! header is followed by TCP or UDP; the rest (extension headers, so every
//! IPv6 fragment) pass to `hostport6_ingress`, which follows them and
//! translates fragments: a datagram's fragments all take one path.
use aya_ebpf::{
    bindings::xdp_action, helpers::bpf_xdp_adjust_meta, macros::xdp, programs::XdpContext,
};
use cni_ebpf_common::{stat, XdpDnat6Meta, XdpDnatMeta, XDP_DNAT6_MAGIC, XDP_DNAT_MAGIC};

use crate::{
    frag::{self, Frag},
    hostport::{lookup, note_reply},
    hostport6::{lookup6, note_reply6},
    parsing::{
        parse_ipv4, parse_ipv6, ptr_at, Ipv4Packet, Packet, ETH_HLEN, ETH_PROTO, ETH_P_IP,
        ETH_P_IPV6, IP6_DADDR, IP6_NEXTHDR, IPPROTO_TCP, IPPROTO_UDP, IP_CSUM, IP_DADDR,
    },
    rewrite::{csum_update, halves},
    stats::bump,
};

#[xdp]
pub fn hostport_xdp(ctx: XdpContext) -> u32 {
    try_hostport_xdp(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

fn try_hostport_xdp(ctx: &XdpContext) -> Option<u32> {
    match u16::from_be(ctx.read::<u16>(ETH_PROTO)?) {
        ETH_P_IP => {}
        ETH_P_IPV6 => return try_hostport_xdp6(ctx),
        _ => return None,
    }
    let l3 = ETH_HLEN;
    // Only option-less headers here (fixed offsets keep the verifier
    // simple); others reach the TC program.
    if ctx.read::<u8>(l3)? != 0x45 {
        return None;
    }
    let mut pkt = parse_ipv4(ctx)?;
    if pkt.proto != IPPROTO_TCP && pkt.proto != IPPROTO_UDP {
        return None;
    }
    if pkt.frag == Frag::Later {
        return later_fragment(ctx, &pkt);
    }
    // The transport checksum must be there for TC to update it.
    pkt.l4_csum = ctx.read(pkt.l4_csum_off())?;
    let (l4, saddr, daddr, sport, dport) = (pkt.l4, pkt.saddr, pkt.daddr, pkt.sport, pkt.dport);

    let t = lookup(daddr, dport, pkt.proto, false)?;
    note_reply(&pkt, &t, (saddr, sport), 0);

    // Room for the metadata first: the helper may move the packet, so
    // every pointer is re-derived after it.
    let meta_len = core::mem::size_of::<XdpDnatMeta>() as i32;
    // SAFETY: helper call on our own context.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -meta_len) } != 0 {
        return None;
    }
    let meta = ctx.metadata();
    if meta + core::mem::size_of::<XdpDnatMeta>() > ctx.data() {
        return None;
    }
    let ip_csum: *mut u16 = ptr_at(ctx, l3 + IP_CSUM)?;
    let daddr_p: *mut u32 = ptr_at(ctx, l3 + IP_DADDR)?;
    let dport_p: *mut u16 = ptr_at(ctx, l4 + 2)?;
    // SAFETY: bounds checked above.
    unsafe {
        *(meta as *mut XdpDnatMeta) = XdpDnatMeta {
            magic: XDP_DNAT_MAGIC,
            old_daddr: daddr,
            old_dport: dport,
            _pad: 0,
        };
        *ip_csum = csum_update(*ip_csum, &halves(daddr), &halves(t.addr[0]));
        *daddr_p = t.addr[0];
        *dport_p = t.port;
    }
    frag::translated(&pkt);
    bump(stat::HOSTPORT_DNAT);
    bump(stat::HOSTPORT_DNAT_XDP);
    Some(xdp_action::XDP_PASS)
}

/// A fragment after the first: the destination of its first fragment's
/// mapping (`parse_ipv4` recalled its ports), if that one was translated
/// here. No transport header, so no metadata for TC.
#[inline(always)]
fn later_fragment(ctx: &XdpContext, pkt: &Ipv4Packet) -> Option<u32> {
    let t = lookup(pkt.daddr, pkt.dport, pkt.proto, false)?;
    let ip_csum: *mut u16 = ptr_at(ctx, pkt.l3 + IP_CSUM)?;
    let daddr_p: *mut u32 = ptr_at(ctx, pkt.l3 + IP_DADDR)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        *ip_csum = csum_update(*ip_csum, &halves(pkt.daddr), &halves(t.addr[0]));
        *daddr_p = t.addr[0];
    }
    bump(stat::FRAG_TRANSLATED);
    bump(stat::HOSTPORT_DNAT);
    bump(stat::HOSTPORT_DNAT_XDP);
    Some(xdp_action::XDP_PASS)
}

/// IPv6: TCP or UDP right after the fixed header, to [node]:hostPort.
fn try_hostport_xdp6(ctx: &XdpContext) -> Option<u32> {
    // Extension headers (a fragment above all) are left to TC.
    let proto: u8 = ctx.read(ETH_HLEN + IP6_NEXTHDR)?;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let pkt = parse_ipv6(ctx)?;
    let (l4, saddr, daddr, sport, dport) = (pkt.l4, pkt.saddr, pkt.daddr, pkt.sport, pkt.dport);
    let l3 = ETH_HLEN;
    let t = lookup6(&daddr, dport, proto, false)?;
    note_reply6(&pkt, &t, (&saddr, sport), 0);

    // Room for the metadata first: the helper may move the packet, so
    // every pointer is re-derived after it.
    let meta_len = core::mem::size_of::<XdpDnat6Meta>() as i32;
    // SAFETY: helper call on our own context.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -meta_len) } != 0 {
        return None;
    }
    let meta = ctx.metadata();
    if meta + core::mem::size_of::<XdpDnat6Meta>() > ctx.data() {
        return None;
    }
    let daddr_p: *mut u32 = ptr_at::<[u32; 4]>(ctx, l3 + IP6_DADDR)? as *mut u32;
    let dport_p: *mut u16 = ptr_at(ctx, l4 + 2)?;
    // SAFETY: bounds checked above (the whole address by ptr_at).
    unsafe {
        *(meta as *mut XdpDnat6Meta) = XdpDnat6Meta {
            magic: XDP_DNAT6_MAGIC,
            old_daddr: daddr,
            old_dport: dport,
            _pad: 0,
        };
        for i in 0..4 {
            core::ptr::write_unaligned(daddr_p.add(i), t.addr[i]);
        }
        *dport_p = t.port;
    }
    bump(stat::HOSTPORT_DNAT);
    bump(stat::HOSTPORT_DNAT_XDP);
    Some(xdp_action::XDP_PASS)
}
