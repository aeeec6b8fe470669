//! containerd's CRI as the runtime, end to end, the way kubelet drives a
//! pod: a private containerd (Debian's 1.6 with its CRI plugin, go-cni
//! inside) in a node namespace runs the conflist bridge (ipMasq) +
//! portmap + firewall + bandwidth. Through our CRI client (crate
//! `cni-cri`) the test runs a pod sandbox with a hostPort and both
//! bandwidth annotations, starts a busybox httpd in it, and checks what a
//! user of the node sees: the pod IP the runtime reports, the hostPort
//! answering from the external side, the pod reaching the external host
//! masqueraded, each direction held to its rate; then StopPodSandbox and
//! RemovePodSandbox leave no veth, IP reservation, agent record, map entry
//! or pinned link, and doing both again succeeds.
//!
//! The same test runs against the reference plugins as a differential
//! witness (their state is iptables rules and qdiscs in the node netns;
//! the agent checks are left out, the veth, IPAM and rule checks stay).
//!
//! Rates: iperf3 from inside the pod's network namespace (the one
//! containerd created) to a server in the node namespace on the bridge's
//! gateway address, two TCP streams over 5 s with the first second left
//! out, as in bandwidth.rs; 10 % tolerance.
//!
//! To see exactly what go-cni hands the plugins (CNI_* environment, stdin
//! with runtimeConfig and prevResult, results), run with
//! `CNI_TESTS_CRI_TRACE=/tmp/trace.log` (see `cni_tests::cri::TRACE_ENV`).
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cni_cri::api::ContainerState;
use cni_cri::sandbox::pod_ips;
use cni_cri::{ContainerSpec, HostPort, PodSpec, SandboxInfo};
use cni_tests::agentctl::{admin, assert_firewall_removed, record_of};
use cni_tests::cri::{
    http_get, in_netns_path, tcp_echo_here, CriNode, WORKLOAD_IMAGE, WORKLOAD_PAYLOAD,
    WORKLOAD_PORT,
};
use cni_tests::prelude::*;
use cni_tests::traffic::{in_netns, TcpEchoServer};

/// The pod's limit in both directions, as the annotations say it.
const RATE_ANNOTATION: &str = "10M";
const RATE_BPS: u64 = 10_000_000;
const TOLERANCE: f64 = 0.10;
const IPERF_PORT: u16 = 5201;
/// The external echo server (masquerade check).
const ECHO_PORT: u16 = 7100;
/// How long the workload may take to answer on its hostPort.
const SERVE_TIMEOUT: Duration = Duration::from_secs(60);

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

#[test]
fn cri_pod_with_hostport_and_bandwidth_ours() {
    require_e2e!();
    pod_through_containerd("criours", Impl::Ours);
}

#[test]
fn cri_pod_with_hostport_and_bandwidth_reference() {
    require_e2e!();
    pod_through_containerd("criref", Impl::Reference);
}

