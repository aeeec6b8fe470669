//! IPv6 hostPort mappings, with the IPv4 programs' semantics (`hostport`):
//!
//! - `hostport6_ingress`, uplink TC ingress: client -> [node]:hostPort
//!   becomes client -> [pod]:containerPort, and the reply translation is
//!   recorded (`hostport_xdp` does the lookup and rewrite at XDP in XDP
//!   mode and leaves the transport checksum to this program).
//! - `hostport6_egress`, uplink TC egress, before the IPv6 masquerade: the
//!   pod's reply gets [node]:hostPort back as its source.
//! - `bridge6_from_pods`, bridge TC ingress: hairpin (a pod reaching a
//!   hostPort of this node over IPv6), translated both ways and redirected
//!   straight back onto the bridge; with `snat` the target pod sees the
//!   bridge's IPv6 address (BRIDGES6).
//!
//! Programs of their own, as for the masquerade (`nat6`): each returns
//! "next" at once for IPv4, and neither family's verification budget
//! limits the other's. They share the IPv4 maps (HOSTPORTS, NODE_ADDRS,
//! HP_ORIG, HP_REPLY): the family byte of every key keeps them apart, and
//! the agent's expiry and DEL serve both.
//!
//! ICMPv6 errors about DNATed flows are translated both ways, as the
//! reference's conntrack does for RELATED packets: one that arrives for
//! [node]:hostPort's reply (Packet Too Big from a router on the client's
//! path, above all: without it the pod never learns the path MTU) goes to
//! the pod, and one the pod sends about a DNATed packet (port unreachable)
//! leaves as [node]:hostPort's.
//!
//! IPv6 has no header checksum: an address change moves only the transport
//! checksum, through the pseudo-header (`rewrite::rewrite6`). Fragments
//! are handled as in the IPv6 masquerade and IPv4's hostPorts (`frag`):
//! every program that translates a first fragment remembers it, and the
//! fragments after it get the same address translation.
use aya_ebpf::{
    bindings::{BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM, BPF_NOEXIST, TC_ACT_SHOT},
    helpers::bpf_get_prandom_u32,
    macros::{classifier, map},
    maps::HashMap,
    programs::TcContext,
};
use cni_ebpf_common::{
    hostport_flags, stat, CtKey, HostPortKey, HostPortTarget, HpReply, IpKey, NatEntry,
    XdpDnat6Meta, FAMILY_V6, XDP_DNAT6_MAGIC,
};

use crate::{
    conntrack::{flag_bits, now, v6_key},
    frag::{self, Frag},
    hostport::{redirect, HOSTPORTS, HP_ORIG, HP_REPLY, NODE_ADDRS, PORT_TRIES},
    parsing::{
        is_icmp6_error, parse_icmp6_error, parse_ipv6, Ipv6Packet, ETH_HLEN, IP6_DADDR, IP6_SADDR,
        IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
    },
    rewrite::{csum_replace_128, fix_l4_csum6, rewrite6},
    stats::bump,
    NEXT,
};

/// Bridge ifindex -> the bridge's IPv6 address (network order words).
#[map(name = "BRIDGES6")]
static BRIDGES6: HashMap<u32, [u32; 4]> = HashMap::pinned(256, 0);

/// ::1.
#[inline(always)]
fn is_loopback6(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == 1u32.to_be()
}

/// The IPv6 mapping for (address, port, protocol), if any: an exact hostIP
/// mapping first, then an any-address one if `addr` is the node's own (or,
/// for node-local sockets, ::1). Keys are built here and passed by
/// reference: the 512-byte stack has no room for copies.
#[inline(always)]
pub fn lookup6(
    addr: &[u32; 4],
    port_be: u16,
    proto: u8,
    allow_loopback: bool,
) -> Option<HostPortTarget> {
    let mut key = HostPortKey {
        addr: *addr,
        port: port_be,
        proto,
        family: FAMILY_V6,
    };
    // SAFETY: read-only use of map values during this run.
    if let Some(t) = unsafe { HOSTPORTS.get(&key) } {
        return Some(*t);
    }
    let ip = IpKey {
        addr: *addr,
        family: FAMILY_V6,
        _pad: [0; 3],
    };
    // SAFETY: read-only use of a map value during this run.
    let local = unsafe { NODE_ADDRS.get(&ip) }.is_some() || (allow_loopback && is_loopback6(addr));
    if !local {
        return None;
    }
    key.addr = [0; 4];
    // SAFETY: read-only use of a map value during this run.
    unsafe { HOSTPORTS.get(&key) }.copied()
}

