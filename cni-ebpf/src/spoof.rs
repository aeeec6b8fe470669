//! Anti-spoofing for firewalled pods, on what the pod sends (host veth TC
//! ingress, before any rule): a pod may only use its own MAC address as
//! the frame's source and in ARP, and its own IP addresses as the packet's
//! source (FW_ENDPOINTS maps each to its veth). Anything else — another
//! pod's address, an invented one, a VLAN tag, an ethertype other than
//! IPv4, IPv6 and ARP — is dropped and counted per attachment.
//!
//! IPv6 neighbour discovery is IPv6's ARP and gets the same checks: a
//! Neighbor Advertisement may only announce one of the pod's addresses (or
//! the pod's own EUI-64 link-local address) as its target, and the
//! link-layer address option of a solicitation or advertisement must be
//! the pod's MAC, so a pod cannot answer for an address it does not own or
//! point a neighbour at another MAC. Router Advertisements and Redirects
//! are the router's to send (the node is the pods' router), never a
//! pod's: dropped.
use aya_ebpf::programs::TcContext;
use cni_ebpf_common::{fw, FwAttach};

use crate::{
    parsing::{
        ethertype, is_link_local6, skip_hop_by_hop, ETH_HLEN, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6,
        IP6_HLEN, IP6_NEXTHDR, IP6_SADDR, IPPROTO_ICMPV6, IP_SADDR,
    },
    policy::{endpoint, endpoint_of, v6_ip},
};

/// Offsets in an Ethernet/IPv4 ARP packet.
const ARP_SHA: usize = ETH_HLEN + 8;
const ARP_SPA: usize = ETH_HLEN + 14;

#[inline(always)]
fn mac_is(ctx: &TcContext, off: usize, mac: &[u8; 6]) -> bool {
    let (Ok(hi), Ok(lo)) = (ctx.load::<[u8; 4]>(off), ctx.load::<[u8; 2]>(off + 4)) else {
        return false;
    };
    hi[0] == mac[0]
        && hi[1] == mac[1]
        && hi[2] == mac[2]
        && hi[3] == mac[3]
        && lo[0] == mac[4]
        && lo[1] == mac[5]
}

/// Whether `addr` (network order) belongs to the attachment of `ifindex`.
#[inline(always)]
fn own_v4(addr: u32, ifindex: u32) -> bool {
    endpoint(addr).is_some_and(|ep| ep.ifindex == ifindex)
}

/// Whether an IPv6 address (network order) is the pod's: one of its
/// addresses, or the link-local address its kernel derives from its MAC
/// (fe80::/64 with the modified EUI-64 interface id; the default address
/// generation mode). Link-local addresses are in no record, so this is
/// the only one of them a pod can prove it owns.
#[inline(always)]
fn own_v6(addr: &[u32; 4], ifindex: u32, mac: &[u8; 6]) -> bool {
    if is_link_local6(addr) {
        let b0 = addr[2].to_ne_bytes();
        let b1 = addr[3].to_ne_bytes();
        return u32::from_be(addr[0]) == 0xfe80_0000
            && addr[1] == 0
            && b0 == [mac[0] ^ 2, mac[1], mac[2], 0xff]
            && b1 == [0xfe, mac[3], mac[4], mac[5]];
    }
    endpoint_of(&v6_ip(*addr)).is_some_and(|ep| ep.ifindex == ifindex)
}

const ND_ROUTER_ADVERT: u8 = 134;
const ND_NEIGHBOR_SOLICIT: u8 = 135;
const ND_NEIGHBOR_ADVERT: u8 = 136;
const ND_REDIRECT: u8 = 137;
/// Option types: source and target link-layer address.
const ND_OPT_SLLA: u8 = 1;
const ND_OPT_TLLA: u8 = 2;
/// Options of a solicitation or advertisement start after the 8-byte
/// header and the 16-byte target.
const ND_OPTS: usize = 24;
/// Options looked at per message (bounded; real NS/NA carry one).
const ND_MAX_OPTS: usize = 4;

