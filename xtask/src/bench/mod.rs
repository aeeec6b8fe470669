//! `cargo xtask bench`: our plugin suite against the reference plugins
//! (Debian's containernetworking-plugins), side by side in one run, on the
//! same topology, with the same conflist apart from the `type` names.
//!
//! Two phases, each on fresh namespaces (nothing in the root netns):
//! - A, churn and cost: for each repeat, ours then the reference (the
//!   order alternates between repeats), on a fresh node: ADD N pods in
//!   order, then DEL them in reverse, each call timed, so pod i's ADD and
//!   DEL both see i other pods. The agent's RSS, the pinned BPF memory,
//!   and (reference) the rules and qdiscs left in the node are read with
//!   all N pods attached.
//! - B, traffic: three nodes side by side (ours, reference, and the
//!   routed ceiling), each with N pods holding a hostPort mapping each,
//!   then a server pod and a client pod added last. Every measurement
//!   runs once per repeat for each node in turn (rotating the order), so
//!   machine noise spreads evenly over the three. The firewall-rule runs
//!   use client pods of their own, with 0, 100 and 1,000 rules each.
//!
//! - C, cri: a node per chain with a private containerd of its own; N
//!   pods (at most 100) started through its CRI as kubelet starts them,
//!   each chain in turn, timed until each answers on its hostPort, then
//!   stopped and removed, timed (see `cri.rs`).
//!
//! Results go to target/bench/report.{md,json} and PNG charts.
mod charts;
mod cost;
mod cri;
mod progress;
mod report;
mod session;
mod stats;
mod traffic;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::netns::NetnsSet;
use progress::Progress;
pub use session::{Call, Extra, Impl};
use session::{Env, PodSpec, Session, EXTERNAL_IP, EXTERNAL_IP6, NODE_IP, NODE_IP6};

/// A bridge holds at most 1024 ports; the traffic phase adds up to 8 pods.
const MAX_PODS: usize = 1000;

const IPERF_PORT: u16 = 5201;
const SOCKPERF_PORT: u16 = 11111;
const CONN_PORT: u16 = 12345;
const ECHO_PORT: u16 = 12346;
/// The connection-rate grid: to one endpoint and to this many (ports
/// MANY_PORT_BASE.., on the external host), with each number of client
/// threads.
const MANY_ENDPOINTS: usize = 100;
const MANY_PORT_BASE: u16 = CONN_PORT + 200;
const CONN_THREADS: [usize; 2] = [1, 8];
/// hostPort of a server port on the server pod.
fn host_port(port: u16) -> u16 {
    port + 10000
}
/// The hostPort every other pod maps to its port 80.
fn filler_host_port(i: usize) -> u16 {
    30000 + i as u16
}
/// Rates of the bandwidth-accuracy runs, Mbit/s.
const BW_RATES: [u64; 3] = [10, 100, 1000];
/// The rate whose latency is measured with the limited direction saturated.
const BW_LOAD_RATE: u64 = 100;
/// The limit every churn pod gets when bandwidth is in the chain.
const CHURN_RATE: u64 = 100;
/// Firewall rules on the client pods of the firewall-rule runs.
const FW_RULES: [usize; 3] = [0, 100, 1000];

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Section {
    /// ADD/DEL latency against pods present, full chain.
    Churn,
    /// Agent RSS, pinned BPF memory, CPU per ADD, rules left in the node.
    Cost,
    /// TCP throughput and request/response latency per path.
    Datapath,
    /// New TCP connections per second through masquerade and hostPort.
    Connrate,
    /// Rate-limit accuracy and latency under load (needs ebpf-bandwidth).
    Bandwidth,
    /// Pod → external throughput, request/response latency and
    /// connections/s with 0, 100 and 1,000 firewall rules (needs
    /// ebpf-firewall).
    Firewall,
    /// RunPodSandbox → ready and StopPodSandbox + RemovePodSandbox through
    /// containerd's CRI, min(--pods, 100) pods with a hostPort and the
    /// bandwidth annotations each.
    Cri,
}

#[derive(clap::Args)]
pub struct Opts {
    /// Pods attached in the churn, and hostPort mappings present during the
    /// traffic runs [default: 1000; --quick: 20].
    #[arg(long)]
    pods: Option<usize>,
    /// Times each measurement is repeated [default: 3; --quick: 1].
    #[arg(long)]
    repeats: Option<usize>,
    /// Seconds per traffic measurement [default: 5; --quick: 1].
    #[arg(long)]
    duration: Option<u32>,
    /// Smoke run: 20 pods, one repeat, 1 s measurements.
    #[arg(long)]
    quick: bool,
    /// Run only these sections (repeatable or comma-separated); default all.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Section>,
    /// Plugins chained after the bridge, in both chains [default: portmap,
    /// plus firewall and bandwidth when ebpf-firewall / ebpf-bandwidth
    /// are built].
    #[arg(long, value_enum, value_delimiter = ',')]
    plugins: Option<Vec<Extra>>,
    /// Where our agent runs hostPort DNAT on the uplink.
    #[arg(long, default_value = "tc", value_parser = ["tc", "xdp"])]
    hostport_mode: String,
    /// Client threads of the connection-rate runs.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Skip `cargo xtask setup`.
    #[arg(long)]
    no_setup: bool,
    /// Skip the release build (use target/release as it is).
    #[arg(long)]
    no_build: bool,
    /// Only re-render report.md and the charts from target/bench/report.json.
    #[arg(long)]
    report_only: bool,
}

/// Everything a run was asked to do, resolved.
#[derive(Serialize, Deserialize)]
pub struct Config {
    pub pods: usize,
    pub repeats: usize,
    pub duration: u32,
    pub quick: bool,
    pub sections: Vec<Section>,
    pub extras: Vec<Extra>,
    /// Chained plugins left out, and why.
    pub extras_missing: Vec<(Extra, String)>,
    pub hostport_mode: String,
    pub concurrency: usize,
    /// sockperf for request/response, else our own client.
    pub sockperf: bool,
    pub bin_dir: PathBuf,
    pub command: String,
}

