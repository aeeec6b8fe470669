//! `cargo xtask bench-churn`: pod churn through our chain and the reference
//! one, in the same run, on the same pod namespaces.
//!
//! For each chain: a fresh node netns and IPAM dir; ADD pods 0..N in order,
//! then DEL them in reverse. So pod i's ADD and its DEL both see exactly i
//! other pods attached, and "pods present" buckets line up for ADD, DEL and
//! their sum. Namespaces are made before and removed after the timed part.
//! Both chains get the same node: an uplink to an "external" netns
//! (198.18.0.0/15) as default route; ours also gets its agent there.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use crate::agent::Agent;
use crate::cni::{self, Attachment, Conflist, Runtime};
use crate::netns::{add_uplink, Netns, NetnsSet, TempDir};
use crate::proc;

/// The kernel's bridge port limit (BR_MAX_PORTS).
const MAX_PODS: usize = 1023;
const POD_SUBNET: &str = "10.244.0.0/16";
/// The newest version both chains speak (the reference v1.1.1 stops at 1.0.0).
const CNI_VERSION: &str = "1.0.0";

struct Chain {
    key: &'static str,
    bridge: &'static str,
    ipam: &'static str,
    cni_path: Vec<PathBuf>,
}

struct Samples {
    /// Milliseconds, indexed by pod.
    add: Vec<f64>,
    del: Vec<f64>,
}

#[derive(clap::Args)]
pub struct Opts {
    /// Number of pods (each gets its own netns); a bridge holds at most 1024 ports.
    #[arg(long, default_value_t = 1000)]
    pods: usize,
    /// Skip `setup` (the tools are known to be there).
    #[arg(long)]
    no_setup: bool,
    /// `ipMasq` in both chains' bridge config (reference: iptables rules
    /// per pod; ours: eBPF SNAT).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    ip_masq: bool,
    /// Run only this chain (repeatable); default: both.
    #[arg(long, value_parser = ["ebpf", "reference"])]
    chain: Vec<String>,
}

pub fn run(opts: &Opts) -> Result<()> {
    let Opts {
        pods,
        no_setup,
        ip_masq,
        ..
    } = *opts;
    crate::require_root("bench-churn")?;
    ensure!(
        (1..=MAX_PODS).contains(&pods),
        "--pods must be 1..={MAX_PODS} (one bridge holds at most 1024 ports)"
    );
    if !no_setup {
        crate::setup::run(false, &[])?;
    }
    let bin_dir = crate::build_bins(true)?;
    let reference = PathBuf::from("/usr/lib/cni");
    for p in [
        bin_dir.join("ebpf-bridge"),
        bin_dir.join("ebpf-host-local"),
        reference.join("bridge"),
        reference.join("host-local"),
    ] {
        ensure!(p.is_file(), "{} is missing", p.display());
    }
    let all = [
        Chain {
            key: "ebpf",
            bridge: "ebpf-bridge",
            ipam: "ebpf-host-local",
            cni_path: vec![bin_dir.clone(), reference.clone()],
        },
        Chain {
            key: "reference",
            bridge: "bridge",
            ipam: "host-local",
            cni_path: vec![reference.clone()],
        },
    ];

    let chains: Vec<&Chain> = all
        .iter()
        .filter(|c| opts.chain.is_empty() || opts.chain.iter().any(|k| k == c.key))
        .collect();

    proc::heading(&format!("Creating {pods} pod netns (not timed)"));
    let t = Instant::now();
    let set = NetnsSet::create("cnib", pods)?;
    println!("    {:.1} s", t.elapsed().as_secs_f64());

    let mut results = Vec::new();
    for chain in chains {
        proc::heading(&format!(
            "{} + {}: ADD {pods} pods, then DEL them (ipMasq {ip_masq})",
            chain.bridge, chain.ipam
        ));
        let s = churn(chain, &set, ip_masq)?;
        results.push((chain, s));
    }

    proc::heading("Removing the pod netns (not timed)");
    drop(set);

    report(pods, ip_masq, &results)
}

fn churn(chain: &Chain, set: &NetnsSet, ip_masq: bool) -> Result<Samples> {
    // Declaration order matters: dropped in reverse, the agent goes first
    // (its bpffs is mounted inside tmp), then the namespaces, then tmp.
    let tmp = TempDir::create("cni-xtask-bench")?;
    let node = Netns::create("cnib-node")?;
    let ext = Netns::create("cnib-ext")?;
    add_uplink(&node, &ext, "up0", "198.18.0.1/24", "198.18.0.2/24")?;
    let agent = match chain.key {
        "ebpf" => {
            let a = Agent::start(&chain.cni_path[0], &node, &tmp.path.join("agent"), &["up0"])?;
            a.wait_for_uplink("198.18.0.1")?;
            Some(a)
        }
        _ => None,
    };
    let mut plugin = json!({
        "type": chain.bridge,
        "bridge": "cni-bench0",
        "isGateway": true,
        "isDefaultGateway": true,
        "ipMasq": ip_masq,
        "ipam": {
            "type": chain.ipam,
            "ranges": [[{ "subnet": POD_SUBNET }]],
            "dataDir": tmp.path.join("ipam"),
        }
    });
    if let (Some(a), Some(obj)) = (&agent, plugin.as_object_mut()) {
        obj.extend(a.conf_keys());
    }
    let list =
        Conflist::new(json!({ "cniVersion": CNI_VERSION, "name": "bench", "plugins": [plugin] }))?;
    let rt = Runtime::new(&node.path(), chain.cni_path.clone())?;
    let n = set.names.len();
    let atts: Vec<Attachment> = set
        .names
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let id = format!("bench-{}-{}-{i:04}", chain.key, std::process::id());
            Attachment::pod(&id, &crate::netns::netns_path(ns), &format!("pod-{i}"))
        })
        .collect();

    let mut cached = Vec::with_capacity(n);
    let mut add = Vec::with_capacity(n);
    for (i, att) in atts.iter().enumerate() {
        let t = Instant::now();
        let res = rt
            .add(&list, att)
            .with_context(|| format!("ADD of pod {i}"))?;
        add.push(t.elapsed().as_secs_f64() * 1e3);
        cached.push(res);
        progress("ADD", i + 1, n);
    }
    let store = tmp.path.join("ipam").join("bench");
    let held = cni::ipam_reservations(&store)?.len();
    ensure!(held == n, "{n} pods attached but {held} IPs reserved");

    let mut del = vec![0.0; n];
    for i in (0..n).rev() {
        let t = Instant::now();
        rt.del(&list, &atts[i], Some(&cached[i]))
            .with_context(|| format!("DEL of pod {i}"))?;
        del[i] = t.elapsed().as_secs_f64() * 1e3;
        progress("DEL", n - i, n);
    }
    let held = cni::ipam_reservations(&store)?.len();
    ensure!(
        held == 0,
        "{held} IPs still reserved after DEL of every pod"
    );
    let veths = node.ip(&["-o", "link", "show", "type", "veth"])?;
    let left = veths.lines().filter(|l| !l.contains(": up0@")).count();
    ensure!(
        left == 0,
        "{left} pod veths left in the node netns after DEL"
    );
    Ok(Samples { add, del })
}

