//! The report: target/bench/report.md (what a user reads), report.json
//! (the summary plus every raw sample, enough to re-render the report with
//! `--report-only`), the PNG charts, and the two conflists.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::charts::{self, Bar, BarGroup, BarPanel, Line, LinePanel};
use super::cri::{CriPod, CriRun};
use super::stats::{median, percentile, r3, ratio, ratio_value, slope, Spread};
use super::{ChurnRun, Config, Dir, Extra, Impl, Metric, PathKind, Results, Section};
use crate::proc;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Add,
    Del,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Add => "ADD",
            Op::Del => "DEL",
        }
    }
}

fn calls(r: &ChurnRun, op: Op) -> &[super::Call] {
    match op {
        Op::Add => &r.add,
        Op::Del => &r.del,
    }
}

fn ms(r: &ChurnRun, op: Op, lo: usize, hi: usize) -> Vec<f64> {
    calls(r, op)[lo..=hi.min(calls(r, op).len().saturating_sub(1))]
        .iter()
        .map(|c| c.ms)
        .collect()
}

fn runs(res: &Results, imp: Impl) -> Vec<&ChurnRun> {
    res.churn.iter().filter(|r| r.imp == imp).collect()
}

/// Per-repeat percentile of the pods in `lo..=hi`: its spread over repeats.
fn bucket(runs: &[&ChurnRun], op: Op, lo: usize, hi: usize, p: f64) -> Spread {
    let v: Vec<f64> = runs
        .iter()
        .map(|r| percentile(&ms(r, op, lo, hi), p))
        .collect();
    Spread::of(&v)
}

/// Pod indices per decile of "pods present" (fewer buckets when N < 10).
pub fn deciles(n: usize) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut last = usize::MAX;
    for i in 0..n {
        let b = i * 10 / n;
        match out.last_mut() {
            Some(r) if b == last => r.1 = i,
            _ => out.push((i, i)),
        }
        last = b;
    }
    out
}

/// The pods around 500 present (450–549), or the last decile of a
/// smaller run.
fn around_500(n: usize) -> (usize, usize) {
    if n >= 550 {
        (450, 549)
    } else {
        deciles(n).last().copied().unwrap_or((0, 0))
    }
}

fn dp(res: &Results, path: PathKind, metric: Metric, imp: Impl, key: &str) -> Spread {
    let v: Vec<f64> = res
        .samples
        .iter()
        .filter(|s| s.path == path && s.metric == metric && s.imp == imp && s.error.is_none())
        .filter_map(|s| s.values.get(key).copied())
        .collect();
    Spread::of(&v)
}

fn dp_errors(res: &Results, path: PathKind, metric: Metric, imp: Impl) -> Vec<String> {
    let mut e: Vec<String> = res
        .samples
        .iter()
        .filter(|s| s.path == path && s.metric == metric && s.imp == imp)
        .filter_map(|s| s.error.clone())
        .collect();
    e.dedup();
    e
}

fn dp_counters(res: &Results, path: PathKind, metric: Metric, imp: Impl) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for s in res
        .samples
        .iter()
        .filter(|s| s.path == path && s.metric == metric && s.imp == imp)
    {
        for (k, v) in &s.counters {
            *m.entry(k.clone()).or_insert(0) += v;
        }
    }
    m
}

/// Firewall-rule runs: the spread of `key` over repeats.
fn fwv(res: &Results, rules: usize, metric: Metric, imp: Impl, key: &str) -> Spread {
    let v: Vec<f64> = res
        .fw
        .iter()
        .filter(|s| s.rules == rules && s.metric == metric && s.imp == imp && s.error.is_none())
        .filter_map(|s| s.values.get(key).copied())
        .collect();
    Spread::of(&v)
}

/// The firewall-rule metrics: (metric, value key, label, digits, higher is better).
const FW_METRICS: [(Metric, &str, &str, usize, bool); 4] = [
    (
        Metric::Throughput,
        "gbps",
        "TCP throughput, Gbit/s",
        2,
        true,
    ),
    (Metric::Rr, "p50_us", "RR p50, µs", 1, false),
    (Metric::Rr, "p99_us", "RR p99, µs", 1, false),
    (Metric::ConnRate, "conn_per_s", "new connections/s", 0, true),
];

/// Whether `most` rules cost at most 10% against no rule (by medians).
fn flat(none: &Spread, most: &Spread, higher_better: bool) -> Option<bool> {
    if !none.is_valid() || !most.is_valid() {
        return None;
    }
    Some(if higher_better {
        most.median >= none.median * 0.9
    } else {
        most.median <= none.median * 1.1
    })
}

fn has_dp(res: &Results, metric: Metric) -> bool {
    res.samples.iter().any(|s| s.metric == metric)
}

fn cri_runs(res: &Results, imp: Impl) -> Vec<&CriRun> {
    res.cri.iter().filter(|r| r.imp == imp).collect()
}

/// The `cri` section's per-pod times: (JSON key, label, value of a pod).
type CriMetric = (&'static str, &'static str, fn(&CriPod) -> f64);
const CRI_METRICS: [CriMetric; 5] = [
    ("ready", "RunPodSandbox → hostPort answers (ready)", |p| {
        p.ready_ms
    }),
    ("run_pod_sandbox", "RunPodSandbox call", |p| p.run_ms),
    ("stop_pod_sandbox", "StopPodSandbox", |p| p.stop_ms),
    ("remove_pod_sandbox", "RemovePodSandbox", |p| p.remove_ms),
    (
        "stop_and_remove",
        "StopPodSandbox + RemovePodSandbox",
        CriPod::stop_remove_ms,
    ),
];

/// Per repeat, percentile `p` of `f` over the pods `lo..=hi` (all when
/// `None`): its spread over the repeats.
fn cri_stat(
    runs: &[&CriRun],
    f: fn(&CriPod) -> f64,
    p: f64,
    range: Option<(usize, usize)>,
) -> Spread {
    let v: Vec<f64> = runs
        .iter()
        .map(|r| {
            let (lo, hi) = range.unwrap_or((0, r.pods.len().saturating_sub(1)));
            let xs: Vec<f64> = r
                .pods
                .iter()
                .enumerate()
                .filter(|(i, _)| (lo..=hi).contains(i))
                .map(|(_, x)| f(x))
                .collect();
            percentile(&xs, p)
        })
        .collect();
    Spread::of(&v)
}

/// Pods per chain in the `cri` runs (the most any run started).
fn cri_pods(res: &Results) -> usize {
    res.cri.iter().map(|r| r.pods.len()).max().unwrap_or(0)
}

/// `met` / `not met`, and whether the two ranges overlap (then the
/// difference is within this run's noise).
fn verdict(met: bool, a: &Spread, b: &Spread) -> String {
    if !a.is_valid() || !b.is_valid() {
        return "n/a".into();
    }
    let overlap = a.min <= b.max && b.min <= a.max;
    match (met, overlap) {
        (true, false) => "**met**".into(),
        (true, true) => "met (ranges overlap)".into(),
        (false, true) => "not met (within the spread)".into(),
        (false, false) => "**not met**".into(),
    }
}

struct Meta {
    date: String,
    kernel: String,
    cpu: String,
    ncpu: usize,
    commit: String,
    reference_version: String,
    iperf3: String,
    sockperf: String,
}

