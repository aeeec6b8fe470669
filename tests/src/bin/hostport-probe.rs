//! A one-shot echo client for the hostPort tests, run as its own process so
//! that it can join a cgroup: the agent's connect4/sendmsg4 hooks act on
//! sockets created by processes of the cgroup they are attached to, and a
//! test thread cannot move itself into one.
//!
//! Usage: `hostport-probe [--cgroup DIR] [--netns PATH] tcp|udp|udp-sendto
//! ADDR:PORT PAYLOAD`. Joins the cgroup first, then the network namespace,
//! then does one exchange with an echo server, and prints
//! `{"local": …, "replyFrom": …, "reply": …}` (exit 0) or the error on
//! stderr (exit 1).
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::Duration;

use nix::sched::{setns, CloneFlags};
use serde_json::json;

fn main() -> ExitCode {
    match run() {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hostport-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<serde_json::Value, String> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut take_opt = |name: &str| -> Option<String> {
        let i = args.iter().position(|a| a == name)?;
        let v = args.get(i + 1).cloned();
        args.drain(i..(i + 2).min(args.len()));
        v
    };
    let cgroup = take_opt("--cgroup");
    let netns = take_opt("--netns");
    let [kind, server, payload] = <[String; 3]>::try_from(args).map_err(|a| {
        format!("usage: [--cgroup DIR] [--netns PATH] KIND ADDR PAYLOAD, got {a:?}")
    })?;
    let server: SocketAddr = server.parse().map_err(|e| format!("{server}: {e}"))?;
    if let Some(cg) = cgroup {
        // "0" moves the writing process; sockets created from now on
        // belong to the cgroup.
        std::fs::write(format!("{cg}/cgroup.procs"), "0")
            .map_err(|e| format!("join cgroup {cg}: {e}"))?;
    }
    if let Some(ns) = netns {
        let f = std::fs::File::open(&ns).map_err(|e| format!("open {ns}: {e}"))?;
        setns(&f, CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns {ns}: {e}"))?;
    }
    let (local, reply_from, reply) = match kind.as_str() {
        "tcp" => tcp(server, &payload)?,
        "udp" => udp(server, &payload, true)?,
        "udp-sendto" => udp(server, &payload, false)?,
        other => return Err(format!("unknown kind {other:?}")),
    };
    Ok(json!({"local": local.to_string(), "replyFrom": reply_from.to_string(), "reply": reply}))
}

fn tcp(server: SocketAddr, payload: &str) -> Result<(SocketAddr, SocketAddr, String), String> {
    let s = TcpStream::connect_timeout(&server, Duration::from_secs(5))
        .map_err(|e| format!("connect {server}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    (&s).write_all(format!("{payload}\n").as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut reply = String::new();
    BufReader::new(&s)
        .read_line(&mut reply)
        .map_err(|e| format!("echo from {server}: {e}"))?;
    let local = s.local_addr().map_err(|e| e.to_string())?;
    let peer = s.peer_addr().map_err(|e| e.to_string())?;
    Ok((local, peer, reply))
}

fn udp(
    server: SocketAddr,
    payload: &str,
    connected: bool,
) -> Result<(SocketAddr, SocketAddr, String), String> {
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| e.to_string())?;
    if connected {
        s.connect(server)
            .map_err(|e| format!("connect {server}: {e}"))?;
    }
    s.set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 2048];
    let mut last = String::new();
    for _ in 0..3 {
        let sent = if connected {
            s.send(payload.as_bytes())
        } else {
            s.send_to(payload.as_bytes(), server)
        };
        sent.map_err(|e| format!("send to {server}: {e}"))?;
        match s.recv_from(&mut buf) {
            Ok((n, from)) => {
                let local = s.local_addr().map_err(|e| e.to_string())?;
                return Ok((local, from, String::from_utf8_lossy(&buf[..n]).into_owned()));
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!("no UDP echo from {server}: {last}"))
}
