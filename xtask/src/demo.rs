//! `cargo xtask demo`: the plugins wiring two pods on a "node", run the way
//! a container runtime runs them, in namespaces the demo creates and removes.
//!
//! Topology: a "node" netns (the bridge, the agent, an uplink), an
//! "external" netns on the far side of the uplink (198.18.0.0/15, the
//! benchmarking range, with no route back to the pods), and two "pod" netns.
//!
//! The demo is a list of steps; each one checks what it shows, and the demo
//! exits 0 only if every step held. New features (hostPort, firewall, ...)
//! are new steps.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cni_cri::api::{ContainerState, PodSandboxState};
use cni_cri::sandbox::pod_ips;
use cni_cri::{ContainerSpec, HostPort, PodSpec, SandboxInfo};
use serde_json::Value;

use crate::agent::Agent;
use crate::cni::{self, Attachment, Conflist, Runtime};
use crate::cri::{Cri, Plugins, HTTPD_IMAGE, HTTPD_PORT, PAUSE_IMAGE, PAYLOAD};
use crate::netns::{self, NetNs, ShowIp, TempDir};
use crate::proc;

const BRIDGE: &str = "cni-demo0";
const POD_SUBNET: &str = "10.244.1.0/24";
/// Our chain, and the reference plugins' (Debian's containernetworking-plugins):
/// bridge, IPAM, portmap, firewall, bandwidth.
const OURS: [&str; 5] = [
    "ebpf-bridge",
    "ebpf-host-local",
    "ebpf-portmap",
    "ebpf-firewall",
    "ebpf-bandwidth",
];
const REFERENCE: [&str; 5] = ["bridge", "host-local", "portmap", "firewall", "bandwidth"];
/// pod1's hostPort, and pod2's egress limit.
const HOST_PORT: u16 = 30080;
const POD_PORT: u16 = 8080;
const EGRESS_RATE: u64 = 20_000_000;
const REFERENCE_DIR: &str = "/usr/lib/cni";
/// The node's uplink and the external host, on 198.18.0.0/15.
const UPLINK: &str = "up0";
const NODE_UPLINK_ADDR: &str = "198.18.0.1/24";
const EXTERNAL_ADDR: &str = "198.18.0.2/24";
const EXTERNAL_IP: &str = "198.18.0.2";
const NODE_UPLINK_IP: &str = "198.18.0.1";
/// The hostPort of the pod containerd starts, and its bandwidth
/// annotations (both directions).
const CRI_HOST_PORT: u16 = 30081;
const CRI_BANDWIDTH: &str = "10M";
const CRI_RATE_BPS: u64 = 10_000_000;
/// How long the workload may take to answer on its hostPort.
const CRI_SERVE_TIMEOUT: Duration = Duration::from_secs(60);
/// Title prefix of the steps that go through containerd's CRI.
const CRI_STEP: &str = "CRI: ";

struct Pod {
    label: &'static str,
    ns: NetNs,
    att: Attachment,
    result: Option<Value>,
}

/// The pod containerd runs, as kubelet knows it.
struct CriPod {
    id: String,
    spec: PodSpec,
    container: Option<String>,
}

