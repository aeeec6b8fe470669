//! Traffic between the benchmark's namespaces: iperf3 and sockperf run as
//! child processes entered into a netns, and the benchmark's own TCP tools
//! (connection rate, request/response when sockperf is missing) run on
//! threads of this process.
//!
//! A socket belongs to the network namespace of the thread that created it
//! and keeps it for life, so a thread that has `setns`ed creates the
//! sockets; the main thread never changes namespace.
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::netns::in_netns;
use crate::netns::{enter_on_exec, enter_thread as enter};
use crate::proc;

fn spawn_in<T: Send + 'static>(
    ns: &Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> JoinHandle<Result<T>> {
    let ns = ns.to_path_buf();
    std::thread::spawn(move || {
        enter(&ns)?;
        f()
    })
}

/// Whether something listens on TCP `port` in the netns (reads the
/// namespace's /proc/thread-self/net/tcp from a thread inside it).
fn listening(ns: &Path, port: u16) -> Result<bool> {
    in_netns(ns, || {
        let want = format!(":{port:04X}");
        // iperf3 listens on a dual-stack IPv6 socket: check tcp6 too.
        let mut text = std::fs::read_to_string("/proc/thread-self/net/tcp")?;
        text.push_str(&std::fs::read_to_string("/proc/thread-self/net/tcp6").unwrap_or_default());
        Ok(text.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
        }))
    })
}

