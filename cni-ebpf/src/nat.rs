//! Masquerade (source NAT) on the uplink: pod traffic leaving the node gets
//! the uplink's address and a source port from the configured range; replies
//! are translated back before the host routes them to the pod. Every
//! fragment of a datagram gets its first fragment's translation (`frag`).
use aya_ebpf::{
    bindings::{bpf_sock_tuple, BPF_F_CURRENT_NETNS, BPF_NOEXIST, TC_ACT_SHOT},
    helpers::{bpf_get_prandom_u32, bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp},
    macros::{classifier, map},
    maps::HashMap,
    programs::TcContext,
};
use aya_log_ebpf::debug;
use cni_ebpf_common::{
    ct_state, stat, CtKey, IpKey, MasqPolicy, NatEntry, UplinkConfig, FAMILY_V4,
};

use crate::{
    conntrack::{now, state_bits, touch, v4_key, SNAT_ORIG, SNAT_REPLY},
    frag::{self, Frag},
    parsing::{
        is_icmp_error, parse_icmp_error, parse_ipv4, Ipv4Packet, ICMP_ECHO_REPLY,
        ICMP_ECHO_REQUEST, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IP_DADDR, IP_SADDR,
        TCP_FLAG_ACK, TCP_FLAG_SYN,
    },
    rewrite::{rewrite, rewrite_icmp_error, Quoted},
    stats::bump,
    NEXT,
};

/// Uplink ifindex -> its address and port range. Written by the agent.
#[map(name = "UPLINKS")]
pub(crate) static UPLINKS: HashMap<u32, UplinkConfig> = HashMap::pinned(64, 0);

/// Pod address -> masquerade policy. One entry per pod IP with ipMasq.
#[map(name = "MASQ_SOURCES")]
pub(crate) static MASQ_SOURCES: HashMap<IpKey, MasqPolicy> = HashMap::pinned(65536, 0);

/// How many ports are tried before giving up on a new binding.
pub(crate) const PORT_TRIES: u32 = 32;

#[classifier]
pub fn snat_egress(ctx: TcContext) -> i32 {
    match try_snat_egress(&ctx) {
        Ok(action) => action,
        Err(()) => NEXT,
    }
}

#[classifier]
pub fn snat_ingress(ctx: TcContext) -> i32 {
    match try_snat_ingress(&ctx) {
        Ok(action) => action,
        Err(()) => NEXT,
    }
}

#[inline(always)]
fn in_prefix(addr_be: u32, net_be: u32, prefix_len: u8) -> bool {
    if prefix_len == 0 {
        return true;
    }
    if prefix_len >= 32 {
        return addr_be == net_be;
    }
    let mask = u32::MAX << (32 - u32::from(prefix_len));
    (u32::from_be(addr_be) & mask) == (u32::from_be(net_be) & mask)
}

