//! ebpf-firewall's policy on a pod's host veth: stateful rules per
//! attachment and direction, and `ingressPolicy` (open / same-bridge /
//! isolated).
//!
//! - [`from_pod`], host veth TC ingress (what the pod sends): anti-spoofing
//!   (`spoof.rs`), then the egress rules.
//! - [`to_pod`], host veth TC egress (what the pod receives): the ingress
//!   rules and `ingressPolicy`.
//!
//! Both run inside the veth programs (`veth.rs`) and only ever pass
//! (TC_ACT_UNSPEC: the rate limit, then the next program, still runs) or
//! drop. Forwarding past the host stack is done
//! elsewhere (`forward.rs`), after every veth program has had its say.
//!
//! Rule evaluation does not depend on the number of rules. Userspace
//! compiles each direction's ordered first-match list into two LPM tries:
//! FW_CIDRS maps the remote address to its *region* (the most specific rule
//! CIDR containing it: prefixes are either nested or disjoint, so every
//! address in a region matches the same rules), and FW_PORTS maps (region,
//! protocol, destination port) to the first matching rule, the port ranges
//! already resolved into disjoint prefixes. A new connection costs two trie
//! lookups whether there are 0 or 4096 rules; the packets after it are
//! matched in FW_CT (one hash lookup) and never see the rules again.
//!
//! Connection tracking: one FW_CT entry per allowed connection, keyed the
//! same from both sides (pod address/port, remote address/port), created
//! when the first packet passes the rules of its direction. Any packet of a
//! live entry passes both ways (replies of an allowed connection); a packet
//! without one is a new connection and meets the rules of its own
//! direction, so unsolicited packets "the other way" are judged as such.
//! Entries expire in the programs (idle timeouts per protocol and TCP
//! state). A DEL leaves its attachment's entries to the agent's sweeper
//! (finding them is a walk of the whole table); each entry carries the
//! cookie of the attachment that opened it, and counts only under it.
//!
//! IPv4 and IPv6 share all of it: keys carry the family and a 128-bit
//! address (an IPv4 address in the first word), and a rule without a CIDR
//! matches both families. For IPv6, ICMPv6 stands for ICMP (rules of
//! protocol `icmp` match it); neighbour discovery (and multicast listener
//! discovery) always passes (the link needs it; anti-spoofing has already
//! checked what the pod announces),
//! and ICMPv6 errors about a tracked connection pass as part of it. A
//! hop-by-hop options header (every MLD message has one, for its router
//! alert) and a fragment header are followed (the verdict of the first
//! fragment holds for the rest); any other extension header makes the
//! packet one of an "other" protocol.
use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, TC_ACT_SHOT},
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{lpm_trie::Key, HashMap, LpmTrie, LruHashMap, PerCpuHashMap},
    programs::TcContext,
};
use cni_ebpf_common::{
    fw, stat, FwAttach, FwCidrKey, FwCtEntry, FwCtKey, FwEndpoint, FwFragKey, FwPortKey, FwRegion,
    FwRuleKey, FwStats, FwVerdict, IpKey, FAMILY_V4, FAMILY_V6,
};

use crate::{
    frag::Frag,
    parsing::{
        ethertype, is_link_local6, parse_flow, parse_flow6, quoted_flow, Flow, ETH_P_ARP, ETH_P_IP,
        ETH_P_IPV6, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, TCP_FLAG_ACK,
        TCP_FLAG_FIN, TCP_FLAG_RST, TCP_FLAG_SYN,
    },
    spoof,
    stats::bump,
    NEXT,
};

/// Prefix bits of the always-matched part of the trie keys (ifindex, dir,
/// family/proto, region).
const KEY_FIXED_BITS: u32 = 64;

const SEC: u64 = 1_000_000_000;
/// Idle timeouts, as nf_conntrack's defaults where they exist: a TCP
/// connection that is established may stay idle for days (keepalives are
/// two hours apart by default); one that is closing or never got an answer
/// goes quickly.
const TCP_ESTABLISHED_NS: u64 = 432_000 * SEC;
const TCP_UNREPLIED_NS: u64 = 120 * SEC;
const TCP_CLOSED_NS: u64 = 10 * SEC;
const UDP_REPLIED_NS: u64 = 180 * SEC;
const UDP_UNREPLIED_NS: u64 = 30 * SEC;
const ICMP_NS: u64 = 30 * SEC;
const OTHER_NS: u64 = 600 * SEC;

