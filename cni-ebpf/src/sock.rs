//! Node-local clients of a hostPort (a process on the node connecting to
//! nodeIP:hostPort or 127.0.0.1:hostPort): the cgroup connect4/sendmsg4
//! hooks rewrite the socket's destination to the pod before any packet
//! exists, so no packet translation and no route_localnet are needed. The
//! recvmsg4/getpeername4 hooks show the client node:hostPort again as its
//! peer, so a UDP client checking where replies come from (a DNS resolver)
//! accepts them.
//!
//! IPv6 clients ([node v6]:hostPort, [::1]:hostPort) get the same from the
//! connect6/sendmsg6/recvmsg6/getpeername6 hooks. A dual-stack (AF_INET6)
//! socket reaching an IPv4 hostPort through a v4-mapped address
//! (::ffff:a.b.c.d) meets the IPv6 hooks too: the IPv4 mapping is looked
//! up and the target written back v4-mapped.
//!
//! The agent attaches these hooks at the cgroup v2 root by default, where
//! they run for every process of the machine, whatever its network
//! namespace: they act only on sockets of the agent's own namespace (its
//! netns cookie in SOCK_NETNS), so nothing outside the node is rewritten.
use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map},
    maps::{Array, LruHashMap},
    programs::SockAddrContext,
};
use cni_ebpf_common::{stat, SockRevKey, SockRevValue, FAMILY_V4, FAMILY_V6};

use crate::{
    hostport::lookup,
    hostport6::lookup6,
    parsing::{IPPROTO_TCP, IPPROTO_UDP, SOCK_DGRAM, SOCK_STREAM},
    stats::bump,
};

#[map(name = "SOCK_REVERSE")]
static SOCK_REVERSE: LruHashMap<SockRevKey, SockRevValue> = LruHashMap::pinned(65536, 0);

#[map(name = "SOCK_NETNS")]
static SOCK_NETNS: Array<u64> = Array::pinned(1, 0);

/// Whether the socket belongs to the agent's network namespace.
#[inline(always)]
fn in_agent_netns(ctx: &SockAddrContext) -> bool {
    // SAFETY: the helper only reads the context's socket.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.sock_addr as *mut _) };
    SOCK_NETNS.get(0).is_some_and(|c| *c != 0 && *c == cookie)
}

#[inline(always)]
fn proto_of(type_: u32) -> Option<u8> {
    match type_ {
        SOCK_STREAM => Some(IPPROTO_TCP),
        SOCK_DGRAM => Some(IPPROTO_UDP),
        _ => None,
    }
}

#[inline(always)]
fn rev_key(ctx: &SockAddrContext, addr: u32, port: u16, proto: u8) -> SockRevKey {
    rev_key_of(ctx, [addr, 0, 0, 0], FAMILY_V4, port, proto)
}

#[inline(always)]
fn rev_key_of(
    ctx: &SockAddrContext,
    addr: [u32; 4],
    family: u8,
    port: u16,
    proto: u8,
) -> SockRevKey {
    SockRevKey {
        // SAFETY: the helper only reads the context's socket.
        cookie: unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut _) },
        addr,
        port,
        proto,
        family,
        _pad: 0,
    }
}

/// connect/sendmsg: node:hostPort -> pod:containerPort, remembered per
/// socket for the reverse direction.
#[inline(always)]
fn redirect(ctx: &SockAddrContext) -> i32 {
    if !in_agent_netns(ctx) {
        return 1;
    }
    // SAFETY: the context's bpf_sock_addr is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = proto_of(sa.type_) else {
        return 1;
    };
    // user_port holds the port in network byte order in its low 16 bits.
    let port = sa.user_port as u16;
    if let Some(t) = lookup(sa.user_ip4, port, proto, true) {
        let orig = SockRevValue {
            addr: [sa.user_ip4, 0, 0, 0],
            port,
            _pad: [0; 6],
        };
        let _ = SOCK_REVERSE.insert(&rev_key(ctx, t.addr[0], t.port, proto), &orig, 0);
        sa.user_ip4 = t.addr[0];
        sa.user_port = u32::from(t.port);
        bump(stat::HOSTPORT_SOCK);
    }
    1
}