fn try_snat_egress(ctx: &TcContext) -> Result<i32, ()> {
    let pkt = parse_ipv4(ctx).ok_or(())?;
    if pkt.proto == IPPROTO_ICMP && pkt.icmp_type != ICMP_ECHO_REQUEST {
        return Ok(NEXT);
    }
    let src = IpKey {
        addr: [pkt.saddr, 0, 0, 0],
        family: FAMILY_V4,
        _pad: [0; 3],
    };
    // SAFETY: read-only use of a map value during this run.
    let policy: &MasqPolicy = match unsafe { MASQ_SOURCES.get(&src) } {
        Some(p) => p,
        None => return node_flow_egress(ctx, &pkt),
    };
    // As the reference: never the pod's own network, never multicast.
    if in_prefix(pkt.daddr, policy.exclude_addr[0], policy.exclude_prefix_len)
        || u32::from_be(pkt.daddr) >> 28 == 0xe
    {
        return Ok(NEXT);
    }
    // SAFETY: __sk_buff is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // An IPv6-only uplink has no IPv4 address to masquerade to.
    // SAFETY: read-only use of a map value during this run.
    let uplink: UplinkConfig = match unsafe { UPLINKS.get(&ifindex) } {
        Some(u) if u.addr_v4 != 0 => *u,
        _ => return Ok(NEXT),
    };

    let (l4_sport, l4_dport) = if pkt.proto == IPPROTO_ICMP {
        (pkt.sport, 0)
    } else {
        (pkt.sport, pkt.dport)
    };
    let key = v4_key(pkt.saddr, pkt.daddr, l4_sport, l4_dport, pkt.proto);
    let bits = state_bits(&pkt);
    let (nat_addr, nat_port) = match SNAT_ORIG.get_ptr_mut(&key) {
        // SAFETY: valid map value pointer for this run.
        Some(e) if unsafe { (*e).state } & ct_state::INBOUND != 0 => {
            // A reply of a flow the remote opened: it keeps the pod's address.
            touch(e, bits);
            return Ok(NEXT);
        }
        Some(e) => {
            // A new connection on the tuple of a finished one (the pod
            // reused its source port): it starts with a clean state, or the
            // old FIN/RST would make it expire as if closed.
            if pkt.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN {
                restart(e, &key);
            }
            touch(e, bits);
            // SAFETY: valid map value pointer.
            unsafe { ((*e).addr[0], (*e).port) }
        }
        // Only a pod's own connection is translated, and a TCP connection
        // starts with a SYN: anything else without a binding is a reply of
        // a connection the remote opened (a SYN-ACK, ...), which leaves
        // with the pod's address as conntrack's MASQUERADE leaves it.
        None if pkt.proto == IPPROTO_TCP
            && pkt.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN =>
        {
            return Ok(NEXT);
        }
        // A later fragment never opens a binding: its first fragment did,
        // or the datagram is not ours.
        None if pkt.frag == Frag::Later => return Ok(NEXT),
        None => match bind(ctx, &pkt, &key, &uplink, bits) {
            Some(port) => (uplink.addr_v4, port),
            None => {
                // Counted, and logged by the agent at most once a second: a
                // log line per dropped packet would flood the ring buffer.
                bump(stat::SNAT_NO_PORT);
                return Ok(TC_ACT_SHOT);
            }
        },
    };
    rewrite(
        ctx,
        &pkt,
        IP_SADDR,
        pkt.saddr,
        nat_addr,
        pkt.sport_off(),
        pkt.sport,
        nat_port,
    )?;
    frag::translated(&pkt);
    bump(stat::SNAT_XLATE);
    Ok(NEXT)
}

/// A packet of the node's own, leaving through the uplink. Pods keep their
/// source port when it is free, so a node socket may pick a tuple a pod's
/// binding holds (the kernel does not know our bindings): its replies
/// would go to the pod. As netfilter does for local connections, such a
/// flow is translated too, to a free port of the range. The common case
/// costs one lookup in each NAT map.
#[inline(always)]
fn node_flow_egress(ctx: &TcContext, pkt: &Ipv4Packet) -> Result<i32, ()> {
    // SAFETY: __sk_buff is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: read-only use of a map value during this run.
    let uplink: UplinkConfig = match unsafe { UPLINKS.get(&ifindex) } {
        Some(u) if u.addr_v4 == pkt.saddr => *u,
        _ => return Ok(NEXT),
    };
    let icmp = pkt.proto == IPPROTO_ICMP;
    let key = v4_key(
        pkt.saddr,
        pkt.daddr,
        pkt.sport,
        if icmp { 0 } else { pkt.dport },
        pkt.proto,
    );
    let bits = state_bits(pkt);
    let port = match SNAT_ORIG.get_ptr_mut(&key) {
        Some(e) => {
            touch(e, bits);
            // SAFETY: valid map value pointer for this run.
            unsafe { (*e).port }
        }
        // Later fragments carry no ports to move.
        None if pkt.frag == Frag::Later => return Ok(NEXT),
        None => {
            let rkey = v4_key(
                pkt.daddr,
                pkt.saddr,
                if icmp { 0 } else { pkt.dport },
                pkt.sport,
                pkt.proto,
            );
            // SAFETY: read-only use of a map value during this run.
            if unsafe { SNAT_REPLY.get(&rkey) }.is_none() {
                return Ok(NEXT);
            }
            let port = bind(ctx, pkt, &key, &uplink, bits).ok_or(())?;
            bump(stat::SNAT_NODE_FLOW);
            port
        }
    };
    if port == pkt.sport {
        return Ok(NEXT);
    }
    rewrite(
        ctx,
        pkt,
        IP_SADDR,
        pkt.saddr,
        pkt.saddr,
        pkt.sport_off(),
        pkt.sport,
        port,
    )?;
    bump(stat::SNAT_XLATE);
    Ok(NEXT)
}

