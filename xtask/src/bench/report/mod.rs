//! The report: target/bench/report.md (what a user reads), report.json
//! (the summary plus every raw sample, enough to re-render the report with
//! `--report-only`), the PNG charts, and the two conflists.
mod figures;
mod findings;
mod goals;
mod measures;
mod sections;

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::stats::r3;
use super::{Config, Results, Section};
use crate::proc;

use self::{figures::draw_charts, findings::problems_section, goals::summary_rows, sections::*};

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

pub(super) fn first_line(c: &mut std::process::Command) -> String {
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
