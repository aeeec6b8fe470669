//! IPv6 masquerade on the uplink, with the IPv4 masquerade's semantics
//! (`nat`): pod-originated TCP, UDP and ICMPv6 echo leave with the uplink's
//! IPv6 address (UPLINKS' `addr_v6`), replies are translated back, ICMPv6
//! errors about translated flows (Packet Too Big above all) reach the pod.
//!
//! Separate programs, not a branch of `snat_egress`/`snat_ingress`: each
//! program is verified on its own, and the IPv4 egress program's port loop
//! already costs the verifier most of what one program may. Each returns
//! "next" at once for the other family. Bindings share the IPv4 maps
//! (SNAT_ORIG/SNAT_REPLY, MASQ_SOURCES, UPLINKS): the family byte of the
//! keys keeps them apart, and the agent's expiry, flush and dump serve both.
//!
//! What IPv6 changes:
//! - no header checksum: an address change moves only the transport
//!   checksum, through the pseudo-header — ICMPv6's included, which ICMPv4's
//!   does not cover (`rewrite::rewrite6`);
//! - UDP checksums are mandatory: never written as zero;
//! - the parser follows a Fragment header right after the fixed header
//!   (`parsing::ext_headers6`; other extension headers pass untranslated),
//!   and fragments are handled as IPv4's (`frag`): a translated first
//!   fragment is remembered by (source, destination, 32-bit fragment id,
//!   protocol), and the fragments after it get the same address.
use aya_ebpf::{
    bindings::{bpf_sock_tuple, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM, BPF_NOEXIST, TC_ACT_SHOT},
    helpers::{bpf_get_prandom_u32, bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp},
    macros::classifier,
    programs::TcContext,
};
use cni_ebpf_common::{
    ct_state, stat, CtKey, HostPortKey, IpKey, MasqPolicy, NatEntry, UplinkConfig, FAMILY_V6,
};

use crate::{
    conntrack::{flag_bits, now, touch, v6_key, SNAT_ORIG, SNAT_REPLY},
    frag::{self, Frag},
    hostport::HOSTPORTS,
    nat::{finish, restart, take_over_closed, CURRENT_NETNS, MASQ_SOURCES, PORT_TRIES, UPLINKS},
    parsing::{
        is_icmp6_error, parse_icmp6_error, parse_ipv6, Ipv6Packet, ETH_HLEN, ICMP6_ECHO_REPLY,
        ICMP6_ECHO_REQUEST, IP6_DADDR, IP6_SADDR, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
        TCP_FLAG_ACK, TCP_FLAG_SYN,
    },
    rewrite::{csum_replace_128, rewrite6},
    stats::bump,
    NEXT,
};

#[classifier]
pub fn snat6_egress(ctx: TcContext) -> i32 {
    match try_snat6_egress(&ctx) {
        Ok(action) => action,
        Err(()) => NEXT,
    }
}

#[classifier]
pub fn snat6_ingress(ctx: TcContext) -> i32 {
    match try_snat6_ingress(&ctx) {
        Ok(action) => action,
        Err(()) => NEXT,
    }
}

/// Whether `addr` lies in `net`/`prefix_len` (all network byte order).
#[inline(always)]
fn in_prefix6(addr: &[u32; 4], net: &[u32; 4], prefix_len: u8) -> bool {
    let len = u32::from(prefix_len).min(128);
    for i in 0..4 {
        let start = 32 * i as u32;
        if len <= start {
            return true;
        }
        let bits = (len - start).min(32);
        let mask = if bits == 32 {
            u32::MAX
        } else {
            u32::MAX << (32 - bits)
        };
        if (u32::from_be(addr[i]) ^ u32::from_be(net[i])) & mask != 0 {
            return false;
        }
    }
    true
}

/// ff00::/8.
#[inline(always)]
fn is_multicast6(addr: &[u32; 4]) -> bool {
    u32::from_be(addr[0]) >> 24 == 0xff
}

#[inline(always)]
fn has_v6(u: &UplinkConfig) -> bool {
    u.addr_v6 != [0; 4]
}