fn pod_through_containerd(tag: &str, imp: Impl) {
    let t_start = Instant::now();
    let fx = CriNode::start(tag, imp);
    eprintln!(
        "[{imp:?}] containerd up and images imported in {:.1?}",
        t_start.elapsed()
    );
    let cri = fx.containerd.client();
    let version = cri.version().unwrap_or_else(|e| panic!("Version: {e}"));
    eprintln!(
        "[{imp:?}] runtime {} {} (CRI {})",
        version.runtime_name, version.runtime_version, version.runtime_api_version
    );
    let links_before = fx.links();
    let veths_before = fx.veths();
    let pins_before = fx.link_pins();
    let rules_before = fx.node.ns.firewall_rules();

    // --- RunPodSandbox + the workload container --------------------------
    let pod = PodSpec::new(
        &format!("web-{tag}"),
        "default",
        &format!("uid-{tag}"),
        fx.logs.path(),
    )
    .host_port(HostPort::tcp(WORKLOAD_PORT, fx.host_port))
    .bandwidth(RATE_ANNOTATION, RATE_ANNOTATION);
    let sandbox_config = pod.sandbox_config();
    let t = Instant::now();
    let id = cri
        .run_pod_sandbox(sandbox_config.clone())
        .unwrap_or_else(|e| {
            panic!(
                "RunPodSandbox: {e}\ncontainerd log:\n{}",
                fx.containerd.log_tail(40)
            )
        });
    eprintln!("[{imp:?}] RunPodSandbox {id} in {:.1?}", t.elapsed());
    let status = cri
        .pod_sandbox_status(&id)
        .unwrap_or_else(|e| panic!("PodSandboxStatus: {e}"));
    let info = SandboxInfo::from_status(&status).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "[{imp:?}] go-cni result kept by containerd: {}",
        info.cni_result.clone().unwrap_or(Value::Null)
    );
    let netns = info
        .netns()
        .unwrap_or_else(|| panic!("no network namespace in the sandbox info: {:#}", info.raw));

    // The pod IP: reported by the runtime, in the subnet, on the pod's
    // eth0, and reserved in the IPAM store for this sandbox.
    let ips = pod_ips(&status);
    assert_eq!(ips.len(), 1, "one pod IP (IPv4 only): {ips:?}");
    let pod_ip: Ipv4Addr = ips[0]
        .parse()
        .unwrap_or_else(|e| panic!("pod IP {:?}: {e}", ips[0]));
    let subnet: ipnet::Ipv4Net = fx.subnet.parse().expect("subnet");
    assert!(subnet.contains(&pod_ip), "{pod_ip} outside {subnet}");
    let eth0 = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["--", "ip", "-4", "-o", "addr", "show", "dev", "eth0"])
        .output()
        .expect("ip addr in the pod netns");
    let eth0 = String::from_utf8_lossy(&eth0.stdout);
    assert!(
        eth0.contains(&format!("inet {pod_ip}/")),
        "eth0 in the pod holds {pod_ip}: {eth0}"
    );
    let reservations = reservations_in(&fx.node.data_dir().join(&fx.net));
    assert_eq!(
        reservations.get(&pod_ip.to_string()),
        Some(&(id.clone(), "eth0".to_string())),
        "IPAM reservation of the pod: {reservations:?}"
    );

    let ctr = cri
        .create_container(
            &id,
            ContainerSpec::new("web", WORKLOAD_IMAGE).container_config(&pod),
            sandbox_config.clone(),
        )
        .unwrap_or_else(|e| panic!("CreateContainer: {e}"));
    cri.start_container(&ctr)
        .unwrap_or_else(|e| panic!("StartContainer: {e}"));
    let cs = cri
        .container_status(&ctr)
        .unwrap_or_else(|e| panic!("ContainerStatus: {e}"));
    assert_eq!(
        cs.state,
        ContainerState::ContainerRunning as i32,
        "workload state: {cs:?}"
    );

    // --- The hostPort from the external side ------------------------------
    let target = SocketAddr::from((fx.ext.node_addr, fx.host_port));
    let t = Instant::now();
    let body = loop {
        let last = match in_netns(&fx.ext.ns, || http_get(target, "/index.html")) {
            Ok(b) => break b,
            Err(e) => e,
        };
        if t.elapsed() > SERVE_TIMEOUT {
            panic!("external -> {target} (hostPort -> pod:{WORKLOAD_PORT}) never answered: {last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(body, WORKLOAD_PAYLOAD, "payload through the hostPort");
    eprintln!(
        "[{imp:?}] hostPort {target} answered after {:.1?}",
        t.elapsed()
    );

    // --- Masquerade: the pod reaches the external host as the node --------
    let _echo = TcpEchoServer::start(&fx.ext.ns, ECHO_PORT);
    let ext_echo = SocketAddr::from((fx.ext.ext_addr, ECHO_PORT));
    let (seen, local) = in_netns_path(&netns, || tcp_echo_here(ext_echo, "from the pod"))
        .unwrap_or_else(|e| panic!("pod -> external {ext_echo}: {e}"));
    assert_eq!(local.ip(), IpAddr::V4(pod_ip), "the pod's own socket");
    assert_eq!(
        seen.ip(),
        IpAddr::V4(fx.ext.node_addr),
        "the external side must see the node's uplink address"
    );

    // --- The datapath state of the pod ------------------------------------
    let host_veth = host_veth_of(&fx, &veths_before);
    let veth_index = fx.node.ns.ip_json(&["link", "show", "dev", &host_veth])[0]["ifindex"]
        .as_u64()
        .unwrap_or_else(|| panic!("no ifindex for {host_veth}"));
    match imp {
        Impl::Ours => {
            assert_eq!(
                fx.node.ns.firewall_rules(),
                Vec::<String>::new(),
                "no iptables/nft rule in the node netns"
            );
            let status = admin(&fx.node, "status");
            assert_eq!(status["hostPorts"], 1, "one hostPort entry: {status:#}");
            assert_eq!(status["masqSources"], 1, "{status:#}");
            assert_eq!(status["records"], 1, "{status:#}");
            let buckets = status["rateLimits"].as_array().cloned().unwrap_or_default();
            assert_eq!(buckets.len(), 2, "a bucket per direction: {buckets:#?}");
            for b in &buckets {
                assert_eq!(b["ifname"], host_veth.as_str(), "{b}");
                assert_eq!(b["rateBps"], RATE_BPS, "the annotation's rate: {b}");
            }
            let records = admin(&fx.node, "records");
            assert!(
                record_of(&records, &fx.net, &id, "eth0").is_some(),
                "a record for (network, sandbox ID, eth0): {records:#}"
            );
            let fw = admin(&fx.node, "firewall");
            assert_eq!(fw["entries"]["attachments"], 1, "{fw:#}");
            let veth_pins = pins_of(&fx, veth_index);
            assert!(
                !veth_pins.is_empty(),
                "the pod's veth programs are pinned links: {:?}",
                fx.link_pins()
            );
        }
        Impl::Reference => {
            let rules = fx.node.ns.firewall_rules();
            assert!(
                rules.iter().any(|r| r.contains(&id)),
                "the reference's rules name the sandbox: {rules:#?}"
            );
        }
    }

    // --- Rates, each direction -------------------------------------------
    {
        let _lock = TRAFFIC.lock().unwrap_or_else(|e| e.into_inner());
        let mut failures = Vec::new();
        for reverse in [false, true] {
            let what = if reverse {
                "ingress (node -> pod)"
            } else {
                "egress (pod -> node)"
            };
            let t = Instant::now();
            let server = iperf_server(&fx);
            let bps = iperf(&netns, fx.gateway, reverse);
            drop(server);
            let err = bps / RATE_BPS as f64 - 1.0;
            let line = format!(
                "[{imp:?}] {what}: {:.2} Mbit/s ({:+.1}% of {RATE_ANNOTATION}) in {:.1?}",
                bps / 1e6,
                err * 100.0,
                t.elapsed()
            );
            eprintln!("{line}");
            if err.abs() > TOLERANCE {
                failures.push(line);
            }
        }
        assert!(
            failures.is_empty(),
            "rate off by more than {}%:\n{}",
            TOLERANCE * 100.0,
            failures.join("\n")
        );
    }

    // --- Teardown as kubelet does it --------------------------------------
    let t = Instant::now();
    cri.stop_container(&ctr, 2)
        .unwrap_or_else(|e| panic!("StopContainer: {e}"));
    cri.stop_pod_sandbox(&id).unwrap_or_else(|e| {
        panic!(
            "StopPodSandbox: {e}\ncontainerd log:\n{}",
            fx.containerd.log_tail(40)
        )
    });
    eprintln!("[{imp:?}] StopPodSandbox in {:.1?}", t.elapsed());
    let leftovers = Leftovers {
        fx: &fx,
        id: &id,
        pod_ip,
        links_before: &links_before,
        pins_before: &pins_before,
        veth_index,
        rules_before: &rules_before,
    };
    leftovers.assert_none("after StopPodSandbox");
    let refused = in_netns(&fx.ext.ns, || {
        TcpStream::connect_timeout(&target, Duration::from_secs(2))
    });
    assert!(
        refused.is_err(),
        "the hostPort still answers after StopPodSandbox"
    );

    // A second StopPodSandbox (the netns is gone now: a DEL without one),
    // then RemovePodSandbox twice: all succeed and nothing comes back.
    cri.stop_pod_sandbox(&id).unwrap_or_else(|e| {
        panic!(
            "second StopPodSandbox: {e}\ncontainerd log:\n{}",
            fx.containerd.log_tail(40)
        )
    });
    cri.remove_pod_sandbox(&id)
        .unwrap_or_else(|e| panic!("RemovePodSandbox: {e}"));
    cri.remove_pod_sandbox(&id)
        .unwrap_or_else(|e| panic!("second RemovePodSandbox: {e}"));
    leftovers.assert_none("after the second StopPodSandbox and RemovePodSandbox");
    let sandboxes = cri
        .list_pod_sandbox()
        .unwrap_or_else(|e| panic!("ListPodSandbox: {e}"));
    assert!(sandboxes.is_empty(), "sandboxes left: {sandboxes:?}");
    assert!(
        !netns.exists() || !is_mount_point(&netns),
        "the pod netns bind mount {} is gone",
        netns.display()
    );
    eprintln!("[{imp:?}] whole test in {:.1?}", t_start.elapsed());
}

/// What the pod may leave behind, checked after teardown.
struct Leftovers<'a> {
    fx: &'a CriNode,
    id: &'a str,
    pod_ip: Ipv4Addr,
    /// The node's links before the pod (the bridge it creates may stay).
    links_before: &'a [(String, String)],
    pins_before: &'a [String],
    /// The ifindex the pod's host veth had.
    veth_index: u64,
    rules_before: &'a [String],
}

impl Leftovers<'_> {
    #[track_caller]
    fn assert_none(&self, when: &str) {
        let fx = self.fx;
        let added: Vec<(String, String)> = fx
            .links()
            .into_iter()
            .filter(|l| !self.links_before.contains(l))
            .filter(|(name, kind)| !(name == &fx.bridge && kind == "bridge"))
            .collect();
        assert_eq!(
            added,
            Vec::<(String, String)>::new(),
            "links (veth, ifb, ...) left in the node {when}"
        );
        let reservations = reservations_in(&fx.node.data_dir().join(&fx.net));
        assert!(
            reservations.is_empty(),
            "IP reservations {when}: {reservations:?}"
        );
        match fx.imp {
            Impl::Ours => {
                let status = admin(&fx.node, "status");
                assert_eq!(
                    status["hostPorts"], 0,
                    "hostPort entries {when}: {status:#}"
                );
                assert_eq!(
                    status["masqSources"], 0,
                    "masquerade entries {when}: {status:#}"
                );
                assert_eq!(status["records"], 0, "records {when}: {status:#}");
                assert_eq!(
                    status["rateLimits"].as_array().map(Vec::len).unwrap_or(0),
                    0,
                    "rate buckets {when}: {status:#}"
                );
                let records = admin(&fx.node, "records");
                assert!(
                    record_of(&records, &fx.net, self.id, "eth0").is_none(),
                    "record {when}: {records:#}"
                );
                assert_eq!(
                    fx.state_files(),
                    Vec::<std::path::PathBuf>::new(),
                    "state dir {when}"
                );
                assert_firewall_removed(&fx.node, when);
                assert_eq!(
                    pins_of(fx, self.veth_index),
                    Vec::<String>::new(),
                    "pinned links of the pod's veth {when}"
                );
                let pins = fx.link_pins();
                assert!(
                    self.pins_before.iter().all(|p| pins.contains(p)),
                    "the node's own links stay {when}: {pins:?} (before the pod: {:?})",
                    self.pins_before
                );
            }
            Impl::Reference => {
                let ip = self.pod_ip.to_string();
                let rules: Vec<String> = fx
                    .node
                    .ns
                    .firewall_rules()
                    .into_iter()
                    .filter(|r| r.contains(self.id) || r.contains(&ip))
                    .collect();
                assert!(
                    rules.is_empty(),
                    "rules naming the pod {when}: {rules:#?} (before the pod: {:#?})",
                    self.rules_before
                );
            }
        }
    }
}

