//! hostPort mappings (the reference portmap's DNAT, in eBPF).
//!
//! - `hostport_ingress`, uplink TC ingress: client -> node:hostPort becomes
//!   client -> pod:containerPort, and the reply translation is recorded.
//!   (`hostport_xdp` does the same at XDP.)
//! - `hostport_egress`, uplink TC egress, before the masquerade: the pod's
//!   reply gets node:hostPort back as its source.
//! - `bridge_from_pods`, bridge TC ingress (everything pods send to the host
//!   stack passes here): hairpin — a pod reaching a hostPort of this node —
//!   is translated both ways and redirected straight back onto the bridge,
//!   since a packet whose source is a local address would be dropped as
//!   martian by the host's input routing.
//!
//! ICMP errors about DNATed flows are translated both ways, as the
//! reference's conntrack does for RELATED packets: one for node:hostPort
//! quoting a reply as it left (fragmentation needed from a router on the
//! client's path, above all: without it the pod never learns the path MTU)
//! goes to the pod (`hostport_ingress`), and one the pod sends about a
//! DNATed packet (port unreachable) leaves as node:hostPort's
//! (`hostport_egress`). IPv6 does the same in `hostport6`.
//!
//! Node-local clients are served at the socket layer (`sock.rs`). Every
//! fragment of a datagram gets its first fragment's translation (`frag`).
//! IPv6 has programs of its own (`hostport6`), sharing these maps.
use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::{bpf_get_prandom_u32, bpf_redirect_neigh},
    macros::{classifier, map},
    maps::{HashMap, LruHashMap},
    programs::TcContext,
};
use cni_ebpf_common::{
    hostport_flags, stat, BridgeInfo, CtKey, HostPortKey, HostPortTarget, HpReply, IpKey, NatEntry,
    XdpDnatMeta, FAMILY_V4, XDP_DNAT_MAGIC,
};

use crate::{
    conntrack::{now, state_bits, v4_key},
    frag::{self, Frag},
    parsing::{
        is_icmp_error, parse_icmp_error, parse_ipv4, Ipv4Packet, IPPROTO_TCP, IPPROTO_UDP,
        IP_DADDR, IP_SADDR,
    },
    rewrite::{fix_l4_csum, rewrite, rewrite_icmp_error, Quoted},
    stats::bump,
    NEXT,
};

/// Source ports tried for a hairpin binding before giving up.
pub(crate) const PORT_TRIES: u32 = 16;
const CT_ENTRIES: u32 = 65536;

#[map(name = "HOSTPORTS")]
pub static HOSTPORTS: HashMap<HostPortKey, HostPortTarget> = HashMap::pinned(65536, 0);

#[map(name = "NODE_ADDRS")]
pub static NODE_ADDRS: HashMap<IpKey, u32> = HashMap::pinned(1024, 0);

#[map(name = "BRIDGES")]
pub(crate) static BRIDGES: HashMap<u32, BridgeInfo> = HashMap::pinned(256, 0);

#[map(name = "HP_ORIG")]
pub(crate) static HP_ORIG: LruHashMap<CtKey, NatEntry> = LruHashMap::pinned(CT_ENTRIES, 0);

#[map(name = "HP_REPLY")]
pub static HP_REPLY: LruHashMap<CtKey, HpReply> = LruHashMap::pinned(CT_ENTRIES, 0);

#[inline(always)]
fn v4_ip(addr: u32) -> IpKey {
    IpKey {
        addr: [addr, 0, 0, 0],
        family: FAMILY_V4,
        _pad: [0; 3],
    }
}

#[inline(always)]
fn is_loopback(addr_be: u32) -> bool {
    u32::from_be(addr_be) >> 24 == 127
}

/// The mapping for (address, port, protocol), if any: an exact hostIP
/// mapping first, then an any-address one if `addr` is the node's own (or,
/// for node-local sockets, loopback).
#[inline(always)]
pub fn lookup(addr: u32, port_be: u16, proto: u8, allow_loopback: bool) -> Option<HostPortTarget> {
    let mut key = HostPortKey {
        addr: [addr, 0, 0, 0],
        port: port_be,
        proto,
        family: FAMILY_V4,
    };
    // SAFETY: read-only use of map values during this run.
    if let Some(t) = unsafe { HOSTPORTS.get(&key) } {
        return Some(*t);
    }
    // SAFETY: read-only use of a map value during this run.
    let local =
        unsafe { NODE_ADDRS.get(&v4_ip(addr)) }.is_some() || (allow_loopback && is_loopback(addr));
    if !local {
        return None;
    }
    key.addr = [0; 4];
    // SAFETY: read-only use of a map value during this run.
    unsafe { HOSTPORTS.get(&key) }.copied()
}