/// The uplink the packet is on, if it has an IPv6 address.
#[inline(always)]
fn uplink_of(ctx: &TcContext) -> Option<UplinkConfig> {
    // SAFETY: __sk_buff is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: read-only use of a map value during this run.
    match unsafe { UPLINKS.get(&ifindex) } {
        Some(u) if has_v6(u) => Some(*u),
        _ => None,
    }
}

/// The original-direction key of a packet leaving the pod (ICMPv6 echo:
/// the id stands for the source port, the destination port is 0).
#[inline(always)]
fn orig_key(pkt: &Ipv6Packet) -> CtKey {
    let dport = if pkt.proto == IPPROTO_ICMPV6 {
        0
    } else {
        pkt.dport
    };
    v6_key(pkt.saddr, pkt.daddr, pkt.sport, dport, pkt.proto)
}

fn try_snat6_egress(ctx: &TcContext) -> Result<i32, ()> {
    let pkt = parse_ipv6(ctx).ok_or(())?;
    if pkt.proto == IPPROTO_ICMPV6 && pkt.icmp_type != ICMP6_ECHO_REQUEST {
        return Ok(NEXT);
    }
    let src = IpKey {
        addr: pkt.saddr,
        family: FAMILY_V6,
        _pad: [0; 3],
    };
    // SAFETY: read-only use of a map value during this run.
    let policy: &MasqPolicy = match unsafe { MASQ_SOURCES.get(&src) } {
        Some(p) => p,
        None => return node_flow_egress6(ctx, &pkt),
    };
    // As the reference's ip6tables chain: never the pod's own network,
    // never multicast.
    if in_prefix6(&pkt.daddr, &policy.exclude_addr, policy.exclude_prefix_len)
        || is_multicast6(&pkt.daddr)
    {
        return Ok(NEXT);
    }
    let Some(uplink) = uplink_of(ctx) else {
        return Ok(NEXT);
    };
    let key = orig_key(&pkt);
    let bits = flag_bits(pkt.proto, pkt.tcp_flags);
    let (nat_addr, nat_port) = match SNAT_ORIG.get_ptr_mut(&key) {
        // SAFETY: valid map value pointer for this run.
        Some(e) if unsafe { (*e).state } & ct_state::INBOUND != 0 => {
            // A reply of a flow the remote opened keeps the pod's address.
            touch(e, bits);
            return Ok(NEXT);
        }
        Some(e) => {
            // A new connection on a finished one's tuple starts clean.
            if pkt.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN {
                restart(e, &key);
            }
            touch(e, bits);
            // SAFETY: valid map value pointer.
            unsafe { ((*e).addr, (*e).port) }
        }
        // Only a SYN opens a TCP binding: anything else without one
        // answers a connection the remote opened.
        None if pkt.proto == IPPROTO_TCP
            && pkt.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN =>
        {
            return Ok(NEXT);
        }
        // A later fragment never opens a binding: its first fragment did,
        // or the datagram is not ours.
        None if pkt.frag == Frag::Later => return Ok(NEXT),
        None => match bind6(ctx, &pkt, &key, &uplink, bits) {
            Some(port) => (uplink.addr_v6, port),
            None => {
                bump(stat::SNAT_NO_PORT);
                return Ok(TC_ACT_SHOT);
            }
        },
    };
    rewrite6(
        ctx,
        &pkt,
        ETH_HLEN + IP6_SADDR,
        &pkt.saddr,
        &nat_addr,
        pkt.sport_off(),
        pkt.sport,
        nat_port,
    )?;
    frag::translated6(ctx, &pkt);
    bump(stat::SNAT_XLATE);
    bump(stat::SNAT6_XLATE);
    Ok(NEXT)
}

