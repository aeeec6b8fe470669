//! Fragmented IPv4 datagrams through the NAT programs (masquerade and
//! hostPort, on the uplink, at XDP and on the bridge).
//!
//! Only the first fragment (offset 0, MF set) carries the transport header,
//! so only it can be matched against the NAT tables. The fragments after it
//! share its (source, destination, IP identification, protocol) and nothing
//! else. As Cilium does, a program that translates a first fragment
//! remembers the fragment's ports under that key in an LRU map; a later
//! fragment that meets a program with the same addresses gets those ports
//! back from the parser, goes through the same lookups as its first
//! fragment, and gets the same address translation.
//!
//! A later fragment has no transport header: only its addresses and the
//! IPv4 header checksum are rewritten. The transport checksum covers the
//! whole datagram but sits in the first fragment, whose incremental update
//! (pseudo-header included) already accounts for the address change.
//!
//! Limits, as Cilium's:
//! - A fragment that overtakes its first fragment finds nothing and passes
//!   untranslated (the receiver then cannot reassemble the datagram).
//! - The programs never delete an entry: the last fragment may overtake a
//!   middle one, and several programs on one hook look the same key up.
//!   LRU eviction reclaims entries, and one older than the kernel's
//!   reassembly timeout is taken for an earlier datagram's.
//! - Only datagrams whose first fragment a NAT program translated are
//!   remembered: fragmented traffic the NAT leaves alone costs no write.
//!
//! IPv6 works the same way through the same map: the key's family byte
//! keeps the families apart and its 32-bit id holds the Fragment header's
//! whole identification (`recall6`, `translated6`). IPv6 has no header
//! checksum, so a later fragment only gets its address rewritten.
use aya_ebpf::{macros::map, maps::LruHashMap, programs::TcContext};
use cni_ebpf_common::{stat, NatFragKey, NatFragPorts, FAMILY_V4, FAMILY_V6};

use crate::{
    conntrack::now,
    parsing::{ext_headers6, Ipv4Packet, Ipv6Packet},
    stats::bump,
};

/// Default size: datagrams in flight whose first fragment was translated.
/// The agent sets it at load time.
const FRAG_ENTRIES: u32 = 16384;

/// The kernel's default IPv4 reassembly timeout (net.ipv4.ipfrag_time).
const REASSEMBLY_TIMEOUT_NS: u64 = 30_000_000_000;

/// More-fragments flag and fragment offset of the IPv4 frag_off field
/// (host order).
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

#[map(name = "NAT_FRAGS")]
static NAT_FRAGS: LruHashMap<NatFragKey, NatFragPorts> = LruHashMap::pinned(FRAG_ENTRIES, 0);

/// Where a packet sits in its datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    /// Not fragmented.
    None,
    /// Offset 0, more fragments follow: carries the transport header.
    First,
    /// Offset > 0: no transport header.
    Later,
}

/// The position of a packet from its IPv4 frag_off field (host order).
#[inline(always)]
pub fn position(frag_off: u16) -> Frag {
    if frag_off & IP_OFFSET != 0 {
        Frag::Later
    } else if frag_off & IP_MF != 0 {
        Frag::First
    } else {
        Frag::None
    }
}

#[inline(always)]
fn key(saddr: u32, daddr: u32, id: u16, proto: u8) -> NatFragKey {
    NatFragKey {
        src: [saddr, 0, 0, 0],
        dst: [daddr, 0, 0, 0],
        id: u32::from(id),
        proto,
        family: FAMILY_V4,
        _pad: [0; 2],
    }
}

/// The ports (and ICMP type) of the first fragment of the datagram a later
/// fragment with these addresses, id (network order) and protocol belongs
/// to, if a NAT program translated that first fragment at this point.
#[inline(always)]
pub fn recall(saddr: u32, daddr: u32, id: u16, proto: u8) -> Option<NatFragPorts> {
    // SAFETY: read-only use of a map value during this run.
    let first = unsafe { NAT_FRAGS.get(&key(saddr, daddr, id, proto)) }.copied()?;
    if now().saturating_sub(first.first_seen_ns) > REASSEMBLY_TIMEOUT_NS {
        return None;
    }
    Some(first)
}