fn first_line(c: &mut std::process::Command) -> String {
    proc::output(c)
        .ok()
        .map(|o| {
            let s = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&s)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

pub fn utc_now() -> String {
    first_line(proc::cmd("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
}

/// `<short hash>[ + uncommitted changes]` of the workspace.
pub fn git_commit() -> String {
    let root = crate::workspace_root();
    let commit =
        first_line(
            proc::cmd("git")
                .arg("-C")
                .arg(&root)
                .args(["rev-parse", "--short", "HEAD"]),
        );
    let dirty = proc::output(proc::cmd("git").arg("-C").arg(&root).args([
        "status",
        "--porcelain",
        "--untracked-files=no",
    ]))
    .map(|o| !o.stdout.is_empty())
    .unwrap_or(false);
    format!(
        "{commit}{}",
        if dirty { " + uncommitted changes" } else { "" }
    )
}

fn meta(res: &Results) -> Meta {
    Meta {
        date: if res.date.is_empty() {
            utc_now()
        } else {
            res.date.clone()
        },
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        cpu: std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_default(),
        ncpu: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        commit: if res.commit.is_empty() {
            git_commit()
        } else {
            res.commit.clone()
        },
        reference_version: first_line(proc::cmd("dpkg-query").args([
            "-W",
            "-f=${Version}",
            "containernetworking-plugins",
        ])),
        iperf3: first_line(proc::cmd("iperf3").arg("--version")),
        sockperf: first_line(proc::cmd("sockperf").arg("--version")),
    }
}

pub fn write(cfg: &Config, res: &Results, dir: &Path) -> Result<()> {
    let m = meta(res);
    let mut md = String::new();
    let mut summary = serde_json::Map::new();
    let mut chart_notes = Vec::new();
    let charts = draw_charts(cfg, res, dir, &mut chart_notes);

    header(&mut md, cfg, res, &m);
    let rows = summary_rows(cfg, res, &mut summary);
    md.push_str("## Summary\n\n");
    md.push_str(
        "| | ours (eBPF) | reference (iptables) | routed, no NAT (ceiling) | ratio | goal |\n",
    );
    md.push_str("|---|---|---|---|---|---|\n");
    for r in &rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            r[0], r[1], r[2], r[3], r[4], r[5]
        );
    }
    md.push('\n');
    for (file, alt) in &charts {
        let _ = writeln!(md, "![{alt}]({file})\n");
    }
    for n in &chart_notes {
        let _ = writeln!(md, "_{n}_\n");
    }
    churn_section(&mut md, cfg, res, &mut summary);
    datapath_section(&mut md, cfg, res);
    connrate_section(&mut md, cfg, res);
    bandwidth_section(&mut md, cfg, res);
    firewall_section(&mut md, cfg, res);
    cri_section(&mut md, cfg, res, &mut summary);
    cost_section(&mut md, cfg, res, &mut summary);
    problems_section(&mut md, cfg, res);
    method_section(&mut md, cfg);

    let doc = json!({
        "benchmark": "cni-ebpf vs reference CNI plugins",
        "meta": {
            "date": m.date, "command": cfg.command, "elapsed_s": r3(res.elapsed_s),
            "kernel": m.kernel, "cpu": m.cpu, "cpus": m.ncpu,
            "load_average_start": res.load_start, "load_average_end": res.load_end,
            "ours_commit": m.commit, "reference_version": m.reference_version,
            "iperf3": m.iperf3, "sockperf": if cfg.sockperf { m.sockperf.clone() } else { String::new() },
        },
        "summary": Value::Object(summary),
        "raw": { "config": cfg, "results": res },
    });
    let write = |name: &str, text: &str| -> Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
    };
    write("report.md", &md)?;
    write("report.json", &serde_json::to_string_pretty(&doc)?)?;
    for (k, v) in &res.conflists {
        write(
            &format!("conflist-{k}.json"),
            &serde_json::to_string_pretty(v)?,
        )?;
    }

    println!("\nSummary (median over repeats; full report in target/bench/report.md):");
    for r in &rows {
        println!(
            "  {:<44} ours {:<22} ref {:<22} ceiling {:<14} {:<10} {}",
            r[0].replace("**", ""),
            r[1],
            r[2],
            r[3],
            r[4],
            r[5].replace("**", "")
        );
    }
    println!("\nWrote {}:", dir.display());
    let mut files = vec!["report.md".to_string(), "report.json".to_string()];
    files.extend(charts.iter().map(|(f, _)| f.clone()));
    files.extend(res.conflists.keys().map(|k| format!("conflist-{k}.json")));
    for f in files {
        println!("    {f}");
    }
    Ok(())
}

fn header(md: &mut String, cfg: &Config, res: &Results, m: &Meta) {
    let _ = writeln!(
        md,
        "# Benchmark: cni-ebpf against the reference CNI plugins\n"
    );
    let _ = writeln!(
        md,
        "Run on {} with `{}` ({:.0} min). Machine: {} × {} CPUs, kernel {}; load average \
         (1/5/15 min) {} at the start, {} at the end.\n",
        m.date,
        cfg.command,
        res.elapsed_s / 60.0,
        m.cpu,
        m.ncpu,
        m.kernel,
        res.load_start,
        res.load_end
    );
    let busy = res
        .load_start
        .split_whitespace()
        .next()
        .and_then(|l| l.parse::<f64>().ok())
        .is_some_and(|l| l > 0.3 * m.ncpu as f64);
    if busy {
        let _ = writeln!(
            md,
            "> **Noisy run:** the machine was busy with other work when this ran (load average \
             above). Ratios between ours and the reference, measured side by side in turn, are \
             more trustworthy than the absolute figures; re-run on a quiet machine for final numbers.\n"
        );
    }
    let chain: Vec<String> = cfg
        .extras
        .iter()
        .map(|e| format!("{} / {}", e.ours(), e.reference()))
        .collect();
    let _ = writeln!(
        md,
        "- **Ours:** release build of git {}. **Reference:** containernetworking-plugins {} (`/usr/lib/cni`).",
        m.commit, m.reference_version
    );
    let _ = writeln!(
        md,
        "- **Chain (both, cniVersion 1.0.0):** ebpf-bridge / bridge with ebpf-host-local / host-local IPAM and `ipMasq: true`{}{}.",
        if chain.is_empty() { "" } else { ", then " },
        chain.join(", then ")
    );
    for (e, why) in &cfg.extras_missing {
        let _ = writeln!(
            md,
            "- **Not in the chain:** {} ({why}); the reference's `{}` is left out too, so both chains stay the same.",
            e.ours(),
            e.reference()
        );
    }
    let traffic = [
        Section::Datapath,
        Section::Connrate,
        Section::Bandwidth,
        Section::Firewall,
    ]
    .iter()
    .any(|s| cfg.has(*s));
    if traffic || cfg.has(Section::Churn) || cfg.has(Section::Cost) {
        let _ = writeln!(
            md,
            "- **Scale:** {} pods in the churn; {} hostPort mappings present during the traffic runs. \
             {} repeat(s), {} s per traffic measurement. Request/response: {}.",
            cfg.pods,
            cfg.pods,
            cfg.repeats,
            cfg.duration,
            if cfg.sockperf {
                "sockperf ping-pong over TCP (full round trips)"
            } else {
                "the benchmark's own TCP client (sockperf not installed)"
            }
        );
    } else {
        let _ = writeln!(md, "- **Repeats:** {}.", cfg.repeats);
    }
    if cfg.has(Section::Cri) {
        let _ = writeln!(
            md,
            "- **CRI:** {} pods per chain started through a private containerd each (min(--pods, {})).",
            super::cri::pods(cfg.pods),
            super::cri::MAX_PODS
        );
    }
    let _ = writeln!(
        md,
        "- **Reading the figures:** `median [min–max]` over the repeats. Ratios divide the medians. \
         For latencies lower is better; for throughput and rates higher is better.\n"
    );
}

/// The headline rows: `[what, ours, reference, ceiling, ratio, goal]`.
fn summary_rows(
    cfg: &Config,
    res: &Results,
    summary: &mut serde_json::Map<String, Value>,
) -> Vec<[String; 6]> {
    let mut rows = Vec::new();
    let ours = runs(res, Impl::Ours);
    let reference = runs(res, Impl::Reference);
    let n = cfg.pods;
    if !ours.is_empty() && !reference.is_empty() && cfg.has(Section::Churn) {
        let (lo, hi) = around_500(n);
        let o = bucket(&ours, Op::Add, lo, hi, 50.0);
        let r = bucket(&reference, Op::Add, lo, hi, 50.0);
        let x = r.median / o.median;
        rows.push([
            format!("Full-chain ADD latency, {lo}–{hi} pods present (ms)"),
            o.fmt(2),
            r.fmt(2),
            "—".into(),
            format!("reference / ours = {}", ratio(r.median, o.median)),
            format!(
                "≥ 10× (issue 4): {}",
                verdict(x >= 10.0, &o, &Spread::of(&[r.median / 10.0]))
            ),
        ]);
        summary.insert(
            "add_latency_around_500_pods_ms".into(),
            json!({ "pods_present": [lo, hi], "ours": o.json(), "reference": r.json(), "reference_over_ours": ratio_value(r.median, o.median) }),
        );
        let d = deciles(n);
        let (f, l) = (d[0], d[d.len() - 1]);
        let first = bucket(&ours, Op::Add, f.0, f.1, 50.0);
        let last = bucket(&ours, Op::Add, l.0, l.1, 50.0);
        let rfirst = bucket(&reference, Op::Add, f.0, f.1, 50.0);
        let rlast = bucket(&reference, Op::Add, l.0, l.1, 50.0);
        let per100 = |rs: &[&ChurnRun]| -> f64 {
            let ys: Vec<f64> = (0..n)
                .map(|i| median(&rs.iter().map(|r| r.add[i].ms).collect::<Vec<_>>()))
                .collect();
            slope(&ys) * 100.0
        };
        let (so, sr) = (per100(&ours), per100(&reference));
        rows.push([
            format!(
                "ADD latency growth, {}–{} → {}–{} pods (ms)",
                f.0, f.1, l.0, l.1
            ),
            format!(
                "{:.2} → {:.2} ({:+.3} ms/100 pods)",
                first.median, last.median, so
            ),
            format!(
                "{:.2} → {:.2} ({:+.3} ms/100 pods)",
                rfirst.median, rlast.median, sr
            ),
            "—".into(),
            format!("ours last/first = {}", ratio(last.median, first.median)),
            format!(
                "flat (issue 4): {}",
                if last.median <= first.median * 1.25 {
                    "**met** (last decile within 1.25× of the first)"
                } else {
                    "**not met** (last decile above 1.25× of the first)"
                }
            ),
        ]);
        summary.insert(
            "add_latency_growth".into(),
            json!({
                "ours": { "first_decile_ms": r3(first.median), "last_decile_ms": r3(last.median), "ms_per_100_pods": r3(so) },
                "reference": { "first_decile_ms": r3(rfirst.median), "last_decile_ms": r3(rlast.median), "ms_per_100_pods": r3(sr) },
            }),
        );
        let od = bucket(&ours, Op::Del, 0, n - 1, 50.0);
        let rd = bucket(&reference, Op::Del, 0, n - 1, 50.0);
        rows.push([
            format!("Full-chain DEL latency, all {n} pods (ms)"),
            od.fmt(2),
            rd.fmt(2),
            "—".into(),
            format!("reference / ours = {}", ratio(rd.median, od.median)),
            String::new(),
        ]);
        summary.insert(
            "del_latency_ms".into(),
            json!({ "ours": od.json(), "reference": rd.json() }),
        );
    }
    let (cri_o, cri_r) = (cri_runs(res, Impl::Ours), cri_runs(res, Impl::Reference));
    if cfg.has(Section::Cri) && !cri_o.is_empty() && !cri_r.is_empty() {
        let np = cri_pods(res);
        let [ready, _, _, _, sr] = CRI_METRICS;
        let o = cri_stat(&cri_o, ready.2, 50.0, None);
        let r = cri_stat(&cri_r, ready.2, 50.0, None);
        let goal = if o.is_valid() && r.is_valid() {
            verdict(
                o.median <= 0.5 * r.median,
                &o,
                &Spread::of(&[0.5 * r.median]),
            )
        } else {
            "n/a".into()
        };
        rows.push([
            format!("RunPodSandbox → hostPort answers, through containerd, {np} pods (ms)"),
            o.fmt(1),
            r.fmt(1),
            "—".into(),
            format!("ours / reference = {}", ratio(o.median, r.median)),
            format!("≤ 0.5× reference (issue 13): {goal}"),
        ]);
        let so = cri_stat(&cri_o, sr.2, 50.0, None);
        let sref = cri_stat(&cri_r, sr.2, 50.0, None);
        rows.push([
            "StopPodSandbox + RemovePodSandbox, through containerd (ms)".into(),
            so.fmt(1),
            sref.fmt(1),
            "—".into(),
            format!("ours / reference = {}", ratio(so.median, sref.median)),
            String::new(),
        ]);
    }
    let tp = |path: PathKind, imp: Impl| dp(res, path, Metric::Throughput, imp, "gbps");
    let add_dp = |rows: &mut Vec<[String; 6]>,
                  summary: &mut serde_json::Map<String, Value>,
                  what: String,
                  key: &str,
                  o: Spread,
                  r: Spread,
                  c: Spread,
                  digits: usize,
                  goal: String| {
        rows.push([
            what,
            o.fmt(digits),
            r.fmt(digits),
            c.fmt(digits),
            format!(
                "ours/ref {}, ours/ceiling {}",
                ratio(o.median, r.median),
                ratio(o.median, c.median)
            ),
            goal,
        ]);
        summary.insert(
            key.into(),
            json!({ "ours": o.json(), "reference": r.json(), "ceiling": c.json(),
                    "ours_over_reference": ratio_value(o.median, r.median),
                    "ours_over_ceiling": ratio_value(o.median, c.median) }),
        );
    };
    if has_dp(res, Metric::Throughput) {
        let (o, r, c) = (
            tp(PathKind::PodToExternal, Impl::Ours),
            tp(PathKind::PodToExternal, Impl::Reference),
            tp(PathKind::PodToExternal, Impl::Routed),
        );
        let goal = format!(
            "≥ ceiling: {}; > reference: {} (issue 3)",
            verdict(o.median >= c.median, &o, &c),
            verdict(o.median > r.median, &o, &r)
        );
        add_dp(
            &mut rows,
            summary,
            "Pod → external TCP throughput, masquerade (Gbit/s)".into(),
            "pod_to_external_gbps",
            o,
            r,
            c,
            2,
            goal,
        );
    }
    if has_dp(res, Metric::ConnRate) {
        let cr = |p, i| dp(res, p, Metric::ConnRate, i, "conn_per_s");
        let (o, r, c) = (
            cr(PathKind::PodToExternal, Impl::Ours),
            cr(PathKind::PodToExternal, Impl::Reference),
            cr(PathKind::PodToExternal, Impl::Routed),
        );
        let goal = format!(
            "≥ ceiling: {}; > reference: {} (issue 3)",
            verdict(o.median >= c.median, &o, &c),
            verdict(o.median > r.median, &o, &r)
        );
        add_dp(
            &mut rows,
            summary,
            "Pod → external new connections/s, masquerade".into(),
            "pod_to_external_conn_per_s",
            o,
            r,
            c,
            0,
            goal,
        );
        // The grid of issue 10: every point ≥ 1.5× the reference and
        // ≥ 0.9× the routed ceiling.
        for (path, key, e, t) in conn_grid_points() {
            let g = |i| dp(res, path, Metric::ConnRate, i, &key);
            let (o, r, c) = (g(Impl::Ours), g(Impl::Reference), g(Impl::Routed));
            if !o.is_valid() {
                continue;
            }
            let goal = format!(
                "≥ 1.5× reference: {}; ≥ 0.9× ceiling: {} (issue 10)",
                verdict(o.median >= 1.5 * r.median, &o, &r),
                verdict(o.median >= 0.9 * c.median, &o, &c)
            );
            add_dp(
                &mut rows,
                summary,
                format!(
                    "{} new connections/s, {e} endpoint{}, {t} client thread{}",
                    path.label(),
                    if e == 1 { "" } else { "s" },
                    if t == 1 { "" } else { "s" }
                ),
                &format!("{}_{key}", path.short()),
                o,
                r,
                c,
                0,
                goal,
            );
        }
    }
    if has_dp(res, Metric::Throughput) {
        let (o, r, c) = (
            tp(PathKind::ExternalToHostPort, Impl::Ours),
            tp(PathKind::ExternalToHostPort, Impl::Reference),
            tp(PathKind::ExternalToHostPort, Impl::Routed),
        );
        let goal = format!(
            "> reference (issue 4): {}",
            verdict(o.median > r.median, &o, &r)
        );
        add_dp(
            &mut rows,
            summary,
            format!("External → hostPort → pod TCP throughput, {n} other mappings (Gbit/s)"),
            "hostport_gbps",
            o,
            r,
            c,
            2,
            goal,
        );
    }
    if has_dp(res, Metric::Rr) {
        let rr = |p, i, k| dp(res, p, Metric::Rr, i, k);
        for (k, label) in [("p50_us", "p50"), ("p99_us", "p99")] {
            let (o, r, c) = (
                rr(PathKind::ExternalToHostPort, Impl::Ours, k),
                rr(PathKind::ExternalToHostPort, Impl::Reference, k),
                rr(PathKind::ExternalToHostPort, Impl::Routed, k),
            );
            add_dp(
                &mut rows,
                summary,
                format!("External → hostPort → pod request/response {label} (µs)"),
                &format!("hostport_rr_{k}"),
                o,
                r,
                c,
                1,
                String::new(),
            );
        }
    }
    if has_dp(res, Metric::ConnRate) {
        let cr = |p, i| dp(res, p, Metric::ConnRate, i, "conn_per_s");
        let (o, r, c) = (
            cr(PathKind::ExternalToHostPort, Impl::Ours),
            cr(PathKind::ExternalToHostPort, Impl::Reference),
            cr(PathKind::ExternalToHostPort, Impl::Routed),
        );
        add_dp(
            &mut rows,
            summary,
            "External → hostPort → pod new connections/s".into(),
            "hostport_conn_per_s",
            o,
            r,
            c,
            0,
            String::new(),
        );
    }
    if has_dp(res, Metric::Throughput) {
        let (o, r, c) = (
            tp(PathKind::PodToPod, Impl::Ours),
            tp(PathKind::PodToPod, Impl::Reference),
            tp(PathKind::PodToPod, Impl::Routed),
        );
        add_dp(
            &mut rows,
            summary,
            "Pod → pod TCP throughput (Gbit/s)".into(),
            "pod_to_pod_gbps",
            o,
            r,
            c,
            2,
            String::new(),
        );
    }
    if !res.fw.is_empty() {
        let most = *super::FW_RULES.last().unwrap_or(&0);
        for (metric, key, label, digits, higher) in FW_METRICS {
            if metric == Metric::Rr && key == "p50_us" {
                continue;
            }
            let o0 = fwv(res, 0, metric, Impl::Ours, key);
            let o = fwv(res, most, metric, Impl::Ours, key);
            let r0 = fwv(res, 0, metric, Impl::Reference, key);
            let r = fwv(res, most, metric, Impl::Reference, key);
            let better = if higher {
                o.median > r.median
            } else {
                o.median < r.median
            };
            let goal = match flat(&o0, &o, higher) {
                Some(f) => format!(
                    "flat in rule count: {}; better than reference: {} (issue 6)",
                    if f { "**met**" } else { "**not met**" },
                    verdict(better, &o, &r)
                ),
                None => "n/a".into(),
            };
            rows.push([
                format!("Pod → external {label} with {most} firewall rules (0 rules)"),
                format!("{} ({})", o.fmt(digits), o0.fmt(digits)),
                format!("{} ({})", r.fmt(digits), r0.fmt(digits)),
                "—".into(),
                format!(
                    "ours/ref {}; {most}/0 rules: ours {}, ref {}",
                    ratio(o.median, r.median),
                    ratio(o.median, o0.median),
                    ratio(r.median, r0.median)
                ),
                goal,
            ]);
            summary.insert(
                format!("firewall_{most}_rules_{}", key),
                json!({ "ours": o.json(), "reference": r.json(),
                        "ours_0_rules": o0.json(), "reference_0_rules": r0.json(),
                        "ours_over_reference": ratio_value(o.median, r.median) }),
            );
        }
    }
    if !ours.is_empty() && !reference.is_empty() {
        let (o, r) = (cpu_per_add(&ours, n), cpu_per_add(&reference, n));
        rows.push([
            "CPU per ADD, plugins + agent (ms)".into(),
            o.fmt(2),
            r.fmt(2),
            "—".into(),
            format!("reference / ours = {}", ratio(r.median, o.median)),
            String::new(),
        ]);
        summary.insert(
            "cpu_per_add_ms".into(),
            json!({ "ours": o.json(), "reference": r.json() }),
        );
        let rss: Vec<f64> = ours
            .iter()
            .filter_map(|r| r.cost.agent_rss_full_kib)
            .map(|k| k as f64 / 1024.0)
            .collect();
        let ipt: Vec<f64> = reference
            .iter()
            .map(|r| r.cost.iptables_rules as f64)
            .collect();
        let oipt: Vec<f64> = ours.iter().map(|r| r.cost.iptables_rules as f64).collect();
        rows.push([
            format!("Node state with {n} pods: agent RSS / iptables rules"),
            format!(
                "{} MiB RSS; {} rules",
                Spread::of(&rss).fmt(1),
                Spread::of(&oipt).fmt(0)
            ),
            format!("no agent; {} rules", Spread::of(&ipt).fmt(0)),
            "—".into(),
            String::new(),
            String::new(),
        ]);
    }
    rows
}

/// Plugin CPU per ADD (mean over calls) plus the agent's CPU over the ADD
/// phase divided by the ADDs: spread over repeats.
fn cpu_per_add(rs: &[&ChurnRun], n: usize) -> Spread {
    let v: Vec<f64> = rs
        .iter()
        .map(|r| {
            let plugins: f64 = r.add.iter().map(|c| c.cpu_ms).sum::<f64>() / n as f64;
            let agent = if r.cost.agent_cpu_add_ms.is_finite() {
                r.cost.agent_cpu_add_ms / n as f64
            } else {
                0.0
            };
            plugins + agent
        })
        .collect();
    Spread::of(&v)
}

fn churn_section(
    md: &mut String,
    cfg: &Config,
    res: &Results,
    summary: &mut serde_json::Map<String, Value>,
) {
    if !cfg.has(Section::Churn) {
        return;
    }
    let ours = runs(res, Impl::Ours);
    let reference = runs(res, Impl::Reference);
    if ours.is_empty() || reference.is_empty() {
        return;
    }
    let n = cfg.pods;
    let _ = writeln!(
        md,
        "## Pod churn: full-chain ADD and DEL latency against pods present\n"
    );
    let _ = writeln!(
        md,
        "Each repeat builds a fresh node for each chain, ADDs {n} pods in order (each with a \
         hostPort mapping{}), then DELs them in reverse, so pod *i*'s ADD and DEL both see *i* \
         other pods. A timed call is one runtime call through the whole conflist: every plugin \
         exec'd in the node netns, IPAM delegated, the result passed down the chain (DEL with \
         the cached result), as containerd does through libcni. Per decile of pods present: the \
         median and p99 of each repeat, shown as `median [min–max]` over the repeats.\n",
        if cfg.extras.contains(&Extra::Bandwidth) {
            format!(
                " and a {}/{} Mbit/s limit",
                super::CHURN_RATE,
                super::CHURN_RATE
            )
        } else {
            String::new()
        }
    );
    md.push_str("| pods present | ADD ours | ADD reference | ref/ours | ADD p99 ours | ADD p99 reference | DEL ours | DEL reference | ref/ours |\n");
    md.push_str("|---|---|---|---|---|---|---|---|---|\n");
    let mut table = Vec::new();
    let mut rows = deciles(n);
    rows.push((0, n - 1));
    let last = rows.len() - 1;
    for (k, (lo, hi)) in rows.iter().copied().enumerate() {
        let ao = bucket(&ours, Op::Add, lo, hi, 50.0);
        let ar = bucket(&reference, Op::Add, lo, hi, 50.0);
        let po = bucket(&ours, Op::Add, lo, hi, 99.0);
        let pr = bucket(&reference, Op::Add, lo, hi, 99.0);
        let dd = bucket(&ours, Op::Del, lo, hi, 50.0);
        let dr = bucket(&reference, Op::Del, lo, hi, 50.0);
        let label = if k == last {
            "**all**".to_string()
        } else {
            format!("{lo}–{hi}")
        };
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {} | {} | {} | {} | {} | {} |",
            ao.fmt(2),
            ar.fmt(2),
            ratio(ar.median, ao.median),
            po.fmt(2),
            pr.fmt(2),
            dd.fmt(2),
            dr.fmt(2),
            ratio(dr.median, dd.median)
        );
        let mut row = serde_json::Map::new();
        row.insert("pods_present".into(), json!([lo, hi]));
        for (imp, rs) in [(Impl::Ours, &ours), (Impl::Reference, &reference)] {
            let mut o = serde_json::Map::new();
            for op in [Op::Add, Op::Del] {
                o.insert(
                    op.name().to_lowercase(),
                    json!({
                        "median": bucket(rs, op, lo, hi, 50.0).json(),
                        "p95": bucket(rs, op, lo, hi, 95.0).json(),
                        "p99": bucket(rs, op, lo, hi, 99.0).json(),
                    }),
                );
            }
            row.insert(imp.key().into(), Value::Object(o));
        }
        table.push(Value::Object(row));
    }
    summary.insert("churn_deciles_ms".into(), Value::Array(table));
    md.push('\n');

    // Where the time goes: per plugin, median over every ADD and DEL.
    let _ = writeln!(
        md,
        "Where an ADD's time goes (median ms per plugin over every ADD of every repeat; the \
         last-decile column is the {}–{} pods present):\n",
        deciles(n).last().map(|d| d.0).unwrap_or(0),
        n - 1
    );
    md.push_str("| plugin | ours | ours, last decile | reference | reference, last decile |\n|---|---|---|---|---|\n");
    let types_o = ours
        .first()
        .map(|r| r.plugin_types.clone())
        .unwrap_or_default();
    let types_r = reference
        .first()
        .map(|r| r.plugin_types.clone())
        .unwrap_or_default();
    let lastd = deciles(n).last().copied().unwrap_or((0, 0));
    let per_plugin = |rs: &[&ChurnRun], k: usize, lo: usize, hi: usize| -> f64 {
        let v: Vec<f64> = rs
            .iter()
            .flat_map(|r| {
                r.add[lo..=hi]
                    .iter()
                    .filter_map(|c| c.plugin_ms.get(k).copied())
            })
            .collect();
        median(&v)
    };
    for k in 0..types_o.len().max(types_r.len()) {
        let _ = writeln!(
            md,
            "| {} / {} | {:.2} | {:.2} | {:.2} | {:.2} |",
            types_o.get(k).map(String::as_str).unwrap_or("?"),
            types_r.get(k).map(String::as_str).unwrap_or("?"),
            per_plugin(&ours, k, 0, n - 1),
            per_plugin(&ours, k, lastd.0, lastd.1),
            per_plugin(&reference, k, 0, n - 1),
            per_plugin(&reference, k, lastd.0, lastd.1),
        );
    }
    md.push('\n');
}

