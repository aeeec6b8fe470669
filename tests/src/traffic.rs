//! Real traffic between test namespaces, driven from the test process.
//!
//! A socket belongs to the network namespace of the thread that created it
//! and keeps it for life, whichever thread then uses it. So [`in_netns`] runs
//! a closure on a fresh thread that has joined a namespace (`setns` only
//! affects the calling thread), and servers and clients create their sockets
//! there. The test thread itself never changes namespace.
//!
//! The echo servers answer every line (TCP) or datagram (UDP) with
//! `<peer address as the server saw it> <line>`: one round trip proves the
//! reply path and shows the source address the far side observed.
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener,
    TcpStream, UdpSocket,
};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::netns::NetNs;

/// Runs `f` on a new thread inside `ns` and returns its result (panics in
/// `f` propagate).
pub fn in_netns<T: Send>(ns: &NetNs, f: impl FnOnce() -> T + Send) -> T {
    let path = ns.path().to_path_buf();
    std::thread::scope(|s| {
        s.spawn(move || {
            enter(&path);
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// Spawns a detached thread inside `ns` (for long-running work).
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &NetNs,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let path = ns.path().to_path_buf();
    std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || {
            enter(&path);
            f()
        })
        .expect("spawn thread")
}

/// Moves the calling thread into the namespace at `path`.
fn enter(path: &std::path::Path) {
    crate::netns::enter_thread(path).unwrap_or_else(|e| panic!("{e:#}"));
}

/// A socket of `ty` bound to the unspecified address of `ip`'s family and
/// `port` in the current thread's namespace (IPv6: IPV6_V6ONLY, so an
/// IPv4 server may hold the same port). `reuse` sets SO_REUSEADDR.
fn bound_socket(
    ip: IpAddr,
    port: u16,
    ty: nix::sys::socket::SockType,
    reuse: bool,
) -> Result<OwnedFd, String> {
    use nix::sys::socket::{
        bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockaddrIn, SockaddrIn6,
    };
    let family = if ip.is_ipv6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let fd =
        socket(family, ty, SockFlag::SOCK_CLOEXEC, None).map_err(|e| format!("socket: {e}"))?;
    if reuse {
        setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(|e| format!("SO_REUSEADDR: {e}"))?;
    }
    let r = if ip.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true).map_err(|e| format!("IPV6_V6ONLY: {e}"))?;
        bind(
            fd.as_raw_fd(),
            &SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0)),
        )
    } else {
        bind(
            fd.as_raw_fd(),
            &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)),
        )
    };
    r.map_err(|e| format!("bind port {port}: {e}"))?;
    Ok(fd)
}

/// The unspecified address of a family (`v6`: `::`, else 0.0.0.0).
fn any_of(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    }
}

/// A TCP listener on 0.0.0.0:`port` (`[::]:port` for an IPv6 `ip`) with a
/// large backlog (many clients connect at once), created in the current
/// thread's namespace.
fn listen_tcp(ip: IpAddr, port: u16) -> TcpListener {
    use nix::sys::socket::{listen, Backlog, SockType};
    let fd = bound_socket(ip, port, SockType::Stream, true)
        .unwrap_or_else(|e| panic!("tcp listener on port {port}: {e}"));
    listen(&fd, Backlog::new(4096).expect("backlog")).expect("listen");
    // SAFETY: `fd` is a listening TCP socket we own; ownership moves.
    unsafe { TcpListener::from_raw_fd(fd.into_raw_fd()) }
}

/// A TCP echo server in a namespace; stopped (listener and every open
/// connection shut down, threads joined) on drop.
pub struct TcpEchoServer {
    pub port: u16,
    listener: Arc<TcpListener>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    acceptor: Option<JoinHandle<Vec<JoinHandle<()>>>>,
}

impl TcpEchoServer {
    /// Listens on 0.0.0.0:`port` in `ns`.
    pub fn start(ns: &NetNs, port: u16) -> TcpEchoServer {
        Self::start_family(ns, port, false)
    }

    /// Listens on [::]:`port` in `ns` (IPv6 only).
    pub fn start_v6(ns: &NetNs, port: u16) -> TcpEchoServer {
        Self::start_family(ns, port, true)
    }

    fn start_family(ns: &NetNs, port: u16, v6: bool) -> TcpEchoServer {
        let listener = Arc::new(in_netns(ns, || listen_tcp(any_of(v6), port)));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let peers: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let acceptor = {
            let (listener, conns, peers) = (listener.clone(), conns.clone(), peers.clone());
            std::thread::spawn(move || {
                let mut handlers = Vec::new();
                // Ends when drop shuts the listener down (accept: EINVAL).
                while let Ok((stream, peer)) = listener.accept() {
                    peers.lock().unwrap().push(peer);
                    if let Ok(c) = stream.try_clone() {
                        conns.lock().unwrap().push(c);
                    }
                    let h = std::thread::Builder::new()
                        .stack_size(64 * 1024)
                        .spawn(move || echo_lines(stream, peer))
                        .expect("spawn echo handler");
                    handlers.push(h);
                }
                handlers
            })
        };
        TcpEchoServer {
            port,
            listener,
            conns,
            peers,
            acceptor: Some(acceptor),
        }
    }