/// Host veth ifindex -> the attachment's configuration.
#[map(name = "FW_ATTACH")]
pub static FW_ATTACH: HashMap<u32, FwAttach> = HashMap::pinned(16384, 0);

/// Pod address -> its veth and bridge (anti-spoofing, ingressPolicy and
/// the forwarding bypass all key on it).
#[map(name = "FW_ENDPOINTS")]
pub static FW_ENDPOINTS: HashMap<IpKey, FwEndpoint> = HashMap::pinned(16384, BPF_F_NO_PREALLOC);

/// Bridges that host firewalled pods: traffic routed in from one of them
/// comes from a pod (ingressPolicy).
#[map(name = "FW_BRIDGES")]
pub static FW_BRIDGES: HashMap<u32, u32> = HashMap::pinned(1024, 0);

#[map(name = "FW_CIDRS")]
static FW_CIDRS: LpmTrie<FwCidrKey, FwRegion> = LpmTrie::pinned(131072, 0);

#[map(name = "FW_PORTS")]
static FW_PORTS: LpmTrie<FwPortKey, FwVerdict> = LpmTrie::pinned(262144, 0);

/// Default size; the agent sizes it like its other connection tables.
#[map(name = "FW_CT")]
static FW_CT: LruHashMap<FwCtKey, FwCtEntry> = LruHashMap::pinned(65536, 0);

/// (ifindex, datagram) -> the first fragment's verdict (`frag_verdict`).
#[map(name = "FW_FRAGS")]
static FW_FRAGS: LruHashMap<FwFragKey, u32> = LruHashMap::pinned(16384, 0);

#[map(name = "FW_STATS")]
static FW_STATS: PerCpuHashMap<u32, FwStats> = PerCpuHashMap::pinned(16384, BPF_F_NO_PREALLOC);

#[map(name = "FW_RULE_HITS")]
static FW_RULE_HITS: PerCpuHashMap<FwRuleKey, u64> =
    PerCpuHashMap::pinned(65536, BPF_F_NO_PREALLOC);

/// Adds one to slot `slot` of the attachment's counters.
#[inline(always)]
pub fn count(ifindex: u32, slot: usize) {
    if slot >= fw::STAT_SLOTS {
        return;
    }
    if let Some(s) = FW_STATS.get_ptr_mut(&ifindex) {
        // SAFETY: per-CPU value of a live entry; no concurrent writer.
        unsafe { (*s).counters[slot] += 1 };
        return;
    }
    let mut s = FwStats::default();
    s.counters[slot] = 1;
    let _ = FW_STATS.insert(&ifindex, &s, 0);
}

#[inline(always)]
fn count_rule(ifindex: u32, dir: u8, rule: u16) {
    let key = FwRuleKey {
        ifindex,
        dir,
        _pad: 0,
        rule,
    };
    if let Some(n) = FW_RULE_HITS.get_ptr_mut(&key) {
        // SAFETY: per-CPU value of a live entry; no concurrent writer.
        unsafe { *n += 1 };
        return;
    }
    let _ = FW_RULE_HITS.insert(&key, &1, 0);
}

#[inline(always)]
pub fn v4_ip(addr: u32) -> IpKey {
    IpKey {
        addr: [addr, 0, 0, 0],
        family: FAMILY_V4,
        _pad: [0; 3],
    }
}

#[inline(always)]
pub fn endpoint(addr: u32) -> Option<FwEndpoint> {
    endpoint_of(&v4_ip(addr))
}

#[inline(always)]
pub fn endpoint_of(key: &IpKey) -> Option<FwEndpoint> {
    // SAFETY: read-only use of a map value during this run.
    unsafe { FW_ENDPOINTS.get(key) }.copied()
}

