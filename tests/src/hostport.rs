//! Harness for the hostPort (ebpf-portmap) tests: the bridge + portmap
//! conflist, a cgroup v2 directory for node-local clients (the agent's
//! socket hooks only see processes in it), TX checksum offload switching
//! on a veth (what `ethtool -K <if> tx off` does, without needing ethtool),
//! a client process that runs inside such a cgroup, and a fleet of UDP
//! echo sockets in many pod namespaces served by one thread.
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::netns::NetNs;
use crate::tempdir::DIR_PREFIX;
use crate::topology::{merge, Node};
use crate::uplink::masq_conf;

/// The ebpf-bridge (ipMasq, gateway, default route) + ebpf-portmap conflist
/// a runtime would hold; `snat` is left out when `None` (its default,
/// true, applies). Both plugins carry `node`'s path keys.
pub fn portmap_conflist(
    node: &Node,
    network: &str,
    bridge: &str,
    subnet: &str,
    snat: Option<bool>,
) -> Value {
    let mut br = masq_conf(node, network, bridge, subnet);
    let obj = br.as_object_mut().expect("bridge config is an object");
    obj.remove("name");
    let version = obj.remove("cniVersion").expect("cniVersion");
    let mut pm = json!({
        "type": "ebpf-portmap",
        "capabilities": {"portMappings": true},
    });
    if let Some(s) = snat {
        pm["snat"] = json!(s);
    }
    merge(&mut pm, &node.path_keys());
    json!({"cniVersion": version, "name": network, "plugins": [br, pm]})
}

/// One `portMappings` element as a runtime sends it.
pub fn mapping(host_port: u32, container_port: u32, protocol: &str) -> Value {
    json!({"hostPort": host_port, "containerPort": container_port, "protocol": protocol})
}

/// [`mapping`] restricted to one node address.
pub fn mapping_on(host_ip: Ipv4Addr, host_port: u32, container_port: u32, protocol: &str) -> Value {
    let mut m = mapping(host_port, container_port, protocol);
    m["hostIP"] = json!(host_ip.to_string());
    m
}

/// A datapath counter of `cni-agent status --json` (0 when absent).
pub fn stat(status: &Value, name: &str) -> u64 {
    status["stats"][name].as_u64().unwrap_or(0)
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` on a pure v2
/// host, `/sys/fs/cgroup/unified` on a hybrid one), from mountinfo.
pub fn cgroup2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> ... - <fstype> ..."
        let (pre, post) = l.split_once(" - ")?;
        (post.split_whitespace().next()? == "cgroup2")
            .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

static CG_COUNTER: AtomicU32 = AtomicU32::new(0);
static CG_REAP: Once = Once::new();

/// A cgroup v2 directory of its own for a test's node-local clients (never
/// the root cgroup: the agent's hooks apply to everything below the
/// directory it is given). On drop, the processes the test moved into it
/// are killed, and it is removed once empty.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    /// `<cgroup2 root>/cni-tests-<pid>-<n>-<tag>`, or `None` when this host
    /// has no cgroup v2 hierarchy.
    pub fn new(tag: &str) -> Option<TestCgroup> {
        let root = cgroup2_root()?;
        CG_REAP.call_once(|| reap_stale_cgroups(&root));
        let n = CG_COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = root.join(format!("{DIR_PREFIX}{}-{n}-{tag}", std::process::id()));
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", path.display()));
        Some(TestCgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pids currently in the cgroup.
    pub fn pids(&self) -> Vec<i32> {
        pids_of(&self.path)
    }
}

fn pids_of(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Kills what is left in `dir` (only processes a test moved there) and
/// removes it, waiting (5 s at most) for the kernel to let go.
fn remove_cgroup(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for pid in pids_of(dir) {
            // SAFETY: kill(2) of a process a test started and moved here.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if Instant::now() >= deadline => {
                eprintln!("warning: cannot remove cgroup {}: {e}", dir.display());
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Removes `cni-tests-<pid>-…` cgroups of test processes that are gone.
fn reap_stale_cgroups(root: &Path) {
    for path in cni_harness::stale_entries(root, DIR_PREFIX) {
        remove_cgroup(&path);
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove_cgroup(&self.path);
    }
}

/// `struct ethtool_value` of linux/ethtool.h.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;

/// One SIOCETHTOOL get/set of a u32 value on `ifname` inside `ns`.
fn ethtool_value(ns: &NetNs, ifname: &str, cmd: u32, data: u32) -> Result<u32, String> {
    let ifname = ifname.to_string();
    crate::traffic::in_netns(ns, move || {
        let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| e.to_string())?;
        let mut value = EthtoolValue { cmd, data };
        // SAFETY: an all-zero ifreq is valid; the name fits (IFNAMSIZ
        // checked) and stays NUL-terminated.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        let name = ifname.as_bytes();
        if name.len() >= ifr.ifr_name.len() {
            return Err(format!("interface name {ifname:?} too long"));
        }
        for (d, s) in ifr.ifr_name.iter_mut().zip(name) {
            *d = *s as libc::c_char;
        }
        ifr.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
        // SAFETY: SIOCETHTOOL with an ifreq whose data points at a live
        // ethtool_value, on a socket we own.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL as _, &mut ifr) };
        if rc != 0 {
            return Err(format!(
                "SIOCETHTOOL {cmd:#x} on {ifname}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(value.data)
    })
}

/// Turns TX checksum offload of `ifname` in `ns` on or off (`ethtool -K
/// <if> tx on|off`). Off, the stack writes full checksums into every packet
/// the interface sends, as packets on a real wire always carry; a veth
/// otherwise passes CHECKSUM_PARTIAL packets to its peer.
pub fn set_tx_checksum(ns: &NetNs, ifname: &str, on: bool) {
    ethtool_value(ns, ifname, ETHTOOL_STXCSUM, on as u32).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        tx_checksum(ns, ifname),
        on,
        "TX checksum offload of {ifname} did not change"
    );
}