/// Records (or refreshes) how replies of a DNATed IPv6 flow are translated:
/// the reply leaves the pod as (pod, containerPort) -> `reply_to`.
#[inline(always)]
pub fn note_reply6(pkt: &Ipv6Packet, t: &HostPortTarget, reply_to: (&[u32; 4], u16), hairpin: u8) {
    let rkey = v6_key(t.addr, *reply_to.0, t.port, reply_to.1, pkt.proto);
    let bits = flag_bits(pkt.proto, pkt.tcp_flags);
    match HP_REPLY.get_ptr_mut(&rkey) {
        // SAFETY: valid map value pointer for this run.
        Some(r) => unsafe {
            (*r).last_seen_ns = now();
            (*r).state |= bits;
        },
        None => {
            let r = HpReply {
                src_addr: pkt.daddr,
                dst_addr: pkt.saddr,
                src_port: pkt.dport,
                dst_port: pkt.sport,
                state: bits,
                hairpin,
                _pad: [0; 2],
                last_seen_ns: now(),
            };
            let _ = HP_REPLY.insert(&rkey, &r, 0);
        }
    }
}

#[inline(always)]
fn tcp_or_udp6(ctx: &TcContext) -> Option<Ipv6Packet> {
    let pkt = parse_ipv6(ctx)?;
    (pkt.proto == IPPROTO_TCP || pkt.proto == IPPROTO_UDP).then_some(pkt)
}

/// The old destination the XDP program left in the metadata, if it
/// translated this packet.
#[inline(always)]
fn xdp_dnat6_meta(ctx: &TcContext) -> Option<XdpDnat6Meta> {
    // SAFETY: __sk_buff is valid for the program's run; the metadata is
    // read only after the bounds check the verifier wants.
    let (meta, data) = unsafe {
        (
            (*ctx.skb.skb).data_meta as usize,
            (*ctx.skb.skb).data as usize,
        )
    };
    if meta + core::mem::size_of::<XdpDnat6Meta>() > data {
        return None;
    }
    // SAFETY: `meta` was bounds checked against data above.
    let m = unsafe { *(meta as *const XdpDnat6Meta) };
    (m.magic == XDP_DNAT6_MAGIC).then_some(m)
}

#[classifier]
pub fn hostport6_ingress(ctx: TcContext) -> i32 {
    match try_hostport6_ingress(&ctx) {
        Ok(action) => action,
        Err(()) => TC_ACT_SHOT,
    }
}

fn try_hostport6_ingress(ctx: &TcContext) -> Result<i32, ()> {
    let Some(pkt) = parse_ipv6(ctx) else {
        return Ok(NEXT);
    };
    if pkt.proto == IPPROTO_ICMPV6 {
        if is_icmp6_error(pkt.icmp_type) && pkt.frag != Frag::Later {
            return icmp6_error_to_pod(ctx, &pkt);
        }
        return Ok(NEXT);
    }
    // Already translated at XDP: only the transport checksum is left (XDP
    // leaves packets with extension headers, fragments among them, to us).
    if let Some(m) = xdp_dnat6_meta(ctx) {
        fix_l4_csum6(ctx, &pkt, &m.old_daddr, &pkt.daddr, m.old_dport, pkt.dport)?;
        return Ok(NEXT);
    }
    let Some(t) = lookup6(&pkt.daddr, pkt.dport, pkt.proto, false) else {
        return Ok(NEXT);
    };
    if pkt.frag != Frag::Later {
        note_reply6(&pkt, &t, (&pkt.saddr, pkt.sport), 0);
    }
    rewrite6(
        ctx,
        &pkt,
        ETH_HLEN + IP6_DADDR,
        &pkt.daddr,
        &t.addr,
        pkt.dport_off(),
        pkt.dport,
        t.port,
    )?;
    frag::translated6(ctx, &pkt);
    bump(stat::HOSTPORT_DNAT);
    Ok(NEXT)
}