fn datapath_section(md: &mut String, cfg: &Config, res: &Results) {
    if !cfg.has(Section::Datapath) || !has_dp(res, Metric::Throughput) {
        return;
    }
    let _ = writeln!(md, "## Datapath: throughput and request/response latency\n");
    let _ = writeln!(
        md,
        "Three nodes side by side, same addresses: ours, the reference, and the ceiling (the \
         reference bridge with `ipMasq: false`, nothing chained, and a route on the external \
         side back to the pod subnet: plain kernel forwarding). Each node has {} other pods \
         with a hostPort mapping each; the server and client pods are attached last. The other \
         pods are idle, and their bridge ports are taken out of flooding: with more than about \
         1,000 ports on one bridge, one flooded broadcast fills the kernel's per-CPU input \
         backlog (`net.core.netdev_max_backlog`, a global sysctl left alone) and the gateway's \
         ARP reply behind it is dropped, in both chains alike. For the \
         ceiling, \"hostPort\" is the external host connecting to the server pod's own \
         address. Throughput: one iperf3 TCP stream for {} s. Request/response: {} for {} s. \
         Each node takes each measurement in turn, the order rotating between repeats.\n",
        cfg.pods,
        cfg.duration,
        if cfg.sockperf {
            "sockperf ping-pong (14-byte messages, full round trip)"
        } else {
            "14-byte echo round trips with the benchmark's own client"
        },
        cfg.duration
    );
    md.push_str("| path | metric | ours | reference | ceiling | ours/ref | ours/ceiling |\n|---|---|---|---|---|---|---|\n");
    for path in PathKind::ALL {
        for (metric, key, label, digits) in [
            (Metric::Throughput, "gbps", "throughput, Gbit/s", 2),
            (Metric::Rr, "p50_us", "RR p50, µs", 1),
            (Metric::Rr, "p99_us", "RR p99, µs", 1),
        ] {
            let s = |i| dp(res, path, metric, i, key);
            let (o, r, c) = (s(Impl::Ours), s(Impl::Reference), s(Impl::Routed));
            let _ = writeln!(
                md,
                "| {} | {label} | {} | {} | {} | {} | {} |",
                path.label(),
                o.fmt(digits),
                r.fmt(digits),
                c.fmt(digits),
                ratio(o.median, r.median),
                ratio(o.median, c.median)
            );
        }
    }
    md.push('\n');
    let mut any = false;
    for path in PathKind::ALL {
        for metric in [Metric::Throughput, Metric::Rr] {
            let c = dp_counters(res, path, metric, Impl::Ours);
            if !c.is_empty() && metric == Metric::Throughput {
                if !any {
                    md.push_str("Our datapath counters over the throughput runs (a check that the eBPF path carried the traffic):\n\n");
                    any = true;
                }
                let list: Vec<String> = c.iter().map(|(k, v)| format!("{k} {v}")).collect();
                let _ = writeln!(md, "- {}: {}", path.label(), list.join(", "));
            }
        }
    }
    if any {
        md.push('\n');
    }
}