fn wait_listening(ns: &Path, port: u16, child: &mut Child, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        proc::check_interrupted()?;
        if listening(ns, port)? {
            return Ok(());
        }
        if let Some(st) = child.try_wait()? {
            bail!("{what} exited ({st}) before listening on port {port}");
        }
        if Instant::now() > deadline {
            bail!("{what} is not listening on port {port} after 5 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process in a netns, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Bg {
    child: Option<Child>,
    what: String,
    out: Option<JoinHandle<String>>,
    err: Option<JoinHandle<String>>,
}

impl Bg {
    fn spawn(ns: &Path, program: &str, args: &[String], capture: bool) -> Result<Bg> {
        proc::check_interrupted()?;
        let nsf = File::open(ns).with_context(|| format!("opening {}", ns.display()))?;
        let mut c = Command::new(program);
        c.args(args).stdin(Stdio::null());
        if capture {
            c.stdout(Stdio::piped()).stderr(Stdio::piped());
        } else {
            c.stdout(Stdio::null()).stderr(Stdio::null());
        }
        enter_on_exec(&mut c, &nsf);
        let what = format!("{program} {}", args.join(" "));
        let mut child = c.spawn().with_context(|| format!("starting {what}"))?;
        // Drain the pipes on threads so a chatty child never blocks.
        let out = child.stdout.take().map(|mut s| {
            std::thread::spawn(move || {
                let mut b = String::new();
                let _ = s.read_to_string(&mut b);
                b
            })
        });
        let err = child.stderr.take().map(|mut s| {
            std::thread::spawn(move || {
                let mut b = String::new();
                let _ = s.read_to_string(&mut b);
                b
            })
        });
        Ok(Bg {
            child: Some(child),
            what,
            out,
            err,
        })
    }

    /// A server: started, and waited for until it listens on `port`.
    pub fn server(ns: &Path, program: &str, args: &[&str], port: u16) -> Result<Bg> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let mut bg = Bg::spawn(ns, program, &args, false)?;
        let what = bg.what.clone();
        if let Some(child) = bg.child.as_mut() {
            wait_listening(ns, port, child, &what)?;
        }
        Ok(bg)
    }

    /// Waits (at most `timeout`) for the child to exit; its stdout, or an
    /// error with its stderr unless it exited 0.
    pub fn finish(mut self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut child = self.child.take().context("no child")?;
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if proc::check_interrupted().is_err() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                proc::check_interrupted()?;
                bail!("`{}` did not finish within {:?}", self.what, timeout);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = self
            .out
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let err = self
            .err
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        if !status.success() {
            let tail: String = out.chars().rev().take(600).collect::<String>();
            let tail: String = tail.chars().rev().collect();
            bail!(
                "`{}` failed ({status}): {} {}",
                self.what,
                err.trim(),
                tail.trim()
            );
        }
        Ok(out)
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: signalling our own child, not reaped yet.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Runs a client to completion in a netns; its stdout.
fn run_in(ns: &Path, program: &str, args: &[String], timeout: Duration) -> Result<String> {
    Bg::spawn(ns, program, args, true)?.finish(timeout)
}

/// iperf3 TCP throughput from the client netns to `dst:port`, in bit/s as
/// the receiver counted it. `reverse`: the server sends (`-R`).
pub fn iperf3(ns: &Path, dst: IpAddr, port: u16, secs: u32, reverse: bool) -> Result<f64> {
    let out = run_in(
        ns,
        "iperf3",
        &iperf3_args(dst, port, secs, reverse),
        Duration::from_secs(u64::from(secs) + 20),
    )?;
    parse_iperf3(&out)
}

fn iperf3_args(dst: IpAddr, port: u16, secs: u32, reverse: bool) -> Vec<String> {
    let mut a: Vec<String> = [
        "-c",
        &dst.to_string(),
        "-p",
        &port.to_string(),
        "-t",
        &secs.to_string(),
        "-J",
        "--connect-timeout",
        "3000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if reverse {
        a.push("-R".into());
    }
    a
}

/// iperf3 in the background (load for the latency-under-load runs).
pub fn iperf3_bg(ns: &Path, dst: IpAddr, port: u16, secs: u32, reverse: bool) -> Result<Bg> {
    Bg::spawn(ns, "iperf3", &iperf3_args(dst, port, secs, reverse), true)
}

pub fn parse_iperf3(out: &str) -> Result<f64> {
    let v: Value = serde_json::from_str(out).context("iperf3 -J output")?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 -J output has no end.sum_received.bits_per_second")
}

/// Round-trip latency of small request/response exchanges.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Rr {
    #[serde(deserialize_with = "super::stats::f64_or_nan")]
    pub p50_us: f64,
    #[serde(deserialize_with = "super::stats::f64_or_nan")]
    pub p99_us: f64,
    pub n: usize,
}

/// `sockperf ping-pong` over TCP for `secs` (full round trips).
pub fn sockperf_pp(ns: &Path, dst: IpAddr, port: u16, secs: u32) -> Result<Rr> {
    let args: Vec<String> = [
        "pp",
        "--tcp",
        "-i",
        &dst.to_string(),
        "-p",
        &port.to_string(),
        "-t",
        &secs.to_string(),
        "--full-rtt",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = run_in(
        ns,
        "sockperf",
        &args,
        Duration::from_secs(u64::from(secs) + 20),
    )?;
    parse_sockperf(&out)
}

pub fn parse_sockperf(out: &str) -> Result<Rr> {
    let pct = |p: &str| -> Option<f64> {
        out.lines()
            .find(|l| l.contains(&format!("percentile {p} =")))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse().ok())
    };
    let n = out
        .lines()
        .find_map(|l| {
            let i = l.find("Total ")?;
            l[i + 6..].split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0);
    match (pct("50.000"), pct("99.000")) {
        (Some(p50_us), Some(p99_us)) => Ok(Rr { p50_us, p99_us, n }),
        _ => bail!(
            "no percentiles in sockperf output: {}",
            out.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
        ),
    }
}

/// Threads serving a listener until dropped.
pub struct ThreadServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for ThreadServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[derive(Clone, Copy)]
enum Serve {
    /// Write one byte and close first (HTTP/1.0 style: the server holds
    /// TIME_WAIT, the client's ports are free again at once).
    OneByteAndClose,
    /// Echo until the client closes (request/response).
    Echo,
}

fn serve(ns: &Path, ports: &[u16], how: Serve, acceptors: usize) -> Result<ThreadServer> {
    let listeners = in_netns(ns, || {
        ports
            .iter()
            .map(|&port| {
                // Dual-stack (IPv4-mapped on the same socket): the paths
                // are measured over both families.
                let l = TcpListener::bind(("::", port))
                    .with_context(|| format!("binding TCP port {port}"))?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for _ in 0..acceptors {
        let ls = listeners
            .iter()
            .map(TcpListener::try_clone)
            .collect::<std::io::Result<Vec<_>>>()?;
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || accept_loop(ls, stop, how)));
    }
    Ok(ThreadServer { stop, threads })
}

/// Accepts on every listener (one poll over all of them) until stopped.
fn accept_loop(ls: Vec<TcpListener>, stop: Arc<AtomicBool>, how: Serve) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    let mut fds: Vec<libc::pollfd> = ls
        .iter()
        .map(|l| libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `fds` is a valid array of its length; bounded timeout.
        if unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) } <= 0 {
            continue;
        }
        for (l, p) in ls.iter().zip(fds.iter_mut()) {
            if p.revents == 0 {
                continue;
            }
            p.revents = 0;
            let Ok((mut s, _)) = l.accept() else { continue };
            match how {
                Serve::OneByteAndClose => {
                    let _ = s.write_all(b"x");
                }
                Serve::Echo => {
                    let stop = stop.clone();
                    conns.retain(|h| !h.is_finished());
                    conns.push(std::thread::spawn(move || echo(s, stop)));
                }
            }
        }
    }
    for h in conns {
        let _ = h.join();
    }
}

fn echo(mut s: TcpStream, stop: Arc<AtomicBool>) {
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 256];
    while !stop.load(Ordering::Relaxed) {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// The connection-rate server: accept, write one byte, close.
pub fn conn_server(ns: &Path, port: u16) -> Result<ThreadServer> {
    conn_servers(ns, &[port])
}

/// Connection-rate servers on several ports (endpoints), served together.
pub fn conn_servers(ns: &Path, ports: &[u16]) -> Result<ThreadServer> {
    serve(ns, ports, Serve::OneByteAndClose, 2)
}

/// The request/response server for [`own_rr`].
pub fn echo_server(ns: &Path, port: u16) -> Result<ThreadServer> {
    serve(ns, &[port], Serve::Echo, 1)
}

/// Completed connections: connect, read the server's byte and its close.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnRate {
    pub per_sec: f64,
    pub ok: u64,
    pub failed: u64,
}

/// New TCP connections per second from `concurrency` client threads in
/// the client netns for `secs`. A connection counts once the server's
/// byte and FIN have arrived; a connect or read that takes more than 1 s
/// (a dropped SYN waits that long for its retransmit) counts as failed.
pub fn conn_rate(ns: &Path, dst: SocketAddr, secs: f64, concurrency: usize) -> Result<ConnRate> {
    conn_rate_to(ns, &[dst], secs, concurrency)
}

/// [`conn_rate`] spread over several endpoints: each client thread goes
/// round the list, starting at its own place in it.
pub fn conn_rate_to(
    ns: &Path,
    dsts: &[SocketAddr],
    secs: f64,
    concurrency: usize,
) -> Result<ConnRate> {
    if dsts.is_empty() {
        bail!("no endpoint to connect to");
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..concurrency.max(1))
        .map(|t| {
            let dsts = dsts.to_vec();
            spawn_in(ns, move || {
                let (mut ok, mut failed) = (0u64, 0u64);
                let mut buf = [0u8; 8];
                let mut next = t;
                while Instant::now() < deadline {
                    let dst = dsts[next % dsts.len()];
                    next += 1;
                    match TcpStream::connect_timeout(&dst, Duration::from_secs(1)) {
                        Ok(mut s) => {
                            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                            let mut got = 0;
                            let done = loop {
                                match s.read(&mut buf) {
                                    Ok(0) => break got > 0,
                                    Ok(n) => got += n,
                                    Err(_) => break false,
                                }
                            };
                            if done {
                                ok += 1;
                            } else {
                                failed += 1;
                            }
                        }
                        Err(_) => failed += 1,
                    }
                }
                Ok((ok, failed))
            })
        })
        .collect();
    let mut total = ConnRate::default();
    for h in handles {
        let (ok, failed) = h.join().map_err(|_| anyhow!("client thread panicked"))??;
        total.ok += ok;
        total.failed += failed;
    }
    total.per_sec = total.ok as f64 / start.elapsed().as_secs_f64();
    Ok(total)
}

/// One connection through the path (connect, the server's byte, its
/// close): the check that a path works before it is measured.
pub fn conn_once(ns: &Path, dst: SocketAddr) -> Result<()> {
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(3))
            .with_context(|| format!("connecting to {dst}"))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .with_context(|| format!("reading from {dst}"))?;
        if buf != b"x" {
            bail!("{dst} answered {buf:?}, not the server's byte");
        }
        Ok(())
    })
}