#[classifier]
pub fn hostport6_egress(ctx: TcContext) -> i32 {
    match try_hostport6_egress(&ctx) {
        Ok(action) => action,
        Err(()) => TC_ACT_SHOT,
    }
}

fn try_hostport6_egress(ctx: &TcContext) -> Result<i32, ()> {
    let Some(pkt) = parse_ipv6(ctx) else {
        return Ok(NEXT);
    };
    if pkt.proto == IPPROTO_ICMPV6 {
        if is_icmp6_error(pkt.icmp_type) && pkt.frag != Frag::Later {
            return icmp6_error_from_pod(ctx, &pkt);
        }
        return Ok(NEXT);
    }
    let rkey = v6_key(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto);
    let Some(r) = HP_REPLY.get_ptr_mut(&rkey) else {
        return Ok(NEXT);
    };
    // SAFETY: valid map value pointer for this run.
    let (src, sport, hairpin) = unsafe {
        (*r).last_seen_ns = now();
        (*r).state |= flag_bits(pkt.proto, pkt.tcp_flags);
        ((*r).src_addr, (*r).src_port, (*r).hairpin)
    };
    if hairpin != 0 {
        return Ok(NEXT);
    }
    rewrite6(
        ctx,
        &pkt,
        ETH_HLEN + IP6_SADDR,
        &pkt.saddr,
        &src,
        pkt.sport_off(),
        pkt.sport,
        sport,
    )?;
    frag::translated6(ctx, &pkt);
    bump(stat::HOSTPORT_REPLY);
    Ok(NEXT)
}

#[classifier]
pub fn bridge6_from_pods(ctx: TcContext) -> i32 {
    match try_bridge6_from_pods(&ctx) {
        Ok(action) => action,
        Err(()) => TC_ACT_SHOT,
    }
}

fn try_bridge6_from_pods(ctx: &TcContext) -> Result<i32, ()> {
    let Some(pkt) = tcp_or_udp6(ctx) else {
        return Ok(NEXT);
    };
    // SAFETY: __sk_buff is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };

    // A reply of a hairpin flow, from the target pod to the address the
    // client was masqueraded to: back to the client pod, from
    // [node]:hostPort.
    let rkey = v6_key(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto);
    if let Some(r) = HP_REPLY.get_ptr_mut(&rkey) {
        // SAFETY: valid map value pointer for this run.
        let (hairpin, src, sport, dst, dport) = unsafe {
            (*r).last_seen_ns = now();
            (*r).state |= flag_bits(pkt.proto, pkt.tcp_flags);
            (
                (*r).hairpin,
                (*r).src_addr,
                (*r).src_port,
                (*r).dst_addr,
                (*r).dst_port,
            )
        };
        if hairpin == 0 {
            return Ok(NEXT);
        }
        rewrite6(
            ctx,
            &pkt,
            ETH_HLEN + IP6_SADDR,
            &pkt.saddr,
            &src,
            pkt.sport_off(),
            pkt.sport,
            sport,
        )?;
        rewrite6(
            ctx,
            &pkt,
            ETH_HLEN + IP6_DADDR,
            &pkt.daddr,
            &dst,
            pkt.dport_off(),
            pkt.dport,
            dport,
        )?;
        frag::translated6(ctx, &pkt);
        bump(stat::HOSTPORT_HAIRPIN);
        return Ok(redirect(ifindex));
    }

    // A pod reaching a hostPort of this node.
    let Some(t) = lookup6(&pkt.daddr, pkt.dport, pkt.proto, false) else {
        return Ok(NEXT);
    };
    let (src, sport) = match HP_ORIG.get_ptr_mut(&rkey) {
        // SAFETY: valid map value pointer for this run.
        Some(e) => unsafe {
            (*e).last_seen_ns = now();
            ((*e).addr, (*e).port)
        },
        // A later fragment opens no binding: its first fragment did.
        None if pkt.frag == Frag::Later => return Ok(NEXT),
        None => match hairpin_bind6(&pkt, &t, ifindex, &rkey) {
            Some(b) => b,
            None => {
                bump(stat::HOSTPORT_NO_PORT);
                return Ok(TC_ACT_SHOT);
            }
        },
    };
    rewrite6(
        ctx,
        &pkt,
        ETH_HLEN + IP6_DADDR,
        &pkt.daddr,
        &t.addr,
        pkt.dport_off(),
        pkt.dport,
        t.port,
    )?;
    if src != pkt.saddr || sport != pkt.sport {
        rewrite6(
            ctx,
            &pkt,
            ETH_HLEN + IP6_SADDR,
            &pkt.saddr,
            &src,
            pkt.sport_off(),
            pkt.sport,
            sport,
        )?;
    }
    frag::translated6(ctx, &pkt);
    bump(stat::HOSTPORT_HAIRPIN);
    Ok(redirect(ifindex))
}

