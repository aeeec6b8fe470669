//! What the agent's `/metrics` exports (Prometheus / OpenMetrics text), read
//! fresh from the pinned maps, the attachment records and the kernel's link
//! counters at every scrape. Nothing is cached between scrapes, so the
//! series of a pod exist exactly while its record does: a deleted pod's
//! series disappear with its DEL, and the numbers are the datapath's own
//! (they survive agent restarts, as the maps do).
//!
//! Families (all prefixed `cni_ebpf_`):
//! - `agent_build_info{version}`, `agent_ready` (1 when /readyz is 200);
//! - `datapath_<counter>_total`: every datapath counter of `cni-agent
//!   status` (snake case: `snatNoPort` is `datapath_snat_no_port_total`);
//! - `map_capacity{map}`, `map_entries{map}` (hash-like maps only);
//! - `nat_ports_in_use{uplink,address,protocol}`,
//!   `nat_bindings{uplink,address,protocol}`, `nat_port_range_size{uplink,address}`;
//! - per pod attachment, labelled `network`, `container_id`, `interface`:
//!   `pod_packets_total`/`pod_bytes_total`/`pod_dropped_packets_total`
//!   `{direction="to_pod"|"from_pod"}` (the host veth's kernel counters),
//!   `pod_rate_limit_{passed,dropped}_{packets,bytes}_total{direction}` and
//!   `pod_rate_limit_bits_per_second{direction}` (ebpf-bandwidth),
//!   `pod_firewall_packets_total{direction="ingress"|"egress",verdict}` and
//!   `pod_firewall_dropped_packets_total{reason}` (ebpf-firewall).
use std::collections::BTreeMap;

use cni_ebpf_common::fw;
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};

use super::{health::Health, ops::Paths};
use crate::{
    datapath::{
        conntrack::NatTable, occupancy::occupancy, pins::read_stats, policy::PolicyMaps,
        rate::RateMap, uplink::UplinkMap,
    },
    netlink::{LinkCounters, Netlink},
    state::record::{Entry, Record, VethHook},
};

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `snatNoPort` -> `snat_no_port`.
fn snake(camel: &str) -> String {
    let mut out = String::new();
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A registry being filled for one scrape. Families are registered on
/// first use, so one without series (no pod with a rate limit, say) is not
/// exported at all.
struct Scrape {
    reg: Registry,
    counters: BTreeMap<String, Family<Labels, Counter>>,
    gauges: BTreeMap<String, Family<Labels, Gauge>>,
}

impl Scrape {
    fn counter(&mut self, name: &str, help: &str, l: Labels, v: u64) {
        let fam = self.counters.entry(name.to_string()).or_insert_with(|| {
            let f = Family::<Labels, Counter>::default();
            self.reg.register(name, help, f.clone());
            f
        });
        fam.get_or_create(&l).inc_by(v);
    }

    fn gauge(&mut self, name: &str, help: &str, l: Labels, v: i64) {
        let fam = self.gauges.entry(name.to_string()).or_insert_with(|| {
            let f = Family::<Labels, Gauge>::default();
            self.reg.register(name, help, f.clone());
            f
        });
        fam.get_or_create(&l).set(v);
    }
}

/// The attachment labels of a record.
fn pod_labels(r: &Record, extra: &[(&str, &str)]) -> Labels {
    let mut l = labels(&[
        ("network", &r.key.network),
        ("container_id", &r.key.container_id),
        ("interface", &r.key.ifname),
    ]);
    l.extend(labels(extra));
    l
}

fn direction(hook: VethHook) -> &'static str {
    match hook {
        VethHook::ToPod => "to_pod",
        VethHook::FromPod => "from_pod",
    }
}

/// Why the agent is not ready, if it is not: the datapath's maps cannot be
/// read, or the background worker has stopped or stalled.
pub fn not_ready(paths: &Paths, health: &Health) -> Option<String> {
    if let Err(e) = read_stats(&paths.layout()) {
        return Some(format!("datapath not loaded: {e}"));
    }
    health.problem()
}

