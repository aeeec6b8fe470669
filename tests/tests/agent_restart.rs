//! The agent is not in the datapath: its programs, maps and links are
//! pinned, so flows keep running while it restarts (SIGTERM, as an upgrade
//! does) or after it crashes (SIGKILL), and a new agent on the same paths
//! takes over. DEL never needs it; ADD does, and fails cleanly without it.
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use cni_agent::datapath::pins::PinLayout;
use cni_ebpf_common::map_names;
use cni_tests::agentctl::{admin, nat_occupancy, record_of, recorded_masq_ips, AgentProc};
use cni_tests::prelude::*;
use cni_tests::traffic::{
    blob, blob_reply, in_netns, tcp_echo, udp_blob, TcpEchoServer, UdpBlobServer,
};
use cni_tests::uplink::{masq_conf, result_ipv4, External};

const NET: &str = "rstnet";
const BRIDGE_NAME: &str = "cnirst0";
const IPERF_PORT: &str = "5201";
const ECHO_PORT: u16 = 7000;

/// The node, its uplink and pod, in drop order (pods are declared by the
/// tests after the fixture, so they go first).
struct Fixture {
    ext: External,
    node: Node,
}

fn fixture(tag: &str) -> Fixture {
    let node = Node::new(tag);
    let ext = External::direct(&node);
    Fixture { ext, node }
}

impl Fixture {
    /// The single-plugin config (a conflist of one).
    fn conf(&self) -> Value {
        masq_conf(&self.node, NET, BRIDGE_NAME, &self.ext.pod_subnet())
    }
    fn list(&self) -> Value {
        conflist_of(&self.conf())
    }
}

