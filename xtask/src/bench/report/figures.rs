//! The PNG charts of the report (drawn with `charts`).
use std::path::Path;

use anyhow::Result;

use super::measures::*;
use crate::bench::charts::{self, Bar, BarGroup, BarPanel, Line, LinePanel};
use crate::bench::cri::CriPod;
use crate::bench::stats::{median, percentile, Spread};
use crate::bench::{Config, Dir, Impl, Metric, PathKind, Results, Section};

/// Draws the charts; returns `(file, alt text)` of those drawn.
pub(super) fn draw_charts(
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
        for rate in crate::bench::BW_RATES {
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
                            crate::bench::BW_LOAD_RATE
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
                        points: crate::bench::FW_RULES
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
