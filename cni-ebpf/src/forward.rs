//! ebpf-firewall's forwarding past the host stack, so firewalled pods keep
//! their connectivity on a node whose netfilter FORWARD policy is DROP,
//! without a single iptables or nft rule (the reference firewall plugin
//! adds ACCEPT rules to FORWARD for that).
//!
//! Routed traffic of a firewalled pod never enters the host's IP forward
//! path: it is routed here with bpf_fib_lookup (the kernel's own FIB,
//! policy routing included), the TTL is decremented as a router would, and
//! bpf_redirect_neigh sends it out of the next hop's device with the L2
//! header from the neighbour table.
//!
//! - `fw_bridge_forward`, bridge TC ingress: what a firewalled pod sends to
//!   its gateway (after its veth programs — anti-spoofing, egress rules,
//!   rate limit — passed it), and what any pod of the bridge routes to a
//!   firewalled pod elsewhere (whose veth programs then judge it).
//!   Everything for the host itself (local destinations) is left to the
//!   stack. Out of the uplink the packet meets the uplink's TC egress
//!   programs (masquerade, hostPort replies) as usual.
//! - `fw_uplink_ingress`, uplink TC ingress, after the masquerade and
//!   hostPort programs translated the destination: what arrives for a
//!   firewalled pod goes to its bridge, and from there to the pod's veth,
//!   whose TC egress programs (ingress rules, ingressPolicy, rate limit)
//!   then run. bpf_redirect_peer would skip those, so it is not used.
//!
//! Only pods whose attachment has the firewall with the bypass enabled get
//! this (FW_ENDPOINTS, flag BYPASS); everyone else takes the stack's path.
//! The bypassed traffic skips all of netfilter, NAT included: the pod's
//! firewall, not the node's FORWARD chain, is the authority on it.
//!
//! IPv6 is forwarded the same way (ip6tables' FORWARD chain is skipped as
//! iptables' is): the hop limit is decremented (IPv6 has no header
//! checksum), and link-local or multicast destinations, which are not
//! routed, are left to the stack.
use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, bpf_redir_neigh, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_REDIRECT,
    },
    helpers::{bpf_fib_lookup, bpf_redirect_neigh},
    macros::classifier,
    programs::TcContext,
};
use cni_ebpf_common::{fw, stat, FwEndpoint};

use crate::{
    parsing::{
        parse_route, parse_route6, Route, Route6, AF_INET, AF_INET6, ETH_HLEN, IP6_HOPLIMIT,
        IP_CSUM, IP_TTL,
    },
    policy::{count, endpoint, endpoint_of, v6_ip},
    stats::bump,
    NEXT,
};

/// bpf_fib_lookup's results that found the next hop (without a neighbour
/// entry, bpf_redirect_neigh resolves it).
const FIB_SUCCESS: i64 = BPF_FIB_LKUP_RET_SUCCESS as i64;
const FIB_NO_NEIGH: i64 = BPF_FIB_LKUP_RET_NO_NEIGH as i64;

#[inline(always)]
fn bypasses(ep: &FwEndpoint) -> bool {
    ep.flags & fw::FLAG_BYPASS != 0
}

/// Routes the packet (which arrived on `iif`) to its next hop, or leaves
/// it to the stack when that is not a plain forward: a local destination,
/// no route, a TTL about to expire or a packet too big for the next hop
/// (the stack then sends the ICMP error), or a route back out of `iif`.
#[inline(always)]
fn forward(ctx: &TcContext, r: &Route, iif: u32, pod_ifindex: u32) -> i32 {
    if r.ttl <= 1 {
        return NEXT;
    }
    // SAFETY: a zeroed bpf_fib_lookup is a valid all-unset request.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = r.proto;
    // tot_len 0: the helper checks the MTU with is_skb_forwardable, which
    // understands GSO packets.
    p.ifindex = iif;
    p.__bindgen_anon_2.tos = r.tos;
    p.__bindgen_anon_3.ipv4_src = r.saddr;
    p.__bindgen_anon_4.ipv4_dst = r.daddr;
    // SAFETY: `p` is a valid, writable bpf_fib_lookup of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            &mut p,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc != FIB_SUCCESS && rc != FIB_NO_NEIGH {
        return NEXT;
    }
    let out = p.ifindex;
    if out == iif || out == 0 {
        return NEXT;
    }
    // SAFETY: the helper wrote the next hop (the gateway, or the
    // destination itself on a connected route) into ipv4_dst.
    let nh_addr = unsafe { p.__bindgen_anon_4.ipv4_dst };
    // TTL - 1, as a router does; the checksum covers the TTL/protocol word.
    let new_word = u16::from_ne_bytes([r.ttl - 1, r.proto]);
    if ctx
        .l3_csum_replace(
            ETH_HLEN + IP_CSUM,
            u64::from(r.ttl_proto),
            u64::from(new_word),
            2,
        )
        .is_err()
        || ctx.store(ETH_HLEN + IP_TTL, &(r.ttl - 1), 0).is_err()
    {
        return NEXT;
    }
    // SAFETY: a zeroed bpf_redir_neigh is valid; family and address set.
    let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
    nh.nh_family = u32::from(AF_INET);
    nh.__bindgen_anon_1.ipv4_nh = nh_addr;
    redirect(out, &mut nh, pod_ifindex)
}