    /// Every peer address accepted so far, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

/// Echoes lines until the client closes, then closes its side too, with
/// shutdown(2): the server keeps a clone of every stream (for its drop), so
/// dropping this one alone would never send a FIN.
fn echo_lines(stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let Ok(w) = stream.try_clone() else {
        return;
    };
    echo_until_eof(BufReader::new(stream), &w, peer);
    let _ = w.shutdown(Shutdown::Both);
}

fn echo_until_eof(mut r: BufReader<TcpStream>, mut w: &TcpStream, peer: SocketAddr) {
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if w.write_all(format!("{peer} {}\n", line.trim_end()).as_bytes())
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

impl Drop for TcpEchoServer {
    fn drop(&mut self) {
        // SAFETY: shutdown(2) on a socket we own; on Linux it wakes a
        // blocked accept() on a listening socket.
        unsafe {
            libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR);
        }
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        if let Some(a) = self.acceptor.take() {
            if let Ok(handlers) = a.join() {
                for h in handlers {
                    let _ = h.join();
                }
            }
        }
    }
}

/// A UDP echo server in a namespace; stopped on drop.
pub struct UdpEchoServer {
    pub port: u16,
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEchoServer {
    pub fn start(ns: &NetNs, port: u16) -> UdpEchoServer {
        Self::start_family(ns, port, false)
    }

    /// On [::]:`port` (IPv6 only).
    pub fn start_v6(ns: &NetNs, port: u16) -> UdpEchoServer {
        Self::start_family(ns, port, true)
    }

    fn start_family(ns: &NetNs, port: u16, v6: bool) -> UdpEchoServer {
        let sock = in_netns(ns, || {
            bound_socket(
                any_of(v6),
                port,
                nix::sys::socket::SockType::Datagram,
                false,
            )
            .map(UdpSocket::from)
            .unwrap_or_else(|e| panic!("udp port {port}: {e}"))
        });
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("udp timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let peers: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let thread = {
            let (stop, peers) = (stop.clone(), peers.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    match sock.recv_from(&mut buf) {
                        Ok((n, peer)) => {
                            peers.lock().unwrap().push(peer);
                            let text = String::from_utf8_lossy(&buf[..n]);
                            let _ = sock.send_to(format!("{peer} {text}").as_bytes(), peer);
                        }
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        Err(_) => return,
                    }
                }
            })
        };
        UdpEchoServer {
            port,
            stop,
            peers,
            thread: Some(thread),
        }
    }

    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

impl Drop for UdpEchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What one echo round trip showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Echo {
    /// The client's address as the server saw it.
    pub seen_as: SocketAddr,
    /// The client's own socket address.
    pub local: SocketAddr,
    /// The echoed text.
    pub text: String,
}

fn parse_echo(reply: &str, local: SocketAddr) -> Result<Echo, String> {
    let reply = reply.trim_end();
    let (peer, text) = reply
        .split_once(' ')
        .ok_or_else(|| format!("malformed echo {reply:?}"))?;
    Ok(Echo {
        seen_as: peer
            .parse()
            .map_err(|e| format!("malformed peer in echo {reply:?}: {e}"))?,
        local,
        text: text.to_string(),
    })
}

/// One TCP line round trip from inside `ns` to `server`.
pub fn tcp_echo(ns: &NetNs, server: SocketAddr, line: &str) -> Result<Echo, String> {
    let line = line.to_string();
    in_netns(ns, move || {
        let s = TcpStream::connect_timeout(&server, Duration::from_secs(5))
            .map_err(|e| format!("connect {server}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let local = s.local_addr().map_err(|e| e.to_string())?;
        (&s).write_all(format!("{line}\n").as_bytes())
            .map_err(|e| format!("send to {server}: {e}"))?;
        let mut reply = String::new();
        BufReader::new(&s)
            .read_line(&mut reply)
            .map_err(|e| format!("echo from {server}: {e}"))?;
        parse_echo(&reply, local)
    })
}

/// One UDP datagram round trip from inside `ns` to `server` (three tries,
/// one second each).
pub fn udp_echo(ns: &NetNs, server: SocketAddr, payload: &str) -> Result<Echo, String> {
    udp_echo_from(ns, 0, server, payload)
}

/// A TCP connection from `local_port` of `ns` to `server` (bound before
/// connecting, with SO_REUSEADDR so a port just left in TIME_WAIT can be
/// taken again), kept open by the caller.
pub fn tcp_connect_from(
    ns: &NetNs,
    local_port: u16,
    server: SocketAddr,
) -> Result<TcpStream, String> {
    use nix::sys::socket::{connect, SockType, SockaddrIn, SockaddrIn6};
    in_netns(ns, move || {
        let fd = bound_socket(server.ip(), local_port, SockType::Stream, true)?;
        let r = match server {
            SocketAddr::V4(s) => connect(fd.as_raw_fd(), &SockaddrIn::from(s)),
            SocketAddr::V6(s) => connect(fd.as_raw_fd(), &SockaddrIn6::from(s)),
        };
        r.map_err(|e| format!("connect {server} from port {local_port}: {e}"))?;
        let s = TcpStream::from(fd);
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        Ok(s)
    })
}

/// One line round trip on an open connection to an echo server.
pub fn echo_on(s: &TcpStream, line: &str) -> Result<Echo, String> {
    let local = s.local_addr().map_err(|e| e.to_string())?;
    let mut w = s;
    w.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut reply = String::new();
    BufReader::new(s)
        .read_line(&mut reply)
        .map_err(|e| format!("echo: {e}"))?;
    parse_echo(&reply, local)
}

/// [`udp_echo`] from a given local port (0: any).
pub fn udp_echo_from(
    ns: &NetNs,
    local_port: u16,
    server: SocketAddr,
    payload: &str,
) -> Result<Echo, String> {
    let payload = payload.to_string();
    in_netns(ns, move || {
        let s = UdpSocket::bind((any_of(server.is_ipv6()), local_port))
            .map_err(|e| format!("bind udp port {local_port}: {e}"))?;
        s.connect(server).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(1)))
            .map_err(|e| e.to_string())?;
        let local = s.local_addr().map_err(|e| e.to_string())?;
        let mut buf = [0u8; 2048];
        let mut last = String::new();
        for _ in 0..3 {
            s.send(payload.as_bytes()).map_err(|e| e.to_string())?;
            match s.recv(&mut buf) {
                Ok(n) => return parse_echo(&String::from_utf8_lossy(&buf[..n]), local),
                Err(e) => last = e.to_string(),
            }
        }
        Err(format!("no UDP echo from {server}: {last}"))
    })
}

/// `len` bytes of a pattern that differs from one position to the next
/// (period 251, shifted by `seed`), so a missing, duplicated or misplaced
/// fragment shows in the reassembled datagram.
pub fn blob(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i % 251) as u8).wrapping_add(seed))
        .collect()
}