/// The points of the connection-rate grid: (path, value key, endpoints,
/// client threads).
fn conn_grid_points() -> Vec<(PathKind, String, usize, usize)> {
    let mut v = Vec::new();
    for path in PathKind::NAT {
        let counts: &[usize] = if path.masquerade() {
            &[1, super::MANY_ENDPOINTS]
        } else {
            &[1]
        };
        for &e in counts {
            for t in super::CONN_THREADS {
                v.push((path, format!("cps_e{e}_t{t}"), e, t));
            }
        }
    }
    v
}

fn connrate_section(md: &mut String, cfg: &Config, res: &Results) {
    if !cfg.has(Section::Connrate) || !has_dp(res, Metric::ConnRate) {
        return;
    }
    let _ = writeln!(md, "## Connection rate\n");
    let _ = writeln!(
        md,
        "{} client threads open TCP connections for {} s; the server writes one byte and \
         closes (so the server holds TIME_WAIT and the client's ports free up at once); a \
         connection counts when the byte and the close have arrived. A connect or read that \
         waits more than 1 s (a dropped SYN waits that long for its retransmit) counts as failed.\n",
        cfg.concurrency, cfg.duration
    );
    md.push_str("| path | ours | reference | ceiling | ours/ref | ours/ceiling | failed (ours / ref / ceiling) |\n|---|---|---|---|---|---|---|\n");
    for path in PathKind::NAT {
        let s = |i| dp(res, path, Metric::ConnRate, i, "conn_per_s");
        let f = |i| dp(res, path, Metric::ConnRate, i, "failed");
        let (o, r, c) = (s(Impl::Ours), s(Impl::Reference), s(Impl::Routed));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} / {} / {} |",
            path.label(),
            o.fmt(0),
            r.fmt(0),
            c.fmt(0),
            ratio(o.median, r.median),
            ratio(o.median, c.median),
            f(Impl::Ours).fmt(0),
            f(Impl::Reference).fmt(0),
            f(Impl::Routed).fmt(0)
        );
    }
    md.push('\n');
    let _ = writeln!(
        md,
        "The grid: to one endpoint and to {} (ports of the external host), with 1 and 8 \
         client threads; the goal of issue 10 is ≥ 1.5× the reference and ≥ 0.9× the routed \
         ceiling at every point.\n",
        super::MANY_ENDPOINTS
    );
    md.push_str("| path | endpoints | threads | ours | reference | ceiling | ours/ref | ours/ceiling | failed (ours / ref / ceiling) |\n|---|---|---|---|---|---|---|---|---|\n");
    for (path, key, e, t) in conn_grid_points() {
        let g = |i| dp(res, path, Metric::ConnRate, i, &key);
        let f = |i| dp(res, path, Metric::ConnRate, i, &format!("failed_e{e}_t{t}"));
        let (o, r, c) = (g(Impl::Ours), g(Impl::Reference), g(Impl::Routed));
        let _ = writeln!(
            md,
            "| {} | {e} | {t} | {} | {} | {} | {} | {} | {} / {} / {} |",
            path.label(),
            o.fmt(0),
            r.fmt(0),
            c.fmt(0),
            ratio(o.median, r.median),
            ratio(o.median, c.median),
            f(Impl::Ours).fmt(0),
            f(Impl::Reference).fmt(0),
            f(Impl::Routed).fmt(0)
        );
    }
    md.push('\n');
    for path in PathKind::NAT {
        let c = dp_counters(res, path, Metric::ConnRate, Impl::Ours);
        if !c.is_empty() {
            let list: Vec<String> = c.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let _ = writeln!(
                md,
                "- our counters over the {} runs: {}",
                path.label(),
                list.join(", ")
            );
        }
    }
    md.push('\n');
}

