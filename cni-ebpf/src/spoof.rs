//! Anti-spoofing for firewalled pods, on what the pod sends (host veth TC
//! ingress, before any rule): a pod may only use its own MAC address as
//! the frame's source and in ARP, and its own IP addresses as the packet's
//! source (FW_ENDPOINTS maps each to its veth). Anything else — another
//! pod's address, an invented one, a VLAN tag, an ethertype other than
//! IPv4, IPv6 and ARP — is dropped and counted per attachment.
use aya_ebpf::programs::TcContext;
use cni_ebpf_common::{fw, FwAttach, IpKey, FAMILY_V6};

use crate::policy::{endpoint, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, FW_ENDPOINTS};

pub const ETH_HLEN: usize = 14;

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
    let ethertype = u16::from_be(ctx.load::<u16>(12).map_err(|_| fw::STAT_OTHER_DROPPED)?);
    match ethertype {
        ETH_P_IP => {
            let saddr: u32 = ctx.load(ETH_HLEN + 12).map_err(|_| fw::STAT_SPOOFED_IP)?;
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
            let src: [u32; 4] = ctx.load(ETH_HLEN + 8).map_err(|_| fw::STAT_SPOOFED_IP)?;
            let first = u32::from_be(src[0]);
            // Link-local (fe80::/10) and unspecified (DAD) sources belong to
            // the link; any other must be one of the pod's.
            let link_local = first >> 22 == 0x3fa;
            let unspecified = src == [0; 4];
            let key = IpKey {
                addr: src,
                family: FAMILY_V6,
                _pad: [0; 3],
            };
            // SAFETY: read-only use of a map value during this run.
            let own = unsafe { FW_ENDPOINTS.get(&key) }.is_some_and(|ep| ep.ifindex == ifindex);
            if link_local || unspecified || own {
                Ok(ethertype)
            } else {
                Err(fw::STAT_SPOOFED_IP)
            }
        }
        _ => Err(fw::STAT_OTHER_DROPPED),
    }
}