fn progress(what: &str, done: usize, n: usize) {
    if done == n || done.is_multiple_of((n / 10).max(1)) {
        println!("    {what} {done}/{n}");
    }
}

/// Nearest-rank percentile of unsorted samples.
fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

fn stats(v: &[f64]) -> Value {
    json!({ "median": round3(percentile(v, 50.0)), "p95": round3(percentile(v, 95.0)), "n": v.len() })
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Pod indices per decile of "pods present" (fewer buckets when N < 10).
fn deciles(n: usize) -> Vec<(usize, usize)> {
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

fn report(pods: usize, ip_masq: bool, results: &[(&Chain, Samples)]) -> Result<()> {
    let buckets = deciles(pods);
    let sums: Vec<Vec<f64>> = results
        .iter()
        .map(|(_, s)| s.add.iter().zip(&s.del).map(|(a, d)| a + d).collect())
        .collect();

    proc::heading(&format!(
        "Churn of {pods} pods, ms (median/p95); pods present = other pods attached"
    ));
    let names: Vec<String> = results.iter().map(|(c, _)| c.key.to_string()).collect();
    let mut header = format!("{:>12}", "pods present");
    for op in ["ADD", "DEL", "ADD+DEL"] {
        for n in &names {
            header.push_str(&format!(" {:>18}", format!("{op} {n}")));
        }
    }
    println!("{header}");
    let cell = |v: &[f64]| format!("{:.2}/{:.2}", percentile(v, 50.0), percentile(v, 95.0));
    let mut rows: Vec<(String, usize, usize)> = buckets
        .iter()
        .map(|&(lo, hi)| (format!("{lo}-{hi}"), lo, hi))
        .collect();
    rows.push(("all".into(), 0, pods - 1));
    for (label, lo, hi) in &rows {
        let mut line = format!("{label:>12}");
        for op in 0..3 {
            for (k, (_, s)) in results.iter().enumerate() {
                let v: &[f64] = match op {
                    0 => &s.add[*lo..=*hi],
                    1 => &s.del[*lo..=*hi],
                    _ => &sums[k][*lo..=*hi],
                };
                line.push_str(&format!(" {:>18}", cell(v)));
            }
        }
        println!("{line}");
    }

    let mut impls = serde_json::Map::new();
    for (k, (chain, s)) in results.iter().enumerate() {
        let dec: Vec<Value> = buckets
            .iter()
            .map(|&(lo, hi)| {
                json!({
                    "pods_present": [lo, hi],
                    "add": stats(&s.add[lo..=hi]),
                    "del": stats(&s.del[lo..=hi]),
                    "add_del": stats(&sums[k][lo..=hi]),
                })
            })
            .collect();
        impls.insert(
            chain.key.to_string(),
            json!({
                "chain": [chain.bridge, chain.ipam],
                "overall": { "add": stats(&s.add), "del": stats(&s.del), "add_del": stats(&sums[k]) },
                "deciles": dec,
                "samples_ms": {
                    "add": s.add.iter().map(|x| round3(*x)).collect::<Vec<_>>(),
                    "del": s.del.iter().map(|x| round3(*x)).collect::<Vec<_>>(),
                },
            }),
        );
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let doc = json!({
        "benchmark": "churn",
        "pods": pods,
        "ip_masq": ip_masq,
        "unit": "ms",
        "order": "ADD pods 0..N-1, then DEL N-1..0; pod i sees i other pods attached at both",
        "timed": "one runtime call through the conflist: plugin exec (in the node netns) with IPAM delegation",
        "kernel": kernel.trim(),
        "implementations": impls,
    });
    let dir = crate::target_dir().join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("churn.json");
    std::fs::write(&path, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("\nWrote {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 95.0), 95.0);
        assert_eq!(percentile(&[3.0], 95.0), 3.0);
    }

    #[test]
    fn deciles_cover_all_pods() {
        assert_eq!(deciles(1000)[0], (0, 99));
        assert_eq!(deciles(1000)[9], (900, 999));
        assert_eq!(deciles(3), vec![(0, 0), (1, 1), (2, 2)]);
        assert_eq!(deciles(25).len(), 10);
        assert_eq!(deciles(25).last(), Some(&(23, 24)));
    }
}