/// Our own request/response client (when sockperf is missing): 14-byte
/// messages echoed back, one at a time, for `secs` after a short warm-up.
pub fn own_rr(ns: &Path, dst: SocketAddr, secs: f64) -> Result<Rr> {
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(3))
            .with_context(|| format!("connecting to {dst}"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let msg = [7u8; 14];
        let mut back = [0u8; 14];
        let warm = Instant::now() + Duration::from_millis(200);
        let end = warm + Duration::from_secs_f64(secs);
        let mut samples = Vec::new();
        loop {
            let t = Instant::now();
            if t > end {
                break;
            }
            s.write_all(&msg)?;
            s.read_exact(&mut back)?;
            if t > warm {
                samples.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        Ok(Rr {
            p50_us: super::stats::percentile(&samples, 50.0),
            p99_us: super::stats::percentile(&samples, 99.0),
            n: samples.len(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sockperf_percentiles() {
        let out =
            "sockperf: Total 7239 observations; each percentile contains 72.39 observations\n\
                   sockperf: ---> percentile 99.000 =  274.056\n\
                   sockperf: ---> percentile 50.000 =   16.344\n";
        let rr = parse_sockperf(out).unwrap();
        assert_eq!(rr.p50_us, 16.344);
        assert_eq!(rr.p99_us, 274.056);
        assert_eq!(rr.n, 7239);
        assert!(parse_sockperf("nothing").is_err());
    }

    #[test]
    fn parses_iperf3_json() {
        let out = r#"{"end":{"sum_received":{"bits_per_second":1.5e9}}}"#;
        assert_eq!(parse_iperf3(out).unwrap(), 1.5e9);
        assert!(parse_iperf3(r#"{"error":"unable to connect"}"#).is_err());
    }
}