/// What a [`UdpBlobServer`] answers to `request`: the same number of
/// bytes, each inverted, so a reply cannot pass for the request reflected.
pub fn blob_reply(request: &[u8]) -> Vec<u8> {
    request.iter().map(|b| !b).collect()
}

/// Datagrams as a server received them: (source as seen, bytes).
pub type Datagrams = Vec<(SocketAddr, Vec<u8>)>;

/// A UDP server for datagrams of any size up to 64 KiB — larger than the
/// path MTU, they travel as IPv4 fragments both ways. It keeps every
/// datagram with the source it came from and answers each with
/// [`blob_reply`], one datagram of the same size. Stopped on drop.
pub struct UdpBlobServer {
    pub port: u16,
    stop: Arc<AtomicBool>,
    received: Arc<Mutex<Datagrams>>,
    thread: Option<JoinHandle<()>>,
}

impl UdpBlobServer {
    pub fn start(ns: &NetNs, port: u16) -> UdpBlobServer {
        Self::start_family(ns, port, false)
    }

    /// On [::]:`port` (IPv6 only; larger datagrams travel as IPv6
    /// fragments).
    pub fn start_v6(ns: &NetNs, port: u16) -> UdpBlobServer {
        Self::start_family(ns, port, true)
    }

    fn start_family(ns: &NetNs, port: u16, v6: bool) -> UdpBlobServer {
        let sock = in_netns(ns, || {
            UdpSocket::bind((any_of(v6), port))
                .unwrap_or_else(|e| panic!("bind udp port {port}: {e}"))
        });
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("udp timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let received: Arc<Mutex<Datagrams>> = Arc::default();
        let thread = {
            let (stop, received) = (stop.clone(), received.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    match sock.recv_from(&mut buf) {
                        Ok((n, peer)) => {
                            let data = buf[..n].to_vec();
                            let reply = blob_reply(&data);
                            // Kept before answering: a client holding the
                            // reply finds its datagram here.
                            received.lock().unwrap().push((peer, data));
                            let _ = sock.send_to(&reply, peer);
                        }
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        Err(_) => return,
                    }
                }
            })
        };
        UdpBlobServer {
            port,
            stop,
            received,
            thread: Some(thread),
        }
    }

    /// Every datagram received so far, with its source as the server saw it.
    pub fn received(&self) -> Datagrams {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for UdpBlobServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The answer to one large datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobReply {
    /// The client's own socket address.
    pub local: SocketAddr,
    /// Where the reply came from (the socket is not connected, so it takes
    /// a reply from anywhere and this shows the source it arrived with).
    pub from: SocketAddr,
    pub data: Vec<u8>,
}

/// Sends `payload` as one datagram from an unconnected UDP socket inside
/// `ns` to `server` and returns the first datagram that comes back (three
/// tries, two seconds each; each try is a new datagram).
pub fn udp_blob(ns: &NetNs, server: SocketAddr, payload: &[u8]) -> Result<BlobReply, String> {
    let payload = payload.to_vec();
    in_netns(ns, move || {
        let s = UdpSocket::bind((any_of(server.is_ipv6()), 0)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 65536];
        let mut last = String::new();
        for _ in 0..3 {
            s.send_to(&payload, server)
                .map_err(|e| format!("send {} bytes to {server}: {e}", payload.len()))?;
            match s.recv_from(&mut buf) {
                Ok((n, from)) => {
                    // The local address is known once the socket sent
                    // (its port) and the reply named the address it hit.
                    let port = s.local_addr().map_err(|e| e.to_string())?.port();
                    let local = local_address_towards(server, port)?;
                    return Ok(BlobReply {
                        local,
                        from,
                        data: buf[..n].to_vec(),
                    });
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(format!(
            "no reply to a {}-byte datagram from {server}: {last}",
            payload.len()
        ))
    })
}

/// The source address the current namespace uses towards `dest` (a
/// connected UDP socket's local address: no packet is sent), with `port`.
fn local_address_towards(dest: SocketAddr, port: u16) -> Result<SocketAddr, String> {
    let probe = UdpSocket::bind((any_of(dest.is_ipv6()), 0)).map_err(|e| e.to_string())?;
    probe.connect(dest).map_err(|e| e.to_string())?;
    let mut local = probe.local_addr().map_err(|e| e.to_string())?;
    local.set_port(port);
    Ok(local)
}

/// The kernel's IPv4 fragmentation and reassembly counters of one network
/// namespace (`Ip:` of /proc/net/snmp, as the namespace sees it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FragCounters {
    /// Fragments received that needed reassembly.
    pub reasm_reqds: u64,
    /// Datagrams reassembled.
    pub reasm_oks: u64,
    /// Datagrams fragmented (sent or forwarded).
    pub frag_oks: u64,
}

impl FragCounters {
    /// Reads the counters of `ns`.
    pub fn of(ns: &NetNs) -> FragCounters {
        let text = in_netns(ns, || {
            std::fs::read_to_string("/proc/thread-self/net/snmp").expect("read /proc/net/snmp")
        });
        let mut ip = text.lines().filter(|l| l.starts_with("Ip:"));
        let (names, values) = (ip.next(), ip.next());
        let (Some(names), Some(values)) = (names, values) else {
            panic!("no Ip: lines in /proc/net/snmp:\n{text}");
        };
        let field = |name: &str| -> u64 {
            names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(n, _)| *n == name)
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc/net/snmp:\n{text}"))
        };
        FragCounters {
            reasm_reqds: field("ReasmReqds"),
            reasm_oks: field("ReasmOKs"),
            frag_oks: field("FragOKs"),
        }
    }

    /// The IPv6 counters of `ns` (`Ip6ReasmReqds`, `Ip6ReasmOKs`,
    /// `Ip6FragOKs` of /proc/net/snmp6).
    pub fn of6(ns: &NetNs) -> FragCounters {
        let text = in_netns(ns, || {
            std::fs::read_to_string("/proc/thread-self/net/snmp6").expect("read /proc/net/snmp6")
        });
        let field = |name: &str| -> u64 {
            text.lines()
                .filter_map(|l| l.split_once(char::is_whitespace))
                .find(|(n, _)| *n == name)
                .and_then(|(_, v)| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc/net/snmp6:\n{text}"))
        };
        FragCounters {
            reasm_reqds: field("Ip6ReasmReqds"),
            reasm_oks: field("Ip6ReasmOKs"),
            frag_oks: field("Ip6FragOKs"),
        }
    }

    /// The increase since `before`.
    pub fn since(self, before: FragCounters) -> FragCounters {
        FragCounters {
            reasm_reqds: self.reasm_reqds - before.reasm_reqds,
            reasm_oks: self.reasm_oks - before.reasm_oks,
            frag_oks: self.frag_oks - before.frag_oks,
        }
    }
}
