//! Node-local clients of a hostPort (a process on the node connecting to
//! nodeIP:hostPort or 127.0.0.1:hostPort): the cgroup connect4/sendmsg4
//! hooks rewrite the socket's destination to the pod before any packet
//! exists, so no packet translation and no route_localnet are needed.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use cni_ebpf_common::stat;

use crate::{
    hostport::lookup,
    parsing::{IPPROTO_TCP, IPPROTO_UDP},
    stats::bump,
};

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;

#[inline(always)]
fn redirect(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the context's bpf_sock_addr is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = match sa.type_ {
        SOCK_STREAM => IPPROTO_TCP,
        SOCK_DGRAM => IPPROTO_UDP,
        _ => return 1,
    };
    // user_port holds the port in network byte order in its low 16 bits.
    let port = sa.user_port as u16;
    if let Some(t) = lookup(sa.user_ip4, port, proto, true) {
        sa.user_ip4 = t.addr[0];
        sa.user_port = u32::from(t.port);
        bump(stat::HOSTPORT_SOCK);
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