fn bandwidth_section(md: &mut String, cfg: &Config, res: &Results) {
    if !cfg.has(Section::Bandwidth) {
        return;
    }
    let _ = writeln!(md, "## Bandwidth: accuracy and latency under load\n");
    if res.bw.is_empty() {
        let _ = writeln!(
            md,
            "Not measured: ebpf-bandwidth is not in the chain (see the header).\n"
        );
        return;
    }
    let _ = writeln!(
        md,
        "Pods with `ingressRate`/`egressRate` set to each rate (burst: 20 ms of the rate, at \
         least 64 KiB). Egress: iperf3 from the pod to the external host; ingress: the same \
         with `-R`. The reference shapes with tbf (ingress) and an ifb device with tbf (egress); \
         ours with an eBPF token bucket on the pod's host-side veth.\n"
    );
    md.push_str("| limit | direction | ours, Mbit/s (% of limit) | reference, Mbit/s (% of limit) |\n|---|---|---|---|\n");
    let bw = |imp: Impl, rate: u64, dir: Dir| -> Spread {
        Spread::of(
            &res.bw
                .iter()
                .filter(|b| b.imp == imp && b.rate_mbit == rate && b.dir == dir)
                .filter_map(|b| b.measured_mbit)
                .collect::<Vec<_>>(),
        )
    };
    for rate in super::BW_RATES {
        for dir in [Dir::Egress, Dir::Ingress] {
            let (o, r) = (bw(Impl::Ours, rate, dir), bw(Impl::Reference, rate, dir));
            let pct = |s: &Spread| {
                if s.is_valid() {
                    format!("{} ({:.1}%)", s.fmt(1), s.median / rate as f64 * 100.0)
                } else {
                    "n/a".into()
                }
            };
            let _ = writeln!(
                md,
                "| {rate} Mbit/s | {} | {} | {} |",
                dir.key(),
                pct(&o),
                pct(&r)
            );
        }
    }
    md.push('\n');
    let _ = writeln!(
        md,
        "Latency from the {} Mbit/s pod to the external host, idle and while iperf3 saturates \
         the limited direction (request/response p50 / p99, µs):\n",
        super::BW_LOAD_RATE
    );
    md.push_str("| direction saturated | ours idle | ours loaded | reference idle | reference loaded |\n|---|---|---|---|---|\n");
    for dir in [Dir::Egress, Dir::Ingress] {
        let cell = |imp: Impl, loaded: bool| -> String {
            let v: Vec<&super::traffic::Rr> = res
                .bw
                .iter()
                .filter(|b| b.imp == imp && b.dir == dir && b.rate_mbit == super::BW_LOAD_RATE)
                .filter_map(|b| {
                    if loaded {
                        b.loaded.as_ref()
                    } else {
                        b.idle.as_ref()
                    }
                })
                .collect();
            if v.is_empty() {
                return "n/a".into();
            }
            let p50 = Spread::of(&v.iter().map(|r| r.p50_us).collect::<Vec<_>>());
            let p99 = Spread::of(&v.iter().map(|r| r.p99_us).collect::<Vec<_>>());
            format!("{} / {}", p50.fmt(0), p99.fmt(0))
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            dir.key(),
            cell(Impl::Ours, false),
            cell(Impl::Ours, true),
            cell(Impl::Reference, false),
            cell(Impl::Reference, true)
        );
    }
    md.push('\n');
}

fn firewall_section(md: &mut String, cfg: &Config, res: &Results) {
    if !cfg.has(Section::Firewall) {
        return;
    }
    let _ = writeln!(md, "## Firewall: cost of rules\n");
    if res.fw.is_empty() {
        let _ = writeln!(
            md,
            "Not measured: ebpf-firewall is not in the chain (see the header).\n"
        );
        return;
    }
    let _ = writeln!(
        md,
        "Pod → external (through masquerade) from client pods with 0, 100 and 1,000 firewall \
         rules, on the same nodes as the datapath runs. Each rule denies TCP to a /24 in \
         10.100.0.0/14 on a 100-port range, so none matches the measured traffic and every \
         rule has to be ruled out. Ours: the rules are the pod's egress `firewallRules` \
         (runtimeConfig), held in the agent's LPM tries and judged once per connection. \
         Reference: the firewall plugin has no rules of its own; an operator's rules go into \
         its admin chain `{}`, which its FORWARD chain jumps to first, so the same rules \
         (with `-s <pod IP>`) are loaded there for the run and flushed after it. Same \
         measurements as the datapath section ({} s each).\n",
        super::session::REFERENCE_ADMIN_CHAIN,
        cfg.duration
    );
    md.push_str("| metric | rules | ours | reference | ours/ref |\n|---|---|---|---|---|\n");
    for (metric, key, label, digits, _) in FW_METRICS {
        for rules in super::FW_RULES {
            let o = fwv(res, rules, metric, Impl::Ours, key);
            let r = fwv(res, rules, metric, Impl::Reference, key);
            let _ = writeln!(
                md,
                "| {label} | {rules} | {} | {} | {} |",
                o.fmt(digits),
                r.fmt(digits),
                ratio(o.median, r.median)
            );
        }
    }
    md.push('\n');
    let errors: Vec<String> = res
        .fw
        .iter()
        .filter_map(|s| {
            s.error.as_ref().map(|e| {
                format!(
                    "{} rules, {}, {}: {e}",
                    s.rules,
                    s.imp.key(),
                    s.metric.key()
                )
            })
        })
        .collect();
    for e in errors {
        let _ = writeln!(md, "- failed: {e}");
    }
    md.push('\n');
}

