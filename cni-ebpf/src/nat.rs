//! Masquerade (source NAT) on the uplink: pod traffic leaving the node gets
//! the uplink's address and a source port from the configured range; replies
//! are translated back before the host routes them to the pod. Every
//! fragment of a datagram gets its first fragment's translation (`frag`).
use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_get_prandom_u32,
    macros::{classifier, map},
    maps::HashMap,
    programs::TcContext,
};
use aya_log_ebpf::{debug, warn};
use cni_ebpf_common::{
    ct_state, stat, CtKey, IpKey, MasqPolicy, NatEntry, UplinkConfig, FAMILY_V4,
};

use crate::{
    conntrack::{now, state_bits, touch, v4_key, SNAT_ORIG, SNAT_REPLY},
    frag::{self, Frag},
    parsing::{
        parse_icmp_error, parse_ipv4, Ipv4Packet, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, IPPROTO_ICMP,
        IPPROTO_TCP, IPPROTO_UDP, IP_CSUM, IP_DADDR, IP_SADDR, TCP_FLAG_ACK, TCP_FLAG_SYN,
    },
    rewrite::rewrite,
    stats::bump,
};

/// Uplink ifindex -> its address and port range. Written by the agent.
#[map(name = "UPLINKS")]
static UPLINKS: HashMap<u32, UplinkConfig> = HashMap::pinned(64, 0);

/// Pod address -> masquerade policy. One entry per pod IP with ipMasq.
#[map(name = "MASQ_SOURCES")]
static MASQ_SOURCES: HashMap<IpKey, MasqPolicy> = HashMap::pinned(65536, 0);

/// How many ports are tried before giving up on a new binding.
const PORT_TRIES: u32 = 32;

const BPF_NOEXIST: u64 = 1;

/// tcx: let the next program (or the stack) decide.
const NEXT: i32 = TC_ACT_UNSPEC;

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
        None => return Ok(NEXT),
    };
    // As the reference: never the pod's own network, never multicast.
    if in_prefix(pkt.daddr, policy.exclude_addr[0], policy.exclude_prefix_len)
        || u32::from_be(pkt.daddr) >> 28 == 0xe
    {
        return Ok(NEXT);
    }
    // SAFETY: __sk_buff is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let uplink: UplinkConfig = match unsafe { UPLINKS.get(&ifindex) } {
        Some(u) => *u,
        None => return Ok(NEXT),
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
        None => match bind(&pkt, &key, &uplink, bits) {
            Some(port) => (uplink.addr_v4, port),
            None => {
                bump(stat::SNAT_NO_PORT);
                warn!(
                    ctx,
                    "masquerade: no free source port for {:i} -> {:i}, packet dropped",
                    u32::from_be(pkt.saddr),
                    u32::from_be(pkt.daddr)
                );
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

/// Creates a binding for a new flow: claims a free port by inserting the
/// reply half with BPF_NOEXIST (the insert is the lock), then writes the
/// original half. Returns the port in network byte order.
#[inline(always)]
fn bind(
    pkt: &Ipv4Packet,
    key: &cni_ebpf_common::CtKey,
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
    // First a free port; only when none of the candidates is free, the
    // port of a closed connection (a free one spares the remote a SYN on a
    // tuple it may still hold in TIME_WAIT).
    for i in 0..2 * PORT_TRIES {
        let take_over = i >= PORT_TRIES;
        let port = ((u32::from(uplink.port_min) + (start.wrapping_add(i % PORT_TRIES) % span))
            as u16)
            .to_be();
        let rkey = if pkt.proto == IPPROTO_ICMP {
            v4_key(pkt.daddr, uplink.addr_v4, 0, port, pkt.proto)
        } else {
            v4_key(pkt.daddr, uplink.addr_v4, pkt.dport, port, pkt.proto)
        };
        let claimed = if take_over {
            take_over_closed(&rkey, &reply_val, pkt.proto)
        } else {
            SNAT_REPLY.insert(&rkey, &reply_val, BPF_NOEXIST).is_ok()
        };
        if !claimed {
            continue;
        }
        let orig_val = NatEntry {
            addr: [uplink.addr_v4, 0, 0, 0],
            port,
            state: bits,
            _pad: 0,
            _pad2: 0,
            last_seen_ns: ts,
        };
        if SNAT_ORIG.insert(key, &orig_val, 0).is_err() {
            let _ = SNAT_REPLY.remove(&rkey);
            return None;
        }
        bump(stat::SNAT_NEW);
        return Some(port);
    }
    None
}

/// Clears the state bits of both halves of a binding whose tuple a new
/// connection is taking over.
#[inline(always)]
fn restart(orig: *mut NatEntry, key: &CtKey) {
    // SAFETY: valid map value pointer for this run.
    let (addr, port) = unsafe {
        (*orig).state = 0;
        ((*orig).addr[0], (*orig).port)
    };
    let rkey = v4_key(key.dst[0], addr, key.dport, port, key.proto);
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
#[inline(always)]
fn take_over_closed(rkey: &CtKey, reply_val: &NatEntry, proto: u8) -> bool {
    if proto != IPPROTO_TCP {
        return false;
    }
    // SAFETY: read-only use of map values during this run.
    let Some(old) = (unsafe { SNAT_REPLY.get(rkey) }).copied() else {
        return false;
    };
    let okey = v4_key(old.addr[0], rkey.src[0], old.port, rkey.sport, proto);
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
        // An error quotes a header right after its own, which a later
        // fragment does not have.
        if pkt.icmp_type == ICMP_ECHO_REQUEST || pkt.frag == Frag::Later {
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
    let _ = SNAT_ORIG.insert(&key, &entry, BPF_NOEXIST);
}

/// An ICMP error about a masqueraded packet (e.g. "fragmentation needed"
/// from a router on the path) arrives addressed to the uplink and quotes the
/// translated header. Both the outer destination and the quoted source must
/// go back to the pod's, or the pod never learns the path MTU and large
/// transfers stall.
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
    let icmp_csum = pkt.l4 + 2;
    let inner_csum_off = inner.l3 + IP_CSUM;
    let old_inner_csum: u16 = ctx.load(inner_csum_off).map_err(|_| ())?;

    // Quoted header: source address (with its own header checksum) and
    // source port. The ICMP checksum covers all these bytes, no pseudo-header.
    ctx.l3_csum_replace(inner_csum_off, inner.saddr as u64, pod_addr as u64, 4)
        .map_err(|_| ())?;
    let new_inner_csum: u16 = ctx.load(inner_csum_off).map_err(|_| ())?;
    ctx.l4_csum_replace(icmp_csum, inner.saddr as u64, pod_addr as u64, 4)
        .map_err(|_| ())?;
    ctx.l4_csum_replace(icmp_csum, old_inner_csum as u64, new_inner_csum as u64, 2)
        .map_err(|_| ())?;
    ctx.l4_csum_replace(icmp_csum, inner.sport as u64, pod_port as u64, 2)
        .map_err(|_| ())?;
    ctx.store(inner.l3 + IP_SADDR, &pod_addr, 0)
        .map_err(|_| ())?;
    ctx.store(inner.sport_off(), &pod_port, 0).map_err(|_| ())?;

    // Outer destination: the uplink address becomes the pod's.
    ctx.l3_csum_replace(pkt.l3 + IP_CSUM, pkt.daddr as u64, pod_addr as u64, 4)
        .map_err(|_| ())?;
    ctx.store(pkt.l3 + IP_DADDR, &pod_addr, 0).map_err(|_| ())?;
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
