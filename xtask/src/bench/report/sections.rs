//! The report's sections after the summary, one function each: churn,
//! datapath, connection rate, bandwidth, firewall rules, CRI, cost, and how
//! it is measured.
use std::fmt::Write as _;

use serde_json::{json, Value};

use super::first_line;
use super::measures::*;
use crate::bench::cri::CriRun;
use crate::bench::stats::{median, r3, ratio, ratio_value, Spread};
use crate::bench::{ChurnRun, Config, Dir, Extra, Impl, Metric, PathKind, Results, Section};
use crate::proc;

/// Plugin CPU per ADD (mean over calls) plus the agent's CPU over the ADD
/// phase divided by the ADDs: spread over repeats.
pub(super) fn cpu_per_add(rs: &[&ChurnRun], n: usize) -> Spread {
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

pub(super) fn churn_section(
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
                crate::bench::CHURN_RATE,
                crate::bench::CHURN_RATE
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

pub(super) fn datapath_section(md: &mut String, cfg: &Config, res: &Results) {
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
pub(super) fn conn_grid_points() -> Vec<(PathKind, String, usize, usize)> {
    let mut v = Vec::new();
    for path in PathKind::NAT {
        let counts: &[usize] = if path.masquerade() {
            &[1, crate::bench::MANY_ENDPOINTS]
        } else {
            &[1]
        };
        for &e in counts {
            for t in crate::bench::CONN_THREADS {
                v.push((path, format!("cps_e{e}_t{t}"), e, t));
            }
        }
    }
    v
}

pub(super) fn connrate_section(md: &mut String, cfg: &Config, res: &Results) {
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
        crate::bench::MANY_ENDPOINTS
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

pub(super) fn bandwidth_section(md: &mut String, cfg: &Config, res: &Results) {
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
    for rate in crate::bench::BW_RATES {
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
        crate::bench::BW_LOAD_RATE
    );
    md.push_str("| direction saturated | ours idle | ours loaded | reference idle | reference loaded |\n|---|---|---|---|---|\n");
    for dir in [Dir::Egress, Dir::Ingress] {
        let cell = |imp: Impl, loaded: bool| -> String {
            let v: Vec<&crate::bench::traffic::Rr> = res
                .bw
                .iter()
                .filter(|b| {
                    b.imp == imp && b.dir == dir && b.rate_mbit == crate::bench::BW_LOAD_RATE
                })
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

pub(super) fn firewall_section(md: &mut String, cfg: &Config, res: &Results) {
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
        crate::bench::session::REFERENCE_ADMIN_CHAIN,
        cfg.duration
    );
    md.push_str("| metric | rules | ours | reference | ours/ref |\n|---|---|---|---|---|\n");
    for (metric, key, label, digits, _) in FW_METRICS {
        for rules in crate::bench::FW_RULES {
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

pub(super) fn cri_section(
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
        format_args!("{}M", crate::bench::CHURN_RATE),
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

pub(super) fn containerd_version() -> String {
    let v = first_line(proc::cmd("dpkg-query").args(["-W", "-f=${Version}", "containerd"]));
    if v.is_empty() {
        "containerd".into()
    } else {
        format!("containerd {v}")
    }
}

pub(super) fn cost_section(
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

pub(super) fn method_section(md: &mut String, cfg: &Config) {
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