/// Whether TX checksum offload is on for `ifname` in `ns`.
pub fn tx_checksum(ns: &NetNs, ifname: &str) -> bool {
    ethtool_value(ns, ifname, ETHTOOL_GTXCSUM, 0).unwrap_or_else(|e| panic!("{e}")) != 0
}

/// What a node-local client saw (see [`local_client`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEcho {
    /// The client's address as the echo server saw it.
    pub seen_as: SocketAddr,
    /// The client socket's own address.
    pub local: SocketAddr,
    /// Where the reply came from as the client's socket reports it: the
    /// peer of a connected socket, the source of an unconnected one's
    /// datagram.
    pub reply_from: SocketAddr,
    pub text: String,
}

/// How [`local_client`] talks to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    /// connect(2) + one line (the connect4 hook).
    Tcp,
    /// connect(2)ed UDP socket (the connect4 hook).
    UdpConnected,
    /// sendto(2) on an unconnected UDP socket (the sendmsg4 hook).
    UdpSendto,
}

impl ClientKind {
    fn arg(self) -> &'static str {
        match self {
            ClientKind::Tcp => "tcp",
            ClientKind::UdpConnected => "udp",
            ClientKind::UdpSendto => "udp-sendto",
        }
    }
}

/// One echo exchange with `server` by a separate process (the
/// `hostport-probe` binary of this package) that first moves itself into
/// `cgroup` (if any) and then into `ns`: the agent's socket hooks act on
/// sockets created by processes of its cgroup, which a test thread cannot
/// join on its own.
pub fn local_client(
    probe_bin: &Path,
    ns: &NetNs,
    cgroup: Option<&TestCgroup>,
    kind: ClientKind,
    server: SocketAddr,
    payload: &str,
) -> Result<LocalEcho, String> {
    let mut cmd = Command::new(probe_bin);
    cmd.arg("--netns").arg(ns.path());
    if let Some(cg) = cgroup {
        cmd.arg("--cgroup").arg(cg.path());
    }
    cmd.args([kind.arg(), &server.to_string(), payload])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", probe_bin.display()));
    // The probe has its own timeouts (15 s at most); this is a backstop.
    let out = wait_output(child, Duration::from_secs(30));
    if !out.status.success() {
        return Err(format!(
            "{} {server} failed ({}): {}",
            kind.arg(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "probe printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    let addr = |k: &str| -> Result<SocketAddr, String> {
        v[k].as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("probe output without {k}: {v}"))
    };
    let reply = v["reply"].as_str().unwrap_or("").trim_end().to_string();
    let (seen, text) = reply
        .split_once(' ')
        .ok_or_else(|| format!("malformed echo {reply:?}"))?;
    Ok(LocalEcho {
        seen_as: seen
            .parse()
            .map_err(|e| format!("malformed peer in echo {reply:?}: {e}"))?,
        local: addr("local")?,
        reply_from: addr("replyFrom")?,
        text: text.to_string(),
    })
}

/// Waits for `child` (killing it after `timeout`) and collects its output.
fn wait_output(mut child: std::process::Child, timeout: Duration) -> std::process::Output {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                break;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("wait: {e}"),
        }
    }
    child.wait_with_output().expect("collect probe output")
}