/// Picks the source an IPv6 hairpin flow is seen from, as `hostport`'s
/// IPv4 `hairpin_bind`: with `snat`, the bridge's IPv6 address and a port
/// free for this target (the pod's own port if possible); without, the
/// pod's own address and port. Writes both halves.
#[inline(always)]
fn hairpin_bind6(
    pkt: &Ipv6Packet,
    t: &HostPortTarget,
    ifindex: u32,
    okey: &CtKey,
) -> Option<([u32; 4], u16)> {
    let snat_addr = if t.flags & hostport_flags::SNAT != 0 {
        // SAFETY: read-only use of a map value during this run.
        unsafe { BRIDGES6.get(&ifindex) }
            .copied()
            .filter(|a| *a != [0; 4])
    } else {
        None
    };
    let snat = snat_addr.is_some();
    let src = snat_addr.unwrap_or(pkt.saddr);
    let reply = HpReply {
        src_addr: pkt.daddr,
        dst_addr: pkt.saddr,
        src_port: pkt.dport,
        dst_port: pkt.sport,
        state: flag_bits(pkt.proto, pkt.tcp_flags),
        hairpin: 1,
        _pad: [0; 2],
        last_seen_ns: now(),
    };
    // SAFETY: helper without side effects.
    let rnd = unsafe { bpf_get_prandom_u32() };
    for i in 0..PORT_TRIES {
        // First the pod's own port; then random ones above 1024.
        let port = if i == 0 || !snat {
            pkt.sport
        } else {
            ((1024 + (rnd.wrapping_add(i) % 64512)) as u16).to_be()
        };
        let rkey = v6_key(t.addr, src, t.port, port, pkt.proto);
        if HP_REPLY
            .insert(&rkey, &reply, u64::from(BPF_NOEXIST))
            .is_err()
        {
            // Without snat only the pod's own port will do.
            if !snat {
                return None;
            }
            continue;
        }
        let orig = NatEntry {
            addr: src,
            port,
            state: 0,
            _pad: 0,
            _pad2: 0,
            last_seen_ns: now(),
        };
        if HP_ORIG.insert(okey, &orig, 0).is_err() {
            let _ = HP_REPLY.remove(&rkey);
            return None;
        }
        return Some((src, port));
    }
    None
}