/// The whole exposition for one scrape.
pub fn render(paths: &Paths, health: &Health) -> Result<String, std::fmt::Error> {
    let layout = paths.layout();
    let mut s = Scrape {
        reg: Registry::with_prefix("cni_ebpf"),
        counters: BTreeMap::new(),
        gauges: BTreeMap::new(),
    };
    s.reg.register(
        "agent_build",
        "The running agent's version",
        Info::new(labels(&[("version", env!("CARGO_PKG_VERSION"))])),
    );
    s.gauge(
        "agent_ready",
        "1 when the datapath is loaded and the background worker healthy (/readyz is 200)",
        Vec::new(),
        i64::from(not_ready(paths, health).is_none()),
    );

    for (name, v) in read_stats(&layout).unwrap_or_default() {
        s.counter(
            &format!("datapath_{}", snake(name)),
            &format!("Datapath counter {name} (as `cni-agent status` shows it)"),
            Vec::new(),
            v,
        );
    }

    for o in occupancy(&layout) {
        s.gauge(
            "map_capacity",
            "Entries a pinned eBPF map can hold (max_entries)",
            labels(&[("map", o.name)]),
            i64::from(o.capacity),
        );
        if let Some(n) = o.entries {
            s.gauge(
                "map_entries",
                "Entries in a pinned eBPF map (hash, LRU and LPM maps)",
                labels(&[("map", o.name)]),
                gauge(n),
            );
        }
    }

    nat(&mut s, &layout);
    pods(&mut s, paths);

    let mut out = String::new();
    encode(&mut out, &s.reg)?;
    Ok(out)
}

/// NAT ports in use per uplink address and protocol, with the range.
fn nat(s: &mut Scrape, layout: &crate::datapath::pins::PinLayout) {
    let uplinks = UplinkMap::open(layout)
        .map(|u| u.configs())
        .unwrap_or_default();
    let name_of = |index: u32| {
        nix::net::if_::if_indextoname(index)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|_| format!("ifindex{index}"))
    };
    for (index, addrs, min, max) in &uplinks {
        for addr in addrs {
            s.gauge(
                "nat_port_range_size",
                "Source ports the masquerade hands out on an uplink (--nat-ports)",
                labels(&[("uplink", &name_of(*index)), ("address", &addr.to_string())]),
                i64::from(max.saturating_sub(*min)) + 1,
            );
        }
    }
    let Ok(table) = NatTable::open(layout) else {
        return;
    };
    for u in table.ports_in_use() {
        let uplink = uplinks
            .iter()
            .find(|(_, addrs, _, _)| addrs.contains(&u.addr))
            .map(|(i, ..)| name_of(*i))
            .unwrap_or_default();
        let l = labels(&[
            ("uplink", &uplink),
            ("address", &u.addr.to_string()),
            ("protocol", u.proto),
        ]);
        s.gauge(
            "nat_ports_in_use",
            "Distinct masquerade source ports held on an uplink address",
            l.clone(),
            gauge(u.ports as u64),
        );
        s.gauge(
            "nat_bindings",
            "Masquerade bindings (pod flows) on an uplink address",
            l,
            gauge(u.bindings as u64),
        );
    }
}