/// A child process killed on drop (iperf3), unless taken back.
struct Proc(Option<Child>);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The pod's TCP bindings to `remote`, as `(pod, nat)` endpoint strings.
fn tcp_bindings_to(node: &Node, pod_ip: std::net::Ipv4Addr, remote: &str) -> Vec<(String, String)> {
    let nat = admin(node, "nat");
    let mut v: Vec<(String, String)> = nat
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| {
            b["proto"] == "tcp"
                && b["remote"] == remote
                && b["pod"]
                    .as_str()
                    .is_some_and(|p| p.starts_with(&format!("{pod_ip}:")))
        })
        .map(|b| {
            (
                b["pod"].as_str().unwrap_or("").to_string(),
                b["nat"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// An iperf3 upload from a pod to the external side keeps running, without
/// a reset or a stalled interval, while the agent is stopped with `signal`
/// and a new one started on the same paths; the new agent sees the same
/// bindings (same ports) and serves new flows.
fn stream_survives(tag: &str, signal: i32) {
    let fx = fixture(tag);
    let mut agent = AgentProc::start(&fx.node, &[]);
    let pod = fx.node.pod(&format!("{tag}pod"));
    let rt = fx.node.runtime(Impl::Ours);
    let list = fx.list();
    let att = Attachment::new(&format!("{tag}-ctr"), &pod, "eth0");
    let result = rt
        .add_list(&list, &att)
        .unwrap_or_else(|o| panic!("ADD: {o}"));
    let pod_ip = result_ipv4(&result);
    let far = fx.ext.ext_addr.to_string();
    let remote = format!("{far}:{IPERF_PORT}");

    let _server = Proc(Some(
        fx.ext
            .ns
            .command("iperf3")
            .args(["-s", "-1", "-p", IPERF_PORT, "-B", &far])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start iperf3 -s"),
    ));
    eventually("iperf3 to listen", SETTLE, || {
        let out = fx
            .ext
            .ns
            .run("ss", &["-Hltn", &format!("sport = :{IPERF_PORT}")]);
        !String::from_utf8_lossy(&out.stdout).trim().is_empty()
    });
    // 8 s at a modest rate (2 cores shared with the agent and the build),
    // reported every 0.5 s.
    let mut client = Proc(Some(
        pod.command("iperf3")
            .args([
                "-c",
                &far,
                "-p",
                IPERF_PORT,
                "-t",
                "8",
                "-i",
                "0.5",
                "-b",
                "100M",
                "--json",
                "--connect-timeout",
                "3000",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start iperf3 -c"),
    ));
    // Control and data connections are both translated and flowing.
    let before = wait_until("iperf3's two connections in the NAT table", SETTLE, || {
        let b = tcp_bindings_to(&fx.node, pod_ip, &remote);
        (b.len() >= 2).then_some(b)
    });

    let t0 = Instant::now();
    let status = agent.signal_and_wait(signal);
    let stopped = t0.elapsed();
    drop(agent);
    // With no agent at all, the pinned programs keep translating: the
    // upload keeps being acknowledged (another 2 MB, i.e. well past what
    // was in flight).
    let acked = acked_bytes(&pod, &remote);
    let resumed = wait_until(
        "the upload to progress with no agent running",
        SETTLE,
        || (acked_bytes(&pod, &remote) > acked + (2 << 20)).then(|| t0.elapsed()),
    );
    let agent = AgentProc::start(&fx.node, &[]);
    let restarted = t0.elapsed();
    eprintln!(
        "agent {}: stopped in {stopped:?} ({status}); upload progressed by 2 MB with no agent \
         {resumed:?} after the signal; new agent serving after {restarted:?}",
        if signal == libc::SIGKILL {
            "SIGKILL"
        } else {
            "SIGTERM"
        }
    );
    for line in agent
        .log_text()
        .lines()
        .filter(|l| l.contains("pinned") || l.contains("uplink"))
    {
        eprintln!("  new agent: {line}");
    }
    let after = tcp_bindings_to(&fx.node, pod_ip, &remote);
    assert_eq!(
        after, before,
        "the flows must keep their bindings across the restart"
    );

    // The run completes without error and no interval was empty.
    let child = client.0.take().expect("iperf3 client");
    let out = wait_child(child, Duration::from_secs(30));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3 printed no JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        out.status.success(),
        "iperf3 client failed: {}",
        report["error"]
    );
    assert!(report.get("error").is_none(), "iperf3: {}", report["error"]);
    let intervals: Vec<u64> = report["intervals"]
        .as_array()
        .expect("intervals")
        .iter()
        .map(|i| i["sum"]["bytes"].as_u64().unwrap_or(0))
        .collect();
    assert!(intervals.len() >= 15, "iperf3 ran short: {intervals:?}");
    assert!(
        intervals.iter().all(|&b| b > 0),
        "a 0.5 s interval moved no data (flow stalled across the restart): {intervals:?}"
    );
    let retransmits: Vec<u64> = report["intervals"]
        .as_array()
        .expect("intervals")
        .iter()
        .map(|i| i["sum"]["retransmits"].as_u64().unwrap_or(0))
        .collect();
    eprintln!("iperf3 retransmits per 0.5 s interval: {retransmits:?}");
    let sent = report["end"]["sum_sent"]["bytes"].as_u64().unwrap_or(0);
    let received = report["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    eprintln!(
        "iperf3: {sent} bytes sent, {received} received, retransmits {}, intervals {intervals:?}",
        report["end"]["sum_sent"]["retransmits"]
    );
    assert!(
        received > 0 && received * 10 >= sent * 9,
        "sent {sent}, received {received}"
    );

    // The new agent serves: new flows are translated and DEL goes through it.
    let _echo = TcpEchoServer::start(&fx.ext.ns, ECHO_PORT);
    let e = tcp_echo(
        &pod,
        SocketAddr::from((fx.ext.ext_addr, ECHO_PORT)),
        "after restart",
    )
    .expect("new connection after the restart");
    assert_eq!(e.seen_as.ip(), IpAddr::V4(fx.ext.node_addr));
    rt.del_list(&list, &att, Some(&result))
        .unwrap_or_else(|o| panic!("DEL: {o}"));
    assert_eq!(admin(&fx.node, "status")["masqSources"], 0);
    drop(agent);
}

/// The largest `bytes_acked` of the pod's TCP connections to `remote`
/// (`ss -ti`, inside the pod).
fn acked_bytes(pod: &NetNs, remote: &str) -> u64 {
    let out = pod.run("ss", &["-Htin", "state", "established", "dst", remote]);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("bytes_acked:")?.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
}

fn wait_child(mut child: Child, timeout: Duration) -> std::process::Output {
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().expect("wait iperf3").is_some() {
            return child.wait_with_output().expect("iperf3 output");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("iperf3 output");
            panic!(
                "iperf3 client still running after {timeout:?}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn stream_survives_agent_restart() {
    require_e2e!();
    stream_survives("rsterm", libc::SIGTERM);
}

#[test]
fn stream_survives_agent_sigkill() {
    require_e2e!();
    stream_survives("rskill", libc::SIGKILL);
}

/// One line over an open connection to an echo server; the server's answer
/// (`<client as seen> <line>`).
fn echo_on(s: &TcpStream, line: &str) -> Result<String, String> {
    let mut w = s;
    w.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut reply = String::new();
    BufReader::new(s)
        .read_line(&mut reply)
        .map_err(|e| format!("echo: {e}"))?;
    Ok(reply.trim_end().to_string())
}

/// The pins of an agent built before a map existed: NAT_FRAGS, the newest
/// map, is missing from them (its pin is removed here to stand for such an
/// agent's). The next agent reuses every other pin, creates and pins the
/// missing map without a new layout version, and a connection opened
/// before keeps its binding; a fragmented datagram, which needs the new
/// map, is translated. (Checked once against a real build without the
/// map as well, both ways.)
#[test]
fn pins_without_a_newer_map_are_reused() {
    require_e2e!();
    let fx = fixture("rsnewmap");
    let mut agent = AgentProc::start(&fx.node, &[]);
    let pod = fx.node.pod("rsnmpod");
    let rt = fx.node.runtime(Impl::Ours);
    let list = fx.list();
    let att = Attachment::new("rsnewmap-ctr", &pod, "eth0");
    let result = rt
        .add_list(&list, &att)
        .unwrap_or_else(|o| panic!("ADD: {o}"));
    let _tcp = TcpEchoServer::start(&fx.ext.ns, ECHO_PORT);
    let _udp = UdpBlobServer::start(&fx.ext.ns, ECHO_PORT + 1);
    let target = SocketAddr::from((fx.ext.ext_addr, ECHO_PORT));
    let conn = in_netns(&pod, move || {
        TcpStream::connect_timeout(&target, Duration::from_secs(5))
    })
    .expect("pod -> external TCP");
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    let before = echo_on(&conn, "before").expect("echo before the restart");
    let seen_as = before.split(' ').next().unwrap_or("").to_string();

    agent.terminate();
    let pin = PinLayout::new(fx.node.bpffs.path()).map_path(map_names::NAT_FRAGS);
    std::fs::remove_file(&pin).unwrap_or_else(|e| panic!("{}: {e}", pin.display()));
    let _agent = AgentProc::start(&fx.node, &[]);
    assert!(pin.exists(), "the missing map is created and pinned");
    let after = echo_on(&conn, "after").expect("echo after the restart");
    assert_eq!(
        after,
        format!("{seen_as} after"),
        "same binding after the restart"
    );

    let request = blob(4000, 5);
    let reply = udp_blob(
        &pod,
        SocketAddr::from((fx.ext.ext_addr, ECHO_PORT + 1)),
        &request,
    )
    .unwrap_or_else(|e| panic!("a fragmented datagram after the restart: {e}"));
    assert!(
        reply.data == blob_reply(&request),
        "the reply arrives whole"
    );
    drop(conn);
    rt.del_list(&list, &att, Some(&result))
        .unwrap_or_else(|o| panic!("DEL: {o}"));
}

/// DEL while the agent is down (killed: stale socket; stopped: no socket)
/// succeeds, and once an agent is back nothing of the attachment is left:
/// record, masquerade entry, NAT bindings, IP reservation, veth. The other
/// pod is untouched and still masqueraded.
#[test]
fn del_while_agent_down() {
    require_e2e!();
    let fx = fixture("deldown");
    let mut agent = AgentProc::start(&fx.node, &[]);
    let pod_a = fx.node.pod("ddowna");
    let pod_b = fx.node.pod("ddownb");
    let rt = fx.node.runtime(Impl::Ours);
    let list = fx.list();
    let att_a = Attachment::new("deldown-a", &pod_a, "eth0");
    let att_b = Attachment::new("deldown-b", &pod_b, "eth0");
    let res_a = rt
        .add_list(&list, &att_a)
        .unwrap_or_else(|o| panic!("ADD a: {o}"));
    let res_b = rt
        .add_list(&list, &att_b)
        .unwrap_or_else(|o| panic!("ADD b: {o}"));
    let (ip_a, ip_b) = (result_ipv4(&res_a), result_ipv4(&res_b));
    let veth = |r: &Value| -> String {
        r["interfaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|i| i["sandbox"].is_null() && i["name"] != BRIDGE_NAME)
            .and_then(|i| i["name"].as_str())
            .unwrap_or_else(|| panic!("no host veth in {r}"))
            .to_string()
    };
    let (veth_a, veth_b) = (veth(&res_a), veth(&res_b));
    let echo = TcpEchoServer::start(&fx.ext.ns, ECHO_PORT);
    let server = SocketAddr::from((fx.ext.ext_addr, ECHO_PORT));
    tcp_echo(&pod_a, server, "a").expect("pod a out");
    tcp_echo(&pod_b, server, "b").expect("pod b out");

    for (signal, (att, res, ip, veth, pod)) in [
        (libc::SIGKILL, (&att_a, &res_a, ip_a, &veth_a, &pod_a)),
        (libc::SIGTERM, (&att_b, &res_b, ip_b, &veth_b, &pod_b)),
    ] {
        agent.signal_and_wait(signal);
        rt.del_list(&list, att, Some(res))
            .unwrap_or_else(|o| panic!("DEL with the agent down ({signal}): {o}"));
        assert!(!fx.node.ns.has_link(veth), "host veth {veth} left");
        assert!(!pod.has_link("eth0"), "pod eth0 left");
        assert!(
            !fx.node.reservations(NET).contains_key(&ip.to_string()),
            "reservation of {ip} left: {:?}",
            fx.node.reservations(NET)
        );
        agent = AgentProc::start(&fx.node, &[]);
        let records = admin(&fx.node, "records");
        assert!(
            record_of(&records, NET, &att.container_id, "eth0").is_none(),
            "record left: {records:#}"
        );
        assert!(
            !recorded_masq_ips(&records).contains(&ip.to_string()),
            "{records:#}"
        );
        // The new agent's sweeper removes the bindings the DEL left.
        eventually("the NAT bindings of the deleted pod to go", SETTLE, || {
            !admin(&fx.node, "nat").as_array().unwrap().iter().any(|b| {
                b["pod"]
                    .as_str()
                    .is_some_and(|p| p.starts_with(&format!("{ip}:")))
            })
        });
        // The map itself, not just the records: the only masquerade
        // source left is that of a pod still attached.
        let status = admin(&fx.node, "status");
        let still = usize::from(signal == libc::SIGKILL);
        assert_eq!(status["masqSources"], still, "{status}");
        assert_eq!(status["records"], still, "{status}");
        if still == 1 {
            let e = tcp_echo(&pod_b, server, "b again").expect("the other pod still works");
            assert_eq!(e.seen_as.ip(), IpAddr::V4(fx.ext.node_addr));
        }
    }
    assert!(fx.node.reservations(NET).is_empty());
    drop(echo);
}

/// ADD while the agent is down (stopped: no socket; killed: stale socket)
/// fails with code 11 ("try again later") and undoes itself: the node is
/// exactly as before, with no runtime DEL needed. With the agent back, the
/// same ADD succeeds.
#[test]
fn add_while_agent_down_fails_cleanly() {
    require_e2e!();
    let fx = fixture("adddown");
    let mut agent = AgentProc::start(&fx.node, &[]);
    let warm = fx.node.pod("adwarm");
    let pod = fx.node.pod("adpod");
    let rt = fx.node.runtime(Impl::Ours);
    let conf = fx.conf();
    // A first pod creates the bridge, its address and forwarding.
    let warm_att = Attachment::new("adddown-warm", &warm, "eth0");
    let warm_res = rt.add(&conf, &warm_att);
    let att = Attachment::new("adddown-ctr", &pod, "eth0");

    for signal in [libc::SIGTERM, libc::SIGKILL] {
        agent.signal_and_wait(signal);
        drop(agent);
        let before = fx
            .node
            .snapshot(&[&warm, &pod])
            .without_files(&["last_reserved_ip."]);
        let out = rt.exec("ADD", &att, &conf).ran();
        let err = out.expect_error();
        assert_eq!(err.code, 11, "ADD with the agent down ({signal}): {out}");
        fx.node
            .snapshot(&[&warm, &pod])
            .without_files(&["last_reserved_ip."])
            .assert_unchanged_from(
                &before,
                &format!("failed ADD (agent down, signal {signal})"),
            );
        agent = AgentProc::start(&fx.node, &[]);
    }
    let status = admin(&fx.node, "status");
    assert_eq!(status["masqSources"], 1, "only the warm-up pod: {status}");
    assert_eq!(nat_occupancy(&status), (0, 0));

    let res = rt.add(&conf, &att);
    assert_eq!(admin(&fx.node, "status")["masqSources"], 2);
    rt.del(&conf, &att, Some(&res)).expect_success();
    rt.del(&conf, &warm_att, Some(&warm_res)).expect_success();
    assert_eq!(admin(&fx.node, "status")["masqSources"], 0);
    drop(agent);
}

/// `--conntrack-size` is honoured when the maps are created, and a later
/// agent asked for another size refuses the pinned maps with an error that
/// says what to do, instead of silently running with the old size. Without
/// the flag a restarted agent keeps the pinned size and says so.
#[test]
fn conntrack_size_is_checked_against_the_pins() {
    require_e2e!();
    let node = Node::new("ctsize");
    let _ext = External::direct(&node);
    let snat_orig = cni_agent::datapath::pins::PinLayout::new(node.bpffs.path())
        .map_path(cni_ebpf_common::map_names::SNAT_ORIG);
    let size = || {
        aya::maps::MapInfo::from_pin(&snat_orig)
            .expect("pinned SNAT_ORIG")
            .max_entries()
    };

    let mut agent = AgentProc::start(&node, &["--conntrack-size", "1024"]);
    assert_eq!(size(), 1024, "the asked size");
    agent.terminate();

    // Asked for another size: refused, with the way out in the message.
    let bin = cni_tests::agent::Agent::binary().expect("cni-agent built");
    let mut child = node
        .ns
        .command(&bin)
        .args(["run", "--socket"])
        .arg(node.agent_socket())
        .arg("--state-dir")
        .arg(node.state_dir())
        .arg("--bpffs-root")
        .arg(node.bpffs.path())
        .args(["--conntrack-size", "2048"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cni-agent");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("an agent asked for another conntrack size must refuse to start");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().expect("agent output");
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!status.success(), "refused: {text}");
    assert!(
        text.contains("1024") && text.contains("2048") && text.contains("--conntrack-size"),
        "the error names both sizes and the flag: {text}"
    );
    assert_eq!(size(), 1024, "the pinned map is untouched");

    // No size asked: the pinned one stays, and the log says so.
    let agent = AgentProc::start(&node, &[]);
    assert_eq!(size(), 1024);
    assert!(
        agent
            .log_text()
            .contains("keeps its pinned size of 1024 entries"),
        "{}",
        agent.log_text()
    );
}

/// The agent never fails quietly: when its background worker (uplink
/// scans, NAT expiry) dies, it exits non-zero for its supervisor to
/// restart it, saying why. (A debug build's panic point stands for a bug.)
#[test]
fn agent_exits_when_its_worker_dies() {
    require_e2e!();
    let node = Node::new("workerdies");
    let _ext = External::direct(&node);
    let mut agent =
        AgentProc::start_with_env(&node, &[], &[("CNI_EBPF_PANIC_AT", "datapath-worker")]);
    let status = agent.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "the agent must exit with an error");
    let log = agent.log_text();
    assert!(
        log.contains("datapath worker") && log.contains("supervisor"),
        "the log says why: {log}"
    );
}

/// Requests are bounded: a client that never sends its line does not hold
/// up others, and an oversized request gets an error instead of memory.
#[test]
fn agent_requests_are_bounded() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    require_e2e!();
    let node = Node::new("bounded");
    let _ext = External::direct(&node);
    let _agent = AgentProc::start(&node, &[]);
    let _silent = UnixStream::connect(node.agent_socket()).expect("connect");
    assert!(admin(&node, "status").is_object(), "others are served");

    let big = UnixStream::connect(node.agent_socket()).expect("connect");
    big.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let chunk = vec![b'x'; 1 << 20];
    let writer = {
        let mut w = big.try_clone().expect("clone");
        std::thread::spawn(move || {
            for _ in 0..8 {
                if w.write_all(&chunk).is_err() {
                    break;
                }
            }
        })
    };
    let mut reply = String::new();
    BufReader::new(&big)
        .read_line(&mut reply)
        .expect("a reply to the oversized request");
    assert!(reply.contains("larger than"), "{reply}");
    drop(big);
    let _ = writer.join();
}
