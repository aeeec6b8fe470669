//! What the report reads from the results: the churn buckets, datapath
//! and firewall spreads, the CRI pod times, and the verdict of a goal.
use std::collections::BTreeMap;

use crate::bench::cri::{CriPod, CriRun};
use crate::bench::stats::{percentile, Spread};
use crate::bench::{ChurnRun, Impl, Metric, PathKind, Results};

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Add,
    Del,
}

impl Op {
    pub(super) fn name(self) -> &'static str {
        match self {
            Op::Add => "ADD",
            Op::Del => "DEL",
        }
    }
}

pub(super) fn calls(r: &ChurnRun, op: Op) -> &[crate::bench::Call] {
    match op {
        Op::Add => &r.add,
        Op::Del => &r.del,
    }
}

pub(super) fn ms(r: &ChurnRun, op: Op, lo: usize, hi: usize) -> Vec<f64> {
    calls(r, op)[lo..=hi.min(calls(r, op).len().saturating_sub(1))]
        .iter()
        .map(|c| c.ms)
        .collect()
}

pub(super) fn runs(res: &Results, imp: Impl) -> Vec<&ChurnRun> {
    res.churn.iter().filter(|r| r.imp == imp).collect()
}

/// Per-repeat percentile of the pods in `lo..=hi`: its spread over repeats.
pub(super) fn bucket(runs: &[&ChurnRun], op: Op, lo: usize, hi: usize, p: f64) -> Spread {
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
pub(super) fn around_500(n: usize) -> (usize, usize) {
    if n >= 550 {
        (450, 549)
    } else {
        deciles(n).last().copied().unwrap_or((0, 0))
    }
}

pub(super) fn dp(res: &Results, path: PathKind, metric: Metric, imp: Impl, key: &str) -> Spread {
    let v: Vec<f64> = res
        .samples
        .iter()
        .filter(|s| s.path == path && s.metric == metric && s.imp == imp && s.error.is_none())
        .filter_map(|s| s.values.get(key).copied())
        .collect();
    Spread::of(&v)
}

pub(super) fn dp_errors(res: &Results, path: PathKind, metric: Metric, imp: Impl) -> Vec<String> {
    let mut e: Vec<String> = res
        .samples
        .iter()
        .filter(|s| s.path == path && s.metric == metric && s.imp == imp)
        .filter_map(|s| s.error.clone())
        .collect();
    e.dedup();
    e
}

pub(super) fn dp_counters(
    res: &Results,
    path: PathKind,
    metric: Metric,
    imp: Impl,
) -> BTreeMap<String, u64> {
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
pub(super) fn fwv(res: &Results, rules: usize, metric: Metric, imp: Impl, key: &str) -> Spread {
    let v: Vec<f64> = res
        .fw
        .iter()
        .filter(|s| s.rules == rules && s.metric == metric && s.imp == imp && s.error.is_none())
        .filter_map(|s| s.values.get(key).copied())
        .collect();
    Spread::of(&v)
}

/// The firewall-rule metrics: (metric, value key, label, digits, higher is better).
pub(super) const FW_METRICS: [(Metric, &str, &str, usize, bool); 4] = [
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
pub(super) fn flat(none: &Spread, most: &Spread, higher_better: bool) -> Option<bool> {
    if !none.is_valid() || !most.is_valid() {
        return None;
    }
    Some(if higher_better {
        most.median >= none.median * 0.9
    } else {
        most.median <= none.median * 1.1
    })
}

pub(super) fn has_dp(res: &Results, metric: Metric) -> bool {
    res.samples.iter().any(|s| s.metric == metric)
}

pub(super) fn cri_runs(res: &Results, imp: Impl) -> Vec<&CriRun> {
    res.cri.iter().filter(|r| r.imp == imp).collect()
}

/// The `cri` section's per-pod times: (JSON key, label, value of a pod).
pub(super) type CriMetric = (&'static str, &'static str, fn(&CriPod) -> f64);
pub(super) const CRI_METRICS: [CriMetric; 5] = [
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
pub(super) fn cri_stat(
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
pub(super) fn cri_pods(res: &Results) -> usize {
    res.cri.iter().map(|r| r.pods.len()).max().unwrap_or(0)
}

/// `met` / `not met`, and whether the two ranges overlap (then the
/// difference is within this run's noise).
pub(super) fn verdict(met: bool, a: &Spread, b: &Spread) -> String {
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