/// Field order is drop order: containerd first (its sandboxes are stopped
/// and removed through the CRI while the agent still serves their DELs,
/// then it is stopped and whatever it left is killed, unmounted and
/// removed), the pods' namespaces, then the agent (so its bpffs can go),
/// the external and node namespaces, then the files.
struct Demo {
    bin_dir: PathBuf,
    /// Plugin types: bridge, IPAM, portmap, firewall, bandwidth.
    plugins: [&'static str; 5],
    /// Servers the demo runs in the pods and the external netns; killed
    /// before their namespaces go.
    servers: Vec<std::process::Child>,
    cri: Option<Cri>,
    cri_pod: Option<CriPod>,
    pods: Vec<Pod>,
    agent: Option<Agent>,
    runtime: Option<Runtime>,
    external: Option<NetNs>,
    node: Option<NetNs>,
    conflist: Option<Conflist>,
    tmp: TempDir,
}

impl Drop for Demo {
    fn drop(&mut self) {
        for mut s in self.servers.drain(..) {
            let _ = s.kill();
            let _ = s.wait();
        }
        let mut names: Vec<&str> = self.pods.iter().map(|p| p.ns.name()).collect();
        names.extend(self.external.iter().chain(&self.node).map(|n| n.name()));
        proc::heading("Cleanup");
        if let Some(c) = &self.cri {
            println!(
                "    stopping containerd{}: its sandboxes removed through the CRI, then its processes, mounts and {}",
                c.containerd()
                    .ok()
                    .and_then(|c| c.pid())
                    .map(|p| format!(" (pid {p})"))
                    .unwrap_or_default(),
                c.dir().display()
            );
        }
        if let Some(a) = &self.agent {
            println!(
                "    stopping cni-agent (pid {}), unmounting its bpffs",
                a.pid()
            );
        }
        println!("    deleting netns {}", names.join(" "));
        println!("    removing {}", self.tmp.path().display());
    }
}

type StepFn = fn(&mut Demo) -> Result<()>;

const STEPS: &[(&str, StepFn)] = &[
    ("Create the node, external and pod netns", Demo::namespaces),
    (
        "Give the node an uplink to the external netns",
        Demo::uplink,
    ),
    ("Start the node agent in the node netns", Demo::start_agent),
    ("Write the conflist", Demo::write_conflist),
    ("ADD pod1 and pod2, like a runtime", Demo::add_pods),
    ("Show the plumbing", Demo::show_plumbing),
    (
        "No iptables or nftables rules in the node netns",
        Demo::no_rules,
    ),
    (
        "CHECK both pods against their cached results",
        Demo::check_pods,
    ),
    ("pod1 -> pod2 ping across the bridge", Demo::ping_pod_to_pod),
    ("pods -> gateway ping", Demo::ping_gateway),
    (
        "pods -> external host ping, masqueraded (ipMasq)",
        Demo::ping_external,
    ),
    (
        "external host -> node:30080 -> pod1 (hostPort); pod1 sees the client",
        Demo::host_port,
    ),
    (
        "pod2 -> node:30080 -> pod1 (hairpin, masqueraded to the bridge)",
        Demo::hairpin,
    ),
    (
        "pod2's egress is limited to 20 Mbit/s (bandwidth)",
        Demo::bandwidth,
    ),
    (
        "iptables FORWARD policy DROP: pods still reach out and are reached (firewall)",
        Demo::forward_drop,
    ),
    (
        "DEL both pods, then DEL again (must be idempotent)",
        Demo::del_pods,
    ),
    (
        "Nothing is left: no veths, IP reservations or records",
        Demo::nothing_left,
    ),
    (
        "CRI: a private containerd in the node netns runs the same conflist",
        Demo::cri_start,
    ),
    (
        "CRI: RunPodSandbox as kubelet sends it (hostPort 30081, bandwidth annotations), then a workload container",
        Demo::cri_run_pod,
    ),
    (
        "CRI: external host -> node:30081 -> the workload (hostPort)",
        Demo::cri_host_port,
    ),
    (
        "CRI: StopPodSandbox + RemovePodSandbox leave no veth, IP reservation or record",
        Demo::cri_remove_pod,
    ),
    (
        "CRI: stop containerd; none of its processes, mounts or files is left",
        Demo::cri_stop,
    ),
];

/// `reference`: the same steps with the reference plugins, for comparison.
pub fn run(reference: bool) -> Result<()> {
    crate::require_root("demo")?;
    crate::setup::run(false, &[])?;
    let bin_dir = crate::build_bins(false)?;
    let (plugins, dir) = if reference {
        (REFERENCE, PathBuf::from(REFERENCE_DIR))
    } else {
        (OURS, bin_dir.clone())
    };
    for p in plugins {
        ensure!(
            dir.join(p).is_file(),
            "{} is missing",
            dir.join(p).display()
        );
    }
    println!("\nDemo of {}", plugins.join(" + "));
    let mut d = Demo {
        bin_dir,
        plugins,
        servers: Vec::new(),
        cri: None,
        cri_pod: None,
        pods: Vec::new(),
        agent: None,
        runtime: None,
        external: None,
        node: None,
        conflist: None,
        tmp: TempDir::create("cni-xtask-demo")?,
    };
    for (i, (title, step)) in STEPS.iter().enumerate() {
        if title.starts_with(CRI_STEP) && !STEPS[i - 1].0.starts_with(CRI_STEP) {
            proc::heading(
                "Part 2: a pod started through containerd's CRI, as kubelet starts it \
                 (same node, conflist and plugins)",
            );
        }
        proc::heading(&format!("Step {}/{}: {title}", i + 1, STEPS.len()));
        if let Err(e) = step(&mut d) {
            if let Some(a) = &d.agent {
                println!(
                    "    agent log ({}), last lines:\n{}",
                    a.log.display(),
                    a.log_tail(20)
                );
            }
            if let Some(c) = &d.cri {
                println!("    containerd log, last lines:\n{}", c.log_tail(30));
            }
            return Err(e.context(format!("step {} ({title}) did not hold", i + 1)));
        }
        println!("    ok");
    }
    drop(d);
    println!("\nDemo: all {} steps held.", STEPS.len());
    Ok(())
}

impl Demo {
    fn node(&self) -> Result<&NetNs> {
        self.node.as_ref().context("no node netns")
    }

    fn rt(&self) -> Result<(&Runtime, &Conflist)> {
        Ok((
            self.runtime.as_ref().context("no runtime")?,
            self.conflist.as_ref().context("no conflist")?,
        ))
    }

    fn version(&self) -> &'static str {
        if self.plugins == REFERENCE {
            "1.0.0"
        } else {
            "1.1.0"
        }
    }

    fn ipam_dir(&self) -> PathBuf {
        self.tmp.path().join("ipam")
    }