/// UDP echo sockets bound to the same port in many namespaces, all served
/// by one thread (a thread per pod would be hundreds of threads). Each
/// datagram is answered with `<peer as seen> <payload>`, like
/// [`crate::traffic::UdpEchoServer`]. Stopped on drop.
pub struct UdpEchoFleet {
    stop: Arc<AtomicBool>,
    received: Arc<Mutex<Vec<Vec<String>>>>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEchoFleet {
    /// Binds 0.0.0.0:`port` in every namespace of `namespaces` (socket i
    /// in namespace i).
    pub fn start(namespaces: &[&NetNs], port: u16) -> UdpEchoFleet {
        let paths: Vec<PathBuf> = namespaces.iter().map(|n| n.path().to_path_buf()).collect();
        // One short-lived thread visits every namespace in turn; a socket
        // keeps the namespace it was created in.
        let sockets: Vec<UdpSocket> = std::thread::spawn(move || {
            paths
                .iter()
                .map(|p| {
                    crate::netns::enter_thread(p).unwrap_or_else(|e| panic!("{e:#}"));
                    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))
                        .unwrap_or_else(|e| panic!("bind udp {port} in {}: {e}", p.display()));
                    s.set_nonblocking(true).expect("nonblocking");
                    s
                })
                .collect()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(Mutex::new(vec![Vec::new(); sockets.len()]));
        let thread = {
            let (stop, received) = (stop.clone(), received.clone());
            std::thread::spawn(move || serve_fleet(&sockets, &stop, &received))
        };
        UdpEchoFleet {
            stop,
            received,
            thread: Some(thread),
        }
    }

    /// The payloads received so far, per socket.
    pub fn received(&self) -> Vec<Vec<String>> {
        self.received.lock().unwrap().clone()
    }
}

fn serve_fleet(sockets: &[UdpSocket], stop: &AtomicBool, received: &Mutex<Vec<Vec<String>>>) {
    let mut fds: Vec<libc::pollfd> = sockets
        .iter()
        .map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `fds` is a valid array of pollfd for the sockets we own.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
        if n <= 0 {
            continue;
        }
        for (i, p) in fds.iter_mut().enumerate() {
            if p.revents == 0 {
                continue;
            }
            p.revents = 0;
            while let Ok((len, peer)) = sockets[i].recv_from(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..len]);
                received.lock().unwrap()[i].push(text.to_string());
                let _ = sockets[i].send_to(format!("{peer} {text}").as_bytes(), peer);
            }
        }
    }
}

impl Drop for UdpEchoFleet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP server that echoes every byte back until the client closes (for
/// bulk transfers both ways); stopped on drop.
pub struct BulkEchoServer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BulkEchoServer {
    pub fn start(ns: &NetNs, port: u16) -> BulkEchoServer {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = crate::traffic::in_netns(ns, || {
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind bulk server")
        });
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut handlers = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => handlers.push(std::thread::spawn(move || {
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                            if let Ok(mut r) = s.try_clone() {
                                let mut w = &s;
                                let _ = std::io::copy(&mut r, &mut w);
                            }
                            let _ = s.shutdown(std::net::Shutdown::Both);
                        })),
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
                for h in handlers {
                    let _ = h.join();
                }
            })
        };
        BulkEchoServer {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for BulkEchoServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `len` patterned bytes to `server` from `ns` while reading the
/// echo, and checks every byte came back.
pub fn bulk_echo(ns: &NetNs, server: SocketAddr, len: usize) -> Result<(), String> {
    use std::io::{Read, Write};
    crate::traffic::in_netns(ns, move || {
        let s = TcpStream::connect_timeout(&server, Duration::from_secs(5))
            .map_err(|e| format!("connect {server}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| e.to_string())?;
        let pattern = |i: usize| (i % 251) as u8;
        let mut w = s.try_clone().map_err(|e| e.to_string())?;
        let writer = std::thread::spawn(move || -> std::io::Result<()> {
            let data: Vec<u8> = (0..len).map(pattern).collect();
            w.write_all(&data)?;
            w.shutdown(std::net::Shutdown::Write)
        });
        let mut got = Vec::with_capacity(len);
        let read = (&s).read_to_end(&mut got);
        let wrote = writer.join().map_err(|_| "writer panicked".to_string())?;
        wrote.map_err(|e| format!("send: {e} (echoed {} bytes so far)", got.len()))?;
        read.map_err(|e| format!("receive: {e} after {} of {len} bytes", got.len()))?;
        if got.len() != len {
            return Err(format!("echoed {} of {len} bytes", got.len()));
        }
        if let Some(i) = (0..len).find(|&i| got[i] != pattern(i)) {
            return Err(format!("byte {i} corrupted"));
        }
        Ok(())
    })
}