/// Checks what an ICMPv6 neighbour discovery message from the pod claims,
/// directly behind the IPv6 header or behind a hop-by-hop options header
/// (which Linux accepts on ND, and policy.rs follows). Other ICMPv6, and ND
/// behind other extension headers (receivers drop fragmented ND, RFC 6980),
/// passes here.
#[inline(always)]
fn check_nd(ctx: &TcContext, ifindex: u32, cfg: &FwAttach) -> Result<(), usize> {
    let l3 = ETH_HLEN;
    let next: u8 = ctx
        .load(l3 + IP6_NEXTHDR)
        .map_err(|_| fw::STAT_SPOOFED_ND)?;
    // As the firewall follows it: ND behind it must not skip the checks.
    let (next, l4) = skip_hop_by_hop(ctx, next, l3 + IP6_HLEN).ok_or(fw::STAT_SPOOFED_ND)?;
    if next != IPPROTO_ICMPV6 {
        return Ok(());
    }
    let t: u8 = ctx.load(l4).map_err(|_| fw::STAT_SPOOFED_ND)?;
    match t {
        ND_ROUTER_ADVERT | ND_REDIRECT => return Err(fw::STAT_SPOOFED_ND),
        ND_NEIGHBOR_ADVERT => {
            let target: [u32; 4] = ctx.load(l4 + 8).map_err(|_| fw::STAT_SPOOFED_ND)?;
            if !own_v6(&target, ifindex, &cfg.mac) {
                return Err(fw::STAT_SPOOFED_ND);
            }
        }
        ND_NEIGHBOR_SOLICIT => {}
        _ => return Ok(()),
    }
    // Link-layer address options: type, length in 8-byte units, address.
    let mut off = l4 + ND_OPTS;
    for _ in 0..ND_MAX_OPTS {
        let Ok(hdr) = ctx.load::<[u8; 2]>(off) else {
            break;
        };
        if hdr[1] == 0 {
            // A zero-length option is invalid: receivers drop the message.
            return Err(fw::STAT_SPOOFED_ND);
        }
        if (hdr[0] == ND_OPT_SLLA || hdr[0] == ND_OPT_TLLA) && !mac_is(ctx, off + 2, &cfg.mac) {
            return Err(fw::STAT_SPOOFED_ND);
        }
        off += usize::from(hdr[1]) * 8;
    }
    Ok(())
}

/// Checks a frame the pod sent. Returns its ethertype, or the counter slot
/// of the reason it is refused.
#[inline(always)]
pub fn check_from_pod(ctx: &TcContext, ifindex: u32, cfg: &FwAttach) -> Result<u16, usize> {
    // SAFETY: __sk_buff is valid for the program's run.
    if unsafe { (*ctx.skb.skb).vlan_present } != 0 {
        return Err(fw::STAT_OTHER_DROPPED);
    }
    if !mac_is(ctx, 6, &cfg.mac) {
        return Err(fw::STAT_SPOOFED_MAC);
    }
    let ethertype = ethertype(ctx).ok_or(fw::STAT_OTHER_DROPPED)?;
    match ethertype {
        ETH_P_IP => {
            let saddr: u32 = ctx
                .load(ETH_HLEN + IP_SADDR)
                .map_err(|_| fw::STAT_SPOOFED_IP)?;
            if own_v4(saddr, ifindex) {
                Ok(ethertype)
            } else {
                Err(fw::STAT_SPOOFED_IP)
            }
        }
        ETH_P_ARP => {
            // Ethernet/IPv4 ARP only; the sender must be the pod (an ARP
            // probe's sender address is 0.0.0.0).
            let htype_ptype: [u8; 6] = ctx.load(ETH_HLEN).map_err(|_| fw::STAT_SPOOFED_ARP)?;
            if htype_ptype != [0, 1, 8, 0, 6, 4] || !mac_is(ctx, ARP_SHA, &cfg.mac) {
                return Err(fw::STAT_SPOOFED_ARP);
            }
            let spa: u32 = ctx.load(ARP_SPA).map_err(|_| fw::STAT_SPOOFED_ARP)?;
            if spa == 0 || own_v4(spa, ifindex) {
                Ok(ethertype)
            } else {
                Err(fw::STAT_SPOOFED_ARP)
            }
        }
        ETH_P_IPV6 => {
            let src: [u32; 4] = ctx
                .load(ETH_HLEN + IP6_SADDR)
                .map_err(|_| fw::STAT_SPOOFED_IP)?;
            // Link-local (fe80::/10) and unspecified (DAD) sources belong to
            // the link; any other must be one of the pod's.
            let link_local = is_link_local6(&src);
            let unspecified = src == [0; 4];
            let own = endpoint_of(&v6_ip(src)).is_some_and(|ep| ep.ifindex == ifindex);
            if !(link_local || unspecified || own) {
                return Err(fw::STAT_SPOOFED_IP);
            }
            check_nd(ctx, ifindex, cfg)?;
            Ok(ethertype)
        }
        _ => Err(fw::STAT_OTHER_DROPPED),
    }
}
