//! The agent's own connection tracking for translated flows: two LRU maps
//! holding the two halves of every binding. They are always written
//! together; a half lost to LRU eviction is repaired from the other one.
//! Expiry is the agent's job (it knows the timeouts); the programs only
//! stamp the last time each direction was seen and the TCP flags.
use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::map, maps::LruHashMap};
use cni_ebpf_common::{ct_state, CtKey, NatEntry, FAMILY_V4, FAMILY_V6};

use crate::parsing::{Ipv4Packet, IPPROTO_TCP, TCP_FLAG_FIN, TCP_FLAG_RST, TCP_FLAG_SYN};

/// Default size; the agent overrides it at load time.
const CT_ENTRIES: u32 = 65536;

/// Original tuple (as the pod sent it) -> the address/port it leaves with.
#[map(name = "SNAT_ORIG")]
pub static SNAT_ORIG: LruHashMap<CtKey, NatEntry> = LruHashMap::pinned(CT_ENTRIES, 0);

/// Reply tuple (as it arrives on the uplink) -> the pod's address/port.
#[map(name = "SNAT_REPLY")]
pub static SNAT_REPLY: LruHashMap<CtKey, NatEntry> = LruHashMap::pinned(CT_ENTRIES, 0);

#[inline(always)]
pub fn v4_key(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> CtKey {
    CtKey {
        src: [src, 0, 0, 0],
        dst: [dst, 0, 0, 0],
        sport,
        dport,
        proto,
        family: FAMILY_V4,
        _pad: [0; 2],
    }
}

/// An IPv6 tuple: same maps, the family byte keeps it apart from IPv4.
#[inline(always)]
pub fn v6_key(src: [u32; 4], dst: [u32; 4], sport: u16, dport: u16, proto: u8) -> CtKey {
    CtKey {
        src,
        dst,
        sport,
        dport,
        proto,
        family: FAMILY_V6,
        _pad: [0; 2],
    }
}

/// State bits a packet contributes to the half of its direction.
#[inline(always)]
pub fn state_bits(pkt: &Ipv4Packet) -> u8 {
    flag_bits(pkt.proto, pkt.tcp_flags)
}

/// State bits of a packet of protocol `proto` with TCP flags `tcp_flags`.
#[inline(always)]
pub fn flag_bits(proto: u8, tcp_flags: u8) -> u8 {
    if proto != IPPROTO_TCP {
        return 0;
    }
    let mut s = 0;
    if tcp_flags & TCP_FLAG_SYN != 0 {
        s |= ct_state::SYN;
    }
    if tcp_flags & TCP_FLAG_FIN != 0 {
        s |= ct_state::FIN;
    }
    if tcp_flags & TCP_FLAG_RST != 0 {
        s |= ct_state::RST;
    }
    s
}

/// Marks a half as seen now, with the packet's state bits.
#[inline(always)]
pub fn touch(entry: *mut NatEntry, bits: u8) {
    // SAFETY: `entry` comes from a map lookup and stays valid for the
    // program's run; racing writers only ever add bits / move time forward.
    unsafe {
        (*entry).last_seen_ns = bpf_ktime_get_ns();
        if (*entry).state & bits != bits {
            (*entry).state |= bits;
        }
    }
}

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without side effects.
    unsafe { bpf_ktime_get_ns() }
}