/// Per attachment: the host veth's counters, rate-limit and firewall
/// counters.
fn pods(s: &mut Scrape, paths: &Paths) {
    let layout = paths.layout();
    let records = paths.records().list(None).unwrap_or_default();
    if records.is_empty() {
        return;
    }
    let links: BTreeMap<String, LinkCounters> = Netlink::connect()
        .and_then(|nl| nl.link_counters())
        .unwrap_or_default();
    let buckets = RateMap::open(&layout).map(|m| m.list()).unwrap_or_default();
    let policy = PolicyMaps::open(&layout).ok();
    for r in &records {
        for e in &r.entries {
            match e {
                Entry::Link { name } => {
                    let Some(c) = links.get(name) else { continue };
                    // The host end: what it transmits goes to the pod.
                    for (dir, packets, bytes, dropped) in [
                        ("to_pod", c.tx_packets, c.tx_bytes, c.tx_dropped),
                        ("from_pod", c.rx_packets, c.rx_bytes, c.rx_dropped),
                    ] {
                        let l = pod_labels(r, &[("direction", dir)]);
                        s.counter(
                            "pod_packets",
                            "Packets through the pod's host veth",
                            l.clone(),
                            packets,
                        );
                        s.counter(
                            "pod_bytes",
                            "Bytes through the pod's host veth",
                            l.clone(),
                            bytes,
                        );
                        s.counter(
                            "pod_dropped_packets",
                            "Packets the pod's host veth dropped (kernel counter)",
                            l,
                            dropped,
                        );
                    }
                }
                Entry::RateLimit { ifname, hook, .. } => {
                    let dir = match hook {
                        VethHook::ToPod => "to-pod",
                        VethHook::FromPod => "from-pod",
                    };
                    let Some(b) = buckets
                        .iter()
                        .find(|b| &b.ifname == ifname && b.direction == dir)
                    else {
                        continue;
                    };
                    let l = pod_labels(r, &[("direction", direction(*hook))]);
                    for (name, help, v) in [
                        (
                            "pod_rate_limit_passed_packets",
                            "Packets the pod's rate limit let through",
                            b.passed_packets,
                        ),
                        (
                            "pod_rate_limit_passed_bytes",
                            "Bytes the pod's rate limit let through",
                            b.passed_bytes,
                        ),
                        (
                            "pod_rate_limit_dropped_packets",
                            "Packets the pod's rate limit dropped",
                            b.dropped_packets,
                        ),
                        (
                            "pod_rate_limit_dropped_bytes",
                            "Bytes the pod's rate limit dropped",
                            b.dropped_bytes,
                        ),
                    ] {
                        s.counter(name, help, l.clone(), v);
                    }
                    s.gauge(
                        "pod_rate_limit_bits_per_second",
                        "The pod's configured rate limit",
                        l,
                        gauge(b.rate_bps),
                    );
                }
                Entry::Firewall(spec) => {
                    let Some(p) = policy.as_ref() else { continue };
                    let c = p.counters(spec.ifindex);
                    for (dir, verdict, slot) in [
                        ("ingress", "allowed", fw::STAT_INGRESS_ALLOWED),
                        ("ingress", "dropped", fw::STAT_INGRESS_DROPPED),
                        ("egress", "allowed", fw::STAT_EGRESS_ALLOWED),
                        ("egress", "dropped", fw::STAT_EGRESS_DROPPED),
                    ] {
                        s.counter(
                            "pod_firewall_packets",
                            "Packets the pod's firewall rules allowed or dropped (ingress: to the pod)",
                            pod_labels(r, &[("direction", dir), ("verdict", verdict)]),
                            c[slot],
                        );
                    }
                    for (reason, slot) in [
                        ("ingress_policy", fw::STAT_POLICY_DROPPED),
                        ("spoofed_ip", fw::STAT_SPOOFED_IP),
                        ("spoofed_mac", fw::STAT_SPOOFED_MAC),
                        ("spoofed_arp", fw::STAT_SPOOFED_ARP),
                        ("spoofed_nd", fw::STAT_SPOOFED_ND),
                        ("other", fw::STAT_OTHER_DROPPED),
                    ] {
                        s.counter(
                            "pod_firewall_dropped_packets",
                            "Packets the pod's firewall dropped besides its rules, by reason",
                            pod_labels(r, &[("reason", reason)]),
                            c[slot],
                        );
                    }
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_names_are_snake_case() {
        assert_eq!(snake("snatNoPort"), "snat_no_port");
        assert_eq!(snake("fragFirstRemembered"), "frag_first_remembered");
    }

    #[test]
    fn an_agent_without_a_datapath_renders_and_is_not_ready() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = Paths {
            state_dir: dir.path().join("state"),
            bpffs_root: dir.path().join("bpffs"),
        };
        let health = Health::new(std::time::Duration::from_secs(1));
        assert!(not_ready(&paths, &health).is_some());
        let text = render(&paths, &health).expect("render");
        assert!(
            text.contains("cni_ebpf_agent_build_info{version=\""),
            "{text}"
        );
        assert!(text.contains("cni_ebpf_agent_ready 0"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
