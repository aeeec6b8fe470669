//! ebpf-bandwidth end to end: a node namespace with our agent, a pod
//! attached by ebpf-bridge (+ ebpf-host-local) with ebpf-bandwidth chained
//! after it, and iperf3 between the pod and an iperf3 server in the node
//! namespace (on the bridge's gateway address). Pod -> node is the pod's
//! egress (`egressRate`, the from-pod hook), node -> pod (`iperf3 -R`) its
//! ingress (`ingressRate`, the to-pod hook).
//!
//! Rates are read on the receiving side from iperf3's JSON, over the steady
//! part of the run (`-O 1` leaves out the first second, where the bucket's
//! initial burst and TCP's slow start live). TCP runs two streams: a single
//! flow through a policer (no queue, hence no ACK clock) lives on loss
//! recovery pauses, and where a 5 s window cuts that sawtooth moves a
//! single flow's average by several percent; two flows fill each other's
//! pauses. UDP is offered at twice the limit, with 4 MB socket buffers so
//! that a receiver descheduled on this busy 2-CPU machine loses nothing
//! the limiter let through. The throughput tests take a process-wide lock:
//! run side by side they would share two CPUs.
use std::process::{Child, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aya::maps::HashMap as AyaHashMap;
use aya::programs::links::LinkOrder;
use aya::programs::tc::{qdisc_add_clsact, NlOptions, TcAttachOptions};
use aya::programs::{SchedClassifier, TcAttachType};
use cni_agent::datapath::pins::{load_pinned, MapSizes, PinLayout};
use cni_agent::datapath::uplink::program;
use cni_ebpf_common::{map_names, prog_names, TrafficCounters};
use cni_tests::agentctl::{admin, record_of, AgentProc};
use cni_tests::prelude::*;
use cni_tests::runtime::plugin_conf;
use cni_tests::traffic::in_netns;

const NET: &str = "bwnet";
const BRIDGE_NAME: &str = "cnibw0";
const POD_SUBNET: &str = "10.23.0.0/24";
const GATEWAY: &str = "10.23.0.1";
const IPERF_PORT: u16 = 5201;
/// Accuracy the issue asks for.
const TOLERANCE: f64 = 0.10;

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
/// Fields drop in order: the pod (its veth goes with it), the agent, then
/// the node.
struct Fixture {
    pod: NetNs,
    _agent: AgentProc,
    node: Node,
    /// The pods' MTU (bridge and veths).
    mtu: u32,
}

fn fixture(tag: &str, mtu: u32) -> Fixture {
    let node = Node::new(tag);
    let agent = AgentProc::start(&node, &[]);
    let pod = node.pod("bwpod");
    Fixture {
        pod,
        _agent: agent,
        node,
        mtu,
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
            "mtu": self.mtu,
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

    fn rt(&self) -> Runtime {
        self.node.runtime(Impl::Ours)
    }

    /// ADD of the whole list; panics with the failing plugin's output.
    #[track_caller]
    fn add(&self, list: &Value, att: &Attachment) -> Value {
        self.rt()
            .add_list(list, att)
            .unwrap_or_else(|out| panic!("ADD failed: {out}"))
    }

    /// ADD of the bridge alone (the list's first plugin): the pod and its
    /// veth without any limit yet.
    #[track_caller]
    fn add_bridge(&self, list: &Value, att: &Attachment) -> Value {
        self.rt()
            .exec("ADD", att, &plugin_conf(list, 0, None, att))
            .expect_success()
    }

    /// One verb of the bandwidth plugin alone (the list's second plugin).
    fn bandwidth(
        &self,
        verb: &str,
        list: &Value,
        att: &Attachment,
        prev: Option<&Value>,
    ) -> Outcome {
        self.rt()
            .exec(verb, att, &plugin_conf(list, 1, prev, att))
            .ran()
    }

    fn rate_limits(&self) -> Vec<Value> {
        admin(&self.node, "status")["rateLimits"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Pinned links of the host veth programs (the tcx attachments).
    fn rate_link_pins(&self) -> Vec<String> {
        let dir = self.node.bpffs.path().join("v1/links");
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("veth_"))
            .collect();
        v.sort();
        v
    }

    /// The qdiscs of the host veth, as `tc` names them.
    fn qdisc_kinds(&self, veth: &str) -> Vec<String> {
        let out = self
            .node
            .ns
            .run("tc", &["-j", "qdisc", "show", "dev", veth]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(json!([]));
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|q| q["kind"].as_str().map(str::to_string))
            .collect()
    }

    /// A one-off iperf3 server in the node namespace, listening when this
    /// returns; killed on drop if the client never came.
    fn iperf_server(&self) -> Proc {
        let server = self
            .node
            .ns
            .command("iperf3")
            .args(["-s", "-1", "-p", &IPERF_PORT.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start iperf3 server");
        let server = Proc(server);
        let ns = &self.node.ns;
        eventually("the iperf3 server to listen", SETTLE, || {
            let out = ns.run("ss", &["-ltnH", &format!("sport = :{IPERF_PORT}")]);
            !String::from_utf8_lossy(&out.stdout).trim().is_empty()
        });
        server
    }

    /// Runs iperf3 from the pod and returns the receiver's bits/s over the
    /// measured part (see the module documentation).
    fn iperf(&self, dir: Dir, proto: Proto, secs: u32) -> f64 {
        let (bps, _) = self.iperf_json(dir, proto, secs, &["-O", "1"]);
        bps
    }

    fn iperf_json(&self, dir: Dir, proto: Proto, secs: u32, extra: &[&str]) -> (f64, Value) {
        let port = IPERF_PORT.to_string();
        let t = secs.to_string();
        let mut args: Vec<String> = [
            "-c",
            GATEWAY,
            "-p",
            &port,
            "-t",
            &t,
            "-J",
            "--connect-timeout",
            "3000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        if dir == Dir::ToPod {
            args.push("-R".into());
        }
        match proto {
            Proto::Tcp => args.extend(["-P".into(), "2".into()]),
            Proto::Udp(bps) => {
                // One datagram per packet: IP, UDP and Ethernet headers fit.
                let len = self.mtu - 100;
                args.extend([
                    "-u".into(),
                    "-b".into(),
                    bps.to_string(),
                    "-l".into(),
                    len.to_string(),
                    "-w".into(),
                    "4M".into(),
                ]);
            }
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        // Each measurement owns a one-off server (`-1`): a server shared
        // between runs answers "busy" while it still winds the last one
        // down, and closes and reopens its socket after a UDP test.
        let server = self.iperf_server();
        let out = self.pod.run("iperf3", &argv);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("iperf3 {argv:?} printed no JSON ({e}): {text}"));
        drop(server);
        assert!(
            out.status.success() && v.get("error").is_none(),
            "iperf3 {argv:?} failed: {}",
            v.get("error").unwrap_or(&v)
        );
        let bps = v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or_else(|| panic!("no end.sum_received.bits_per_second in {v}"));
        (bps, v)
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

fn mbit(bps: f64) -> String {
    format!("{:.2} Mbit/s", bps / 1e6)
}

fn limits(rate: u64, burst: u64) -> Value {
    json!({"ingressRate": rate, "ingressBurst": burst, "egressRate": rate, "egressBurst": burst})
}

/// Both directions limited to `rate`: TCP and UDP goodput over 5 s each
/// within 10% of it, drops counted in `cni-agent status`, no qdisc or ifb
/// anywhere, CHECK and STATUS pass, DEL leaves no bucket or link.
fn rate_holds(tag: &str, rate: u64, mtu: u32) {
    require_e2e!();
    let _lock = traffic_lock();
    let fx = fixture(tag, mtu);
    // A burst far below the floor: the depth is the plugin's floor.
    let list = fx.list(limits(rate, 80_000));
    let att = fx.attachment(&format!("{tag}-ctr"));
    let result = fx.add(&list, &att);
    let veth = host_veth(&result);
    fx.rt()
        .check_list(&list, &att, &result)
        .unwrap_or_else(|o| panic!("CHECK after ADD: {o}"));
    fx.rt()
        .status_list(&list)
        .unwrap_or_else(|o| panic!("STATUS: {o}"));

    // No qdisc, no ifb: only the default qdisc on the veth.
    let kinds = fx.qdisc_kinds(&veth);
    assert!(
        kinds.iter().all(|k| k == "noqueue"),
        "the veth must keep its default qdisc, found {kinds:?}"
    );
    let links = fx.node.ns.ip_json(&["-d", "link", "show"]);
    assert!(
        !links
            .as_array()
            .into_iter()
            .flatten()
            .any(|l| l["linkinfo"]["info_kind"] == "ifb"),
        "no ifb device: {links}"
    );

    let mut failures = Vec::new();
    for (dir, proto, secs) in [
        (Dir::FromPod, Proto::Tcp, 5),
        (Dir::ToPod, Proto::Tcp, 5),
        (Dir::FromPod, Proto::Udp(2 * rate), 5),
        (Dir::ToPod, Proto::Udp(2 * rate), 5),
    ] {
        let measure = || {
            let t0 = Instant::now();
            let bps = fx.iperf(dir, proto, secs);
            (bps, bps / rate as f64 - 1.0, t0.elapsed())
        };
        let (mut bps, mut err, mut took) = measure();
        // A run that took far longer than asked (`-O 1` adds a second) was
        // starved of CPU: the client stalls, then sends its backlog in a
        // burst the bucket cannot hold, so the receiver sees less than the
        // limit passes. Such a run measures the machine, not the limit:
        // measured again, once.
        let nominal = Duration::from_secs(u64::from(secs) + 1);
        if err.abs() > TOLERANCE && took > nominal * 5 / 4 {
            eprintln!(
                "{dir:?} {proto:?}: {} in {took:.1?} for {nominal:?}: starved, measuring again",
                mbit(bps)
            );
            (bps, err, took) = measure();
        }
        let line = format!(
            "{} {dir:?} {proto:?}: {} ({:+.1}%) in {:.1?}",
            mbit(rate as f64),
            mbit(bps),
            err * 100.0,
            took
        );
        eprintln!("{line}");
        if err.abs() > TOLERANCE {
            failures.push(line);
        }
    }
    assert!(
        failures.is_empty(),
        "goodput off by more than {}%:\n{}",
        TOLERANCE * 100.0,
        failures.join("\n")
    );

    // The drops are visible to the operator, per bucket and in total.
    let status = admin(&fx.node, "status");
    assert!(
        status["stats"]["rateLimitDropped"].as_u64().unwrap_or(0) > 0,
        "stats.rateLimitDropped: {status:#}"
    );
    let buckets = status["rateLimits"].as_array().cloned().unwrap_or_default();
    assert_eq!(buckets.len(), 2, "one bucket per direction: {buckets:#?}");
    for b in &buckets {
        assert_eq!(b["ifname"], veth.as_str(), "{b}");
        assert_eq!(b["rateBps"], rate, "{b}");
        assert!(b["droppedPackets"].as_u64().unwrap_or(0) > 0, "{b}");
        assert!(b["passedBytes"].as_u64().unwrap_or(0) > 0, "{b}");
    }

    fx.rt()
        .del_list(&list, &att, Some(&result))
        .unwrap_or_else(|o| panic!("DEL: {o}"));
    assert!(fx.rate_limits().is_empty(), "buckets left after DEL");
    assert!(fx.rate_link_pins().is_empty(), "links left after DEL");
}

#[test]
fn rate_10mbit_holds_for_tcp_and_udp_both_ways() {
    rate_holds("bw10m", 10_000_000, 1500);
}

#[test]
fn rate_100mbit_holds_for_tcp_and_udp_both_ways() {
    rate_holds("bw100m", 100_000_000, 1500);
}

/// At 1 Gbit/s, iperf3's UDP sender must offer 2 Gbit/s; with a syscall
/// per 1400-byte datagram two shared CPUs cannot, so this pod network uses
/// jumbo frames (the limiter charges bytes, not packets).
#[test]
fn rate_1gbit_holds_for_tcp_and_udp_both_ways() {
    rate_holds("bw1g", 1_000_000_000, 9000);
}

/// A configured burst above the floor: that many bytes pass at line rate,
/// then the rate holds. UDP offered far above the rate, read by 100 ms
/// intervals on the receiving pod.
#[test]
fn burst_passes_at_line_rate_then_the_rate_holds() {
    require_e2e!();
    let _lock = traffic_lock();
    let fx = fixture("bwburst", 1500);
    let rate: u64 = 10_000_000;
    let burst: u64 = 16_000_000; // 2 MB, four times the 10 Mbit/s floor
    let list = fx.list(json!({"ingressRate": rate, "ingressBurst": burst}));
    let att = fx.attachment("bw-burst");
    let _result = fx.add(&list, &att);
    let (_, v) = fx.iperf_json(Dir::ToPod, Proto::Udp(400_000_000), 2, &["-i", "0.1"]);
    let intervals: Vec<f64> = v["intervals"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| i["sum"]["bytes"].as_f64().unwrap_or(0.0))
        .collect();
    let secs: Vec<f64> = v["intervals"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| i["sum"]["seconds"].as_f64().unwrap_or(0.0))
        .collect();
    eprintln!(
        "bytes per 100 ms: {:?}",
        intervals.iter().map(|b| *b as u64).collect::<Vec<_>>()
    );
    assert!(intervals.len() >= 15, "iperf3 intervals: {v}");
    let burst_bytes = burst as f64 / 8.0;
    let first = intervals[0];
    // The burst arrives in the first 100 ms (line rate is > 100x the rate)
    // and not much more: the rate's own 100 ms share on top.
    assert!(
        first >= 0.9 * burst_bytes && first <= 1.1 * (burst_bytes + rate as f64 / 8.0 * 0.1),
        "first 100 ms carried {first} bytes, the burst is {burst_bytes}"
    );
    // From 0.5 s on, the rate.
    let steady: f64 = intervals[5..].iter().sum();
    let steady_secs: f64 = secs[5..].iter().sum();
    let bps = steady * 8.0 / steady_secs;
    eprintln!("after the burst: {}", mbit(bps));
    assert!(
        (bps / rate as f64 - 1.0).abs() <= TOLERANCE,
        "after the burst the rate must hold: {} for {}",
        mbit(bps),
        mbit(rate as f64)
    );
}

/// Only `ingressRate` (through the `bandwidth` capability): the pod's
/// egress has no bucket and no program and stays at line rate, far above
/// the limit, while its ingress is limited.
#[test]
fn unlimited_direction_stays_at_line_rate() {
    require_e2e!();
    let _lock = traffic_lock();
    let fx = fixture("bwone", 1500);
    let rate: u64 = 50_000_000;
    let list = fx.list(json!({}));
    let mut att = fx.attachment("bw-one");
    att.capability_args.insert(
        "bandwidth".into(),
        json!({"ingressRate": rate, "ingressBurst": 1_000_000}),
    );
    let result = fx.add(&list, &att);
    let veth = host_veth(&result);
    let buckets = fx.rate_limits();
    assert_eq!(buckets.len(), 1, "{buckets:#?}");
    assert_eq!(buckets[0]["direction"], "to-pod");
    assert_eq!(buckets[0]["ifname"], veth.as_str());
    let pins = fx.rate_link_pins();
    assert!(
        pins.len() == 1 && pins[0].ends_with("-egress-veth_to_pod"),
        "only the to-pod program is attached: {pins:?}"
    );

    let up = fx.iperf(Dir::FromPod, Proto::Tcp, 3);
    let down = fx.iperf(Dir::ToPod, Proto::Udp(2 * rate), 2);
    eprintln!(
        "egress (unlimited) {}, ingress (limit {}) {}",
        mbit(up),
        mbit(rate as f64),
        mbit(down)
    );
    assert!(
        up > 10.0 * rate as f64,
        "the unlimited direction must run at line rate: {}",
        mbit(up)
    );
    assert!(
        (down / rate as f64 - 1.0).abs() <= TOLERANCE,
        "the limited direction: {}",
        mbit(down)
    );
}

/// DEL of ebpf-bandwidth alone lifts the limit (line rate again) and
/// leaves the bridge's attachment alone; DEL twice succeeds; a new ADD
/// with other limits applies them (CHECK then agrees with the new limits
/// and not the old); GC of a stale attachment removes its buckets.
#[test]
fn del_lifts_the_limit_and_a_new_add_changes_it() {
    require_e2e!();
    let _lock = traffic_lock();
    let fx = fixture("bwdel", 1500);
    let slow: u64 = 10_000_000;
    let list = fx.list(limits(slow, 80_000));
    let att = fx.attachment("bw-del");
    let result = fx.add(&list, &att);
    let veth = host_veth(&result);

    let limited = fx.iperf(Dir::ToPod, Proto::Tcp, 2);
    assert!(limited < 1.5 * slow as f64, "limited: {}", mbit(limited));

    fx.bandwidth("DEL", &list, &att, Some(&result))
        .expect_success();
    fx.bandwidth("DEL", &list, &att, Some(&result))
        .expect_success();
    assert!(fx.rate_limits().is_empty(), "no bucket after DEL");
    assert!(fx.rate_link_pins().is_empty(), "no link after DEL");
    let records = admin(&fx.node, "records");
    let entries = record_of(&records, NET, "bw-del", "eth0")
        .unwrap_or_else(|| panic!("the bridge's record must stay: {records:#}"));
    assert!(
        entries
            .as_array()
            .into_iter()
            .flatten()
            .all(|e| e["kind"] != "rate-limit" && e["owner"] != "bandwidth"),
        "no bandwidth entry left: {entries:#}"
    );
    let check = fx.bandwidth("CHECK", &list, &att, Some(&result));
    assert!(
        !check.success(),
        "CHECK must fail once the limit is gone: {check}"
    );

    let free = fx.iperf(Dir::ToPod, Proto::Tcp, 2);
    eprintln!("limited {} -> after DEL {}", mbit(limited), mbit(free));
    assert!(
        free > 20.0 * slow as f64,
        "line rate after DEL: {}",
        mbit(free)
    );

    // New limits on the same pod.
    let fast: u64 = 100_000_000;
    let list2 = fx.list(limits(fast, 80_000));
    fx.bandwidth("ADD", &list2, &att, Some(&result))
        .expect_success();
    fx.bandwidth("CHECK", &list2, &att, Some(&result))
        .expect_success();
    let stale = fx.bandwidth("CHECK", &list, &att, Some(&result));
    assert!(
        !stale.success(),
        "CHECK with the old limits must fail: {stale}"
    );
    let buckets = fx.rate_limits();
    assert_eq!(buckets.len(), 2, "{buckets:#?}");
    assert!(buckets.iter().all(|b| b["rateBps"] == fast), "{buckets:#?}");
    let new_rate = fx.iperf(Dir::ToPod, Proto::Udp(2 * fast), 2);
    eprintln!("new limit {}: {}", mbit(fast as f64), mbit(new_rate));
    assert!(
        (new_rate / fast as f64 - 1.0).abs() <= TOLERANCE,
        "the new limit: {}",
        mbit(new_rate)
    );

    // GC with no valid attachment: the record, its buckets and links go.
    fx.rt()
        .gc_list(&list2, &[], GcKey::ValidAttachments)
        .unwrap_or_else(|o| panic!("GC: {o}"));
    assert!(fx.rate_limits().is_empty(), "buckets left after GC");
    assert!(fx.rate_link_pins().is_empty(), "links left after GC");
    assert!(!fx.node.ns.has_link(&veth), "GC removed the veth too");
    fx.rt()
        .del_list(&list2, &att, Some(&result))
        .unwrap_or_else(|o| panic!("DEL after GC: {o}"));
}

/// Someone else's programs on the host veth before the ADD: a classic
/// clsact qdisc with a cls_bpf filter on its ingress and a tcx program on
/// its egress (a second, independent load of the suite's counting program,
/// with its own maps). The reference plugin cannot add its ingress qdisc
/// there ("file exists"); ours attaches through tcx, the limit holds, and
/// the foreign programs keep seeing every packet, before and after our DEL.
#[test]
fn coexists_with_foreign_tc_programs() {
    require_e2e!();
    let _lock = traffic_lock();
    let fx = fixture("bwtc", 1500);
    let rate: u64 = 20_000_000;
    let list = fx.list(limits(rate, 80_000));
    let att = fx.attachment("bw-tc");
    let prev = fx.add_bridge(&list, &att);
    let veth = host_veth(&prev);

    let foreign_root = fx.node.bpffs.path().join("foreign");
    let ifname = veth.clone();
    let (foreign, ifindex) = in_netns(&fx.node.ns, move || {
        let layout = PinLayout::new(&foreign_root);
        let mut ebpf = load_pinned(&layout, MapSizes::default()).expect("load a foreign copy");
        let prog: &mut SchedClassifier =
            program(&mut ebpf, prog_names::TC_COUNT).expect("tc_count");
        prog.load().expect("load tc_count");
        qdisc_add_clsact(&ifname).expect("add a clsact qdisc");
        prog.attach_with_options(
            &ifname,
            TcAttachType::Ingress,
            TcAttachOptions::Netlink(NlOptions::default()),
        )
        .expect("cls_bpf filter on clsact ingress");
        prog.attach_with_options(
            &ifname,
            TcAttachType::Egress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .expect("tcx program on egress");
        let ifindex = nix::net::if_::if_nametoindex(ifname.as_str()).expect("ifindex");
        (ebpf, ifindex)
    });
    let counters: AyaHashMap<_, u32, TrafficCounters> =
        AyaHashMap::try_from(foreign.map(map_names::IF_COUNTERS).expect("IF_COUNTERS"))
            .expect("map type");
    let foreign_packets = || counters.get(&ifindex, 0).map(|c| c.packets).unwrap_or(0);
    let kinds = fx.qdisc_kinds(&veth);
    assert!(kinds.iter().any(|k| k == "clsact"), "{kinds:?}");

    // The reference, on the same veth, with the same prevResult (egress
    // only: its ingress limit is a root tbf, which would stay behind).
    let ref_list = fx.list(json!({"egressRate": rate, "egressBurst": 80_000}));
    let mut reference = plugin_conf(&ref_list, 1, Some(&prev), &att);
    reference["type"] = json!("bandwidth");
    // The Debian reference speaks up to 1.0.0 (the same result shape).
    reference["cniVersion"] = json!("1.0.0");
    reference["prevResult"]["cniVersion"] = json!("1.0.0");
    let err = fx
        .rt()
        .exec_plugin("bandwidth", "ADD", &att, &reference)
        .expect_error();
    assert!(
        err.msg.contains("exists"),
        "the reference is expected to fail on a foreign clsact: {err:?}"
    );
    // Its DEL removes the ifb it created before failing.
    fx.rt()
        .exec_plugin("bandwidth", "DEL", &att, &reference)
        .expect_success();

    fx.bandwidth("ADD", &list, &att, Some(&prev))
        .expect_success();
    fx.bandwidth("CHECK", &list, &att, Some(&prev))
        .expect_success();
    let (_, progs) = in_netns(&fx.node.ns, || {
        SchedClassifier::query_tcx(veth.as_str(), TcAttachType::Egress).expect("query tcx")
    });
    let names: Vec<String> = progs
        .iter()
        .map(|p| p.name_as_str().unwrap_or_default().to_string())
        .collect();
    // Ours goes first: a foreign program that returns "pass" must not
    // get the packet past the limit.
    assert_eq!(
        names,
        ["veth_to_pod", "tc_count"],
        "tcx programs on the veth's egress"
    );

    for dir in [Dir::ToPod, Dir::FromPod] {
        let before = foreign_packets();
        let bps = fx.iperf(dir, Proto::Udp(2 * rate), 2);
        let seen = foreign_packets() - before;
        eprintln!(
            "{dir:?} next to foreign programs: {} for {}; they saw {seen} packets",
            mbit(bps),
            mbit(rate as f64)
        );
        assert!(
            (bps / rate as f64 - 1.0).abs() <= TOLERANCE,
            "{dir:?}: the limit holds next to the foreign programs: {}",
            mbit(bps)
        );
        assert!(
            seen > 1000,
            "{dir:?}: the foreign programs keep seeing traffic: {seen}"
        );
    }

    fx.bandwidth("DEL", &list, &att, Some(&prev))
        .expect_success();
    assert!(fx.rate_link_pins().is_empty(), "our links are gone");
    let kinds = fx.qdisc_kinds(&veth);
    assert!(
        kinds.iter().any(|k| k == "clsact"),
        "the foreign qdisc stays: {kinds:?}"
    );
    let before = foreign_packets();
    let ping = fx
        .pod
        .run("ping", &["-c", "3", "-i", "0.2", "-W", "1", GATEWAY]);
    assert!(ping.status.success(), "pod -> gateway after DEL");
    assert!(
        foreign_packets() >= before + 6,
        "the foreign programs still run after our DEL"
    );
    // The foreign programs go with their loader.
    drop(foreign);
}

/// Bad configs: a code-7 error naming the field, with the reference's
/// reason, and nothing changed on the node or in the pod.
#[test]
fn bad_configs_are_refused_and_change_nothing() {
    require_e2e!();
    let fx = fixture("bwbad", 1500);
    let list = fx.list(json!({}));
    let att = fx.attachment("bw-bad");
    let prev = fx.add_bridge(&list, &att);
    let before = fx.node.snapshot(&[&fx.pod]);
    for (bw, field, reason) in [
        (
            json!({"egressBurst": 1000}),
            "egressRate",
            "if burst is set, rate must also be set",
        ),
        (
            json!({"egressRate": 1000, "egressBurst": 34_359_738_360u64}),
            "egressBurst",
            "burst cannot be more than 4GB",
        ),
        (
            json!({"ingressRate": -5, "ingressBurst": 100}),
            "ingressRate",
            "",
        ),
        (
            json!({"ingressRate": "10M", "ingressBurst": 100}),
            "ingressRate",
            "",
        ),
        (
            json!({"runtimeConfig": {"bandwidth": {"egressBurst": 1000}}}),
            "runtimeConfig.bandwidth.egressRate",
            "if burst is set",
        ),
        (
            json!({"ingressRate": 1000, "ingressBurst": 1000, "shapedSubnets": ["10.0.0.0/8"]}),
            "shapedSubnets",
            "",
        ),
    ] {
        let bad = fx.list(bw.clone());
        let err = fx.bandwidth("ADD", &bad, &att, Some(&prev)).expect_error();
        assert_eq!(err.code, 7, "{bw}: {err:?}");
        assert!(
            err.msg.contains(field),
            "{bw}: {:?} should name {field}",
            err.msg
        );
        assert!(
            err.msg.contains(reason),
            "{bw}: {:?} should say {reason:?}",
            err.msg
        );
    }
    // A limit without prevResult: not called as a chained plugin.
    let good = fx.list(limits(1_000_000, 80_000));
    let err = fx.bandwidth("ADD", &good, &att, None).expect_error();
    assert_eq!(err.code, 7, "{err:?}");
    assert!(err.msg.contains("chained"), "{err:?}");
    fx.node
        .snapshot(&[&fx.pod])
        .assert_unchanged_from(&before, "refused bandwidth ADDs must change nothing");
    assert!(fx.rate_limits().is_empty());
}
