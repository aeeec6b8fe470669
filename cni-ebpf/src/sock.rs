//! Node-local clients of a hostPort (a process on the node connecting to
//! nodeIP:hostPort or 127.0.0.1:hostPort): the cgroup connect4/sendmsg4
//! hooks rewrite the socket's destination to the pod before any packet
//! exists, so no packet translation and no route_localnet are needed. The
//! recvmsg4/getpeername4 hooks show the client node:hostPort again as its
//! peer, so a UDP client checking where replies come from (a DNS resolver)
//! accepts them.
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
use cni_ebpf_common::{stat, SockRevKey, SockRevValue, FAMILY_V4};

use crate::{
    hostport::lookup,
    parsing::{IPPROTO_TCP, IPPROTO_UDP},
    stats::bump,
};

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;

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
    SockRevKey {
        // SAFETY: the helper only reads the context's socket.
        cookie: unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut _) },
        addr: [addr, 0, 0, 0],
        port,
        proto,
        family: FAMILY_V4,
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