/// The host-side veth the pod added.
fn host_veth_of(fx: &CriNode, before: &[String]) -> String {
    let added: Vec<String> = fx
        .veths()
        .into_iter()
        .filter(|v| !before.contains(v))
        .collect();
    assert_eq!(added.len(), 1, "one new veth in the node: {added:?}");
    added[0].clone()
}

/// The pinned links of the device with ifindex `index` (pins are named
/// `<ifindex>-<direction>-<program>`).
fn pins_of(fx: &CriNode, index: u64) -> Vec<String> {
    let prefix = format!("{index}-");
    fx.link_pins()
        .into_iter()
        .filter(|p| p.starts_with(&prefix))
        .collect()
}

fn is_mount_point(p: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&*p.to_string_lossy()))
}

/// A one-off iperf3 server (`-1`) in the node namespace (the pods' gateway
/// is there), one per measurement: a server shared between runs can answer
/// "busy" while it still winds the last one down.
fn iperf_server(fx: &CriNode) -> Proc {
    let child = fx
        .node
        .ns
        .command("iperf3")
        .args(["-s", "-1", "-p", &IPERF_PORT.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start iperf3 server");
    let server = Proc(child);
    let ns = &fx.node.ns;
    eventually("the iperf3 server to listen", SETTLE, || {
        let out = ns.run("ss", &["-ltnH", &format!("sport = :{IPERF_PORT}")]);
        !String::from_utf8_lossy(&out.stdout).trim().is_empty()
    });
    server
}

/// iperf3 from the pod's netns to `server`: receiver's bits/s over 5 s,
/// first second left out, two TCP streams; `reverse` measures the pod's
/// ingress.
fn iperf(netns: &Path, server: Ipv4Addr, reverse: bool) -> f64 {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display()))
        .args(["--", "iperf3", "-c", &server.to_string()])
        .args(["-p", &IPERF_PORT.to_string()])
        .args([
            "-t",
            "5",
            "-O",
            "1",
            "-P",
            "2",
            "-J",
            "--connect-timeout",
            "3000",
        ]);
    if reverse {
        cmd.arg("-R");
    }
    let out = cmd.stdin(Stdio::null()).output().expect("run iperf3");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("iperf3 printed no JSON ({e}): {text}"));
    assert!(
        out.status.success() && v.get("error").is_none(),
        "iperf3 failed: {}",
        v.get("error").unwrap_or(&v)
    );
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no end.sum_received.bits_per_second in {v}"))
}
