//! hostPort DNAT at XDP on the uplink: the same translation as
//! `hostport::hostport_ingress`, before an skb exists. XDP has no checksum
//! helpers, so the checksums are updated incrementally here (RFC 1624). The
//! TC program stays attached behind it and catches what this one passes on
//! untranslated (IPv4 options), so both modes give the same results.
use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use cni_ebpf_common::stat;

use crate::{
    hostport::{lookup, note_reply},
    parsing::{Ipv4Packet, ETH_HLEN, IPPROTO_TCP, IPPROTO_UDP},
    stats::bump,
};

#[xdp]
pub fn hostport_xdp(ctx: XdpContext) -> u32 {
    try_hostport_xdp(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

/// A bounds-checked pointer into the packet.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Folds a 32-bit ones'-complement sum to 16 bits.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// HC' = ~(~HC + ~m + m') over 16-bit words as they sit in memory (the
/// ones'-complement sum does not care about byte order if all words agree).
#[inline(always)]
fn csum_update(csum: u16, old: &[u16], new: &[u16]) -> u16 {
    let mut sum = u32::from(!csum);
    for w in old {
        sum += u32::from(!*w);
    }
    for w in new {
        sum += u32::from(*w);
    }
    !fold(sum)
}

#[inline(always)]
fn halves(v: u32) -> [u16; 2] {
    let b = v.to_ne_bytes();
    [
        u16::from_ne_bytes([b[0], b[1]]),
        u16::from_ne_bytes([b[2], b[3]]),
    ]
}

fn try_hostport_xdp(ctx: &XdpContext) -> Option<u32> {
    let ethertype: *mut u16 = ptr_at(ctx, 12)?;
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be(unsafe { *ethertype }) != 0x0800 {
        return None;
    }
    let l3 = ETH_HLEN;
    let vihl: *mut u8 = ptr_at(ctx, l3)?;
    // Only option-less headers here (fixed offsets keep the verifier
    // simple); others reach the TC program.
    if unsafe { *vihl } != 0x45 {
        return None;
    }
    let frag: *mut u16 = ptr_at(ctx, l3 + 6)?;
    if u16::from_be(unsafe { *frag }) & 0x1fff != 0 {
        return None;
    }
    let proto: u8 = unsafe { *ptr_at::<u8>(ctx, l3 + 9)? };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return None;
    }
    let ip_csum: *mut u16 = ptr_at(ctx, l3 + 10)?;
    let saddr_p: *mut u32 = ptr_at(ctx, l3 + 12)?;
    let daddr_p: *mut u32 = ptr_at(ctx, l3 + 16)?;
    let l4 = l3 + 20;
    let sport_p: *mut u16 = ptr_at(ctx, l4)?;
    let dport_p: *mut u16 = ptr_at(ctx, l4 + 2)?;
    let l4_csum_p: *mut u16 = ptr_at(ctx, l4 + if proto == IPPROTO_TCP { 16 } else { 6 })?;
    let tcp_flags = if proto == IPPROTO_TCP {
        unsafe { *ptr_at::<u8>(ctx, l4 + 13)? }
    } else {
        0
    };
    // SAFETY: all pointers bounds checked above.
    let (saddr, daddr, sport, dport, l4_csum) =
        unsafe { (*saddr_p, *daddr_p, *sport_p, *dport_p, *l4_csum_p) };

    let t = lookup(daddr, dport, proto, false)?;
    let pkt = Ipv4Packet {
        l3,
        l4,
        proto,
        saddr,
        daddr,
        sport,
        dport,
        tcp_flags,
        icmp_type: 0,
        l4_csum,
    };
    note_reply(&pkt, &t, (saddr, sport), 0);

    let (new_addr, new_port) = (t.addr[0], t.port);
    let old_a = halves(daddr);
    let new_a = halves(new_addr);
    unsafe {
        *ip_csum = csum_update(*ip_csum, &old_a, &new_a);
        // UDP checksum 0 means "none": leave it.
        if proto == IPPROTO_TCP || l4_csum != 0 {
            let mut c = csum_update(
                l4_csum,
                &[old_a[0], old_a[1], dport],
                &[new_a[0], new_a[1], new_port],
            );
            if proto == IPPROTO_UDP && c == 0 {
                c = 0xffff;
            }
            *l4_csum_p = c;
        }
        *daddr_p = new_addr;
        *dport_p = new_port;
    }
    bump(stat::HOSTPORT_DNAT);
    bump(stat::HOSTPORT_DNAT_XDP);
    Some(xdp_action::XDP_PASS)
}