/// recvmsg/getpeername: pod:containerPort -> node:hostPort, for sockets
/// that were redirected.
#[inline(always)]
fn reverse(ctx: &SockAddrContext) -> i32 {
    if !in_agent_netns(ctx) {
        return 1;
    }
    // SAFETY: the context's bpf_sock_addr is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = proto_of(sa.type_) else {
        return 1;
    };
    let key = rev_key(ctx, sa.user_ip4, sa.user_port as u16, proto);
    // SAFETY: read-only use of a map value during this run.
    if let Some(orig) = unsafe { SOCK_REVERSE.get(&key) } {
        sa.user_ip4 = orig.addr[0];
        sa.user_port = u32::from(orig.port);
    }
    1
}

/// The IPv6 address the socket asked for. The kernel accepts only 32-bit
/// accesses to `user_ip6`: one volatile access per word keeps LLVM from
/// merging them.
#[inline(always)]
fn user_ip6(sa: &aya_ebpf::bindings::bpf_sock_addr) -> [u32; 4] {
    let p = sa.user_ip6.as_ptr();
    // SAFETY: four in-bounds reads of the context's field.
    unsafe {
        [
            core::ptr::read_volatile(p),
            core::ptr::read_volatile(p.add(1)),
            core::ptr::read_volatile(p.add(2)),
            core::ptr::read_volatile(p.add(3)),
        ]
    }
}

#[inline(always)]
fn set_user_ip6(sa: &mut aya_ebpf::bindings::bpf_sock_addr, addr: &[u32; 4]) {
    let p = sa.user_ip6.as_mut_ptr();
    // SAFETY: four in-bounds 32-bit writes of the context's field.
    unsafe {
        core::ptr::write_volatile(p, addr[0]);
        core::ptr::write_volatile(p.add(1), addr[1]);
        core::ptr::write_volatile(p.add(2), addr[2]);
        core::ptr::write_volatile(p.add(3), addr[3]);
    }
}

/// ::ffff:0:0/96, as network-order words.
#[inline(always)]
fn is_v4_mapped(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == 0xffffu32.to_be()
}

/// connect6/sendmsg6: [node]:hostPort (or ::1, or a v4-mapped node
/// address) -> the pod, remembered per socket for the reverse direction.
#[inline(always)]
fn redirect6(ctx: &SockAddrContext) -> i32 {
    if !in_agent_netns(ctx) {
        return 1;
    }
    // SAFETY: the context's bpf_sock_addr is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = proto_of(sa.type_) else {
        return 1;
    };
    let port = sa.user_port as u16;
    let addr = user_ip6(sa);
    let target = if is_v4_mapped(&addr) {
        lookup(addr[3], port, proto, true).map(|t| ([0, 0, 0xffffu32.to_be(), t.addr[0]], t.port))
    } else {
        lookup6(&addr, port, proto, true).map(|t| (t.addr, t.port))
    };
    if let Some((t_addr, t_port)) = target {
        let orig = SockRevValue {
            addr,
            port,
            _pad: [0; 6],
        };
        let _ = SOCK_REVERSE.insert(&rev_key_of(ctx, t_addr, FAMILY_V6, t_port, proto), &orig, 0);
        set_user_ip6(sa, &t_addr);
        sa.user_port = u32::from(t_port);
        bump(stat::HOSTPORT_SOCK);
    }
    1
}

/// recvmsg6/getpeername6: [pod]:containerPort -> what the socket asked
/// for, for sockets that were redirected.
#[inline(always)]
fn reverse6(ctx: &SockAddrContext) -> i32 {
    if !in_agent_netns(ctx) {
        return 1;
    }
    // SAFETY: the context's bpf_sock_addr is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = proto_of(sa.type_) else {
        return 1;
    };
    let key = rev_key_of(ctx, user_ip6(sa), FAMILY_V6, sa.user_port as u16, proto);
    // SAFETY: read-only use of a map value during this run.
    if let Some(orig) = unsafe { SOCK_REVERSE.get(&key) } {
        set_user_ip6(sa, &orig.addr);
        sa.user_port = u32::from(orig.port);
    }
    1
}

#[cgroup_sock_addr(connect6)]
pub fn hostport_connect6(ctx: SockAddrContext) -> i32 {
    redirect6(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn hostport_sendmsg6(ctx: SockAddrContext) -> i32 {
    redirect6(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn hostport_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse6(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn hostport_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse6(&ctx)
}

#[cgroup_sock_addr(connect4)]
pub fn hostport_connect4(ctx: SockAddrContext) -> i32 {
    redirect(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn hostport_sendmsg4(ctx: SockAddrContext) -> i32 {
    redirect(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn hostport_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn hostport_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx)
}