/// Records (or refreshes) how replies of a DNATed flow are translated.
#[inline(always)]
pub fn note_reply(pkt: &Ipv4Packet, t: &HostPortTarget, reply_src: (u32, u16), hairpin: u8) {
    let rkey = v4_key(t.addr[0], reply_src.0, t.port, reply_src.1, pkt.proto);
    let bits = state_bits(pkt);
    match HP_REPLY.get_ptr_mut(&rkey) {
        // SAFETY: valid map value pointer for this run.
        Some(r) => unsafe {
            (*r).last_seen_ns = now();
            (*r).state |= bits;
        },
        None => {
            let r = HpReply {
                src_addr: [pkt.daddr, 0, 0, 0],
                dst_addr: [pkt.saddr, 0, 0, 0],
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
fn tcp_or_udp(ctx: &TcContext) -> Option<Ipv4Packet> {
    let pkt = parse_ipv4(ctx)?;
    (pkt.proto == IPPROTO_TCP || pkt.proto == IPPROTO_UDP).then_some(pkt)
}

/// The old destination the XDP program left in the metadata, if it
/// translated this packet.
#[inline(always)]
fn xdp_dnat_meta(ctx: &TcContext) -> Option<XdpDnatMeta> {
    // SAFETY: __sk_buff is valid for the program's run; the metadata is
    // read only after the bounds check the verifier wants.
    let (meta, data) = unsafe {
        (
            (*ctx.skb.skb).data_meta as usize,
            (*ctx.skb.skb).data as usize,
        )
    };
    if meta + core::mem::size_of::<XdpDnatMeta>() > data {
        return None;
    }
    // SAFETY: `meta` was bounds checked against data above.
    let m = unsafe { *(meta as *const XdpDnatMeta) };
    (m.magic == XDP_DNAT_MAGIC).then_some(m)
}

#[classifier]
pub fn hostport_ingress(ctx: TcContext) -> i32 {
    let Some(pkt) = parse_ipv4(&ctx) else {
        return NEXT;
    };
    if is_icmp_error(&pkt) {
        return icmp_error_to_pod(&ctx, &pkt).unwrap_or(TC_ACT_SHOT);
    }
    if pkt.proto != IPPROTO_TCP && pkt.proto != IPPROTO_UDP {
        return NEXT;
    }
    // Already translated at XDP: only the transport checksum is left (the
    // XDP program leaves no metadata on a later fragment, which has none).
    if let Some(m) = xdp_dnat_meta(&ctx) {
        if fix_l4_csum(&ctx, &pkt, m.old_daddr, pkt.daddr, m.old_dport, pkt.dport).is_err() {
            return TC_ACT_SHOT;
        }
        return NEXT;
    }
    let Some(t) = lookup(pkt.daddr, pkt.dport, pkt.proto, false) else {
        return NEXT;
    };
    if pkt.frag != Frag::Later {
        note_reply(&pkt, &t, (pkt.saddr, pkt.sport), 0);
    }
    if rewrite(
        &ctx,
        &pkt,
        IP_DADDR,
        pkt.daddr,
        t.addr[0],
        pkt.dport_off(),
        pkt.dport,
        t.port,
    )
    .is_err()
    {
        return TC_ACT_SHOT;
    }
    frag::translated(&pkt);
    bump(stat::HOSTPORT_DNAT);
    NEXT
}

#[classifier]
pub fn hostport_egress(ctx: TcContext) -> i32 {
    let Some(pkt) = parse_ipv4(&ctx) else {
        return NEXT;
    };
    if is_icmp_error(&pkt) {
        return icmp_error_from_pod(&ctx, &pkt).unwrap_or(TC_ACT_SHOT);
    }
    if pkt.proto != IPPROTO_TCP && pkt.proto != IPPROTO_UDP {
        return NEXT;
    }
    let rkey = v4_key(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto);
    let Some(r) = HP_REPLY.get_ptr_mut(&rkey) else {
        return NEXT;
    };
    // SAFETY: valid map value pointer for this run.
    let (src, sport, hairpin) = unsafe {
        (*r).last_seen_ns = now();
        (*r).state |= state_bits(&pkt);
        ((*r).src_addr[0], (*r).src_port, (*r).hairpin)
    };
    if hairpin != 0 {
        return NEXT;
    }
    if rewrite(
        &ctx,
        &pkt,
        IP_SADDR,
        pkt.saddr,
        src,
        pkt.sport_off(),
        pkt.sport,
        sport,
    )
    .is_err()
    {
        return TC_ACT_SHOT;
    }
    frag::translated(&pkt);
    bump(stat::HOSTPORT_REPLY);
    NEXT
}

#[classifier]
pub fn bridge_from_pods(ctx: TcContext) -> i32 {
    match try_bridge_from_pods(&ctx) {
        Ok(action) => action,
        Err(()) => TC_ACT_SHOT,
    }
}

fn try_bridge_from_pods(ctx: &TcContext) -> Result<i32, ()> {
    let Some(pkt) = tcp_or_udp(ctx) else {
        return Ok(NEXT);
    };
    // SAFETY: __sk_buff is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };

    // A reply of a hairpin flow, from the target pod to the masquerade
    // address: back to the client pod, from node:hostPort.
    let rkey = v4_key(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto);
    if let Some(r) = HP_REPLY.get_ptr_mut(&rkey) {
        // SAFETY: valid map value pointer for this run.
        let r = unsafe {
            (*r).last_seen_ns = now();
            (*r).state |= state_bits(&pkt);
            *r
        };
        if r.hairpin == 0 {
            return Ok(NEXT);
        }
        rewrite(
            ctx,
            &pkt,
            IP_SADDR,
            pkt.saddr,
            r.src_addr[0],
            pkt.sport_off(),
            pkt.sport,
            r.src_port,
        )?;
        rewrite(
            ctx,
            &pkt,
            IP_DADDR,
            pkt.daddr,
            r.dst_addr[0],
            pkt.dport_off(),
            pkt.dport,
            r.dst_port,
        )?;
        frag::translated(&pkt);
        bump(stat::HOSTPORT_HAIRPIN);
        return Ok(redirect(ifindex));
    }

    // A pod reaching a hostPort of this node.
    let Some(t) = lookup(pkt.daddr, pkt.dport, pkt.proto, false) else {
        return Ok(NEXT);
    };
    let okey = v4_key(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto);
    let (src, sport) = match HP_ORIG.get_ptr_mut(&okey) {
        // SAFETY: valid map value pointer for this run.
        Some(e) => unsafe {
            (*e).last_seen_ns = now();
            ((*e).addr[0], (*e).port)
        },
        // A later fragment opens no binding: its first fragment did.
        None if pkt.frag == Frag::Later => return Ok(NEXT),
        None => match hairpin_bind(&pkt, &t, ifindex, &okey) {
            Some(b) => b,
            None => {
                bump(stat::HOSTPORT_NO_PORT);
                return Ok(TC_ACT_SHOT);
            }
        },
    };
    rewrite(
        ctx,
        &pkt,
        IP_DADDR,
        pkt.daddr,
        t.addr[0],
        pkt.dport_off(),
        pkt.dport,
        t.port,
    )?;
    if src != pkt.saddr || sport != pkt.sport {
        rewrite(
            ctx,
            &pkt,
            IP_SADDR,
            pkt.saddr,
            src,
            pkt.sport_off(),
            pkt.sport,
            sport,
        )?;
    }
    frag::translated(&pkt);
    bump(stat::HOSTPORT_HAIRPIN);
    Ok(redirect(ifindex))
}

/// Picks the source a hairpin flow is seen from: with `snat`, the bridge
/// address and a port free for this target (the pod's own port if
/// possible); without, the pod's own address and port. Writes both halves.
#[inline(always)]
fn hairpin_bind(
    pkt: &Ipv4Packet,
    t: &HostPortTarget,
    ifindex: u32,
    okey: &CtKey,
) -> Option<(u32, u16)> {
    let snat_addr = if t.flags & hostport_flags::SNAT != 0 {
        // SAFETY: read-only use of a map value during this run.
        unsafe { BRIDGES.get(&ifindex) }
            .map(|b| b.addr_v4)
            .filter(|a| *a != 0)
    } else {
        None
    };
    let src = snat_addr.unwrap_or(pkt.saddr);
    let reply = HpReply {
        src_addr: [pkt.daddr, 0, 0, 0],
        dst_addr: [pkt.saddr, 0, 0, 0],
        src_port: pkt.dport,
        dst_port: pkt.sport,
        state: state_bits(pkt),
        hairpin: 1,
        _pad: [0; 2],
        last_seen_ns: now(),
    };
    // SAFETY: helper without side effects.
    let rnd = unsafe { bpf_get_prandom_u32() };
    for i in 0..PORT_TRIES {
        // First the pod's own port; then random ones above 1024.
        let port = if i == 0 || snat_addr.is_none() {
            pkt.sport
        } else {
            ((1024 + (rnd.wrapping_add(i) % 64512)) as u16).to_be()
        };
        let rkey = v4_key(t.addr[0], src, t.port, port, pkt.proto);
        if HP_REPLY
            .insert(&rkey, &reply, u64::from(BPF_NOEXIST))
            .is_err()
        {
            // Without snat only the pod's own port will do.
            snat_addr?;
            continue;
        }
        let orig = NatEntry {
            addr: [src, 0, 0, 0],
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

/// An ICMP error for node:hostPort, quoting a reply that `hostport_egress`
/// translated (node:hostPort -> client): the outer destination and the
/// quoted source go back to the pod's address and port. Only for a flow
/// the mapping carries to that client: an error about the node's own
/// traffic from that port stays the node's.
#[inline(always)]
fn icmp_error_to_pod(ctx: &TcContext, pkt: &Ipv4Packet) -> Result<i32, ()> {
    let Some(inner) = parse_icmp_error(ctx, pkt) else {
        return Ok(NEXT);
    };
    if inner.saddr != pkt.daddr || (inner.proto != IPPROTO_TCP && inner.proto != IPPROTO_UDP) {
        return Ok(NEXT);
    }
    let Some(t) = lookup(inner.saddr, inner.sport, inner.proto, false) else {
        return Ok(NEXT);
    };
    let rkey = v4_key(t.addr[0], inner.daddr, t.port, inner.dport, inner.proto);
    // SAFETY: read-only use of a map value during this run.
    match unsafe { HP_REPLY.get(&rkey) } {
        Some(r) if r.hairpin == 0 && r.src_addr[0] == inner.saddr && r.src_port == inner.sport => {}
        _ => return Ok(NEXT),
    }
    rewrite_icmp_error(ctx, pkt, &inner, Quoted::Source, t.addr[0], t.port)?;
    bump(stat::HOSTPORT_ICMP_ERROR_XLATE);
    Ok(NEXT)
}

/// An ICMP error the pod sends about a packet the DNAT delivered to it
/// (client -> pod:containerPort, e.g. a UDP port nobody listens on): the
/// outer source and the quoted destination become node:hostPort, so the
/// client's socket matches it (a connected UDP socket then gets
/// "connection refused" instead of waiting) and the pod's address does not
/// leave the node.
#[inline(always)]
fn icmp_error_from_pod(ctx: &TcContext, pkt: &Ipv4Packet) -> Result<i32, ()> {
    let Some(inner) = parse_icmp_error(ctx, pkt) else {
        return Ok(NEXT);
    };
    if inner.daddr != pkt.saddr || (inner.proto != IPPROTO_TCP && inner.proto != IPPROTO_UDP) {
        return Ok(NEXT);
    }
    // The quoted packet went client -> pod: its reply tuple is the key.
    let rkey = v4_key(
        inner.daddr,
        inner.saddr,
        inner.dport,
        inner.sport,
        inner.proto,
    );
    // SAFETY: read-only use of a map value during this run.
    let (node, hport) = match unsafe { HP_REPLY.get(&rkey) } {
        Some(r) if r.hairpin == 0 => (r.src_addr[0], r.src_port),
        _ => return Ok(NEXT),
    };
    rewrite_icmp_error(ctx, pkt, &inner, Quoted::Destination, node, hport)?;
    bump(stat::HOSTPORT_ICMP_ERROR_XLATE);
    Ok(NEXT)
}

/// Sends the rewritten packet out of the bridge with a fresh L2 header from
/// the neighbour table, past the host's input routing.
#[inline(always)]
pub(crate) fn redirect(ifindex: u32) -> i32 {
    // SAFETY: no neighbour parameters: the helper resolves the next hop
    // from the packet's destination.
    let r = unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) };
    if r as i32 == TC_ACT_REDIRECT {
        TC_ACT_REDIRECT
    } else {
        TC_ACT_SHOT
    }
}