    fn namespaces(&mut self) -> Result<()> {
        let node = NetNs::create("cnidemo-node")?.lo_up()?;
        println!("    node: {}", node.name());
        self.runtime = Some(cni::runtime(
            node.path(),
            vec![self.bin_dir.clone(), PathBuf::from(REFERENCE_DIR)],
        )?);
        self.node = Some(node);
        let ext = NetNs::create("cnidemo-ext")?.lo_up()?;
        println!("    external: {}", ext.name());
        self.external = Some(ext);
        for label in ["pod1", "pod2"] {
            let ns = NetNs::create(&format!("cnidemo-{label}"))?.lo_up()?;
            println!("    {label}: {}", ns.name());
            let id = netns::unique(&format!("xtask-demo-{label}"));
            let mut att = Attachment::pod(&id, ns.path(), label);
            // What a kubelet passes as capability arguments.
            if label == "pod1" {
                att.capability_args.insert(
                    "portMappings".into(),
                    serde_json::json!([{"hostPort": HOST_PORT, "containerPort": POD_PORT, "protocol": "tcp"}]),
                );
            } else {
                att.capability_args.insert(
                    "bandwidth".into(),
                    serde_json::json!({"egressRate": EGRESS_RATE, "egressBurst": EGRESS_RATE}),
                );
            }
            self.pods.push(Pod {
                label,
                ns,
                att,
                result: None,
            });
        }
        Ok(())
    }

    fn external(&self) -> Result<&NetNs> {
        self.external.as_ref().context("no external netns")
    }

    fn is_reference(&self) -> bool {
        self.plugins == REFERENCE
    }

    /// A veth from the node to the external netns, and the node's default
    /// route through it. The external side gets no route to the pod subnet:
    /// pods reach it only through masquerade.
    fn uplink(&mut self) -> Result<()> {
        let node = self.node()?;
        let ext = self.external()?;
        netns::add_uplink(node, ext, UPLINK, NODE_UPLINK_ADDR, EXTERNAL_ADDR)?;
        node.show_ip(&["-br", "addr", "show", "dev", UPLINK])?;
        node.show_ip(&["route"])?;
        ext.show_ip(&["-br", "addr", "show", "dev", "eth0"])?;
        ext.show_ip(&["route"])?;
        Ok(())
    }

    fn start_agent(&mut self) -> Result<()> {
        if self.is_reference() {
            println!("    (the reference plugins have no agent: skipped)");
            return Ok(());
        }
        let dir = self.tmp.path().join("agent");
        let agent = Agent::start(&self.bin_dir, self.node()?, &dir, &[UPLINK])?;
        println!(
            "    cni-agent run (pid {}), log {}",
            agent.pid(),
            agent.log.display()
        );
        agent.wait_for_uplink(NODE_UPLINK_IP)?;
        agent.show("status")?;
        self.agent = Some(agent);
        Ok(())
    }

