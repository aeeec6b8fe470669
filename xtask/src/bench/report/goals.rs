//! The summary table: each headline figure, ours beside the reference
//! and the ceiling, with the goal it is held to and whether it was met.

use serde_json::{json, Value};

use super::measures::*;
use super::sections::*;
use crate::bench::stats::{median, r3, ratio, ratio_value, slope, Spread};
use crate::bench::{ChurnRun, Config, Impl, Metric, PathKind, Results, Section};

/// The headline rows: `[what, ours, reference, ceiling, ratio, goal]`.
pub(super) fn summary_rows(
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
        let most = *crate::bench::FW_RULES.last().unwrap_or(&0);
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
