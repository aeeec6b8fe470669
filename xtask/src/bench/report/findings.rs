//! What the figures imply and what could not be measured: the
//! "Findings" and "Not measured, and problems seen" sections.
use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::measures::*;
use crate::bench::stats::{median, ratio, Spread};
use crate::bench::{ChurnRun, Config, Dir, Impl, Metric, PathKind, Results};

/// Observations the figures imply, worded for the reader: drops our
/// datapath counted, rate limits off by more than 5%, plugins of ours
/// slower than their reference counterpart.
pub(super) fn findings(cfg: &Config, res: &Results) -> Vec<String> {
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
        for rate in crate::bench::BW_RATES {
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

pub(super) fn problems_section(md: &mut String, cfg: &Config, res: &Results) {
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