/// Creates a binding for a new flow, as netfilter's MASQUERADE picks one:
/// the flow's own source port if the translated tuple (uplink address,
/// port, remote address, remote port) is free, else a port of the range.
/// The own port is free when no binding holds the tuple, no socket of the
/// node would receive its packets, and it is not a hostPort; a range port
/// when no binding holds the tuple. The claim is the
/// reply half inserted with BPF_NOEXIST; the original half is inserted the
/// same way, so when two CPUs bind the same flow at once one binding wins
/// and the other CPU gives its claim back and uses the winner's port.
/// Returns the port in network byte order.
#[inline(always)]
fn bind(
    ctx: &TcContext,
    pkt: &Ipv4Packet,
    key: &CtKey,
    uplink: &UplinkConfig,
    bits: u8,
) -> Option<u16> {
    let span = u32::from(uplink.port_max).checked_sub(u32::from(uplink.port_min))? + 1;
    // SAFETY: helper without side effects.
    let start = unsafe { bpf_get_prandom_u32() };
    let ts = now();
    let reply_val = NatEntry {
        addr: [pkt.saddr, 0, 0, 0],
        port: key.sport,
        state: 0,
        _pad: 0,
        _pad2: 0,
        last_seen_ns: ts,
    };
    let orig_val = |port| NatEntry {
        addr: [uplink.addr_v4, 0, 0, 0],
        port,
        state: bits,
        _pad: 0,
        _pad2: 0,
        last_seen_ns: ts,
    };
    let rkey = |port| {
        if pkt.proto == IPPROTO_ICMP {
            v4_key(pkt.daddr, uplink.addr_v4, 0, port, pkt.proto)
        } else {
            v4_key(pkt.daddr, uplink.addr_v4, pkt.dport, port, pkt.proto)
        }
    };
    // The flow's own port first (ICMP identifiers stay in the range: ping
    // sockets cannot be looked up).
    if pkt.proto != IPPROTO_ICMP {
        let kept = key.sport;
        if port_in_use(ctx, pkt, uplink.addr_v4, kept) {
            bump(stat::SNAT_PORT_IN_USE);
        } else if SNAT_REPLY
            .insert(&rkey(kept), &reply_val, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return finish(key, &rkey(kept), &orig_val(kept), stat::SNAT_PORT_KEPT);
        }
    }
    // Then free ports of the range; only when none of those is free, the
    // port of a closed connection (a free one spares the remote a SYN on a
    // tuple it may still hold in TIME_WAIT). The range is kept clear of
    // the node's ephemeral ports and hostPorts by configuration (checking
    // each candidate here would take the verifier past its limit).
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

/// Writes the original half of a binding whose reply half `rkey` was just
/// claimed. When another CPU bound the same flow first, its binding stands:
/// the claim is given back and the winner's port used.
#[inline(always)]
pub(crate) fn finish(key: &CtKey, rkey: &CtKey, orig: &NatEntry, counter: u32) -> Option<u16> {
    if SNAT_ORIG.insert(key, orig, u64::from(BPF_NOEXIST)).is_err() {
        let _ = SNAT_REPLY.remove(rkey);
        // SAFETY: read-only use of a map value during this run.
        return unsafe { SNAT_ORIG.get(key) }.map(|o| o.port);
    }
    bump(counter);
    Some(orig.port)
}

/// An IPv4 `struct bpf_sock_tuple`, as the socket lookup helpers take it.
#[repr(C)]
struct SockTupleV4 {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
}

/// `BPF_F_CURRENT_NETNS` (-1) as the helpers' u64 netns argument: look
/// sockets up in the packet's namespace.
pub(crate) const CURRENT_NETNS: u64 = BPF_F_CURRENT_NETNS as u64;

/// Whether `addr:port` (network byte order) is used for `pkt`'s remote by
/// the node itself: a hostPort, or a socket of the node's namespace that a
/// reply to that tuple would reach (a connection or listener for TCP, a
/// bound socket for UDP). Such a port is never kept for a pod, or its
/// replies would be stolen from the node.
#[inline(always)]
fn port_in_use(ctx: &TcContext, pkt: &Ipv4Packet, addr: u32, port: u16) -> bool {
    if crate::hostport::lookup(addr, port, pkt.proto, false).is_some() {
        return true;
    }
    let mut tuple = SockTupleV4 {
        saddr: pkt.daddr,
        daddr: addr,
        sport: pkt.dport,
        dport: port,
    };
    let tuple_ptr = &mut tuple as *mut SockTupleV4 as *mut bpf_sock_tuple;
    let size = core::mem::size_of::<SockTupleV4>() as u32;
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

/// Clears the state bits of both halves of a binding whose tuple a new
/// connection is taking over (either family: the key carries it).
#[inline(always)]
pub(crate) fn restart(orig: *mut NatEntry, key: &CtKey) {
    // SAFETY: valid map value pointer for this run.
    let (addr, port) = unsafe {
        (*orig).state = 0;
        ((*orig).addr, (*orig).port)
    };
    let rkey = CtKey {
        src: key.dst,
        dst: addr,
        sport: key.dport,
        dport: port,
        proto: key.proto,
        family: key.family,
        _pad: [0; 2],
    };
    if let Some(r) = SNAT_REPLY.get_ptr_mut(&rkey) {
        // SAFETY: valid map value pointer for this run.
        unsafe { (*r).state = 0 };
    }
}

/// A port whose TCP connection is over (RST seen, or FIN both ways) is
/// free again at once, as conntrack lets a new SYN reuse a TIME_WAIT tuple:
/// waiting for the agent's expiry would cap new connections to one remote
/// endpoint at (ports in the range) / (closed timeout). The old binding's
/// original half goes, and the reply half is overwritten with the new one.
/// Shared by both families: the keys carry theirs.
#[inline(always)]
pub(crate) fn take_over_closed(rkey: &CtKey, reply_val: &NatEntry, proto: u8) -> bool {
    if proto != IPPROTO_TCP {
        return false;
    }
    // SAFETY: read-only use of map values during this run.
    let Some(old) = (unsafe { SNAT_REPLY.get(rkey) }).copied() else {
        return false;
    };
    // The old binding's original half, in the reply half's family.
    let okey = CtKey {
        src: old.addr,
        dst: rkey.src,
        sport: old.port,
        dport: rkey.sport,
        proto,
        family: rkey.family,
        _pad: [0; 2],
    };
    // SAFETY: read-only use of a map value during this run.
    let orig_state = unsafe { SNAT_ORIG.get(&okey) }.map_or(0, |o| o.state);
    let closed = (old.state | orig_state) & ct_state::RST != 0
        || (old.state & ct_state::FIN != 0 && orig_state & ct_state::FIN != 0);
    if !closed {
        return false;
    }
    let _ = SNAT_ORIG.remove(&okey);
    if SNAT_REPLY.insert(rkey, reply_val, 0).is_err() {
        return false;
    }
    bump(stat::SNAT_PORT_REUSED);
    true
}

fn try_snat_ingress(ctx: &TcContext) -> Result<i32, ()> {
    let pkt = parse_ipv4(ctx).ok_or(())?;
    if pkt.proto == IPPROTO_ICMP && pkt.icmp_type != ICMP_ECHO_REPLY {
        if !is_icmp_error(&pkt) {
            return Ok(NEXT);
        }
        return icmp_error_ingress(ctx, &pkt);
    }
    let (sport, dport) = if pkt.proto == IPPROTO_ICMP {
        (0, pkt.dport)
    } else {
        (pkt.sport, pkt.dport)
    };
    let rkey = v4_key(pkt.saddr, pkt.daddr, sport, dport, pkt.proto);
    let Some(rev) = SNAT_REPLY.get_ptr_mut(&rkey) else {
        if pkt.proto == IPPROTO_UDP && pkt.frag != Frag::Later {
            note_inbound(&pkt);
        }
        return Ok(NEXT);
    };
    touch(rev, state_bits(&pkt) | ct_state::REPLIED);
    // SAFETY: valid map value pointer.
    let (pod_addr, pod_port) = unsafe { ((*rev).addr[0], (*rev).port) };

    // Repair the original half if LRU pressure evicted it, or the next
    // outgoing packet would get a new port and break the flow.
    let okey = if pkt.proto == IPPROTO_ICMP {
        v4_key(pod_addr, pkt.saddr, pod_port, 0, pkt.proto)
    } else {
        v4_key(pod_addr, pkt.saddr, pod_port, pkt.sport, pkt.proto)
    };
    if SNAT_ORIG.get_ptr(&okey).is_none() {
        let orig_val = NatEntry {
            addr: [pkt.daddr, 0, 0, 0],
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
    rewrite(
        ctx,
        &pkt,
        IP_DADDR,
        pkt.daddr,
        pod_addr,
        pkt.dport_off(),
        pkt.dport,
        pod_port,
    )?;
    frag::translated(&pkt);
    bump(stat::SNAT_REPLY_XLATE);
    Ok(NEXT)
}

/// A UDP datagram routed in to a masqueraded pod's own address: its flow
/// is the remote's, so the pod's replies must not be translated (see
/// [`ct_state::INBOUND`]). The entry is refreshed by both directions and
/// expires with the agent's UDP timeout. (TCP needs no entry: only a SYN
/// opens a binding, and a pod never answers an inbound connection with
/// one.)
#[inline(always)]
fn note_inbound(pkt: &Ipv4Packet) {
    let pod = IpKey {
        addr: [pkt.daddr, 0, 0, 0],
        family: FAMILY_V4,
        _pad: [0; 3],
    };
    // SAFETY: read-only use of a map value during this run.
    if unsafe { MASQ_SOURCES.get(&pod) }.is_none() {
        return;
    }
    let key = v4_key(pkt.daddr, pkt.saddr, pkt.dport, pkt.sport, pkt.proto);
    if let Some(e) = SNAT_ORIG.get_ptr_mut(&key) {
        touch(e, 0);
        return;
    }
    let entry = NatEntry {
        addr: [pkt.daddr, 0, 0, 0],
        port: pkt.dport,
        state: ct_state::INBOUND,
        _pad: 0,
        _pad2: 0,
        last_seen_ns: now(),
    };
    let _ = SNAT_ORIG.insert(&key, &entry, u64::from(BPF_NOEXIST));
}

/// An ICMP error about a masqueraded packet (e.g. "fragmentation needed"
/// from a router on the path) arrives addressed to the uplink and quotes the
/// translated header. Both the outer destination and the quoted source must
/// go back to the pod's, or the pod never learns the path MTU and large
/// transfers stall. The rewrite (checksums included) is the one the
/// hostPort programs use too (`rewrite::rewrite_icmp_error`).
fn icmp_error_ingress(ctx: &TcContext, pkt: &Ipv4Packet) -> Result<i32, ()> {
    let inner = parse_icmp_error(ctx, pkt).ok_or(())?;
    // The quoted packet went pod -> remote after translation, so its reply
    // tuple is remote -> (uplink address, translated port).
    let rkey = if inner.proto == IPPROTO_ICMP {
        v4_key(inner.daddr, inner.saddr, 0, inner.sport, inner.proto)
    } else {
        v4_key(
            inner.daddr,
            inner.saddr,
            inner.dport,
            inner.sport,
            inner.proto,
        )
    };
    // SAFETY: read-only use of a map value during this run.
    let rev = unsafe { SNAT_REPLY.get(&rkey) }.ok_or(())?;
    let (pod_addr, pod_port) = (rev.addr[0], rev.port);
    if inner.saddr != pkt.daddr {
        return Ok(NEXT);
    }
    rewrite_icmp_error(ctx, pkt, &inner, Quoted::Source, pod_addr, pod_port)?;
    bump(stat::SNAT_ICMP_ERROR_XLATE);
    debug!(
        ctx,
        "masquerade: ICMP error type {} from {:i} translated to {:i}",
        pkt.icmp_type,
        u32::from_be(pkt.saddr),
        u32::from_be(pod_addr)
    );
    Ok(NEXT)
}
