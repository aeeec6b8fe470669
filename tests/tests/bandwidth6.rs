//! ebpf-bandwidth on IPv6 traffic: a node namespace with our agent, a
//! dual-stack pod (10.24.0.0/24 and fd00:24::/64) attached by ebpf-bridge
//! with ebpf-bandwidth chained after it, and iperf3 over IPv6 between the
//! pod and the bridge's IPv6 gateway address in the node namespace.
//!
//! Each measurement starts its own one-off iperf3 server (`-s -1`) on a
//! port of its own and polls until it listens, so no run ever meets a
//! server still busy with another. Rates are read on the receiving side
//! over the steady part of the run (`-O 1`), with two TCP streams, as in
//! `bandwidth.rs` (whose module documentation says why).
use std::process::{Child, Stdio};
use std::sync::Mutex;

use cni_tests::agentctl::{admin, AgentProc};
use cni_tests::prelude::*;
use cni_tests::uplink::{no_dad, wait_settled};

const NET: &str = "bw6net";
const BRIDGE_NAME: &str = "cnibw6";
const GATEWAY6: &str = "fd00:24::1";
const RATE: u64 = 10_000_000;
/// A policer only caps: above the limit is a failure at 10 %; below it,
/// a machine whose other CPU is busy may slow the sender, so 20 %.
const OVER: f64 = 0.10;
const UNDER: f64 = 0.20;

/// One throughput measurement at a time in this binary.
static TRAFFIC: Mutex<()> = Mutex::new(());

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a one-off iperf3 server (it serves one test, then exits) in the
/// node on `port` and waits until it listens on IPv6.
fn one_off_server(node: &Node, port: u16) -> Proc {
    let child = node
        .ns
        .command("iperf3")
        .args(["-s", "-1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start iperf3 server");
    let server = Proc(child);
    eventually("the iperf3 server to listen", SETTLE, || {
        let out = node.ns.run("ss", &["-ltnH6", &format!("sport = :{port}")]);
        !String::from_utf8_lossy(&out.stdout).trim().is_empty()
    });
    server
}

/// Receiver-side bits/s of a 5 s two-stream TCP run over IPv6 from the pod
/// to the gateway (`reverse`: from the gateway to the pod), first second
/// left out.
fn iperf6(node: &Node, pod: &NetNs, port: u16, reverse: bool) -> f64 {
    let _server = one_off_server(node, port);
    let port = port.to_string();
    let mut args = vec![
        "-6",
        "-c",
        GATEWAY6,
        "-p",
        &port,
        "-t",
        "5",
        "-O",
        "1",
        "-P",
        "2",
        "-J",
        "--connect-timeout",
        "3000",
    ];
    if reverse {
        args.push("-R");
    }
    let out = pod.run("iperf3", &args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("iperf3 {args:?} printed no JSON ({e}): {text}"));
    assert!(
        out.status.success() && v.get("error").is_none(),
        "iperf3 {args:?} failed: {}",
        v.get("error").unwrap_or(&v)
    );
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no end.sum_received.bits_per_second in {v}"))
}

/// A 10 Mbit/s `ingressRate` and `egressRate` hold for IPv6 TCP both ways
/// (pod → node is its egress, node → pod its ingress), and the limiter's
/// counters show it dropped what was over.
#[test]
fn rate_10mbit_holds_for_v6_tcp_both_ways() {
    require_e2e!();
    let _lock = TRAFFIC.lock().unwrap_or_else(|e| e.into_inner());
    let node = Node::new("bw6");
    no_dad(&node.ns);
    let _agent = AgentProc::start(&node, &[]);
    let pod = node.pod("bw6pod");
    no_dad(&pod);
    let mut bridge = json!({
        "type": "ebpf-bridge",
        "bridge": BRIDGE_NAME,
        "isGateway": true,
        "ipam": {
            "type": "ebpf-host-local",
            "ranges": [[{"subnet": "10.24.0.0/24"}], [{"subnet": "fd00:24::/64"}]],
            "dataDir": node.data_dir(),
        }
    });
    merge(&mut bridge, &node.path_keys());
    let mut bandwidth = json!({
        "type": "ebpf-bandwidth",
        "ingressRate": RATE,
        "egressRate": RATE,
    });
    merge(&mut bandwidth, &node.path_keys());
    let list = json!({"cniVersion": "1.1.0", "name": NET, "plugins": [bridge, bandwidth]});
    let att = Attachment::new("bw6-ctr", &pod, "eth0");
    let rt = node.runtime(Impl::Ours);
    let result = rt
        .add_list(&list, &att)
        .unwrap_or_else(|o| panic!("ADD: {o}"));
    wait_settled(&pod);
    wait_settled(&node.ns);

    for (port, reverse, what) in [(5311, false, "egress"), (5312, true, "ingress")] {
        let bps = iperf6(&node, &pod, port, reverse);
        eprintln!("IPv6 TCP {what}: {:.2} Mbit/s", bps / 1e6);
        let ratio = bps / RATE as f64;
        assert!(
            (1.0 - UNDER..=1.0 + OVER).contains(&ratio),
            "IPv6 TCP {what}: {:.2} Mbit/s against a limit of 10 Mbit/s",
            bps / 1e6
        );
    }
    let limits = admin(&node, "status")["rateLimits"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(limits.len(), 2, "one bucket per direction: {limits:?}");
    for b in &limits {
        assert!(b["droppedPackets"].as_u64().unwrap_or(0) > 0, "{b}");
    }
    rt.del_list(&list, &att, Some(&result))
        .unwrap_or_else(|o| panic!("DEL: {o}"));
}