/// To be called once a NAT program has translated `pkt` (as parsed, before
/// the rewrite): a first fragment is remembered for the fragments after
/// it, a later one is counted.
#[inline(always)]
pub fn translated(pkt: &Ipv4Packet) {
    match pkt.frag {
        Frag::First => {
            let first = NatFragPorts {
                sport: pkt.sport,
                dport: pkt.dport,
                icmp_type: pkt.icmp_type,
                _pad: [0; 3],
                first_seen_ns: now(),
            };
            let k = key(pkt.saddr, pkt.daddr, pkt.id, pkt.proto);
            if NAT_FRAGS.insert(&k, &first, 0).is_ok() {
                bump(stat::FRAG_FIRST);
            }
        }
        Frag::Later => bump(stat::FRAG_TRANSLATED),
        Frag::None => {}
    }
}

/// IPv6 Fragment header: fragment offset (in 8-byte units, shifted left by
/// 3) and the M flag, host order.
const IP6_OFFSET: u16 = 0xfff8;
const IP6_MF: u16 = 0x0001;

/// The position of an IPv6 packet from its Fragment header's offset/flags
/// field (host order). Offset 0 without M (an "atomic fragment") is a whole
/// datagram.
#[inline(always)]
pub fn position6(off_m: u16) -> Frag {
    if off_m & IP6_OFFSET != 0 {
        Frag::Later
    } else if off_m & IP6_MF != 0 {
        Frag::First
    } else {
        Frag::None
    }
}

/// Looks up a remembered IPv6 first fragment. The key is built here and
/// passed by reference (the 512-byte stack has no room for copies).
#[inline(always)]
fn get6(k: &NatFragKey) -> Option<NatFragPorts> {
    // SAFETY: read-only use of a map value during this run.
    let first = unsafe { NAT_FRAGS.get(k) }.copied()?;
    if now().saturating_sub(first.first_seen_ns) > REASSEMBLY_TIMEOUT_NS {
        return None;
    }
    Some(first)
}

#[inline(always)]
fn key6(saddr: &[u32; 4], daddr: &[u32; 4], id: u32, proto: u8) -> NatFragKey {
    NatFragKey {
        src: *saddr,
        dst: *daddr,
        id,
        proto,
        family: FAMILY_V6,
        _pad: [0; 2],
    }
}

/// IPv6 `recall`: the first fragment's ports for a later fragment with
/// these addresses, 32-bit identification (as in the packet) and upper
/// protocol, if a NAT program translated that first fragment at this
/// point. (The kernel's IPv6 reassembly timeout is 60 s, ip6frag_time;
/// 30 s is plenty for a datagram crossing one node.)
#[inline(always)]
pub fn recall6(saddr: &[u32; 4], daddr: &[u32; 4], id: u32, proto: u8) -> Option<NatFragPorts> {
    get6(&key6(saddr, daddr, id, proto))
}

/// IPv6 `translated`: remembers a translated first fragment (as parsed,
/// before the rewrite), counts a translated later one. `parse_ipv6` gives
/// a first fragment `Frag::None` (one verifier walk serves both) and
/// keeps neither the Fragment header's place nor its id (snat6_egress has
/// no stack to spare), so the header chain is walked again here, only for
/// packets that were translated.
#[inline(always)]
pub fn translated6(ctx: &TcContext, pkt: &Ipv6Packet) {
    if pkt.frag == Frag::Later {
        bump(stat::FRAG_TRANSLATED);
        return;
    }
    let Some(w) = ext_headers6(ctx) else {
        return;
    };
    if w.frag_hdr == 0 {
        return;
    }
    let (Ok(off_m), Ok(id)) = (
        ctx.load::<u16>(w.frag_hdr + 2),
        ctx.load::<u32>(w.frag_hdr + 4),
    ) else {
        return;
    };
    if position6(u16::from_be(off_m)) != Frag::First {
        return;
    }
    let first = NatFragPorts {
        sport: pkt.sport,
        dport: pkt.dport,
        icmp_type: pkt.icmp_type,
        _pad: [0; 3],
        first_seen_ns: now(),
    };
    let k = key6(&pkt.saddr, &pkt.daddr, id, pkt.proto);
    if NAT_FRAGS.insert(&k, &first, 0).is_ok() {
        bump(stat::FRAG_FIRST);
    }
}