/// Sends the packet out of `out` to the next hop `nh`, counting it for the
/// pod's attachment, or leaves it to the stack if the helper refuses.
#[inline(always)]
fn redirect(out: u32, nh: &mut bpf_redir_neigh, pod_ifindex: u32) -> i32 {
    // SAFETY: `nh` is valid for the size passed.
    let rc =
        unsafe { bpf_redirect_neigh(out, nh, core::mem::size_of::<bpf_redir_neigh>() as i32, 0) };
    if rc as i32 == TC_ACT_REDIRECT {
        count(pod_ifindex, fw::STAT_FORWARDED);
        bump(stat::FW_FORWARDED);
        TC_ACT_REDIRECT
    } else {
        NEXT
    }
}

/// [`forward`] for IPv6.
#[inline(always)]
fn forward6(ctx: &TcContext, r: &Route6, iif: u32, pod_ifindex: u32) -> i32 {
    if r.hop_limit <= 1 {
        return NEXT;
    }
    // SAFETY: a zeroed bpf_fib_lookup is a valid all-unset request.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = AF_INET6;
    p.l4_protocol = r.proto;
    p.ifindex = iif;
    // Traffic class and flow label, as the kernel's own lookup keys them.
    p.__bindgen_anon_2.flowinfo = r.flowinfo & u32::to_be(0x0fff_ffff);
    p.__bindgen_anon_3.ipv6_src = r.saddr;
    p.__bindgen_anon_4.ipv6_dst = r.daddr;
    // SAFETY: `p` is a valid, writable bpf_fib_lookup of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            &mut p,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc != FIB_SUCCESS && rc != FIB_NO_NEIGH {
        return NEXT;
    }
    let out = p.ifindex;
    if out == iif || out == 0 {
        return NEXT;
    }
    if ctx
        .store(ETH_HLEN + IP6_HOPLIMIT, &(r.hop_limit - 1), 0)
        .is_err()
    {
        return NEXT;
    }
    // SAFETY: a zeroed bpf_redir_neigh is valid; family and address set.
    let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
    nh.nh_family = u32::from(AF_INET6);
    // SAFETY: the helper wrote the next hop into ipv6_dst.
    nh.__bindgen_anon_1.ipv6_nh = unsafe { p.__bindgen_anon_4.ipv6_dst };
    redirect(out, &mut nh, pod_ifindex)
}

#[inline(always)]
fn endpoint6(addr: &[u32; 4]) -> Option<FwEndpoint> {
    endpoint_of(&v6_ip(*addr))
}

/// Bridge TC ingress: routed traffic from a firewalled pod, or to one (from
/// a pod on another bridge: the destination's firewall judges it, as the
/// uplink's traffic).
#[classifier]
pub fn fw_bridge_forward(ctx: TcContext) -> i32 {
    let Some(r) = parse_route(&ctx) else {
        return bridge_forward6(&ctx);
    };
    let Some(ep) = endpoint(r.saddr).or_else(|| endpoint(r.daddr)) else {
        return NEXT;
    };
    if !bypasses(&ep) {
        return NEXT;
    }
    // SAFETY: __sk_buff is valid for the program's run.
    let iif = unsafe { (*ctx.skb.skb).ifindex };
    forward(&ctx, &r, iif, ep.ifindex)
}

#[inline(always)]
fn bridge_forward6(ctx: &TcContext) -> i32 {
    let Some(r) = parse_route6(ctx) else {
        return NEXT;
    };
    let Some(ep) = endpoint6(&r.saddr).or_else(|| endpoint6(&r.daddr)) else {
        return NEXT;
    };
    if !bypasses(&ep) {
        return NEXT;
    }
    // SAFETY: __sk_buff is valid for the program's run.
    let iif = unsafe { (*ctx.skb.skb).ifindex };
    forward6(ctx, &r, iif, ep.ifindex)
}

#[inline(always)]
fn uplink_ingress6(ctx: &TcContext) -> i32 {
    let Some(r) = parse_route6(ctx) else {
        return NEXT;
    };
    let Some(ep) = endpoint6(&r.daddr) else {
        return NEXT;
    };
    if !bypasses(&ep) {
        return NEXT;
    }
    // SAFETY: __sk_buff is valid for the program's run.
    let iif = unsafe { (*ctx.skb.skb).ifindex };
    forward6(ctx, &r, iif, ep.ifindex)
}

/// Uplink TC ingress: traffic for a firewalled pod.
#[classifier]
pub fn fw_uplink_ingress(ctx: TcContext) -> i32 {
    let Some(r) = parse_route(&ctx) else {
        return uplink_ingress6(&ctx);
    };
    let Some(ep) = endpoint(r.daddr) else {
        return NEXT;
    };
    if !bypasses(&ep) {
        return NEXT;
    }
    // SAFETY: __sk_buff is valid for the program's run.
    let iif = unsafe { (*ctx.skb.skb).ifindex };
    forward(&ctx, &r, iif, ep.ifindex)
}