impl Config {
    pub fn has(&self, s: Section) -> bool {
        self.sections.contains(&s)
    }
}

/// One pod's churn calls in one repeat of one chain.
#[derive(Serialize, Deserialize)]
pub struct ChurnRun {
    pub rep: usize,
    pub imp: Impl,
    pub add: Vec<Call>,
    pub del: Vec<Call>,
    pub cost: CostSnap,
    /// Plugin types in conflist order (for `Call::plugin_ms`).
    pub plugin_types: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CostSnap {
    pub agent_rss_idle_kib: Option<u64>,
    pub agent_rss_full_kib: Option<u64>,
    pub agent_rss_after_del_kib: Option<u64>,
    /// Agent CPU over the whole ADD (DEL) phase, ms (NaN: no agent).
    #[serde(deserialize_with = "stats::f64_or_nan")]
    pub agent_cpu_add_ms: f64,
    #[serde(deserialize_with = "stats::f64_or_nan")]
    pub agent_cpu_del_ms: f64,
    pub bpf: Option<cost::BpfMem>,
    pub iptables_rules: usize,
    pub nft_lines: usize,
    pub qdiscs: usize,
    pub ifbs: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathKind {
    PodToExternal,
    ExternalToHostPort,
    PodToPod,
    PodToExternal6,
    ExternalToHostPort6,
    PodToPod6,
}

impl PathKind {
    /// Every path, IPv4 then the same paths over IPv6 (the nodes are
    /// dual-stack, issue 11).
    pub const ALL: [PathKind; 6] = [
        PathKind::PodToExternal,
        PathKind::ExternalToHostPort,
        PathKind::PodToPod,
        PathKind::PodToExternal6,
        PathKind::ExternalToHostPort6,
        PathKind::PodToPod6,
    ];

    /// The paths through a translation (masquerade or hostPort DNAT),
    /// whose connection rate is measured.
    pub const NAT: [PathKind; 4] = [
        PathKind::PodToExternal,
        PathKind::ExternalToHostPort,
        PathKind::PodToExternal6,
        PathKind::ExternalToHostPort6,
    ];

    pub fn label(self) -> &'static str {
        match self {
            PathKind::PodToExternal => "pod → external (masquerade)",
            PathKind::ExternalToHostPort => "external → hostPort → pod",
            PathKind::PodToPod => "pod → pod (same bridge)",
            PathKind::PodToExternal6 => "IPv6 pod → external (masquerade)",
            PathKind::ExternalToHostPort6 => "IPv6 external → hostPort → pod",
            PathKind::PodToPod6 => "IPv6 pod → pod (same bridge)",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            PathKind::PodToExternal => "pod→ext (masq)",
            PathKind::ExternalToHostPort => "ext→hostPort→pod",
            PathKind::PodToPod => "pod→pod",
            PathKind::PodToExternal6 => "v6 pod→ext (masq)",
            PathKind::ExternalToHostPort6 => "v6 ext→hostPort→pod",
            PathKind::PodToPod6 => "v6 pod→pod",
        }
    }

    pub fn v6(self) -> bool {
        matches!(
            self,
            PathKind::PodToExternal6 | PathKind::ExternalToHostPort6 | PathKind::PodToPod6
        )
    }

    /// Through the masquerade (whose bindings drain between runs).
    pub fn masquerade(self) -> bool {
        matches!(self, PathKind::PodToExternal | PathKind::PodToExternal6)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Throughput,
    Rr,
    ConnRate,
}

impl Metric {
    pub fn key(self) -> &'static str {
        match self {
            Metric::Throughput => "throughput",
            Metric::Rr => "request_response",
            Metric::ConnRate => "connection_rate",
        }
    }
}

/// One traffic measurement (one repeat, one node).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    pub path: PathKind,
    pub metric: Metric,
    pub imp: Impl,
    pub rep: usize,
    /// `gbps`; `p50_us`, `p99_us`; `conn_per_s`, `failed`.
    pub values: BTreeMap<String, f64>,
    /// Datapath counter deltas (ours) over the measurement.
    pub counters: BTreeMap<String, u64>,
    pub error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dir {
    /// Out of the pod (`egressRate`): the pod sends.
    Egress,
    /// Into the pod (`ingressRate`): the pod receives.
    Ingress,
}

impl Dir {
    pub fn key(self) -> &'static str {
        match self {
            Dir::Egress => "egress",
            Dir::Ingress => "ingress",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BwSample {
    pub imp: Impl,
    pub rep: usize,
    pub rate_mbit: u64,
    pub dir: Dir,
    /// Accuracy run: measured Mbit/s.
    pub measured_mbit: Option<f64>,
    /// Latency run: unloaded and loaded round trips, and the load's rate.
    pub idle: Option<traffic::Rr>,
    pub loaded: Option<traffic::Rr>,
    pub load_mbit: Option<f64>,
    pub error: Option<String>,
}

/// One measurement of the firewall-rule runs (pod → external).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FwSample {
    pub imp: Impl,
    pub rep: usize,
    pub rules: usize,
    pub metric: Metric,
    /// As `Sample::values`.
    pub values: BTreeMap<String, f64>,
    pub error: Option<String>,
}

/// What a run produced, for the report.
#[derive(Default, Serialize, Deserialize)]
pub struct Results {
    pub churn: Vec<ChurnRun>,
    pub samples: Vec<Sample>,
    pub bw: Vec<BwSample>,
    #[serde(default)]
    pub fw: Vec<FwSample>,
    /// The `cri` section's runs (one per chain and repeat).
    #[serde(default)]
    pub cri: Vec<cri::CriRun>,
    /// Agent RSS after the traffic phase, KiB.
    pub agent_rss_after_traffic_kib: Option<u64>,
    pub conflists: BTreeMap<String, serde_json::Value>,
    pub notes: Vec<String>,
    pub not_measured: Vec<String>,
    /// When the run started (UTC).
    #[serde(default)]
    pub date: String,
    /// Our git commit at the start of the run.
    #[serde(default)]
    pub commit: String,
    pub load_start: String,
    pub load_end: String,
    pub elapsed_s: f64,
}

pub fn run(opts: &Opts) -> Result<()> {
    let dir = crate::target_dir().join("bench");
    if opts.report_only {
        let path = dir.join("report.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {} (run the benchmark first)", path.display()))?;
        let doc: serde_json::Value = serde_json::from_str(&text)?;
        let cfg: Config = serde_json::from_value(doc["raw"]["config"].clone())
            .context("report.json: raw.config")?;
        let res: Results = serde_json::from_value(doc["raw"]["results"].clone())
            .context("report.json: raw.results")?;
        return report::write(&cfg, &res, &dir);
    }
    crate::require_root("bench")?;
    let pods = opts.pods.unwrap_or(if opts.quick { 20 } else { 1000 });
    ensure!(
        (2..=MAX_PODS).contains(&pods),
        "--pods must be 2..={MAX_PODS} (a bridge holds at most 1024 ports, and the traffic phase adds 5 pods)"
    );
    let repeats = opts.repeats.unwrap_or(if opts.quick { 1 } else { 3 });
    ensure!(repeats >= 1, "--repeats must be at least 1");
    let duration = opts.duration.unwrap_or(if opts.quick { 1 } else { 5 });
    ensure!(duration >= 1, "--duration must be at least 1 s");
    if !opts.no_setup {
        crate::setup::run(false, &[])?;
    }
    let bin_dir = if opts.no_build {
        crate::target_dir().join("release")
    } else {
        crate::build_bins(true)?
    };
    for p in ["cni-agent", "ebpf-bridge", "ebpf-host-local"] {
        ensure!(
            bin_dir.join(p).is_file(),
            "{} is missing",
            bin_dir.join(p).display()
        );
    }
    for p in ["bridge", "host-local", "portmap", "firewall", "bandwidth"] {
        let path = Path::new(session::REFERENCE_DIR).join(p);
        ensure!(
            path.is_file(),
            "{} is missing (containernetworking-plugins)",
            path.display()
        );
    }
    for tool in ["iperf3", "bpftool", "iptables-save", "nft", "tc"] {
        ensure!(
            which(tool).is_some(),
            "`{tool}` is not installed (cargo xtask setup)"
        );
    }