#[inline(always)]
pub fn v6_ip(addr: [u32; 4]) -> IpKey {
    IpKey {
        addr,
        family: FAMILY_V6,
        _pad: [0; 3],
    }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: helper without side effects.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn ct_key(
    ifindex: u32,
    family: u8,
    proto: u8,
    pod: &[u32; 4],
    remote: &[u32; 4],
    pod_port: u16,
    remote_port: u16,
) -> FwCtKey {
    FwCtKey {
        ifindex,
        proto,
        family,
        pod_port,
        remote_port,
        _pad: 0,
        pod: *pod,
        remote: *remote,
    }
}

/// How long an entry may stay idle in its current state.
#[inline(always)]
fn timeout(proto: u8, state: u8) -> u64 {
    match proto {
        IPPROTO_TCP => {
            if state & fw::CT_RST != 0
                || state & (fw::CT_FIN_EGRESS | fw::CT_FIN_INGRESS)
                    == (fw::CT_FIN_EGRESS | fw::CT_FIN_INGRESS)
            {
                TCP_CLOSED_NS
            } else if state & fw::CT_REPLIED == 0 {
                TCP_UNREPLIED_NS
            } else {
                TCP_ESTABLISHED_NS
            }
        }
        IPPROTO_UDP => {
            if state & fw::CT_REPLIED != 0 {
                UDP_REPLIED_NS
            } else {
                UDP_UNREPLIED_NS
            }
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => ICMP_NS,
        _ => OTHER_NS,
    }
}

/// State bits a packet adds to its connection.
#[inline(always)]
fn state_bits(f: &Flow, dir: u8, origin: u8) -> u8 {
    let mut s = 0;
    if dir != origin {
        s |= fw::CT_REPLIED;
    }
    if f.proto == IPPROTO_TCP {
        if f.tcp_flags & TCP_FLAG_FIN != 0 {
            s |= if dir == fw::DIR_EGRESS {
                fw::CT_FIN_EGRESS
            } else {
                fw::CT_FIN_INGRESS
            };
        }
        if f.tcp_flags & TCP_FLAG_RST != 0 {
            s |= fw::CT_RST;
        }
    }
    s
}

/// A first fragment's verdict as FW_FRAGS holds it: the action, and the
/// cookie of the attachment that judged it (see `FwAttach::cookie`).
#[inline(always)]
fn frag_verdict(action: u8, cookie: u16) -> u32 {
    u32::from(action) | u32::from(cookie) << 16
}

/// Looks the packet's connection up; refreshes and returns true if it is
/// live. A TCP SYN on a connection that was closing starts a new one, and
/// an entry of an earlier attachment (another cookie) is no connection.
#[inline(always)]
fn tracked(key: &FwCtKey, f: &Flow, dir: u8, ts: u64, cookie: u16) -> bool {
    let Some(e) = FW_CT.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: `e` comes from a map lookup and stays valid for this run;
    // racing writers only add bits and move time forward.
    unsafe {
        if (*e).cookie != cookie {
            return false;
        }
        let state = (*e).state;
        if ts.saturating_sub((*e).last_seen_ns) > timeout(f.proto, state) {
            return false;
        }
        let syn_only = f.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
        if syn_only && state & (fw::CT_RST | fw::CT_FIN_EGRESS | fw::CT_FIN_INGRESS) != 0 {
            return false;
        }
        let bits = state_bits(f, dir, (*e).origin);
        if state & bits != bits {
            (*e).state = state | bits;
        }
        (*e).last_seen_ns = ts;
    }
    true
}

/// An ICMP error about a connection of this attachment (e.g. "port
/// unreachable", "fragmentation needed") is part of it. The quoted packet
/// went the other way: towards the remote for an error the pod receives.
#[inline(always)]
fn related(ctx: &TcContext, ifindex: u32, cookie: u16, f: &Flow, dir: u8) -> bool {
    let Some(q) = quoted_flow(ctx, f) else {
        return false;
    };
    let key = if dir == fw::DIR_INGRESS {
        ct_key(
            ifindex, f.family, q.proto, &q.saddr, &q.daddr, q.sport, q.dport,
        )
    } else {
        ct_key(
            ifindex, f.family, q.proto, &q.daddr, &q.saddr, q.dport, q.sport,
        )
    };
    // SAFETY: read-only use of a map value during this run.
    unsafe { FW_CT.get(&key) }.is_some_and(|e| e.cookie == cookie)
}

/// Whether a new connection to the pod comes from a pod that
/// `ingressPolicy` keeps out: one on another bridge (same-bridge), or any
/// (isolated). A pod is a firewalled endpoint (its source address is
/// anti-spoofed), or anything routed in from a bridge that hosts them.
///
/// An IPv6 link-local source can only be on the pod's own link, i.e. a pod
/// of its bridge (or the bridge itself): refused when isolated.
#[inline(always)]
fn refused_by_policy(ctx: &TcContext, cfg: &FwAttach, f: &Flow, remote: &[u32; 4]) -> bool {
    let isolated = cfg.ingress_policy == fw::POLICY_ISOLATED;
    let key = IpKey {
        addr: *remote,
        family: f.family,
        _pad: [0; 3],
    };
    if let Some(ep) = endpoint_of(&key) {
        return isolated || ep.bridge_ifindex != cfg.bridge_ifindex;
    }
    if f.family == FAMILY_V6 && is_link_local6(remote) {
        return isolated;
    }
    // SAFETY: __sk_buff is valid for the program's run.
    let iif = unsafe { (*ctx.skb.skb).ingress_ifindex };
    // SAFETY: read-only use of a map value during this run.
    if iif != 0 && unsafe { FW_BRIDGES.get(&iif) }.is_some() {
        return isolated || iif != cfg.bridge_ifindex;
    }
    false
}

/// The first rule of direction `dir` matching a new connection to/from
/// `remote` (destination port `dport`), or `ACTION_NONE`.
#[inline(always)]
fn evaluate(ifindex: u32, dir: u8, f: &Flow, remote: &[u32; 4]) -> FwVerdict {
    let (proto, dport) = (f.proto, f.dport);
    let none = FwVerdict {
        rule: fw::RULE_DEFAULT,
        action: fw::ACTION_NONE,
        _pad: 0,
    };
    let bits = if f.family == FAMILY_V6 { 128 } else { 32 };
    let ck = Key::new(
        KEY_FIXED_BITS + bits,
        FwCidrKey {
            ifindex,
            dir,
            family: f.family,
            _pad: [0; 2],
            addr: *remote,
        },
    );
    let Some(region) = FW_CIDRS.get(&ck) else {
        return none;
    };
    match proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let pk = Key::new(
                KEY_FIXED_BITS + 16,
                FwPortKey {
                    ifindex,
                    dir,
                    proto,
                    region: region.region,
                    port: dport,
                    _pad: 0,
                },
            );
            FW_PORTS.get(&pk).copied().unwrap_or(none)
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => region.icmp,
        _ => region.other,
    }
}

/// The verdict on one IP packet of the attachment in direction `dir`.
#[inline(always)]
fn decide(ctx: &TcContext, ifindex: u32, cfg: &FwAttach, dir: u8, f: &Flow) -> bool {
    if f.ndp {
        return true;
    }
    let frag_key = FwFragKey {
        ifindex,
        id: f.id,
        proto: f.proto,
        family: f.family,
        src: f.saddr,
        dst: f.daddr,
    };
    if f.frag == Frag::Later {
        // SAFETY: read-only use of a map value during this run.
        return unsafe { FW_FRAGS.get(&frag_key) }
            .is_some_and(|a| *a == frag_verdict(fw::ACTION_ALLOW, cfg.cookie));
    }
    let allowed = decide_first(ctx, ifindex, cfg, dir, f);
    if f.frag == Frag::First {
        let action = if allowed {
            fw::ACTION_ALLOW
        } else {
            fw::ACTION_DENY
        };
        let _ = FW_FRAGS.insert(&frag_key, &frag_verdict(action, cfg.cookie), 0);
    }
    allowed
}

#[inline(always)]
fn decide_first(ctx: &TcContext, ifindex: u32, cfg: &FwAttach, dir: u8, f: &Flow) -> bool {
    let (pod, remote, pod_port, remote_port) = if dir == fw::DIR_EGRESS {
        (&f.saddr, &f.daddr, f.sport, f.dport)
    } else {
        (&f.daddr, &f.saddr, f.dport, f.sport)
    };
    let established = if dir == fw::DIR_EGRESS {
        fw::STAT_EGRESS_ESTABLISHED
    } else {
        fw::STAT_INGRESS_ESTABLISHED
    };
    if f.icmp_error && related(ctx, ifindex, cfg.cookie, f, dir) {
        count(ifindex, established);
        return true;
    }
    let key = ct_key(
        ifindex,
        f.family,
        f.proto,
        pod,
        remote,
        pod_port,
        remote_port,
    );
    let ts = now();
    if tracked(&key, f, dir, ts, cfg.cookie) {
        count(ifindex, established);
        return true;
    }
    if dir == fw::DIR_INGRESS
        && cfg.ingress_policy != fw::POLICY_OPEN
        && refused_by_policy(ctx, cfg, f, remote)
    {
        count(ifindex, fw::STAT_POLICY_DROPPED);
        return false;
    }
    let v = evaluate(ifindex, dir, f, remote);
    count_rule(ifindex, dir, v.rule);
    let action = if v.action == fw::ACTION_NONE {
        if dir == fw::DIR_EGRESS {
            cfg.egress_default
        } else {
            cfg.ingress_default
        }
    } else {
        v.action
    };
    if action != fw::ACTION_ALLOW {
        return false;
    }
    if to_group(f) {
        return true;
    }
    let entry = FwCtEntry {
        last_seen_ns: ts,
        origin: dir,
        state: state_bits(f, dir, dir),
        cookie: cfg.cookie,
        _pad: [0; 4],
    };
    let _ = FW_CT.insert(&key, &entry, 0);
    true
}

/// Whether the packet goes to a group: IPv4 multicast or the limited
/// broadcast, IPv6 multicast. Not tracked: a reply to a group packet comes
/// from a unicast address and can never match an entry keyed by the
/// group, and the bridge floods a group packet to every port, so tracking
/// it cost an entry per pair of pods (about 21,000 for 195 pods, evicting
/// real connections from the LRU as the node grows).
#[inline(always)]
fn to_group(f: &Flow) -> bool {
    let first = f.daddr[0].to_ne_bytes()[0];
    if f.family == FAMILY_V6 {
        first == 0xff
    } else {
        first & 0xf0 == 0xe0 || f.daddr[0] == u32::MAX
    }
}

/// The configuration of the firewall attachment on the veth that runs the
/// program; none means the pod has no firewall (the veth programs also
/// serve ebpf-bandwidth). ebpf-firewall writes it before its ADD attaches
/// the programs and removes it before its DEL detaches them.
#[inline(always)]
fn attachment(ctx: &TcContext) -> Option<(u32, FwAttach)> {
    // SAFETY: __sk_buff is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: read-only use of a map value during this run.
    let cfg = unsafe { FW_ATTACH.get(&ifindex) }?;
    Some((ifindex, *cfg))
}

/// Judges one packet in direction `dir` and counts it.
#[inline(always)]
fn judge(ctx: &TcContext, ifindex: u32, cfg: &FwAttach, dir: u8, ethertype: u16) -> i32 {
    let (allowed_slot, dropped_slot) = if dir == fw::DIR_EGRESS {
        (fw::STAT_EGRESS_ALLOWED, fw::STAT_EGRESS_DROPPED)
    } else {
        (fw::STAT_INGRESS_ALLOWED, fw::STAT_INGRESS_DROPPED)
    };
    let flow = match ethertype {
        ETH_P_IP => parse_flow(ctx),
        ETH_P_IPV6 => parse_flow6(ctx),
        // ARP and the like towards the pod; from the pod, spoof.rs has
        // already refused everything but IPv4, IPv6 and ARP.
        _ => return NEXT,
    };
    let allowed = match flow {
        Some(f) => decide(ctx, ifindex, cfg, dir, &f),
        // Truncated or malformed.
        None => false,
    };
    if allowed {
        count(ifindex, allowed_slot);
        NEXT
    } else {
        count(ifindex, dropped_slot);
        bump(stat::FW_DROPPED);
        TC_ACT_SHOT
    }
}

/// What the pod sends (host veth TC ingress): anti-spoofing, then the
/// egress rules.
#[inline(always)]
pub fn from_pod(ctx: &TcContext) -> i32 {
    let Some((ifindex, cfg)) = attachment(ctx) else {
        return NEXT;
    };
    match spoof::check_from_pod(ctx, ifindex, &cfg) {
        Ok(ETH_P_ARP) => NEXT,
        Ok(ethertype) => judge(ctx, ifindex, &cfg, fw::DIR_EGRESS, ethertype),
        Err(slot) => {
            count(ifindex, slot);
            bump(stat::FW_SPOOFED);
            TC_ACT_SHOT
        }
    }
}

/// What the pod receives (host veth TC egress): the ingress rules and
/// `ingressPolicy`.
#[inline(always)]
pub fn to_pod(ctx: &TcContext) -> i32 {
    let Some((ifindex, cfg)) = attachment(ctx) else {
        return NEXT;
    };
    let Some(ethertype) = ethertype(ctx) else {
        return TC_ACT_SHOT;
    };
    judge(ctx, ifindex, &cfg, fw::DIR_INGRESS, ethertype)
}