/// An ICMPv6 error for [node]:hostPort, quoting a reply that
/// `hostport6_egress` translated ([node]:hostPort -> client): the outer
/// destination and the quoted source go back to the pod's address and
/// port. Checksums as in `nat6`'s ICMPv6 error translation: the quoted
/// bytes are plain message bytes (their store needs no skb->csum update,
/// the checksum field's change offsets them), the outer destination is in
/// the pseudo-header. The quoted transport checksum is left as it was.
#[inline(always)]
fn icmp6_error_to_pod(ctx: &TcContext, pkt: &Ipv6Packet) -> Result<i32, ()> {
    let Some(inner) = parse_icmp6_error(ctx, pkt) else {
        return Ok(NEXT);
    };
    if inner.saddr != pkt.daddr || (inner.proto != IPPROTO_TCP && inner.proto != IPPROTO_UDP) {
        return Ok(NEXT);
    }
    let Some(t) = lookup6(&inner.saddr, inner.sport, inner.proto, false) else {
        return Ok(NEXT);
    };
    // Only for a flow the mapping actually carries to that client.
    let rkey = v6_key(t.addr, inner.daddr, t.port, inner.dport, inner.proto);
    // SAFETY: read-only use of a map value during this run.
    match unsafe { HP_REPLY.get(&rkey) } {
        Some(r) if r.hairpin == 0 && r.src_addr == inner.saddr && r.src_port == inner.sport => {}
        _ => return Ok(NEXT),
    }
    let csum = pkt.l4 + 2;
    csum_replace_128(ctx, csum, &inner.saddr, &t.addr, 0)?;
    ctx.l4_csum_replace(csum, inner.sport as u64, t.port as u64, 2)
        .map_err(|_| ())?;
    ctx.store(inner.l3 + IP6_SADDR, &t.addr, 0)
        .map_err(|_| ())?;
    ctx.store(inner.sport_off(), &t.port, 0).map_err(|_| ())?;
    csum_replace_128(ctx, csum, &pkt.daddr, &t.addr, u64::from(BPF_F_PSEUDO_HDR))?;
    ctx.store(
        ETH_HLEN + IP6_DADDR,
        &t.addr,
        u64::from(BPF_F_RECOMPUTE_CSUM),
    )
    .map_err(|_| ())?;
    bump(stat::HOSTPORT_ICMP_ERROR_XLATE);
    Ok(NEXT)
}

/// An ICMPv6 error the pod sends about a packet the DNAT delivered to it
/// (client -> [pod]:containerPort, e.g. a UDP port nobody listens on):
/// the outer source and the quoted destination become [node]:hostPort,
/// so the client's socket matches it (a connected UDP socket then gets
/// "connection refused" instead of waiting).
#[inline(always)]
fn icmp6_error_from_pod(ctx: &TcContext, pkt: &Ipv6Packet) -> Result<i32, ()> {
    let Some(inner) = parse_icmp6_error(ctx, pkt) else {
        return Ok(NEXT);
    };
    if inner.daddr != pkt.saddr || (inner.proto != IPPROTO_TCP && inner.proto != IPPROTO_UDP) {
        return Ok(NEXT);
    }
    // The quoted packet went client -> pod: its reply tuple is the key.
    let rkey = v6_key(
        inner.daddr,
        inner.saddr,
        inner.dport,
        inner.sport,
        inner.proto,
    );
    // SAFETY: read-only use of a map value during this run.
    let (node, hport) = match unsafe { HP_REPLY.get(&rkey) } {
        Some(r) if r.hairpin == 0 => (r.src_addr, r.src_port),
        _ => return Ok(NEXT),
    };
    let csum = pkt.l4 + 2;
    csum_replace_128(ctx, csum, &inner.daddr, &node, 0)?;
    ctx.l4_csum_replace(csum, inner.dport as u64, hport as u64, 2)
        .map_err(|_| ())?;
    ctx.store(inner.l3 + IP6_DADDR, &node, 0).map_err(|_| ())?;
    ctx.store(inner.l4 + 2, &hport, 0).map_err(|_| ())?;
    csum_replace_128(ctx, csum, &pkt.saddr, &node, u64::from(BPF_F_PSEUDO_HDR))?;
    ctx.store(ETH_HLEN + IP6_SADDR, &node, u64::from(BPF_F_RECOMPUTE_CSUM))
        .map_err(|_| ())?;
    bump(stat::HOSTPORT_ICMP_ERROR_XLATE);
    Ok(NEXT)
}
