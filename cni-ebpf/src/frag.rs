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
use aya_ebpf::{macros::map, maps::LruHashMap};
use cni_ebpf_common::{stat, NatFragKey, NatFragPorts, FAMILY_V4};

use crate::{conntrack::now, parsing::Ipv4Packet, stats::bump};

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