fn cri_section(
    md: &mut String,
    cfg: &Config,
    res: &Results,
    summary: &mut serde_json::Map<String, Value>,
) {
    if !cfg.has(Section::Cri) {
        return;
    }
    let _ = writeln!(md, "## CRI: pods through containerd\n");
    let ours = cri_runs(res, Impl::Ours);
    let reference = cri_runs(res, Impl::Reference);
    if ours.is_empty() || reference.is_empty() {
        let _ = writeln!(
            md,
            "Not measured (see \"Not measured, and problems seen\").\n"
        );
        return;
    }
    let n = cri_pods(res);
    let _ = writeln!(
        md,
        "Kubelet's path: per repeat, a fresh node per chain with a private containerd of its \
         own (Debian's {}, with its CRI plugin and go-cni) in the node netns, running the \
         chain's conflist (`conflist-ours.json` / `conflist-reference.json`) with every plugin \
         and `loopback` from one bin dir. {n} pods per chain, one at a time, the two chains in \
         turn (the order alternating from pod to pod), so pod *i* sees *i* other sandboxes of \
         its chain. Each pod is a RunPodSandbox as kubelet sends it: a hostPort{} and the \
         `kubernetes.io/ingress-bandwidth` / `egress-bandwidth` annotations ({} each){}.\n\n\
         **Ready** is the time from sending RunPodSandbox until an HTTP GET from the external \
         netns to the node's address and the pod's hostPort returns the page the sandbox \
         serves (polled every 2 ms; a refused connection is retried at once). The sandbox image \
         is busybox httpd instead of a pause that only sleeps, so a sandbox serves as soon as \
         its process runs: ready = RunPodSandbox (netns, the CNI ADDs of `loopback` and the \
         conflist, the sandbox container started by runc) + the first answer through the \
         hostPort. No CreateContainer/StartContainer: their cost is containerd's and runc's, \
         the same for both chains. Then StopPodSandbox (the CNI DELs) and RemovePodSandbox of \
         every pod, in reverse, timed each. Figures: per repeat the median, p95 and p99 over \
         the pods, shown as `median [min–max]` over the repeats.\n",
        containerd_version(),
        if cfg.extras.contains(&Extra::Portmap) {
            ""
        } else {
            " (portmap is not in the chain: ready is the pod's own address answering from the node)"
        },
        format_args!("{}M", super::CHURN_RATE),
        if cfg.extras.contains(&Extra::Bandwidth) {
            ""
        } else {
            "; bandwidth is not in the chain, so the annotations change nothing"
        },
    );
    md.push_str(
        "| per pod (ms) | ours median | ours p95 | ours p99 | reference median | reference p95 | reference p99 | ours / reference (median) |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    let mut js = serde_json::Map::new();
    js.insert("pods".into(), json!(n));
    for (key, label, f) in CRI_METRICS {
        let s = |rs: &[&CriRun], p| cri_stat(rs, f, p, None);
        let (o50, o95, o99) = (s(&ours, 50.0), s(&ours, 95.0), s(&ours, 99.0));
        let (r50, r95, r99) = (
            s(&reference, 50.0),
            s(&reference, 95.0),
            s(&reference, 99.0),
        );
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {} | {} | {} | {} | {} |",
            o50.fmt(1),
            o95.fmt(1),
            o99.fmt(1),
            r50.fmt(1),
            r95.fmt(1),
            r99.fmt(1),
            ratio(o50.median, r50.median)
        );
        js.insert(
            key.into(),
            json!({
                "ours": { "median": o50.json(), "p95": o95.json(), "p99": o99.json() },
                "reference": { "median": r50.json(), "p95": r95.json(), "p99": r99.json() },
                "ours_over_reference": ratio_value(o50.median, r50.median),
            }),
        );
    }
    md.push('\n');
    let ready = CRI_METRICS[0].2;
    let d = deciles(n);
    if d.len() > 1 {
        let (f, l) = (d[0], d[d.len() - 1]);
        let g = |rs: &[&CriRun], b: (usize, usize)| cri_stat(rs, ready, 50.0, Some(b));
        let _ = writeln!(
            md,
            "Ready against pods present (median ms): ours {} with {}–{} other sandboxes, {} with \
             {}–{}; reference {} → {}.\n",
            g(&ours, f).fmt(1),
            f.0,
            f.1,
            g(&ours, l).fmt(1),
            l.0,
            l.1,
            g(&reference, f).fmt(1),
            g(&reference, l).fmt(1)
        );
    }
    let o = cri_stat(&ours, ready, 50.0, None);
    let r = cri_stat(&reference, ready, 50.0, None);
    let met = (o.is_valid() && r.is_valid()).then_some(o.median <= 0.5 * r.median);
    let _ = writeln!(
        md,
        "Goal (issue 13): through containerd's RunPodSandbox, ours ≤ 0.5× the reference — \
         ready median ours / reference = {}: **{}**.\n",
        ratio(o.median, r.median),
        match met {
            Some(true) => "met",
            Some(false) => "not met",
            None => "n/a",
        }
    );
    if o.is_valid() && r.is_valid() {
        let _ = writeln!(
            md,
            "The reference takes {:.1} ms more per pod (medians): that is the difference of the \
             two CNI chains as containerd runs them; the rest of RunPodSandbox (the netns, \
             containerd's bookkeeping, runc starting the sandbox) is the same for both. The goal \
             needs ours at {:.1} ms or less.\n",
            r.median - o.median,
            0.5 * r.median
        );
    }
    js.insert(
        "goal_ready_ours_at_most_half_of_reference".into(),
        json!(met),
    );
    let start =
        |rs: &[&CriRun]| Spread::of(&rs.iter().map(|r| r.containerd_start_s).collect::<Vec<_>>());
    let _ = writeln!(
        md,
        "containerd up (CRI answering, images imported), not part of any pod's time: ours {} s, \
         reference {} s.\n",
        start(&ours).fmt(1),
        start(&reference).fmt(1)
    );
    for r in res.cri.iter().filter(|r| r.error.is_some()) {
        let _ = writeln!(
            md,
            "- failed: {} repeat {}: {}",
            r.imp.key(),
            r.rep + 1,
            r.error.as_deref().unwrap_or("")
        );
    }
    summary.insert("cri_ms".into(), Value::Object(js));
}

fn containerd_version() -> String {
    let v = first_line(proc::cmd("dpkg-query").args(["-W", "-f=${Version}", "containerd"]));
    if v.is_empty() {
        "containerd".into()
    } else {
        format!("containerd {v}")
    }
}