    let mut extras_missing = Vec::new();
    let extras: Vec<Extra> = match &opts.plugins {
        Some(list) => {
            let mut l = list.clone();
            l.sort();
            l.dedup();
            for e in &l {
                ensure!(
                    bin_dir.join(e.ours()).is_file(),
                    "--plugins {}: {} is not built",
                    e.reference(),
                    bin_dir.join(e.ours()).display()
                );
            }
            for e in Extra::ALL {
                if !l.contains(&e) {
                    extras_missing.push((e, "left out by --plugins".to_string()));
                }
            }
            l
        }
        None => Extra::ALL
            .into_iter()
            .filter(|e| {
                let there = bin_dir.join(e.ours()).is_file();
                if !there {
                    extras_missing.push((
                        *e,
                        format!("{} is not built yet", bin_dir.join(e.ours()).display()),
                    ));
                }
                there
            })
            .collect(),
    };

    let mut sections = if opts.only.is_empty() {
        vec![
            Section::Churn,
            Section::Cost,
            Section::Datapath,
            Section::Connrate,
            Section::Bandwidth,
            Section::Firewall,
            Section::Cri,
        ]
    } else {
        opts.only.clone()
    };
    sections.sort();
    sections.dedup();

    let command = {
        let args: Vec<String> = std::env::args().skip(1).collect();
        format!("cargo xtask {}", args.join(" "))
    };
    let cfg = Config {
        pods,
        repeats,
        duration,
        quick: opts.quick,
        sections,
        extras,
        extras_missing,
        hostport_mode: opts.hostport_mode.clone(),
        concurrency: opts.concurrency.max(1),
        sockperf: which("sockperf").is_some(),
        bin_dir,
        command,
    };

    let mut res = Results {
        date: report::utc_now(),
        commit: report::git_commit(),
        load_start: loadavg(),
        ..Default::default()
    };
    let env = Env {
        bin_dir: cfg.bin_dir.clone(),
        extras: cfg.extras.clone(),
        hostport_mode: cfg.hostport_mode.clone(),
    };
    let phase_a = cfg.has(Section::Churn) || cfg.has(Section::Cost);
    let phase_b = cfg.has(Section::Datapath)
        || cfg.has(Section::Connrate)
        || cfg.has(Section::Bandwidth)
        || cfg.has(Section::Firewall);
    let bw = cfg.has(Section::Bandwidth) && cfg.extras.contains(&Extra::Bandwidth);
    if cfg.has(Section::Bandwidth) && !bw {
        res.not_measured.push(
            "bandwidth accuracy and latency under load: ebpf-bandwidth is not in the chain \
             (not built yet, or left out by --plugins)"
                .into(),
        );
    }
    let fw = cfg.has(Section::Firewall) && cfg.extras.contains(&Extra::Firewall);
    if cfg.has(Section::Firewall) && !fw {
        res.not_measured.push(
            "firewall rules: ebpf-firewall is not in the chain (not built yet, or left out \
             by --plugins)"
                .into(),
        );
    }
    let mut phase_c = cfg.has(Section::Cri);
    if phase_c {
        if let Some(why) = crate::cri::missing() {
            res.not_measured
                .push(format!("cri: containerd's CRI cannot run here: {why}"));
            phase_c = false;
        }
    }
    let tasks = if phase_b {
        plan_traffic(&cfg, bw, fw)
    } else {
        Vec::new()
    };
    let total = if phase_a { cfg.repeats * 4 } else { 0 }
        + if phase_b { 5 + tasks.len() } else { 0 }
        + if phase_c { cfg.repeats * 3 } else { 0 }
        + 1;
    let mut pg = Progress::new(total);
    print_intro(&cfg);