/// A packet of the node's own leaving with the uplink's IPv6 address: as
/// for IPv4 (`nat::node_flow_egress`), a flow whose tuple a pod's binding
/// holds is moved to a free port of the range, so neither steals the
/// other's replies.
#[inline(always)]
fn node_flow_egress6(ctx: &TcContext, pkt: &Ipv6Packet) -> Result<i32, ()> {
    let uplink = match uplink_of(ctx) {
        Some(u) if u.addr_v6 == pkt.saddr => u,
        _ => return Ok(NEXT),
    };
    let key = orig_key(pkt);
    let bits = flag_bits(pkt.proto, pkt.tcp_flags);
    let port = match SNAT_ORIG.get_ptr_mut(&key) {
        Some(e) => {
            touch(e, bits);
            // SAFETY: valid map value pointer for this run.
            unsafe { (*e).port }
        }
        // Later fragments carry no ports to move.
        None if pkt.frag == Frag::Later => return Ok(NEXT),
        None => {
            let rkey = v6_key(pkt.daddr, pkt.saddr, key.dport, pkt.sport, pkt.proto);
            // SAFETY: read-only use of a map value during this run.
            if unsafe { SNAT_REPLY.get(&rkey) }.is_none() {
                return Ok(NEXT);
            }
            let port = bind6(ctx, pkt, &key, &uplink, bits).ok_or(())?;
            bump(stat::SNAT_NODE_FLOW);
            port
        }
    };
    if port == pkt.sport {
        return Ok(NEXT);
    }
    rewrite6(
        ctx,
        pkt,
        ETH_HLEN + IP6_SADDR,
        &pkt.saddr,
        &pkt.saddr,
        pkt.sport_off(),
        pkt.sport,
        port,
    )?;
    bump(stat::SNAT_XLATE);
    bump(stat::SNAT6_XLATE);
    Ok(NEXT)
}

/// Creates a binding for a new flow exactly as `nat::bind` does for IPv4:
/// the pod's own source port when the translated tuple is free (no binding,
/// no node socket, no hostPort), else a port of the range, else the port of
/// a closed connection. Both halves are inserted with BPF_NOEXIST, so when
/// two CPUs bind the same flow at once one binding wins and both packets
/// use it. Returns the port in network byte order.
#[inline(always)]
fn bind6(
    ctx: &TcContext,
    pkt: &Ipv6Packet,
    key: &CtKey,
    uplink: &UplinkConfig,
    bits: u8,
) -> Option<u16> {
    let span = u32::from(uplink.port_max).checked_sub(u32::from(uplink.port_min))? + 1;
    // SAFETY: helper without side effects.
    let start = unsafe { bpf_get_prandom_u32() };
    let ts = now();
    let reply_val = NatEntry {
        addr: pkt.saddr,
        port: key.sport,
        state: 0,
        _pad: 0,
        _pad2: 0,
        last_seen_ns: ts,
    };
    let orig_val = |port| NatEntry {
        addr: uplink.addr_v6,
        port,
        state: bits,
        _pad: 0,
        _pad2: 0,
        last_seen_ns: ts,
    };
    let rkey = |port| v6_key(pkt.daddr, uplink.addr_v6, key.dport, port, pkt.proto);
    // The flow's own port first (ICMPv6 identifiers stay in the range: ping
    // sockets cannot be looked up).
    if pkt.proto != IPPROTO_ICMPV6 {
        let kept = key.sport;
        if port_in_use6(ctx, pkt, &uplink.addr_v6, kept) {
            bump(stat::SNAT_PORT_IN_USE);
        } else if SNAT_REPLY
            .insert(&rkey(kept), &reply_val, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return finish(key, &rkey(kept), &orig_val(kept), stat::SNAT_PORT_KEPT);
        }
    }
    for i in 0..2 * PORT_TRIES {
        let take_over = i >= PORT_TRIES;
        let port = ((u32::from(uplink.port_min) + (start.wrapping_add(i % PORT_TRIES) % span))
            as u16)
            .to_be();
        let rk = rkey(port);
        let claimed = if take_over {
            take_over_closed(&rk, &reply_val, pkt.proto)
        } else {
            SNAT_REPLY
                .insert(&rk, &reply_val, u64::from(BPF_NOEXIST))
                .is_ok()
        };
        if claimed {
            return finish(key, &rk, &orig_val(port), stat::SNAT_NEW);
        }
    }
    None
}