fn cost_section(
    md: &mut String,
    cfg: &Config,
    res: &Results,
    summary: &mut serde_json::Map<String, Value>,
) {
    if !cfg.has(Section::Cost) {
        return;
    }
    let ours = runs(res, Impl::Ours);
    let reference = runs(res, Impl::Reference);
    if ours.is_empty() && reference.is_empty() {
        return;
    }
    let n = cfg.pods;
    let _ = writeln!(md, "## Cost\n");
    let _ = writeln!(
        md,
        "Read during the churn runs. CPU per call: user + system time of the plugin processes \
         and everything they ran (IPAM, iptables, tc), from getrusage(RUSAGE_CHILDREN) around \
         each call; the agent's CPU is its /proc utime + stime over the whole ADD (DEL) phase \
         divided by the calls. Pinned memory: `bytes_memlock` of every map and program pinned \
         under the agent's bpffs root (bpftool); maps are preallocated, so this does not grow \
         with pods.\n"
    );
    let sp = |rs: &[&ChurnRun], f: &dyn Fn(&ChurnRun) -> Option<f64>| -> Spread {
        Spread::of(&rs.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
    };
    let kib = |k: Option<u64>| k.map(|k| k as f64 / 1024.0);
    let mean_cpu = |r: &ChurnRun, op: Op| -> Option<f64> {
        let c = calls(r, op);
        Some(c.iter().map(|c| c.cpu_ms).sum::<f64>() / c.len().max(1) as f64)
    };
    let agent_cpu = |r: &ChurnRun, op: Op| -> Option<f64> {
        let v = match op {
            Op::Add => r.cost.agent_cpu_add_ms,
            Op::Del => r.cost.agent_cpu_del_ms,
        };
        v.is_finite().then(|| v / n as f64)
    };
    let rows: Vec<(String, Spread, Spread, usize)> = vec![
        (
            "CPU per ADD: plugin processes, mean (ms)".into(),
            sp(&ours, &|r| mean_cpu(r, Op::Add)),
            sp(&reference, &|r| mean_cpu(r, Op::Add)),
            2,
        ),
        (
            "CPU per ADD: agent (ms)".into(),
            sp(&ours, &|r| agent_cpu(r, Op::Add)),
            Spread::of(&[]),
            3,
        ),
        (
            "CPU per DEL: plugin processes, mean (ms)".into(),
            sp(&ours, &|r| mean_cpu(r, Op::Del)),
            sp(&reference, &|r| mean_cpu(r, Op::Del)),
            2,
        ),
        (
            "CPU per DEL: agent (ms)".into(),
            sp(&ours, &|r| agent_cpu(r, Op::Del)),
            Spread::of(&[]),
            3,
        ),
        (
            "Agent RSS, idle (MiB)".into(),
            sp(&ours, &|r| kib(r.cost.agent_rss_idle_kib)),
            Spread::of(&[]),
            1,
        ),
        (
            format!("Agent RSS with {n} pods (MiB)"),
            sp(&ours, &|r| kib(r.cost.agent_rss_full_kib)),
            Spread::of(&[]),
            1,
        ),
        (
            "Agent RSS after every DEL (MiB)".into(),
            sp(&ours, &|r| kib(r.cost.agent_rss_after_del_kib)),
            Spread::of(&[]),
            1,
        ),
        (
            "Pinned BPF maps (count)".into(),
            sp(&ours, &|r| r.cost.bpf.map(|b| b.maps as f64)),
            Spread::of(&[]),
            0,
        ),
        (
            "Pinned BPF map memory (MiB)".into(),
            sp(&ours, &|r| {
                r.cost.bpf.map(|b| b.map_bytes as f64 / 1048576.0)
            }),
            Spread::of(&[]),
            1,
        ),
        (
            "Pinned BPF programs (count / KiB)".into(),
            sp(&ours, &|r| r.cost.bpf.map(|b| b.progs as f64)),
            Spread::of(&[]),
            0,
        ),
        (
            format!("Pinned BPF links with {n} pods"),
            sp(&ours, &|r| r.cost.bpf.map(|b| b.links as f64)),
            Spread::of(&[]),
            0,
        ),
        (
            format!("iptables rules in the node netns with {n} pods"),
            sp(&ours, &|r| Some(r.cost.iptables_rules as f64)),
            sp(&reference, &|r| Some(r.cost.iptables_rules as f64)),
            0,
        ),
        (
            format!("nft ruleset lines with {n} pods"),
            sp(&ours, &|r| Some(r.cost.nft_lines as f64)),
            sp(&reference, &|r| Some(r.cost.nft_lines as f64)),
            0,
        ),
        (
            format!("tc qdiscs (not noqueue/clsact) with {n} pods"),
            sp(&ours, &|r| Some(r.cost.qdiscs as f64)),
            sp(&reference, &|r| Some(r.cost.qdiscs as f64)),
            0,
        ),
        (
            format!("ifb devices with {n} pods"),
            sp(&ours, &|r| Some(r.cost.ifbs as f64)),
            sp(&reference, &|r| Some(r.cost.ifbs as f64)),
            0,
        ),
    ];
    md.push_str("| | ours | reference |\n|---|---|---|\n");
    let mut js = serde_json::Map::new();
    for (label, o, r, d) in &rows {
        let rtext = if r.is_valid() {
            r.fmt(*d)
        } else {
            "—".into()
        };
        let mut otext = o.fmt(*d);
        if label.starts_with("Pinned BPF programs") {
            let kb = sp(&ours, &|r| r.cost.bpf.map(|b| b.prog_bytes as f64 / 1024.0));
            otext = format!("{} / {}", o.fmt(0), kb.fmt(0));
        }
        let _ = writeln!(md, "| {label} | {otext} | {rtext} |");
        js.insert(
            label.clone(),
            json!({ "ours": o.json(), "reference": r.json() }),
        );
    }
    if let Some(k) = res.agent_rss_after_traffic_kib {
        let _ = writeln!(
            md,
            "| Agent RSS after the traffic runs (MiB) | {:.1} | — |",
            k as f64 / 1024.0
        );
        js.insert(
            "agent_rss_after_traffic_mib".into(),
            json!(r3(k as f64 / 1024.0)),
        );
    }
    md.push('\n');
    summary.insert("cost".into(), Value::Object(js));
}

/// Observations the figures imply, worded for the reader: drops our
/// datapath counted, rate limits off by more than 5%, plugins of ours
/// slower than their reference counterpart.
fn findings(cfg: &Config, res: &Results) -> Vec<String> {
    let mut out = Vec::new();
    let mut drops: BTreeMap<(PathKind, Metric, String), u64> = BTreeMap::new();
    for s in res.samples.iter().filter(|s| s.imp == Impl::Ours) {
        for (k, v) in &s.counters {
            if k.contains("NoPort") || k.contains("Dropped") {
                *drops.entry((s.path, s.metric, k.clone())).or_insert(0) += v;
            }
        }
    }
    for ((path, metric, k), v) in drops {
        let why = match k.as_str() {
            "snatNoPort" => {
                " (no free masquerade source port: the agent's port range, 61000–65535 by \
                 default, is allocated per remote address and port, a closed TCP binding keeps \
                 its port for the closed timeout, 10 s by default, and a new binding probes 32 \
                 ports from a random start; each drop costs the client a 1 s SYN retransmit)"
            }
            "hostPortNoPort" => " (no free port for a hostPort SNAT binding)",
            _ => "",
        };
        out.push(format!(
            "Our datapath dropped {v} packets counted as `{k}` during the {} {} runs{why}.",
            path.label(),
            metric.key().replace('_', " ")
        ));
    }
    let failed = |imp: Impl, path: PathKind| dp(res, path, Metric::ConnRate, imp, "failed");
    for path in PathKind::NAT {
        let (o, r) = (failed(Impl::Ours, path), failed(Impl::Reference, path));
        if o.is_valid() && o.median > 0.0 && o.median > 2.0 * r.median.max(0.5) {
            out.push(format!(
                "{}: {} connection attempts per run failed (connect or read waited over 1 s) \
                 through ours, {} through the reference.",
                path.label(),
                o.fmt(0),
                r.fmt(0)
            ));
        }
    }
    for imp in [Impl::Ours, Impl::Reference] {
        for rate in super::BW_RATES {
            for dir in [Dir::Egress, Dir::Ingress] {
                let m = Spread::of(
                    &res.bw
                        .iter()
                        .filter(|b| b.imp == imp && b.rate_mbit == rate && b.dir == dir)
                        .filter_map(|b| b.measured_mbit)
                        .collect::<Vec<_>>(),
                );
                let pct = m.median / rate as f64 * 100.0;
                if m.is_valid() && !(95.0..=105.0).contains(&pct) {
                    out.push(format!(
                        "{}: the {rate} Mbit/s {} limit let {} Mbit/s through ({pct:.0}% of the limit).",
                        imp.label(),
                        dir.key(),
                        m.fmt(1)
                    ));
                }
            }
        }
    }
    let ours = runs(res, Impl::Ours);
    let reference = runs(res, Impl::Reference);
    if let (Some(o), Some(r)) = (ours.first(), reference.first()) {
        let n = cfg.pods;
        let per = |rs: &[&ChurnRun], k: usize| -> f64 {
            median(
                &rs.iter()
                    .flat_map(|r| r.add[..n.min(r.add.len())].iter())
                    .filter_map(|c| c.plugin_ms.get(k).copied())
                    .collect::<Vec<_>>(),
            )
        };
        for k in 0..o.plugin_types.len().min(r.plugin_types.len()) {
            let (a, b) = (per(&ours, k), per(&reference, k));
            if a > b * 1.1 {
                out.push(format!(
                    "ADD of {} takes {:.1} ms (median), {} the reference's {} ({:.1} ms).",
                    o.plugin_types[k],
                    a,
                    ratio(a, b),
                    r.plugin_types[k],
                    b
                ));
            }
        }
    }
    // Which of our plugins makes ADD grow with the pods present.
    if let Some(o) = ours.first() {
        let n = cfg.pods;
        let d = deciles(n);
        let (f, l) = (d[0], d[d.len() - 1]);
        let per = |k: usize, lo: usize, hi: usize| -> f64 {
            median(
                &ours
                    .iter()
                    .flat_map(|r| r.add[lo..=hi.min(r.add.len().saturating_sub(1))].iter())
                    .filter_map(|c| c.plugin_ms.get(k).copied())
                    .collect::<Vec<_>>(),
            )
        };
        for (k, ty) in o.plugin_types.iter().enumerate() {
            let (a, b) = (per(k, f.0, f.1), per(k, l.0, l.1));
            if n >= 100 && b > a * 1.25 && b - a > 2.0 {
                out.push(format!(
                    "ADD of {ty} grows with the pods present: {a:.1} ms (median) with {}–{} \
                     pods, {b:.1} ms with {}–{}.",
                    f.0, f.1, l.0, l.1
                ));
            }
        }
        let idle = Spread::of(
            &ours
                .iter()
                .filter_map(|r| r.cost.agent_rss_idle_kib.map(|k| k as f64 / 1024.0))
                .collect::<Vec<_>>(),
        );
        let after = Spread::of(
            &ours
                .iter()
                .filter_map(|r| r.cost.agent_rss_after_del_kib.map(|k| k as f64 / 1024.0))
                .collect::<Vec<_>>(),
        );
        if idle.is_valid() && after.is_valid() && after.median > idle.median * 1.5 {
            out.push(format!(
                "The agent's RSS does not come back after every pod is deleted: {} MiB idle, \
                 {} MiB after {n} ADDs and {n} DELs.",
                idle.fmt(1),
                after.fmt(1)
            ));
        }
    }
    out.dedup();
    out
}

fn problems_section(md: &mut String, cfg: &Config, res: &Results) {
    let f = findings(cfg, res);
    if !f.is_empty() {
        let _ = writeln!(
            md,
            "## Findings
"
        );
        for i in &f {
            let _ = writeln!(md, "- {i}");
        }
        md.push('\n');
    }
    let mut items: Vec<String> = Vec::new();
    for (e, why) in &cfg.extras_missing {
        items.push(format!("{}: {why}", e.ours()));
    }
    items.extend(res.not_measured.iter().cloned());
    items.extend(res.notes.iter().cloned());
    for path in PathKind::ALL {
        for metric in [Metric::Throughput, Metric::Rr, Metric::ConnRate] {
            for imp in [Impl::Ours, Impl::Reference, Impl::Routed] {
                for e in dp_errors(res, path, metric, imp) {
                    items.push(format!(
                        "{} {} {}: {e}",
                        imp.label(),
                        path.label(),
                        metric.key()
                    ));
                }
            }
        }
    }
    for r in &res.cri {
        if let Some(e) = &r.error {
            items.push(format!("cri {} repeat {}: {e}", r.imp.label(), r.rep + 1));
        }
    }
    for b in &res.bw {
        if let Some(e) = &b.error {
            items.push(format!(
                "{} bandwidth {} Mbit/s {}: {e}",
                b.imp.label(),
                b.rate_mbit,
                b.dir.key()
            ));
        }
    }
    items.sort();
    items.dedup();
    let _ = writeln!(md, "## Not measured, and problems seen\n");
    if items.is_empty() {
        let _ = writeln!(md, "Nothing: every section ran and every path worked.\n");
    } else {
        for i in items {
            let _ = writeln!(md, "- {i}");
        }
        md.push('\n');
    }
}

fn method_section(md: &mut String, cfg: &Config) {
    let _ = writeln!(md, "## How it is measured\n");
    let _ = writeln!(
        md,
        "- Everything runs in network namespaces the benchmark creates (a node, an external \
         host on 198.18.0.0/15, one netns per pod) and deletes; the root namespace is not \
         touched and no traffic leaves these namespaces.\n\
         - Our agent runs in each node netns of ours with a private socket, state dir and bpffs \
         (hostPort DNAT mode: {}). The external host has no route to the pods except in the \
         ceiling node, so masquerade is really exercised.\n\
         - The conflists are in `conflist-ours.json` and `conflist-reference.json` next to this \
         report; every raw sample is in `report.json` (`raw`), from which `cargo xtask bench \
         --report-only` re-renders this report and the charts.\n",
        cfg.hostport_mode
    );
}

/// Draws the charts; returns `(file, alt text)` of those drawn.
fn draw_charts(
    cfg: &Config,
    res: &Results,
    dir: &Path,
    notes: &mut Vec<String>,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut try_draw = |file: &str, alt: &str, r: Result<()>| match r {
        Ok(()) => out.push((file.to_string(), alt.to_string())),
        Err(e) => notes.push(format!("{file} not drawn: {e:#}")),
    };
    let ours = runs(res, Impl::Ours);
    let reference = runs(res, Impl::Reference);
    if cfg.has(Section::Churn) && !ours.is_empty() && !reference.is_empty() {
        let n = cfg.pods;
        let w = (n / 40).max(1);
        let panel = |op: Op| -> LinePanel {
            let mut lines = Vec::new();
            for (imp, rs, color) in [(Impl::Ours, &ours, 0), (Impl::Reference, &reference, 1)] {
                let mut med = Vec::new();
                let mut p95 = Vec::new();
                let mut lo = 0;
                while lo < n {
                    let hi = (lo + w - 1).min(n - 1);
                    let v: Vec<f64> = rs.iter().flat_map(|r| ms(r, op, lo, hi)).collect();
                    let x = (lo + hi) as f64 / 2.0;
                    med.push((x, median(&v)));
                    p95.push((x, percentile(&v, 95.0)));
                    lo = hi + 1;
                }
                let name = match imp {
                    Impl::Ours => "ours",
                    _ => "reference",
                };
                lines.push(Line {
                    label: format!("{name} median"),
                    color,
                    thin: false,
                    points: med,
                });
                lines.push(Line {
                    label: format!("{name} p95"),
                    color,
                    thin: true,
                    points: p95,
                });
            }
            LinePanel {
                title: format!("Full-chain {} latency vs pods present", op.name()),
                x_desc: "pods already attached".into(),
                y_desc: "ms per call".into(),
                lines,
            }
        };
        try_draw(
            "churn.png",
            "Full-chain ADD and DEL latency against pods present, ours and the reference",
            charts::lines(
                &dir.join("churn.png"),
                (1500, 560),
                &[panel(Op::Add), panel(Op::Del)],
                true,
            ),
        );
    }
    let impls = [
        (Impl::Ours, "ours (eBPF)", 0),
        (Impl::Reference, "reference (iptables)", 1),
        (Impl::Routed, "routed, no NAT (ceiling)", 2),
    ];
    let group = |path: PathKind, metric: Metric, key: &str| BarGroup {
        name: path.short().to_string(),
        bars: impls
            .iter()
            .map(|(imp, label, color)| Bar {
                label: label.to_string(),
                color: *color,
                value: dp(res, path, metric, *imp, key),
            })
            .collect(),
    };
    let mut panels = Vec::new();
    if has_dp(res, Metric::Throughput) {
        panels.push(BarPanel {
            title: "TCP throughput, 1 stream (higher is better)".into(),
            y_desc: "Gbit/s".into(),
            groups: PathKind::ALL
                .iter()
                .map(|p| group(*p, Metric::Throughput, "gbps"))
                .collect(),
            hline: None,
        });
    }
    if has_dp(res, Metric::ConnRate) {
        panels.push(BarPanel {
            title: "New TCP connections/s (higher is better)".into(),
            y_desc: "connections/s".into(),
            groups: PathKind::NAT
                .iter()
                .map(|p| group(*p, Metric::ConnRate, "conn_per_s"))
                .collect(),
            hline: None,
        });
    }
    if has_dp(res, Metric::Rr) {
        for (k, l) in [("p50_us", "p50"), ("p99_us", "p99")] {
            panels.push(BarPanel {
                title: format!("Request/response round trip, {l} (lower is better)"),
                y_desc: "µs".into(),
                groups: PathKind::ALL
                    .iter()
                    .map(|p| group(*p, Metric::Rr, k))
                    .collect(),
                hline: None,
            });
        }
    }
    if !panels.is_empty() {
        let cols = panels.len().min(2);
        let rows = panels.len().div_ceil(cols);
        try_draw(
            "datapath.png",
            "Throughput, connections/s and request/response latency per path: ours, reference, ceiling",
            charts::bars(
                &dir.join("datapath.png"),
                (750 * cols as u32, 520 * rows as u32),
                cols,
                &panels,
            ),
        );
    }
    if !res.bw.is_empty() {
        let acc = |imp: Impl, rate: u64, dir: Dir| {
            Spread::of(
                &res.bw
                    .iter()
                    .filter(|b| b.imp == imp && b.rate_mbit == rate && b.dir == dir)
                    .filter_map(|b| b.measured_mbit.map(|m| m / rate as f64 * 100.0))
                    .collect::<Vec<_>>(),
            )
        };
        let mut groups = Vec::new();
        for rate in super::BW_RATES {
            for dir in [Dir::Egress, Dir::Ingress] {
                groups.push(BarGroup {
                    name: format!("{rate}M {}", dir.key()),
                    bars: vec![
                        Bar {
                            label: "ours".into(),
                            color: 0,
                            value: acc(Impl::Ours, rate, dir),
                        },
                        Bar {
                            label: "reference".into(),
                            color: 1,
                            value: acc(Impl::Reference, rate, dir),
                        },
                    ],
                });
            }
        }
        let lat = |imp: Impl, dir: Dir, loaded: bool| {
            Spread::of(
                &res.bw
                    .iter()
                    .filter(|b| b.imp == imp && b.dir == dir)
                    .filter_map(|b| if loaded { b.loaded } else { b.idle })
                    .map(|r| r.p99_us)
                    .collect::<Vec<_>>(),
            )
        };
        let mut lgroups = Vec::new();
        for dir in [Dir::Egress, Dir::Ingress] {
            for loaded in [false, true] {
                lgroups.push(BarGroup {
                    name: format!("{} {}", dir.key(), if loaded { "loaded" } else { "idle" }),
                    bars: vec![
                        Bar {
                            label: "ours".into(),
                            color: 0,
                            value: lat(Impl::Ours, dir, loaded),
                        },
                        Bar {
                            label: "reference".into(),
                            color: 1,
                            value: lat(Impl::Reference, dir, loaded),
                        },
                    ],
                });
            }
        }
        try_draw(
            "bandwidth.png",
            "Rate-limit accuracy and latency under load, ours and the reference",
            charts::bars(
                &dir.join("bandwidth.png"),
                (1500, 520),
                2,
                &[
                    BarPanel {
                        title: "Measured rate, % of the limit (100 is exact)".into(),
                        y_desc: "% of limit".into(),
                        groups,
                        hline: Some(100.0),
                    },
                    BarPanel {
                        title: format!(
                            "RR p99 at the {} Mbit/s limit, idle vs saturated",
                            super::BW_LOAD_RATE
                        ),
                        y_desc: "µs".into(),
                        groups: lgroups,
                        hline: None,
                    },
                ],
            ),
        );
    }
    if !res.fw.is_empty() {
        let panels: Vec<LinePanel> = FW_METRICS
            .iter()
            .filter(|(_, key, ..)| *key != "p50_us")
            .map(|(metric, key, label, _, higher)| LinePanel {
                title: format!(
                    "{} ({} is better)",
                    label.split(',').next().unwrap_or(label),
                    if *higher { "higher" } else { "lower" }
                ),
                x_desc: "rules on the pod".into(),
                y_desc: label.split(',').next_back().unwrap_or(label).trim().into(),
                lines: [(Impl::Ours, "ours", 0), (Impl::Reference, "reference", 1)]
                    .iter()
                    .map(|(imp, name, color)| Line {
                        label: (*name).into(),
                        color: *color,
                        thin: false,
                        points: super::FW_RULES
                            .iter()
                            .map(|r| (*r as f64, fwv(res, *r, *metric, *imp, key).median))
                            .filter(|(_, y)| y.is_finite())
                            .collect(),
                    })
                    .collect(),
            })
            .collect();
        try_draw(
            "firewall.png",
            "Pod → external throughput, p99 latency and connections/s against firewall rules, ours and the reference",
            charts::lines(&dir.join("firewall.png"), (1800, 520), &panels, false),
        );
    }
    let (cri_o, cri_r) = (cri_runs(res, Impl::Ours), cri_runs(res, Impl::Reference));
    if !cri_o.is_empty() && !cri_r.is_empty() {
        let n = cri_pods(res);
        let w = (n / 25).max(1);
        let panel = |f: fn(&CriPod) -> f64, title: &str| -> LinePanel {
            let mut lines = Vec::new();
            for (rs, name, color) in [(&cri_o, "ours", 0), (&cri_r, "reference", 1)] {
                let mut med = Vec::new();
                let mut p95 = Vec::new();
                let mut lo = 0;
                while lo < n {
                    let hi = (lo + w - 1).min(n - 1);
                    let v: Vec<f64> = rs
                        .iter()
                        .flat_map(|r| r.pods.iter().skip(lo).take(hi + 1 - lo).map(f))
                        .collect();
                    let x = (lo + hi) as f64 / 2.0;
                    med.push((x, median(&v)));
                    p95.push((x, percentile(&v, 95.0)));
                    lo = hi + 1;
                }
                let keep = |v: Vec<(f64, f64)>| -> Vec<(f64, f64)> {
                    v.into_iter().filter(|(_, y)| y.is_finite()).collect()
                };
                lines.push(Line {
                    label: format!("{name} median"),
                    color,
                    thin: false,
                    points: keep(med),
                });
                // A p95 of fewer than five pods is their maximum: left out.
                if w * rs.len() >= 5 {
                    lines.push(Line {
                        label: format!("{name} p95"),
                        color,
                        thin: true,
                        points: keep(p95),
                    });
                }
            }
            LinePanel {
                title: title.into(),
                x_desc: "other sandboxes of the chain".into(),
                y_desc: "ms per pod".into(),
                lines,
            }
        };
        try_draw(
            "cri.png",
            "Through containerd: RunPodSandbox until the hostPort answers, and StopPodSandbox + RemovePodSandbox, against pods present, ours and the reference",
            charts::lines(
                &dir.join("cri.png"),
                (1500, 560),
                &[
                    panel(|p| p.ready_ms, "RunPodSandbox → hostPort answers"),
                    panel(CriPod::stop_remove_ms, "StopPodSandbox + RemovePodSandbox"),
                ],
                false,
            ),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deciles_cover_all_pods() {
        assert_eq!(deciles(1000)[0], (0, 99));
        assert_eq!(deciles(1000)[9], (900, 999));
        assert_eq!(deciles(3), vec![(0, 0), (1, 1), (2, 2)]);
        assert_eq!(deciles(25).len(), 10);
        assert_eq!(deciles(25).last(), Some(&(23, 24)));
    }

    #[test]
    fn around_500_is_a_window_or_the_last_decile() {
        assert_eq!(around_500(1000), (450, 549));
        assert_eq!(around_500(20), (18, 19));
    }
}