    if phase_a {
        churn_phase(&cfg, &env, &mut pg, &mut res)?;
    }
    if phase_c {
        // Not fatal: the other sections' results still get their report.
        if let Err(e) = cri::phase(&cfg, &env, &mut pg, &mut res) {
            crate::proc::check_interrupted()?;
            pg.note(&format!("cri: FAILED: {e:#}"));
            res.not_measured
                .push(format!("cri: the section stopped: {e:#}"));
        }
    }
    if phase_b {
        traffic_phase(&cfg, &env, &tasks, (bw, fw), &mut pg, &mut res)?;
    }
    pg.step("writing the report and charts");
    res.load_end = loadavg();
    res.elapsed_s = pg.elapsed_secs();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    report::write(&cfg, &res, &dir)?;
    Ok(())
}

fn print_intro(cfg: &Config) {
    let chain: Vec<&str> = std::iter::once("bridge+host-local (ipMasq)")
        .chain(cfg.extras.iter().map(|e| e.reference()))
        .collect();
    println!(
        "\nBenchmark: {} pods, {} repeat(s), {} s per traffic measurement; chain: {}; sections: {}",
        cfg.pods,
        cfg.repeats,
        cfg.duration,
        chain.join(" + "),
        cfg.sections
            .iter()
            .map(|s| format!("{s:?}").to_lowercase())
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (e, why) in &cfg.extras_missing {
        println!("    {} not in the chain: {why}", e.reference());
    }
    if !cfg.sockperf {
        println!(
            "    sockperf not installed: request/response uses the benchmark's own TCP client"
        );
    }
    if cfg.has(Section::Cri) {
        println!(
            "    cri: {} pods per chain through a private containerd each (min(--pods, {}))",
            cri::pods(cfg.pods),
            cri::MAX_PODS
        );
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn burst_bits(rate_bps: u64) -> u64 {
    // 20 ms of the rate, and at least 64 KiB so one GSO packet fits.
    (rate_bps / 50).max(64 * 1024 * 8)
}

fn churn_spec(cfg: &Config, set: &NetnsSet, i: usize) -> PodSpec {
    PodSpec {
        name: format!("p{i:04}"),
        netns: crate::netns::netns_path(&set.names[i]),
        mappings: if cfg.extras.contains(&Extra::Portmap) {
            vec![(filler_host_port(i), 80)]
        } else {
            Vec::new()
        },
        bandwidth: cfg
            .extras
            .contains(&Extra::Bandwidth)
            .then(|| (CHURN_RATE * 1_000_000, burst_bits(CHURN_RATE * 1_000_000))),
        fw_rules: 0,
    }
}

/// Phase A: churn and cost.
fn churn_phase(cfg: &Config, env: &Env, pg: &mut Progress, res: &mut Results) -> Result<()> {
    let n = cfg.pods;
    println!("\nCreating {n} pod netns (not timed)");
    let set = NetnsSet::create("cnib", n)?;
    for rep in 0..cfg.repeats {
        let order = if rep % 2 == 0 {
            [Impl::Ours, Impl::Reference]
        } else {
            [Impl::Reference, Impl::Ours]
        };
        for imp in order {
            pg.step(&format!(
                "churn {}/{}: {}: ADD {n} pods in order",
                rep + 1,
                cfg.repeats,
                imp.label()
            ));
            let mut s = Session::create(env, imp, &format!("r{rep}"))?;
            res.conflists
                .entry(imp.key().to_string())
                .or_insert_with(|| s.conflist_json().clone());
            let mut snap = CostSnap {
                agent_rss_idle_kib: s.agent_pid().and_then(cost::rss_kib),
                ..Default::default()
            };
            let cpu0 = s.agent_cpu_ms();
            let mut add = Vec::with_capacity(n);
            for i in 0..n {
                crate::proc::check_interrupted()?;
                add.push(s.add(&churn_spec(cfg, &set, i))?);
                pg.count("ADD", i + 1, n);
            }
            snap.agent_cpu_add_ms = s.agent_cpu_ms() - cpu0;
            snap.agent_rss_full_kib = s.agent_pid().and_then(cost::rss_kib);
            snap.bpf = s.bpffs_root().and_then(|r| cost::pinned_bpf(r).ok());
            let (ipt, nft, qd, ifb) = cost::netfilter_and_tc(&s.node);
            snap.iptables_rules = ipt;
            snap.nft_lines = nft;
            snap.qdiscs = qd;
            snap.ifbs = ifb;
            pg.note(&format!(
                "ADD median {:.1} ms; node netns: {ipt} iptables rules, {nft} nft lines, {qd} qdiscs",
                stats::median(&add.iter().map(|c| c.ms).collect::<Vec<_>>())
            ));
            pg.step(&format!(
                "churn {}/{}: {}: DEL {n} pods in reverse",
                rep + 1,
                cfg.repeats,
                imp.label()
            ));
            let cpu0 = s.agent_cpu_ms();
            let mut del = vec![Call::default(); n];
            for i in (0..n).rev() {
                crate::proc::check_interrupted()?;
                del[i] = s.del(i)?;
                pg.count("DEL", n - i, n);
            }
            snap.agent_cpu_del_ms = s.agent_cpu_ms() - cpu0;
            snap.agent_rss_after_del_kib = s.agent_pid().and_then(cost::rss_kib);
            s.check_clean()?;
            pg.note(&format!(
                "DEL median {:.1} ms; nothing left behind",
                stats::median(&del.iter().map(|c| c.ms).collect::<Vec<_>>())
            ));
            let plugin_types = s
                .list
                .plugins()
                .iter()
                .map(|p| p["type"].as_str().unwrap_or("?").to_string())
                .collect();
            res.churn.push(ChurnRun {
                rep,
                imp,
                add,
                del,
                cost: snap,
                plugin_types,
            });
            drop(s);
        }
    }
    println!("Removing the pod netns (not timed)");
    drop(set);
    Ok(())
}

/// One traffic measurement to make.
#[derive(Clone, Copy, Debug)]
enum Task {
    Dp {
        rep: usize,
        path: PathKind,
        metric: Metric,
        imp: Impl,
    },
    BwRate {
        rep: usize,
        rate: u64,
        dir: Dir,
        imp: Impl,
    },
    BwLoad {
        rep: usize,
        dir: Dir,
        imp: Impl,
    },
    Fw {
        rep: usize,
        rules: usize,
        metric: Metric,
        imp: Impl,
    },
}

/// Every node takes each measurement in turn, the order rotating with the
/// repeat, so that slow drifts of a busy machine hit all of them alike.
fn rotated<T: Copy>(v: &[T], rep: usize) -> Vec<T> {
    let k = rep % v.len().max(1);
    v[k..].iter().chain(&v[..k]).copied().collect()
}

fn plan_traffic(cfg: &Config, bw: bool, fw: bool) -> Vec<Task> {
    let impls = [Impl::Ours, Impl::Reference, Impl::Routed];
    let mut t = Vec::new();
    for rep in 0..cfg.repeats {
        for path in PathKind::ALL {
            let mut metrics = Vec::new();
            if cfg.has(Section::Datapath) {
                metrics.extend([Metric::Throughput, Metric::Rr]);
            }
            if cfg.has(Section::Connrate) && PathKind::NAT.contains(&path) {
                metrics.push(Metric::ConnRate);
            }
            for metric in metrics {
                for imp in rotated(&impls, rep) {
                    t.push(Task::Dp {
                        rep,
                        path,
                        metric,
                        imp,
                    });
                }
            }
        }
        if bw {
            for rate in BW_RATES {
                for dir in [Dir::Egress, Dir::Ingress] {
                    for imp in rotated(&[Impl::Ours, Impl::Reference], rep) {
                        t.push(Task::BwRate {
                            rep,
                            rate,
                            dir,
                            imp,
                        });
                    }
                }
            }
            for dir in [Dir::Egress, Dir::Ingress] {
                for imp in rotated(&[Impl::Ours, Impl::Reference], rep) {
                    t.push(Task::BwLoad { rep, dir, imp });
                }
            }
        }
        if fw {
            for metric in [Metric::Throughput, Metric::Rr, Metric::ConnRate] {
                for rules in FW_RULES {
                    for imp in rotated(&[Impl::Ours, Impl::Reference], rep) {
                        t.push(Task::Fw {
                            rep,
                            rules,
                            metric,
                            imp,
                        });
                    }
                }
            }
        }
    }
    t
}

/// The client pod of the firewall-rule runs with `rules` rules.
fn fw_pod(rules: usize) -> String {
    format!("fw{rules}")
}

/// The external connection server of the firewall-rule runs with `rules`
/// rules. One per pod: the server holds TIME_WAIT for each closed
/// connection, keyed by the node's address and NAT port, and a SYN from
/// another pod (other TCP timestamps) that lands on one is refused by PAWS
/// and retried a second later — a cost of reusing one endpoint, not of
/// the rules.
fn fw_conn_port(rules: usize) -> u16 {
    CONN_PORT + 100 + FW_RULES.iter().position(|r| *r == rules).unwrap_or(0) as u16
}

/// The servers of one node: in the external netns and in the server pod.
struct Servers {
    _procs: Vec<traffic::Bg>,
    _threads: Vec<traffic::ThreadServer>,
}

fn start_servers(cfg: &Config, nss: &[PathBuf]) -> Result<Servers> {
    let mut procs = Vec::new();
    let mut threads = Vec::new();
    for ns in nss {
        procs.push(traffic::Bg::server(
            ns,
            "iperf3",
            &["-s", "-p", &IPERF_PORT.to_string()],
            IPERF_PORT,
        )?);
        if cfg.sockperf {
            procs.push(traffic::Bg::server(
                ns,
                "sockperf",
                &[
                    "sr",
                    "--tcp",
                    "-i",
                    "0.0.0.0",
                    "-p",
                    &SOCKPERF_PORT.to_string(),
                ],
                SOCKPERF_PORT,
            )?);
        }
        threads.push(traffic::echo_server(ns, ECHO_PORT)?);
        threads.push(traffic::conn_server(ns, CONN_PORT)?);
        let many: Vec<u16> = (0..MANY_ENDPOINTS as u16)
            .map(|i| MANY_PORT_BASE + i)
            .collect();
        threads.push(traffic::conn_servers(ns, &many)?);
    }
    Ok(Servers {
        _procs: procs,
        _threads: threads,
    })
}

/// Where a measurement's client runs and what it connects to.
fn endpoint(s: &Session, path: PathKind, port: u16) -> Result<(PathBuf, IpAddr, u16)> {
    let client = s.pod("client")?.netns.clone();
    Ok(match path {
        PathKind::PodToExternal => (client, EXTERNAL_IP.into(), port),
        PathKind::PodToExternal6 => (client, EXTERNAL_IP6.into(), port),
        PathKind::ExternalToHostPort => match s.imp {
            Impl::Routed => (s.ext_path(), s.pod_ip("server")?.into(), port),
            _ => (s.ext_path(), NODE_IP.into(), host_port(port)),
        },
        PathKind::ExternalToHostPort6 => match s.imp {
            Impl::Routed => (s.ext_path(), s.pod_ip6("server")?.into(), port),
            _ => (s.ext_path(), NODE_IP6.into(), host_port(port)),
        },
        PathKind::PodToPod => (client, s.pod_ip("server")?.into(), port),
        PathKind::PodToPod6 => (client, s.pod_ip6("server")?.into(), port),
    })
}

/// Phase B: three nodes side by side, then every measurement in turn.
fn traffic_phase(
    cfg: &Config,
    env: &Env,
    tasks: &[Task],
    (bw, fw): (bool, bool),
    pg: &mut Progress,
    res: &mut Results,
) -> Result<()> {
    let n = cfg.pods;
    let impls = [Impl::Ours, Impl::Reference, Impl::Routed];
    // Field order of the tuple: servers are stopped before their session.
    let mut nodes: Vec<(Session, NetnsSet)> = Vec::new();
    for imp in impls {
        let fillers = if imp == Impl::Routed { 0 } else { n };
        let bw_pods = if bw && imp != Impl::Routed {
            BW_RATES.len()
        } else {
            0
        };
        let fw_pods = if fw && imp != Impl::Routed {
            FW_RULES.len()
        } else {
            0
        };
        pg.step(&format!(
            "traffic setup: {}: {fillers} pods with a hostPort each, then the server and client pods (ADD not timed)",
            imp.label()
        ));
        let set = NetnsSet::create("cnibt", fillers + 2 + bw_pods + fw_pods)?;
        let mut s = Session::create(env, imp, "t")?;
        res.conflists
            .entry(imp.key().to_string())
            .or_insert_with(|| s.conflist_json().clone());
        let portmap = cfg.extras.contains(&Extra::Portmap) && imp != Impl::Routed;
        let bw_chain = cfg.extras.contains(&Extra::Bandwidth) && imp != Impl::Routed;
        for i in 0..fillers {
            crate::proc::check_interrupted()?;
            let mut spec = churn_spec(cfg, &set, i);
            if !bw_chain {
                spec.bandwidth = None;
            }
            if !portmap {
                spec.mappings.clear();
            }
            s.add(&spec)?;
            pg.count("ADD", i + 1, fillers);
        }
        if fillers > 0 {
            quiet_ports(&s.node)?;
        }
        let ns = |k: usize| crate::netns::netns_path(&set.names[k]);
        let server_maps = if portmap {
            [IPERF_PORT, SOCKPERF_PORT, CONN_PORT, ECHO_PORT]
                .iter()
                .map(|p| (host_port(*p), *p))
                .collect()
        } else {
            Vec::new()
        };
        s.add(&PodSpec {
            name: "server".into(),
            netns: ns(fillers),
            mappings: server_maps,
            bandwidth: None,
            fw_rules: 0,
        })?;
        s.add(&PodSpec {
            name: "client".into(),
            netns: ns(fillers + 1),
            mappings: Vec::new(),
            bandwidth: None,
            fw_rules: 0,
        })?;
        let mut next = fillers + 2;
        for rate in BW_RATES.iter().take(bw_pods) {
            let bps = rate * 1_000_000;
            s.add(&PodSpec {
                name: format!("bw{rate}"),
                netns: ns(next),
                mappings: Vec::new(),
                bandwidth: Some((bps, burst_bits(bps))),
                fw_rules: 0,
            })?;
            next += 1;
        }
        for rules in FW_RULES.iter().take(fw_pods) {
            s.add(&PodSpec {
                name: fw_pod(*rules),
                netns: ns(next),
                mappings: Vec::new(),
                bandwidth: None,
                // Ours: the pod's own rules. The reference's go into its
                // admin chain just before each of this pod's runs.
                fw_rules: if imp == Impl::Ours { *rules } else { 0 },
            })?;
            next += 1;
        }
        nodes.push((s, set));
    }

    pg.step(
        "traffic setup: starting iperf3, sockperf and the connection servers; checking every path",
    );
    let mut servers = Vec::new();
    let mut fw_servers = Vec::new();
    for (s, _) in &nodes {
        let server_ns = s.pod("server")?.netns.clone();
        servers.push(start_servers(cfg, &[s.ext_path(), server_ns])?);
        if fw && s.imp != Impl::Routed {
            for rules in FW_RULES {
                fw_servers.push(traffic::conn_server(&s.ext_path(), fw_conn_port(rules))?);
            }
        }
    }
    // A path that does not work for a node is reported, not fatal: its
    // measurements still run (and fail on their own, with their error).
    for (s, _) in &nodes {
        for path in PathKind::ALL {
            let mut r = Ok(());
            for attempt in 0..3 {
                if attempt > 0 {
                    std::thread::sleep(Duration::from_secs(1));
                }
                r = endpoint(s, path, CONN_PORT).and_then(|(ns, dst, port)| {
                    traffic::conn_once(&ns, SocketAddr::new(dst, port))
                });
                if r.is_ok() {
                    break;
                }
            }
            match r {
                Ok(()) => pg.note(&format!("{}: {}: ok", s.imp.label(), path.label())),
                Err(e) => {
                    let msg = format!("{e:#}");
                    pg.note(&format!(
                        "{}: {}: FAILED: {msg}",
                        s.imp.label(),
                        path.label()
                    ));
                    res.notes.push(format!(
                        "{} {}: the check before the measurements failed three times: {msg}",
                        s.imp.label(),
                        path.label()
                    ));
                }
            }
        }
    }

    let find = |imp: Impl| -> Result<&Session> {
        nodes
            .iter()
            .map(|(s, _)| s)
            .find(|s| s.imp == imp)
            .context("no such node")
    };
    for task in tasks {
        crate::proc::check_interrupted()?;
        match *task {
            Task::Dp {
                rep,
                path,
                metric,
                imp,
            } => {
                let what = match metric {
                    Metric::Throughput => "TCP throughput (iperf3)",
                    Metric::Rr if cfg.sockperf && !path.v6() => {
                        "request/response latency (sockperf ping-pong)"
                    }
                    Metric::Rr => "request/response latency (own TCP client)",
                    Metric::ConnRate => "new connections/s",
                };
                pg.step(&format!(
                    "{} {}/{}: {}: {}",
                    path.short(),
                    rep + 1,
                    cfg.repeats,
                    imp.label(),
                    what
                ));
                let s = find(imp)?;
                let mut sample = Sample {
                    path,
                    metric,
                    imp,
                    rep,
                    values: BTreeMap::new(),
                    counters: BTreeMap::new(),
                    error: None,
                };
                if metric == Metric::ConnRate && path.masquerade() {
                    s.wait_nat_below(1000, Duration::from_secs(12));
                }
                let before = s.agent_stats();
                (sample.values, sample.error) =
                    outcome(pg, measure(cfg, metric, |port| endpoint(s, path, port)));
                if metric == Metric::ConnRate && sample.error.is_none() {
                    let (grid, error) = outcome(pg, conn_grid(cfg, s, path));
                    sample.values.extend(grid);
                    sample.error = error;
                }
                sample.counters = delta(&before, &s.agent_stats());
                res.samples.push(sample);
            }
            Task::BwRate {
                rep,
                rate,
                dir,
                imp,
            } => {
                pg.step(&format!(
                    "bandwidth {}/{}: {}: {rate} Mbit/s {} limit, iperf3",
                    rep + 1,
                    cfg.repeats,
                    imp.label(),
                    dir.key()
                ));
                let s = find(imp)?;
                let mut b = BwSample {
                    imp,
                    rep,
                    rate_mbit: rate,
                    dir,
                    measured_mbit: None,
                    idle: None,
                    loaded: None,
                    load_mbit: None,
                    error: None,
                };
                let r = s.pod(&format!("bw{rate}")).and_then(|p| {
                    traffic::iperf3(
                        &p.netns,
                        EXTERNAL_IP.into(),
                        IPERF_PORT,
                        cfg.duration,
                        dir == Dir::Ingress,
                    )
                });
                match r {
                    Ok(bps) => {
                        pg.note(&format!(
                            "{:.1} Mbit/s ({:.1}% of the limit)",
                            bps / 1e6,
                            bps / 1e6 / rate as f64 * 100.0
                        ));
                        b.measured_mbit = Some(bps / 1e6);
                    }
                    Err(e) => {
                        pg.note(&format!("FAILED: {e:#}"));
                        b.error = Some(format!("{e:#}"));
                    }
                }
                res.bw.push(b);
            }
            Task::BwLoad { rep, dir, imp } => {
                pg.step(&format!(
                    "bandwidth {}/{}: {}: latency with the {BW_LOAD_RATE} Mbit/s {} limit saturated",
                    rep + 1,
                    cfg.repeats,
                    imp.label(),
                    dir.key()
                ));
                let s = find(imp)?;
                let mut b = BwSample {
                    imp,
                    rep,
                    rate_mbit: BW_LOAD_RATE,
                    dir,
                    measured_mbit: None,
                    idle: None,
                    loaded: None,
                    load_mbit: None,
                    error: None,
                };
                match latency_under_load(cfg, s, dir) {
                    Ok((idle, loaded, load)) => {
                        pg.note(&format!(
                            "idle p50/p99 {:.0}/{:.0} µs; loaded ({:.1} Mbit/s) p50/p99 {:.0}/{:.0} µs",
                            idle.p50_us, idle.p99_us, load, loaded.p50_us, loaded.p99_us
                        ));
                        b.idle = Some(idle);
                        b.loaded = Some(loaded);
                        b.load_mbit = Some(load);
                    }
                    Err(e) => {
                        pg.note(&format!("FAILED: {e:#}"));
                        b.error = Some(format!("{e:#}"));
                    }
                }
                res.bw.push(b);
            }
            Task::Fw {
                rep,
                rules,
                metric,
                imp,
            } => {
                pg.step(&format!(
                    "firewall {}/{}: {}: {rules} rules, pod → external {}",
                    rep + 1,
                    cfg.repeats,
                    imp.label(),
                    match metric {
                        Metric::Throughput => "TCP throughput",
                        Metric::Rr => "request/response latency",
                        Metric::ConnRate => "new connections/s",
                    }
                ));
                let s = find(imp)?;
                let (values, error) = outcome(pg, measure_rules(cfg, s, rules, metric));
                res.fw.push(FwSample {
                    imp,
                    rep,
                    rules,
                    metric,
                    values,
                    error,
                });
            }
        }
    }
    res.agent_rss_after_traffic_kib = find(Impl::Ours)
        .ok()
        .and_then(|s| s.agent_pid())
        .and_then(cost::rss_kib);

    pg.step("traffic teardown: stopping servers, removing the nodes (not timed)");
    drop(fw_servers);
    drop(servers);
    drop(nodes);
    Ok(())
}

/// Takes the idle filler pods' bridge ports out of flooding. With more
/// than about 1,000 ports on one bridge, a single flooded broadcast (an ARP
/// request) fills the kernel's per-CPU input backlog
/// (net.core.netdev_max_backlog, 1,000 by default, a global sysctl the
/// benchmark must not change), and the frames right behind it, such as the
/// gateway's ARP reply, are dropped: both chains lose pods that way. The
/// fillers send nothing; their rules, map entries and links stay as they are.
fn quiet_ports(node: &crate::netns::NetNs) -> Result<()> {
    let links = node.try_ip(&["-o", "link", "show", "master", session::BRIDGE])?;
    let mut script = String::new();
    for l in links.lines() {
        if let Some(name) = l.split(": ").nth(1).and_then(|n| n.split('@').next()) {
            script.push_str(&format!(
                "link set dev {name} flood off mcast_flood off bcast_flood off\n"
            ));
        }
    }
    if script.is_empty() {
        return Ok(());
    }
    node.feed("bridge", &["-batch", "-"], &script)
}

/// A measurement's result as a sample keeps it: the finite values, or the
/// error; either is shown on the progress display.
fn outcome(
    pg: &mut Progress,
    r: Result<BTreeMap<String, f64>>,
) -> (BTreeMap<String, f64>, Option<String>) {
    match r {
        Ok(v) => {
            let line: Vec<String> = v.iter().map(|(k, x)| format!("{k} {x:.2}")).collect();
            pg.note(&line.join(", "));
            (v.into_iter().filter(|(_, x)| x.is_finite()).collect(), None)
        }
        Err(e) => {
            pg.note(&format!("FAILED: {e:#}"));
            (BTreeMap::new(), Some(format!("{e:#}")))
        }
    }
}

fn delta(a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    b.iter()
        .filter_map(|(k, v)| {
            let d = v.saturating_sub(a.get(k).copied().unwrap_or(0));
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

/// Request/response round trips from `ns` to a server of the external host
/// or the server pod (sockperf, else our own client).
fn rr(cfg: &Config, ns: &Path, dst: IpAddr) -> Result<traffic::Rr> {
    if cfg.sockperf {
        traffic::sockperf_pp(ns, dst, SOCKPERF_PORT, cfg.duration)
    } else {
        traffic::own_rr(ns, SocketAddr::new(dst, ECHO_PORT), f64::from(cfg.duration))
    }
}

/// One measurement; `at(port)` says where the client runs and what it
/// connects to for a server listening on `port`.
fn measure(
    cfg: &Config,
    metric: Metric,
    at: impl Fn(u16) -> Result<(PathBuf, IpAddr, u16)>,
) -> Result<BTreeMap<String, f64>> {
    let mut v = BTreeMap::new();
    match metric {
        Metric::Throughput => {
            let (ns, dst, port) = at(IPERF_PORT)?;
            let bps = traffic::iperf3(&ns, dst, port, cfg.duration, false)?;
            v.insert("gbps".into(), bps / 1e9);
        }
        Metric::Rr => {
            // sockperf's server listens on IPv4 (`-i 0.0.0.0`); IPv6 paths
            // take the echo server, which every node runs too.
            let (ns, dst, port) = at(ECHO_PORT)?;
            let r = if cfg.sockperf && dst.is_ipv4() {
                let (ns, dst, port) = at(SOCKPERF_PORT)?;
                traffic::sockperf_pp(&ns, dst, port, cfg.duration)?
            } else {
                traffic::own_rr(&ns, SocketAddr::new(dst, port), f64::from(cfg.duration))?
            };
            v.insert("p50_us".into(), r.p50_us);
            v.insert("p99_us".into(), r.p99_us);
        }
        Metric::ConnRate => {
            let (ns, dst, port) = at(CONN_PORT)?;
            let c = traffic::conn_rate(
                &ns,
                SocketAddr::new(dst, port),
                f64::from(cfg.duration),
                cfg.concurrency,
            )?;
            v.insert("conn_per_s".into(), c.per_sec);
            v.insert("failed".into(), c.failed as f64);
        }
    }
    Ok(v)
}

/// The connection-rate grid: new connections/s to one endpoint and to
/// [`MANY_ENDPOINTS`] (pod → external only: a hostPort is one endpoint),
/// with each of [`CONN_THREADS`] client threads. Keys `cps_e<E>_t<T>` and
/// `failed_e<E>_t<T>`.
fn conn_grid(cfg: &Config, s: &Session, path: PathKind) -> Result<BTreeMap<String, f64>> {
    let mut v = BTreeMap::new();
    let counts: &[usize] = if path.masquerade() {
        &[1, MANY_ENDPOINTS]
    } else {
        &[1]
    };
    for &e in counts {
        let ports: Vec<u16> = if e == 1 {
            vec![CONN_PORT]
        } else {
            (0..e as u16).map(|i| MANY_PORT_BASE + i).collect()
        };
        let mut ns = PathBuf::new();
        let mut dsts = Vec::new();
        for p in ports {
            let (n, ip, port) = endpoint(s, path, p)?;
            ns = n;
            dsts.push(SocketAddr::new(ip, port));
        }
        for threads in CONN_THREADS {
            if path.masquerade() {
                s.wait_nat_below(1000, Duration::from_secs(12));
            }
            let c = traffic::conn_rate_to(&ns, &dsts, f64::from(cfg.duration), threads)?;
            v.insert(format!("cps_e{e}_t{threads}"), c.per_sec);
            v.insert(format!("failed_e{e}_t{threads}"), c.failed as f64);
        }
    }
    Ok(v)
}

/// Pod → external from the client pod with `rules` firewall rules. The
/// reference's rules are loaded into its admin chain for the run and
/// flushed after it, so no other run walks them.
fn measure_rules(
    cfg: &Config,
    s: &Session,
    rules: usize,
    metric: Metric,
) -> Result<BTreeMap<String, f64>> {
    let pod = s.pod(&fw_pod(rules))?;
    let ip = s.pod_ip(&pod.name)?;
    if metric == Metric::ConnRate {
        s.wait_nat_below(1000, Duration::from_secs(12));
    }
    if s.imp == Impl::Reference {
        s.load_admin_rules(ip, rules)?;
    }
    let r = measure(cfg, metric, |port| {
        let port = if port == CONN_PORT {
            fw_conn_port(rules)
        } else {
            port
        };
        Ok((pod.netns.clone(), EXTERNAL_IP.into(), port))
    });
    if s.imp == Impl::Reference {
        s.load_admin_rules(ip, 0)?;
    }
    r
}

/// Round trips from the rate-limited pod to the external host, idle and
/// then with iperf3 saturating the limited direction.
fn latency_under_load(
    cfg: &Config,
    s: &Session,
    dir: Dir,
) -> Result<(traffic::Rr, traffic::Rr, f64)> {
    let pod = s.pod(&format!("bw{BW_LOAD_RATE}"))?;
    let dst: IpAddr = EXTERNAL_IP.into();
    let idle = rr(cfg, &pod.netns, dst)?;
    let secs = cfg.duration + 2;
    let load = traffic::iperf3_bg(&pod.netns, dst, IPERF_PORT, secs, dir == Dir::Ingress)?;
    std::thread::sleep(Duration::from_millis(1000));
    let loaded = rr(cfg, &pod.netns, dst);
    let out = load.finish(Duration::from_secs(u64::from(secs) + 20))?;
    let loaded = loaded?;
    let mbit = traffic::parse_iperf3(&out)? / 1e6;
    if mbit > BW_LOAD_RATE as f64 * 3.0 {
        bail!("the load ran at {mbit:.0} Mbit/s: the {BW_LOAD_RATE} Mbit/s limit is not applied");
    }
    Ok((idle, loaded, mbit))
}
