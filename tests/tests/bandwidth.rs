//! ebpf-bandwidth end to end: a node namespace with our agent, a pod
//! attached by ebpf-bridge (+ ebpf-host-local) with ebpf-bandwidth chained
//! after it, and iperf3 between the pod and an iperf3 server in the node
//! namespace (on the bridge's gateway address). Pod -> node is the pod's
//! egress (`egressRate`, the from-pod hook), node -> pod (`iperf3 -R`) its
//! ingress (`ingressRate`, the to-pod hook).
//!
//! Rates are read on the receiving side from iperf3's JSON, over the steady
//! part of the run (`-O 1` leaves out the first second, where the bucket's
//! initial burst and TCP's slow start live). The throughput tests take a
//! process-wide lock: run side by side they would share two CPUs.
use std::process::{Child, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cni_tests::agentctl::{admin, record_of, AgentProc};
use cni_tests::prelude::*;
use cni_tests::runtime::plugin_conf;

const NET: &str = "bwnet";
const BRIDGE_NAME: &str = "cnibw0";
const POD_SUBNET: &str = "10.23.0.0/24";
const GATEWAY: &str = "10.23.0.1";
const IPERF_PORT: u16 = 5201;

/// One throughput measurement at a time in this binary.
static TRAFFIC: Mutex<()> = Mutex::new(());

fn traffic_lock() -> std::sync::MutexGuard<'static, ()> {
    TRAFFIC.lock().unwrap_or_else(|e| e.into_inner())
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Node with a running agent and an iperf3 server, and one pod namespace.
/// Fields drop in order: the pod (its veth goes with it), the server, the
/// agent, then the node.
struct Fixture {
    pod: NetNs,
    _iperf: Proc,
    _agent: AgentProc,
    node: Node,
}

fn fixture(tag: &str) -> Fixture {
    let node = Node::new(tag);
    let agent = AgentProc::start(&node, &[]);
    let server = node
        .ns
        .command("iperf3")
        .args(["-s", "-p", &IPERF_PORT.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start iperf3 server");
    let server = Proc(server);
    let ns = &node.ns;
    eventually("the iperf3 server to listen", SETTLE, || {
        let out = ns.run("ss", &["-ltnH", &format!("sport = :{IPERF_PORT}")]);
        !String::from_utf8_lossy(&out.stdout).trim().is_empty()
    });
    let pod = node.pod("bwpod");
    Fixture {
        pod,
        _iperf: server,
        _agent: agent,
        node,
    }
}

impl Fixture {
    /// ebpf-bridge + ebpf-bandwidth (capability `bandwidth`), with `bw`'s
    /// keys merged into the bandwidth plugin's config.
    fn list(&self, bw: Value) -> Value {
        let mut bridge = json!({
            "type": "ebpf-bridge",
            "bridge": BRIDGE_NAME,
            "isGateway": true,
            "ipam": {
                "type": "ebpf-host-local",
                "ranges": [[{"subnet": POD_SUBNET}]],
                "dataDir": self.node.data_dir(),
            }
        });
        merge(&mut bridge, &self.node.path_keys());
        let mut bandwidth = json!({
            "type": "ebpf-bandwidth",
            "capabilities": {"bandwidth": true},
        });
        merge(&mut bandwidth, &self.node.path_keys());
        merge(&mut bandwidth, &bw);
        json!({"cniVersion": "1.1.0", "name": NET, "plugins": [bridge, bandwidth]})
    }

    fn attachment(&self, id: &str) -> Attachment {
        Attachment::new(id, &self.pod, "eth0")
    }

    fn rt(&self) -> Runtime<'_> {
        self.node.runtime(Impl::Ours)
    }

    /// ADD of the whole list; panics with the failing plugin's output.
    #[track_caller]
    fn add(&self, list: &Value, att: &Attachment) -> Value {
        self.rt()
            .add_list(list, att)
            .unwrap_or_else(|out| panic!("ADD failed: {out}"))
    }

    /// One verb of the bandwidth plugin alone (the list's second plugin).
    fn bandwidth_verb(&self, verb: &str, list: &Value, att: &Attachment, prev: Option<&Value>) -> Outcome {
        self.rt().exec(verb, att, &plugin_conf(list, 1, prev, att))
    }
}

/// The host-side veth of an ADD result: the interface without a sandbox
/// that is not the bridge.
fn host_veth(result: &Value) -> String {
    result["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["sandbox"].as_str().is_none_or(str::is_empty) && i["name"] != BRIDGE_NAME)
        .and_then(|i| i["name"].as_str())
        .unwrap_or_else(|| panic!("no host veth in {result}"))
        .to_string()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    /// Pod -> node: the pod's egress.
    FromPod,
    /// Node -> pod (`-R`): the pod's ingress.
    ToPod,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Tcp,
    /// UDP offered at this many bits/s.
    Udp(u64),
}

/// Runs iperf3 from the pod for `secs` (plus one omitted second) and
/// returns the receiver's bits/s over the measured part.
fn iperf(pod: &NetNs, dir: Dir, proto: Proto, secs: u32) -> f64 {
    let port = IPERF_PORT.to_string();
    let t = secs.to_string();
    let mut args = vec![
        "-c", GATEWAY, "-p", &port, "-t", &t, "-O", "1", "-J", "--connect-timeout", "3000",
    ];
    if dir == Dir::ToPod {
        args.push("-R");
    }
    let streams = std::env::var("BW_P").unwrap_or("1".into());
    if proto == Proto::Tcp {
        args.extend(["-P", Box::leak(streams.into_boxed_str())]);
    }
    let rate;
    let len = std::env::var("BW_UDPLEN").unwrap_or("1400".into());
    if let Proto::Udp(bps) = proto {
        rate = bps.to_string();
        args.extend(["-u", "-b", &rate, "-l", &len, "-w", "4M"]);
    }
    let out = pod.run("iperf3", &args);
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("iperf3 {args:?} printed no JSON ({e}): {text}"));
    assert!(
        out.status.success() && v.get("error").is_none(),
        "iperf3 {args:?} failed: {}",
        v.get("error").unwrap_or(&v)
    );
    if std::env::var("BW_NSTAT").is_ok() { eprintln!("sent {}", v["end"]["sum_sent"]); }
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no end.sum_received.bits_per_second in {v}"))
}

fn mbit(bps: f64) -> String {
    format!("{:.2} Mbit/s", bps / 1e6)
}

#[test]
#[ignore = "measurement helper: prints numbers"]
fn experiment() {
    require_e2e!();
    let _lock = traffic_lock();
    let fx = fixture("bwexp");
    let rate: u64 = std::env::var("BW_RATE").ok().and_then(|s| s.parse().ok()).unwrap_or(100_000_000);
    let burst: u64 = std::env::var("BW_BURST").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let mut list = if std::env::var("BW_NONE").is_ok() {
        fx.list(json!({}))
    } else {
        fx.list(json!({"ingressRate": rate, "ingressBurst": burst, "egressRate": rate, "egressBurst": burst}))
    };
    if let Ok(mtu) = std::env::var("BW_MTU") {
        list["plugins"][0]["mtu"] = json!(mtu.parse::<u32>().unwrap());
    }
    let udp_len = std::env::var("BW_UDPLEN").ok();
    let att = fx.attachment("bw-exp");
    let result = fx.add(&list, &att);
    eprintln!("veth {}", host_veth(&result));
    let _ = fx.pod.run("ping", &["-c", "1", "-W", "1", GATEWAY]);
    for (dir, proto, secs) in [
        (Dir::ToPod, Proto::Tcp, 5),
        (Dir::FromPod, Proto::Tcp, 5),
        (Dir::FromPod, Proto::Udp(rate * 3), 3),
        (Dir::ToPod, Proto::Udp(rate * 3), 3),
    ] {
        if std::env::var("BW_TCP_ONLY").is_ok() && proto != Proto::Tcp {
            continue;
        }
        let t0 = Instant::now();
        let _ = fx.pod.run("nstat", &["-n"]);
        let _ = fx.node.ns.run("nstat", &["-n"]);
        let before = admin(&fx.node, "status")["rateLimits"].clone();
        let tb = Instant::now();
        let bps = iperf(&fx.pod, dir, proto, secs);
        let el = tb.elapsed().as_secs_f64();
        let after = admin(&fx.node, "status")["rateLimits"].clone();
        if let (Some(b), Some(a)) = (before.as_array(), after.as_array()) {
            for (x, y) in b.iter().zip(a) {
                let pb = y["passedBytes"].as_f64().unwrap() - x["passedBytes"].as_f64().unwrap();
                let db = y["droppedBytes"].as_f64().unwrap() - x["droppedBytes"].as_f64().unwrap();
                let full = y["passedPackets"].as_f64().unwrap() - x["passedPackets"].as_f64().unwrap();
                eprintln!("  bucket {}: passed {} dropped {} over {el:.2}s, full-time {:.0} ms", y["direction"], mbit(pb * 8.0 / el), mbit(db * 8.0 / el), full / 1e6);
            }
        }
        if std::env::var("BW_NSTAT").is_ok() {
            let sender = if dir == Dir::FromPod { &fx.pod } else { &fx.node.ns };
            let receiver = if dir == Dir::ToPod { &fx.pod } else { &fx.node.ns };
            let o = receiver.run("nstat", &[]);
            eprintln!("RECEIVER {}", String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.contains("Udp")).collect::<Vec<_>>().join("\n"));
            let o = sender.run("nstat", &[]);
            eprintln!("{}", String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.contains("Timeout") || l.contains("Retrans") || l.contains("LossProbe") || l.contains("SACKRecovery") || l.contains("OutSegs")).collect::<Vec<_>>().join("\n"));
        }
        eprintln!(
            "{dir:?} {proto:?}: {} ({:+.1}%) in {:?}",
            mbit(bps),
            (bps / rate as f64 - 1.0) * 100.0,
            t0.elapsed()
        );
    }
    if std::env::var("BW_INTERVALS").is_ok() {
        let out = fx.pod.run("iperf3", &["-c", GATEWAY, "-p", "5201", "-t", "4", "-i", "0.1", "-J", "-R"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let line: Vec<String> = v["intervals"].as_array().unwrap().iter().map(|i| format!("{:.0}", i["sum"]["bits_per_second"].as_f64().unwrap() / 1e6)).collect();
        eprintln!("intervals (Mbit/s per 100ms): {}", line.join(" "));
    }
    eprintln!("{:#}", admin(&fx.node, "status")["rateLimits"]);
    let _ = Duration::ZERO;
    let _ = record_of;
}