/// The IPv6 half of `struct bpf_sock_tuple`: its size tells the lookup
/// helpers the family.
#[repr(C)]
struct SockTupleV6 {
    saddr: [u32; 4],
    daddr: [u32; 4],
    sport: u16,
    dport: u16,
}

/// Whether `addr:port` is used for `pkt`'s remote by the node itself: an
/// IPv6 hostPort (on this address or any), or a socket of the node's
/// namespace a reply to that tuple would reach (`nat::port_in_use`).
#[inline(always)]
fn port_in_use6(ctx: &TcContext, pkt: &Ipv6Packet, addr: &[u32; 4], port: u16) -> bool {
    let mut hp = HostPortKey {
        addr: *addr,
        port,
        proto: pkt.proto,
        family: FAMILY_V6,
    };
    // SAFETY: read-only use of map values during this run.
    if unsafe { HOSTPORTS.get(&hp) }.is_some() {
        return true;
    }
    hp.addr = [0; 4];
    // SAFETY: as above.
    if unsafe { HOSTPORTS.get(&hp) }.is_some() {
        return true;
    }
    let mut tuple = SockTupleV6 {
        saddr: pkt.daddr,
        daddr: *addr,
        sport: pkt.dport,
        dport: port,
    };
    let tuple_ptr = &mut tuple as *mut SockTupleV6 as *mut bpf_sock_tuple;
    let size = core::mem::size_of::<SockTupleV6>() as u32;
    let skb = ctx.skb.skb as *mut core::ffi::c_void;
    // SAFETY: the tuple lives on this stack frame; a socket returned by the
    // lookup is released before returning, as the verifier requires.
    unsafe {
        let sk = match pkt.proto {
            IPPROTO_TCP => bpf_skc_lookup_tcp(skb, tuple_ptr, size, CURRENT_NETNS, 0),
            IPPROTO_UDP => bpf_sk_lookup_udp(skb, tuple_ptr, size, CURRENT_NETNS, 0),
            _ => return false,
        };
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk as *mut core::ffi::c_void);
    }
    true
}

fn try_snat6_ingress(ctx: &TcContext) -> Result<i32, ()> {
    let pkt = parse_ipv6(ctx).ok_or(())?;
    if pkt.proto == IPPROTO_ICMPV6 && pkt.icmp_type != ICMP6_ECHO_REPLY {
        // An error quotes a packet right after its own header, which a
        // later fragment does not have.
        if is_icmp6_error(pkt.icmp_type) && pkt.frag != Frag::Later {
            return icmp6_error_ingress(ctx, &pkt);
        }
        return Ok(NEXT);
    }
    let sport = if pkt.proto == IPPROTO_ICMPV6 {
        0
    } else {
        pkt.sport
    };
    let rkey = v6_key(pkt.saddr, pkt.daddr, sport, pkt.dport, pkt.proto);
    let Some(rev) = SNAT_REPLY.get_ptr_mut(&rkey) else {
        if pkt.proto == IPPROTO_UDP && pkt.frag != Frag::Later {
            note_inbound6(&pkt);
        }
        return Ok(NEXT);
    };
    touch(rev, flag_bits(pkt.proto, pkt.tcp_flags) | ct_state::REPLIED);
    // SAFETY: valid map value pointer.
    let (pod_addr, pod_port) = unsafe { ((*rev).addr, (*rev).port) };

    // Repair the original half if LRU pressure evicted it.
    let okey = v6_key(pod_addr, pkt.saddr, pod_port, sport, pkt.proto);
    if SNAT_ORIG.get_ptr(&okey).is_none() {
        let orig_val = NatEntry {
            addr: pkt.daddr,
            port: pkt.dport,
            state: 0,
            _pad: 0,
            _pad2: 0,
            last_seen_ns: now(),
        };
        if SNAT_ORIG.insert(&okey, &orig_val, 0).is_ok() {
            bump(stat::SNAT_REPAIRED);
        }
    }
    rewrite6(
        ctx,
        &pkt,
        ETH_HLEN + IP6_DADDR,
        &pkt.daddr,
        &pod_addr,
        pkt.dport_off(),
        pkt.dport,
        pod_port,
    )?;
    frag::translated6(ctx, &pkt);
    bump(stat::SNAT_REPLY_XLATE);
    bump(stat::SNAT6_REPLY_XLATE);
    Ok(NEXT)
}