    /// The demo's conflist as text (to keep the familiar key order on
    /// screen) at spec `version`. Our plugins get the agent's private
    /// paths, so the demo never touches the node-wide defaults.
    fn conflist_text(&self, version: &str) -> String {
        let q = |v: &dyn std::fmt::Display| Value::String(v.to_string()).to_string();
        let mut paths = String::new();
        if let Some(a) = &self.agent {
            for (k, v) in a.conf_keys() {
                paths.push_str(&format!("      {}: {v},\n", q(&k)));
            }
        }
        format!(
            r#"{{
  "cniVersion": {version},
  "name": "demo",
  "plugins": [
    {{
      "type": {bridge_type},
      "bridge": {bridge},
      "isGateway": true,
      "isDefaultGateway": true,
      "ipMasq": true,
{paths}      "ipam": {{
        "type": {ipam_type},
        "ranges": [[{{ "subnet": {subnet} }}]],
        "dataDir": {data}
      }}
    }},
    {{
      "type": {portmap_type},
{paths}      "capabilities": {{ "portMappings": true }},
      "snat": true
    }},
    {{
{paths}      "type": {firewall_type}
    }},
    {{
{paths}      "type": {bandwidth_type},
      "capabilities": {{ "bandwidth": true }}
    }}
  ]
}}
"#,
            version = q(&version),
            bridge_type = q(&self.plugins[0]),
            bridge = q(&BRIDGE),
            ipam_type = q(&self.plugins[1]),
            portmap_type = q(&self.plugins[2]),
            firewall_type = q(&self.plugins[3]),
            bandwidth_type = q(&self.plugins[4]),
            subnet = q(&POD_SUBNET),
            data = q(&self.ipam_dir().display()),
        )
    }

    fn write_conflist(&mut self) -> Result<()> {
        // The reference plugins (v1.1.1) stop at spec 1.0.0.
        let text = self.conflist_text(self.version());
        let raw: Value = serde_json::from_str(&text).context("demo conflist")?;
        let path = self.tmp.path().join("10-demo.conflist");
        std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
        println!("    {}:", path.display());
        for line in text.lines() {
            println!("    {line}");
        }
        self.conflist = Some(Conflist::new(raw)?);
        Ok(())
    }

    fn add_pods(&mut self) -> Result<()> {
        let (rt, list) = self.rt()?;
        let mut results = Vec::new();
        for pod in &self.pods {
            println!(
                "    ADD {} (CNI_CONTAINERID={} CNI_NETNS={} CNI_IFNAME={})",
                pod.label, pod.att.container_id, pod.att.netns, pod.att.ifname
            );
            let res = rt.add_list(&list.raw, &pod.att)?;
            for line in serde_json::to_string_pretty(&res)?.lines() {
                println!("      {line}");
            }
            ensure!(
                !cni::result_ips(&res).is_empty(),
                "{}: result has no IP",
                pod.label
            );
            results.push(res);
        }
        for (pod, res) in self.pods.iter_mut().zip(results) {
            pod.result = Some(res);
        }
        let ips: Vec<String> = self
            .pods
            .iter()
            .flat_map(|p| cni::result_ips(p.result.as_ref().unwrap_or(&Value::Null)))
            .collect();
        let mut uniq = ips.clone();
        uniq.sort();
        uniq.dedup();
        ensure!(uniq.len() == ips.len(), "pods got overlapping IPs: {ips:?}");
        Ok(())
    }

    fn show_plumbing(&mut self) -> Result<()> {
        let node = self.node()?;
        node.show_ip(&["-br", "link", "show", "master", BRIDGE])?;
        node.show_ip(&["-br", "addr", "show", "dev", BRIDGE])?;
        for pod in &self.pods {
            pod.ns
                .show_ip(&["-br", "addr", "show", "dev", &pod.att.ifname])?;
            let routes = pod.ns.show_ip(&["route"])?;
            ensure!(
                routes.starts_with("default") || routes.contains("\ndefault"),
                "{}: no default route (isDefaultGateway)",
                pod.label
            );
        }
        Ok(())
    }

    /// The product's promise: ipMasq and friends are eBPF, so the node
    /// netns has no netfilter rules. The reference bridge's ipMasq does add
    /// some: shown, not asserted, in --reference mode.
    fn no_rules(&mut self) -> Result<()> {
        let node = self.node()?;
        let ipt = proc::show(&mut node.exec("iptables-save"))?;
        let nft = proc::show(node.exec("nft").args(["list", "ruleset"]))?;
        let rules = ipt
            .lines()
            .any(|l| !l.trim().is_empty() && !l.starts_with('#'))
            || !nft.trim().is_empty();
        if self.plugins == REFERENCE {
            println!("    (the reference bridge implements ipMasq with the rules above)");
        } else {
            ensure!(!rules, "netfilter rules found in the node netns");
        }
        Ok(())
    }

    fn check_pods(&mut self) -> Result<()> {
        let (rt, list) = self.rt()?;
        for pod in &self.pods {
            let cached = pod.result.as_ref().context("no cached result")?;
            match rt.check_list(&list.raw, &pod.att, cached) {
                Ok(()) => println!("    CHECK {}: ok", pod.label),
                // The reference portmap (v1.1.1) fails its own CHECK on a
                // node without IPv6 chains: shown, not fatal, for it.
                Err(e) if self.is_reference() => {
                    println!("    CHECK {} (reference): {e:#}", pod.label)
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn ping(from: &Pod, to: &str) -> Result<()> {
        let mut c = from.ns.exec("ping");
        c.args(["-c", "3", "-i", "0.2", "-W", "1", to]);
        let out =
            proc::show(&mut c).with_context(|| format!("{} cannot reach {to}", from.label))?;
        ensure!(
            out.contains(" 0% packet loss"),
            "{} -> {to}: packets lost",
            from.label
        );
        Ok(())
    }

    fn ping_pod_to_pod(&mut self) -> Result<()> {
        let [p1, p2] = &self.pods[..] else {
            bail!("expected two pods")
        };
        let dst = cni::result_ips(p2.result.as_ref().context("pod2 has no result")?);
        let dst = dst.first().context("pod2 has no IP")?;
        Self::ping(p1, dst)
    }

    fn ping_gateway(&mut self) -> Result<()> {
        for pod in &self.pods {
            let gws = cni::result_gateways(pod.result.as_ref().context("no result")?);
            let gw = gws.first().context("result has no gateway (isGateway)")?;
            Self::ping(pod, gw)?;
        }
        Ok(())
    }

    fn ping_external(&mut self) -> Result<()> {
        println!("    the external netns has no route to {POD_SUBNET}: replies come back only if the source was translated");
        for pod in &self.pods {
            Self::ping(pod, EXTERNAL_IP)?;
        }
        match &self.agent {
            Some(a) => {
                let nat = a.show("nat")?;
                ensure!(
                    nat.contains(NODE_UPLINK_IP),
                    "no NAT binding to the uplink address"
                );
            }
            None => {
                let nat = proc::show(self.node()?.exec("conntrack").args(["-L", "-p", "icmp"]));
                if nat.is_err() {
                    println!("    (conntrack not installed: bindings not shown)");
                }
            }
        }
        Ok(())
    }

    /// A TCP server in `pod` that answers each connection with the peer
    /// address it sees.
    fn serve_peer_address(&mut self, pod: usize) -> Result<()> {
        let child = self.pods[pod]
            .ns
            .exec("socat")
            .args([
                &format!("TCP-LISTEN:{POD_PORT},fork,reuseaddr"),
                "SYSTEM:echo $SOCAT_PEERADDR",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("starting socat in {}", self.pods[pod].label))?;
        self.servers.push(child);
        // Ready when the port answers (from inside the pod).
        for _ in 0..50 {
            let probe = self.pods[pod]
                .ns
                .exec("socat")
                .args(["-T1", "/dev/null", &format!("TCP:127.0.0.1:{POD_PORT}")])
                .status();
            if probe.is_ok_and(|s| s.success()) {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        bail!("the server in {} did not start", self.pods[pod].label)
    }

    /// What a client in `ns` gets back from `addr:port` (the peer address
    /// the server saw).
    fn ask(ns: &NetNs, addr: &str, port: u16) -> Result<String> {
        let mut c = ns.exec("socat");
        c.args(["-T3", "-", &format!("TCP:{addr}:{port}")])
            .stdin(std::process::Stdio::null());
        Ok(proc::stdout_of(&mut c)?.trim().to_string())
    }

    fn host_port(&mut self) -> Result<()> {
        self.serve_peer_address(0)?;
        let seen = Self::ask(self.external()?, NODE_UPLINK_IP, HOST_PORT)?;
        println!("    external {EXTERNAL_IP} -> {NODE_UPLINK_IP}:{HOST_PORT}: pod1 saw the client as {seen}");
        ensure!(
            seen == EXTERNAL_IP,
            "pod1 should see the real client {EXTERNAL_IP}, saw {seen:?}"
        );
        if let Some(a) = &self.agent {
            let st = a.status_json()?;
            println!(
                "    agent: hostPorts {}, DNATs {}",
                st["hostPorts"], st["stats"]["hostPortDnat"]
            );
        }
        Ok(())
    }

    fn hairpin(&mut self) -> Result<()> {
        let seen = Self::ask(&self.pods[1].ns, NODE_UPLINK_IP, HOST_PORT);
        match (&seen, self.is_reference()) {
            (Ok(seen), false) => {
                println!("    pod2 -> {NODE_UPLINK_IP}:{HOST_PORT}: pod1 saw {seen} (the bridge address)");
                ensure!(
                    seen.starts_with("10.244.1.1"),
                    "hairpin should be masqueraded to the bridge address, saw {seen:?}"
                );
            }
            (Ok(seen), true) => {
                println!("    pod2 -> {NODE_UPLINK_IP}:{HOST_PORT}: pod1 saw {seen}")
            }
            (Err(e), true) => println!("    the reference's hairpin did not connect here: {e:#}"),
            (Err(e), false) => bail!("hairpin failed: {e:#}"),
        }
        Ok(())
    }

    fn bandwidth(&mut self) -> Result<()> {
        let server = self
            .external()?
            .exec("iperf3")
            .args(["-s", "-1", "-B", EXTERNAL_IP])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting iperf3 -s")?;
        self.servers.push(server);
        // Until the server listens, iperf3 reports "connection refused" in
        // its JSON (with exit status 0 in this version).
        let mut report = None;
        for _ in 0..50 {
            let mut c = self.pods[1].ns.exec("iperf3");
            c.args(["-c", EXTERNAL_IP, "-t", "3", "-O", "1", "-J"]);
            let v: Option<Value> = proc::output(&mut c)
                .ok()
                .and_then(|o| serde_json::from_slice(&o.stdout).ok());
            if let Some(v) = v.filter(|v| v.get("error").is_none()) {
                report = Some(v);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let v = report.context("iperf3 from pod2 did not run")?;
        let bps = v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .with_context(|| {
                format!(
                    "iperf3 reported no rate: {}",
                    v.get("error").unwrap_or(&v["end"])
                )
            })?;
        let ratio = bps / EGRESS_RATE as f64;
        println!(
            "    pod2 -> external TCP: {:.1} Mbit/s for a {} Mbit/s limit ({:+.1}%)",
            bps / 1e6,
            EGRESS_RATE / 1_000_000,
            (ratio - 1.0) * 100.0
        );
        ensure!((0.8..=1.2).contains(&ratio), "the limit is not in force");
        Ok(())
    }

    fn forward_drop(&mut self) -> Result<()> {
        let node = self.node()?;
        proc::run_checked(node.exec("iptables").args(["-P", "FORWARD", "DROP"]))?;
        println!("    iptables -P FORWARD DROP in the node netns");
        for pod in &self.pods {
            Self::ping(pod, EXTERNAL_IP)?;
        }
        if self.is_reference() {
            // The reference firewall accepts only replies towards the pod:
            // a new DNATed connection meets the DROP policy.
            match Self::ask(self.external()?, NODE_UPLINK_IP, HOST_PORT) {
                Ok(seen) => println!("    external -> hostPort -> pod1: pod1 saw {seen}"),
                Err(e) => println!("    external -> hostPort -> pod1 under the reference: {e:#}"),
            }
        } else {
            let seen = Self::ask(self.external()?, NODE_UPLINK_IP, HOST_PORT)?;
            println!("    external -> hostPort -> pod1 still works: pod1 saw {seen}");
            ensure!(
                seen == EXTERNAL_IP,
                "hostPort under FORWARD DROP: saw {seen:?}"
            );
            let ipt = proc::stdout_of(&mut node.exec("iptables-save"))?;
            let rules = ipt.lines().filter(|l| l.starts_with('-')).count();
            println!("    iptables rules in the node netns: {rules} (only the policy was changed)");
            ensure!(rules == 0, "our firewall must not add iptables rules");
        }
        Ok(())
    }

    fn del_pods(&mut self) -> Result<()> {
        for mut s in self.servers.drain(..) {
            let _ = s.kill();
            let _ = s.wait();
        }
        let (rt, list) = self.rt()?;
        for pod in &self.pods {
            rt.del_list(&list.raw, &pod.att, pod.result.as_ref())?;
            println!("    DEL {}: ok", pod.label);
        }
        for pod in &self.pods {
            rt.del_list(&list.raw, &pod.att, pod.result.as_ref())?;
            println!("    DEL {} again: ok", pod.label);
        }
        Ok(())
    }

    fn nothing_left(&mut self) -> Result<()> {
        let node = self.node()?;
        let veths = node.show_ip(&["-o", "link", "show", "type", "veth"])?;
        let pod_veths = veths
            .lines()
            .filter(|l| !l.contains(&format!(": {UPLINK}@")))
            .count();
        ensure!(pod_veths == 0, "pod veths left in the node netns");
        for pod in &self.pods {
            let links = pod.ns.show_ip(&["-o", "link", "show"])?;
            ensure!(
                !links.contains(&format!(": {}", pod.att.ifname)),
                "{}: {} is still there",
                pod.label,
                pod.att.ifname
            );
        }
        let store = self.ipam_dir().join("demo");
        let left = cni::ipam_reservations(&store)?;
        println!(
            "    IPAM store {}: {} reservation(s) {:?}",
            store.display(),
            left.len(),
            left
        );
        ensure!(left.is_empty(), "IP reservations left behind");
        // Our plugins' per-attachment records (<stateDir>/attachments/<net>/).
        let Some(agent) = &self.agent else {
            return Ok(());
        };
        let records_dir = agent.state_dir.join("attachments").join("demo");
        let records: Vec<String> = match std::fs::read_dir(&records_dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        };
        println!(
            "    attachment records {}: {} {:?}",
            records_dir.display(),
            records.len(),
            records
        );
        ensure!(records.is_empty(), "attachment records left behind");
        agent.show("status")?;
        Ok(())
    }

    fn cri(&self) -> Result<&Cri> {
        self.cri.as_ref().context("containerd is not running")
    }

    fn cri_pod(&self) -> Result<&CriPod> {
        self.cri_pod.as_ref().context("no pod sandbox")
    }

    /// Veths in the node netns other than the uplink.
    fn pod_veths(&self) -> Result<Vec<String>> {
        let out = self
            .node()?
            .try_ip(&["-o", "link", "show", "type", "veth"])?;
        Ok(out
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n != UPLINK)
            .collect())
    }

    /// Our per-attachment records of the demo network.
    fn records(&self) -> Vec<String> {
        let Some(agent) = &self.agent else {
            return Vec::new();
        };
        let dir = agent.state_dir.join("attachments").join("demo");
        let mut v: Vec<String> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// A private containerd (Debian's 1.6 with its CRI plugin) in the node
    /// netns, with the demo's conflist and every plugin in one bin dir.
    fn cri_start(&mut self) -> Result<()> {
        let node = self.node()?;
        if self.is_reference() {
            proc::run_checked(node.exec("iptables").args(["-P", "FORWARD", "ACCEPT"]))?;
            println!(
                "    iptables -P FORWARD ACCEPT again: under DROP the reference refuses a new hostPort connection (step 15)"
            );
        } else {
            println!("    the node netns keeps iptables FORWARD policy DROP from step 15");
        }
        // containerd 1.6's go-cni (libcni 1.1) speaks CNI up to 1.0.0.
        let text = self.conflist_text("1.0.0");
        let plugins = if self.is_reference() {
            Plugins::Reference
        } else {
            Plugins::Ours(&self.bin_dir)
        };
        let cri = Cri::start(node.path(), &text, plugins, PAUSE_IMAGE)?;
        let c = cri.containerd()?;
        println!(
            "    $ nsenter --net={} -- containerd --config {}   (pid {})",
            node.path().display(),
            c.config().config_file().display(),
            c.pid().map(|p| p.to_string()).unwrap_or_default()
        );
        println!(
            "    every path it writes is under {}; it serves the CRI on {}",
            cri.dir().display(),
            c.socket().display()
        );
        println!(
            "    conf_dir: {} (the conflist above{})",
            cri.conf_file.display(),
            if self.is_reference() {
                ""
            } else {
                " at cniVersion 1.0.0, the newest containerd 1.6's go-cni speaks"
            }
        );
        println!("    bin_dir: {}", cri.bin_dir.display());
        if !self.is_reference() {
            let mut links: Vec<(String, String)> = std::fs::read_dir(&cri.bin_dir)?
                .flatten()
                .map(|e| {
                    let target = std::fs::read_link(e.path())
                        .map(|t| t.display().to_string())
                        .unwrap_or_default();
                    (e.file_name().to_string_lossy().into_owned(), target)
                })
                .collect();
            links.sort();
            for (name, target) in links {
                println!("      {name} -> {target}");
            }
        } else {
            println!("      (the reference plugins' directory, with its own loopback)");
        }
        let cl = cri.client()?;
        let v = cl.version()?;
        println!(
            "    CRI Version: {} {} (CRI {})",
            v.runtime_name, v.runtime_version, v.runtime_api_version
        );
        let mut tags: Vec<String> = cl
            .list_images()?
            .into_iter()
            .flat_map(|i| i.repo_tags)
            .collect();
        tags.sort();
        println!(
            "    images (built here from /bin/busybox, nothing pulled): {}",
            tags.join(", ")
        );
        ensure!(
            tags.iter().any(|t| t == PAUSE_IMAGE) && tags.iter().any(|t| t == HTTPD_IMAGE),
            "the pause and workload images were not imported"
        );
        self.cri = Some(cri);
        Ok(())
    }

    fn cri_run_pod(&mut self) -> Result<()> {
        let cri = self.cri.as_ref().context("containerd is not running")?;
        let cl = cri.client()?;
        let spec = PodSpec::new(
            "web",
            "default",
            &crate::netns::unique("xtask-demo-uid"),
            &cri.log_dir,
        )
        .host_port(HostPort::tcp(HTTPD_PORT, CRI_HOST_PORT))
        .bandwidth(CRI_BANDWIDTH, CRI_BANDWIDTH);
        let config = spec.sandbox_config();
        println!(
            "    RunPodSandbox: pod default/web, port {HTTPD_PORT}/TCP with hostPort {CRI_HOST_PORT}, annotations"
        );
        let mut ann: Vec<_> = config.annotations.iter().collect();
        ann.sort();
        for (k, v) in ann {
            println!("      {k}: {v}");
        }
        let t = Instant::now();
        let id = cl.run_pod_sandbox(config.clone()).with_context(|| {
            format!(
                "RunPodSandbox of default/web; containerd log:\n{}",
                cri.log_tail(30)
            )
        })?;
        println!(
            "    sandbox {id} ready in {} ms (netns, CNI ADD of loopback and the conflist, pause container)",
            t.elapsed().as_millis()
        );
        self.cri_pod = Some(CriPod {
            id: id.clone(),
            spec,
            container: None,
        });
        let status = cl.pod_sandbox_status(&id)?;
        let state = status.status.as_ref().map(|s| s.state);
        ensure!(
            state == Some(PodSandboxState::SandboxReady as i32),
            "sandbox state {state:?}, not SANDBOX_READY"
        );
        let ips = pod_ips(&status);
        println!(
            "    PodSandboxStatus: SANDBOX_READY, pod IP {} (what kubelet reports as status.podIP)",
            ips.join(", ")
        );
        let subnet: std::net::Ipv4Addr =
            POD_SUBNET.split('/').next().unwrap_or_default().parse()?;
        let ip: std::net::Ipv4Addr = ips
            .first()
            .context("containerd reports no pod IP")?
            .parse()
            .context("the pod IP")?;
        ensure!(
            ips.len() == 1 && ip.octets()[..3] == subnet.octets()[..3],
            "pod IPs {ips:?} are not one address of {POD_SUBNET}"
        );
        let info = SandboxInfo::from_status(&status)?;
        let netns = info
            .netns()
            .context("no network namespace in the sandbox info")?;
        println!(
            "    the pod's netns, made by containerd: {}",
            netns.display()
        );
        let addr = proc::show(
            proc::cmd("nsenter")
                .arg(format!("--net={}", netns.display()))
                .args(["--", "ip", "-br", "addr", "show", "dev", "eth0"]),
        )?;
        ensure!(
            addr.contains(&format!("{ip}/")),
            "eth0 in the pod does not hold {ip}"
        );
        let held = cni::ipam_reservations(&self.ipam_dir().join("demo"))?;
        println!("    IPAM reservations: {held:?}");
        ensure!(
            held == vec![ip.to_string()],
            "the IPAM store should hold exactly {ip}"
        );
        let veths = self.pod_veths()?;
        println!("    host-side veth in the node: {veths:?}");
        ensure!(veths.len() == 1, "one pod veth expected in the node");
        match &self.agent {
            Some(a) => {
                let st = a.status_json()?;
                let buckets = st["rateLimits"].as_array().cloned().unwrap_or_default();
                for b in &buckets {
                    println!(
                        "    agent: rate limit on {} {}: {} bit/s",
                        b["ifname"].as_str().unwrap_or("?"),
                        b["direction"].as_str().unwrap_or("?"),
                        b["rateBps"]
                    );
                }
                println!(
                    "    agent: hostPorts {}, records {}",
                    st["hostPorts"], st["records"]
                );
                ensure!(
                    st["hostPorts"] == 1 && st["records"] == 1,
                    "the agent should hold one hostPort and one record"
                );
                ensure!(
                    buckets.len() == 2 && buckets.iter().all(|b| b["rateBps"] == CRI_RATE_BPS),
                    "both directions should be limited to {CRI_RATE_BPS} bit/s by the annotations"
                );
                ensure!(self.records().len() == 1, "one attachment record expected");
            }
            None => {
                self.node()?
                    .show_ip(&["-br", "link", "show", "type", "ifb"])?;
                proc::show(
                    self.node()?
                        .exec("tc")
                        .args(["qdisc", "show", "dev", &veths[0]]),
                )?;
            }
        }
        let ctr_spec = ContainerSpec::new("web", HTTPD_IMAGE);
        let pod = self.cri_pod()?;
        let ctr = cl
            .create_container(&id, ctr_spec.container_config(&pod.spec), config)
            .with_context(|| format!("CreateContainer; containerd log:\n{}", cri.log_tail(30)))?;
        if let Some(p) = self.cri_pod.as_mut() {
            p.container = Some(ctr.clone());
        }
        cl.start_container(&ctr)
            .with_context(|| format!("StartContainer; containerd log:\n{}", cri.log_tail(30)))?;
        let cs = cl.container_status(&ctr)?;
        println!(
            "    CreateContainer + StartContainer: container web ({HTTPD_IMAGE}, busybox httpd on :{HTTPD_PORT}) {ctr}: {}",
            if cs.state == ContainerState::ContainerRunning as i32 {
                "CONTAINER_RUNNING"
            } else {
                "not running"
            }
        );
        ensure!(
            cs.state == ContainerState::ContainerRunning as i32,
            "the workload is not running: {cs:?}"
        );
        Ok(())
    }

    fn cri_host_port(&mut self) -> Result<()> {
        let target: SocketAddr = format!("{NODE_UPLINK_IP}:{CRI_HOST_PORT}").parse()?;
        let took = crate::cri::wait_served(self.external()?.path(), target, CRI_SERVE_TIMEOUT)?;
        println!(
            "    external {EXTERNAL_IP} -> GET http://{target}/ -> 200 {:?} (after {} ms of polling)",
            PAYLOAD.trim_end(),
            took.as_millis()
        );
        if let Some(a) = &self.agent {
            let st = a.status_json()?;
            println!(
                "    agent: hostPort DNATs since it started: {}",
                st["stats"]["hostPortDnat"]
            );
        }
        Ok(())
    }

    fn cri_remove_pod(&mut self) -> Result<()> {
        let cri = self.cri()?;
        let cl = cri.client()?;
        let pod = self.cri_pod()?;
        if let Some(ctr) = &pod.container {
            cl.stop_container(ctr, 2)?;
            println!("    StopContainer web: ok");
        }
        let t = Instant::now();
        cl.stop_pod_sandbox(&pod.id)
            .with_context(|| format!("StopPodSandbox; containerd log:\n{}", cri.log_tail(30)))?;
        println!(
            "    StopPodSandbox {}: ok in {} ms (CNI DEL of the conflist)",
            pod.id,
            t.elapsed().as_millis()
        );
        let t = Instant::now();
        cl.remove_pod_sandbox(&pod.id)?;
        println!(
            "    RemovePodSandbox {}: ok in {} ms",
            pod.id,
            t.elapsed().as_millis()
        );
        let left = cl.list_pod_sandbox()?;
        println!("    ListPodSandbox: {} sandbox(es)", left.len());
        ensure!(left.is_empty(), "sandboxes left: {left:?}");
        let veths = self.pod_veths()?;
        println!("    pod veths in the node: {veths:?}");
        ensure!(veths.is_empty(), "pod veths left in the node netns");
        let store = self.ipam_dir().join("demo");
        let held = cni::ipam_reservations(&store)?;
        println!(
            "    IPAM store {}: {} reservation(s) {held:?}",
            store.display(),
            held.len()
        );
        ensure!(held.is_empty(), "IP reservations left behind");
        let target: SocketAddr = format!("{NODE_UPLINK_IP}:{CRI_HOST_PORT}").parse()?;
        let refused = crate::netns::in_netns(self.external()?.path(), || {
            Ok(crate::cri::http_get(target, Duration::from_secs(2)).is_err())
        })?;
        println!(
            "    external -> {target}: {}",
            if refused { "refused" } else { "still answers" }
        );
        ensure!(refused, "the hostPort still answers after the pod is gone");
        if let Some(a) = &self.agent {
            let records = self.records();
            println!("    attachment records: {} {records:?}", records.len());
            ensure!(records.is_empty(), "attachment records left behind");
            let st = a.status_json()?;
            let buckets = st["rateLimits"].as_array().map(Vec::len).unwrap_or(0);
            println!(
                "    agent: hostPorts {}, masqSources {}, records {}, rate limits {buckets}",
                st["hostPorts"], st["masqSources"], st["records"]
            );
            ensure!(
                st["hostPorts"] == 0
                    && st["masqSources"] == 0
                    && st["records"] == 0
                    && buckets == 0,
                "the agent still holds entries of the pod"
            );
        } else {
            let ifbs = self
                .node()?
                .try_ip(&["-o", "link", "show", "type", "ifb"])?;
            ensure!(ifbs.trim().is_empty(), "ifb devices left: {ifbs}");
        }
        self.cri_pod = None;
        Ok(())
    }

    fn cri_stop(&mut self) -> Result<()> {
        let mut cri = self.cri.take().context("containerd is not running")?;
        let pid = cri.containerd()?.pid();
        let dir = cri.dir().to_path_buf();
        let t = cri.shutdown().context("containerd was already stopped")?;
        println!(
            "    containerd (pid {}) stopped; sandboxes its teardown still found: {}",
            pid.map(|p| p.to_string()).unwrap_or_default(),
            t.sandboxes_removed.len()
        );
        if !t.forced.is_empty() {
            println!("    cleaned up by force: {:?}", t.forced);
        }
        ensure!(t.errors.is_empty(), "containerd teardown: {:?}", t.errors);
        ensure!(
            t.sandboxes_removed.is_empty(),
            "sandboxes were still there: {:?}",
            t.sandboxes_removed
        );
        let alive = pid.is_some_and(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .map(|s| !s.contains(") Z "))
                .unwrap_or(false)
        });
        ensure!(!alive, "containerd is still running");
        let mounts = cni_cri::cleanup::mounts_below(&dir);
        ensure!(
            mounts.is_empty(),
            "mounts left below {}: {mounts:?}",
            dir.display()
        );
        println!(
            "    {}: {}; mounts below it: none",
            dir.display(),
            if dir.exists() {
                "still there"
            } else {
                "removed"
            }
        );
        ensure!(!dir.exists(), "{} is still there", dir.display());
        drop(cri);
        Ok(())
    }
}