/// A UDP datagram routed in to a masqueraded pod's own IPv6 address: the
/// flow is the remote's, so the pod's replies keep its address
/// ([`ct_state::INBOUND`], as `nat::note_inbound`).
#[inline(always)]
fn note_inbound6(pkt: &Ipv6Packet) {
    let pod = IpKey {
        addr: pkt.daddr,
        family: FAMILY_V6,
        _pad: [0; 3],
    };
    // SAFETY: read-only use of a map value during this run.
    if unsafe { MASQ_SOURCES.get(&pod) }.is_none() {
        return;
    }
    let key = v6_key(pkt.daddr, pkt.saddr, pkt.dport, pkt.sport, pkt.proto);
    if let Some(e) = SNAT_ORIG.get_ptr_mut(&key) {
        touch(e, 0);
        return;
    }
    let entry = NatEntry {
        addr: pkt.daddr,
        port: pkt.dport,
        state: ct_state::INBOUND,
        _pad: 0,
        _pad2: 0,
        last_seen_ns: now(),
    };
    let _ = SNAT_ORIG.insert(&key, &entry, u64::from(BPF_NOEXIST));
}

/// An ICMPv6 error (Packet Too Big, Destination Unreachable, Time
/// Exceeded, Parameter Problem) about a masqueraded packet arrives for the
/// uplink's address and quotes the translated packet. The outer
/// destination and the quoted source address and port go back to the
/// pod's, or the pod never learns the path MTU (IPv6 routers never
/// fragment: without Packet Too Big, large transfers stall).
///
/// The ICMPv6 checksum covers the pseudo-header and the whole message: the
/// quoted bytes are plain message bytes (no pseudo-header flag, stores
/// without skb->csum update since the checksum field's change offsets
/// them), the outer destination is in the pseudo-header (as in
/// `rewrite6`). The quoted transport checksum is left as it was: nobody
/// checks a truncated packet's.
fn icmp6_error_ingress(ctx: &TcContext, pkt: &Ipv6Packet) -> Result<i32, ()> {
    let inner = parse_icmp6_error(ctx, pkt).ok_or(())?;
    if inner.saddr != pkt.daddr {
        return Ok(NEXT);
    }
    // The quoted packet went (uplink address, translated port) -> remote,
    // so its reply tuple is remote -> (uplink address, translated port).
    let rsport = if inner.proto == IPPROTO_ICMPV6 {
        0
    } else {
        inner.dport
    };
    let rkey = v6_key(inner.daddr, inner.saddr, rsport, inner.sport, inner.proto);
    // SAFETY: read-only use of a map value during this run.
    let rev = unsafe { SNAT_REPLY.get(&rkey) }.ok_or(())?;
    let (pod_addr, pod_port) = (rev.addr, rev.port);
    let csum = pkt.l4 + 2;

    csum_replace_128(ctx, csum, &inner.saddr, &pod_addr, 0)?;
    ctx.l4_csum_replace(csum, inner.sport as u64, pod_port as u64, 2)
        .map_err(|_| ())?;
    ctx.store(inner.l3 + IP6_SADDR, &pod_addr, 0)
        .map_err(|_| ())?;
    ctx.store(inner.sport_off(), &pod_port, 0).map_err(|_| ())?;

    csum_replace_128(
        ctx,
        csum,
        &pkt.daddr,
        &pod_addr,
        u64::from(BPF_F_PSEUDO_HDR),
    )?;
    ctx.store(
        ETH_HLEN + IP6_DADDR,
        &pod_addr,
        u64::from(BPF_F_RECOMPUTE_CSUM),
    )
    .map_err(|_| ())?;
    bump(stat::SNAT_ICMP_ERROR_XLATE);
    Ok(NEXT)
}
