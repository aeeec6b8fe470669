//! The agent's HTTP endpoint during real traffic: a pod behind the full
//! masquerade + firewall + bandwidth chain sends through the uplink (TCP
//! masqueraded, a UDP burst well over its 1 Mbit/s egress limit, UDP to a
//! port its firewall rules deny), and `/metrics` scraped before and after
//! shows the datapath counters, map occupancy, NAT ports in use on the
//! uplink and the pod's own packets, rate-limit drops and firewall drops
//! move; once the pod is deleted its series are gone. `/healthz` and
//! `/readyz` answer 200; other paths, methods and oversized requests are
//! refused.
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use cni_tests::agentctl::AgentProc;
use cni_tests::prelude::*;
use cni_tests::traffic::{in_netns, tcp_echo, TcpEchoServer};
use cni_tests::uplink::{masq_conf, External, UPLINK_IF};

const NET: &str = "metricsnet";
const BRIDGE_NAME: &str = "cnimet0";
const ADDR: &str = "127.0.0.1:9964";
const ECHO_PORT: u16 = 7200;
const DENIED_PORT: u16 = 9999;
const CONTAINER: &str = "metrics-ctr";

/// One HTTP/1.1 request from inside the node; (status, body).
fn http(node: &Node, request: String) -> (u16, String) {
    in_netns(&node.ns, move || {
        let mut s =
            TcpStream::connect_timeout(&ADDR.parse().expect("addr"), Duration::from_secs(5))
                .expect("connect to the metrics endpoint");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        // The server may close before reading all of an oversized request.
        let _ = s.write_all(request.as_bytes());
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    })
}

fn get(node: &Node, path: &str) -> (u16, String) {
    http(
        node,
        format!("GET {path} HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n"),
    )
}

/// A scrape: (metric name, labels) -> value.
type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

fn scrape(node: &Node) -> Samples {
    let (status, body) = get(node, "/metrics");
    assert_eq!(status, 200, "/metrics: {body}");
    assert!(
        body.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF"
    );
    let mut out = Samples::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("series value");
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let inner = rest.strip_suffix('}').expect("closing brace");
                let labels = inner
                    .split("\",")
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (k, v) = p.split_once("=\"").expect("label");
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                (n.to_string(), labels)
            }
            None => (series.to_string(), BTreeMap::new()),
        };
        out.insert((name, labels), value.parse().expect("value"));
    }
    out
}

/// The value of the one series of `name` whose labels include `want`.
fn value(s: &Samples, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let mut hits = s.iter().filter(|((n, l), _)| {
        n == name
            && want
                .iter()
                .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
    });
    let first = hits.next().map(|(_, v)| *v);
    assert!(
        hits.next().is_none(),
        "{name} {want:?} matches several series"
    );
    first
}

#[track_caller]
fn must(s: &Samples, name: &str, want: &[(&str, &str)]) -> f64 {
    value(s, name, want).unwrap_or_else(|| {
        let names: Vec<&String> = s.keys().map(|(n, _)| n).collect();
        panic!("no series {name} {want:?}; have {names:?}")
    })
}

#[test]
fn metrics_move_with_traffic_and_a_deleted_pods_series_go() {
    require_e2e!();
    let node = Node::new("metr");
    node.ns.ip(&["link", "set", "lo", "up"]);
    let ext = External::direct(&node);
    let _agent = AgentProc::start(&node, &["--metrics-address", ADDR]);

    let (status, body) = get(&node, "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = get(&node, "/readyz");
    assert_eq!((status, body.as_str()), (200, "ok\n"), "ready once serving");

    let mut bridge = masq_conf(&node, NET, BRIDGE_NAME, &ext.pod_subnet());
    let obj = bridge.as_object_mut().expect("object");
    obj.remove("name");
    obj.remove("cniVersion");
    let mut firewall = json!({"type": "ebpf-firewall", "capabilities": {"firewallRules": true}});
    merge(&mut firewall, &node.path_keys());
    let mut bandwidth = json!({"type": "ebpf-bandwidth", "capabilities": {"bandwidth": true}});
    merge(&mut bandwidth, &node.path_keys());
    let list = json!({
        "cniVersion": "1.0.0",
        "name": NET,
        "plugins": [bridge, firewall, bandwidth],
    });
    let pod = node.pod("metrpod");
    let rt = node.runtime(Impl::Ours);
    let mut att = Attachment::new(CONTAINER, &pod, "eth0");
    att.capability_args.insert(
        "bandwidth".into(),
        json!({"egressRate": 1_000_000, "egressBurst": 8_000}),
    );
    att.capability_args.insert(
        "firewallRules".into(),
        json!({"egress": {"default": "allow", "rules": [
            {"action": "deny", "cidr": format!("{}/32", ext.ext_addr), "protocol": "udp", "ports": DENIED_PORT}
        ]}}),
    );
    let result = rt
        .add_list(&list, &att)
        .unwrap_or_else(|o| panic!("ADD: {o}"));

    let pod_l = |extra: &[(&'static str, &'static str)]| {
        let mut v = vec![
            ("network", NET),
            ("container_id", CONTAINER),
            ("interface", "eth0"),
        ];
        v.extend_from_slice(extra);
        v
    };
    let before = scrape(&node);
    assert_eq!(
        must(&before, "cni_ebpf_agent_build_info", &[]),
        1.0,
        "build info"
    );
    assert_eq!(must(&before, "cni_ebpf_agent_ready", &[]), 1.0);
    assert_eq!(
        must(&before, "cni_ebpf_map_capacity", &[("map", "SNAT_ORIG")]),
        262_144.0
    );
    assert_eq!(
        must(&before, "cni_ebpf_map_entries", &[("map", "MASQ_SOURCES")]),
        1.0,
        "the pod's masquerade source"
    );
    assert_eq!(
        must(
            &before,
            "cni_ebpf_pod_rate_limit_bits_per_second",
            &pod_l(&[("direction", "from_pod")])
        ),
        1_000_000.0
    );
    assert!(
        must(
            &before,
            "cni_ebpf_nat_port_range_size",
            &[("uplink", UPLINK_IF)]
        ) > 4000.0,
        "the default --nat-ports range"
    );

    // Traffic: a masqueraded TCP exchange (its binding stays while we
    // scrape), a UDP burst of 2 MB against a 1 Mbit/s limit, and UDP to a
    // denied port.
    let server = TcpEchoServer::start(&ext.ns, ECHO_PORT);
    let far = |port| SocketAddr::new(ext.ext_addr.into(), port);
    let held = in_netns(&pod, || {
        let s = TcpStream::connect_timeout(&far(ECHO_PORT), Duration::from_secs(5))
            .expect("pod -> external");
        (&s).write_all(b"held open\n").expect("send");
        let mut b = [0u8; 64];
        let n = (&s).read(&mut b).expect("echo");
        assert!(n > 0);
        s
    });
    tcp_echo(&pod, far(ECHO_PORT), "one more").expect("echo");
    in_netns(&pod, || {
        let u = UdpSocket::bind("0.0.0.0:0").expect("udp");
        // Denied first: the rate limit sees the pod's packets before the
        // firewall does, and the burst empties its bucket.
        for _ in 0..20 {
            let _ = u.send_to(b"denied", far(DENIED_PORT));
        }
        let payload = [7u8; 1000];
        for _ in 0..2000 {
            let _ = u.send_to(&payload, far(9));
        }
    });

    let after = scrape(&node);
    let grew = |name: &str, want: &[(&str, &str)]| {
        let a = value(&before, name, want).unwrap_or(0.0);
        let b = must(&after, name, want);
        assert!(b > a, "{name} {want:?} did not move: {a} -> {b}");
        eprintln!("{name} {want:?}: {a} -> {b}");
    };
    grew("cni_ebpf_datapath_snat_translated_total", &[]);
    grew("cni_ebpf_datapath_snat_replies_translated_total", &[]);
    grew("cni_ebpf_datapath_snat_port_kept_total", &[]);
    grew("cni_ebpf_datapath_rate_limit_dropped_total", &[]);
    grew("cni_ebpf_datapath_firewall_dropped_total", &[]);
    grew(
        "cni_ebpf_pod_packets_total",
        &pod_l(&[("direction", "from_pod")]),
    );
    grew(
        "cni_ebpf_pod_bytes_total",
        &pod_l(&[("direction", "to_pod")]),
    );
    grew(
        "cni_ebpf_pod_rate_limit_dropped_packets_total",
        &pod_l(&[("direction", "from_pod")]),
    );
    grew(
        "cni_ebpf_pod_rate_limit_passed_bytes_total",
        &pod_l(&[("direction", "from_pod")]),
    );
    grew(
        "cni_ebpf_pod_firewall_packets_total",
        &pod_l(&[("direction", "egress"), ("verdict", "dropped")]),
    );
    grew(
        "cni_ebpf_pod_firewall_packets_total",
        &pod_l(&[("direction", "egress"), ("verdict", "allowed")]),
    );
    let dropped = must(
        &after,
        "cni_ebpf_pod_rate_limit_dropped_packets_total",
        &pod_l(&[("direction", "from_pod")]),
    );
    assert!(
        dropped > 500.0,
        "most of a 2 MB burst over 1 Mbit/s is dropped: {dropped}"
    );
    assert!(must(&after, "cni_ebpf_map_entries", &[("map", "SNAT_ORIG")]) >= 1.0);
    assert!(
        must(
            &after,
            "cni_ebpf_nat_ports_in_use",
            &[("uplink", UPLINK_IF), ("protocol", "tcp")]
        ) >= 1.0,
        "the held connection's port"
    );
    assert!(
        must(
            &after,
            "cni_ebpf_nat_bindings",
            &[("uplink", UPLINK_IF), ("protocol", "udp")]
        ) >= 1.0
    );
    drop(held);
    drop(server);

    // The pod goes: so do its series.
    rt.del_list(&list, &att, Some(&result))
        .unwrap_or_else(|o| panic!("DEL: {o}"));
    let gone = scrape(&node);
    let left: Vec<_> = gone
        .keys()
        .filter(|(_, l)| l.get("container_id").map(String::as_str) == Some(CONTAINER))
        .collect();
    assert!(left.is_empty(), "series of the deleted pod: {left:?}");
    assert_eq!(
        must(&gone, "cni_ebpf_map_entries", &[("map", "MASQ_SOURCES")]),
        0.0
    );
    // Counters of the datapath stay (they are the node's, not the pod's).
    assert!(must(&gone, "cni_ebpf_datapath_snat_translated_total", &[]) >= 1.0);

    // What the endpoint refuses.
    assert_eq!(get(&node, "/nope").0, 404);
    assert_eq!(
        http(
            &node,
            "POST /metrics HTTP/1.1\r\nHost: node\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                .into()
        )
        .0,
        405
    );
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nHost: node\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let (status, _) = http(&node, huge);
    assert_ne!(status, 200, "an oversized request head is refused");
    // The endpoint still serves after that.
    assert_eq!(get(&node, "/healthz").0, 200);
}

#[test]
fn metrics_address_none_serves_nothing() {
    require_e2e!();
    let node = Node::new("metrnone");
    node.ns.ip(&["link", "set", "lo", "up"]);
    let agent = AgentProc::start(&node, &["--metrics-address", "none"]);
    let refused = in_netns(&node.ns, || TcpStream::connect(ADDR).is_err());
    assert!(refused, "nothing listens with --metrics-address none");
    assert!(
        !agent.log_text().contains("/metrics"),
        "{}",
        agent.log_text()
    );
}

/// An address that cannot be bound yet (the node's loopback is down)
/// does not keep the agent from serving the plugins; the endpoint comes
/// up once it can bind.
#[test]
fn the_endpoint_binds_once_it_can() {
    require_e2e!();
    let node = Node::new("metrlate");
    // With an uplink up and the loopback down, 127.0.0.1 is not a local
    // address of the node yet.
    let _ext = External::direct(&node);
    let agent = AgentProc::start(&node, &["--metrics-address", ADDR]);
    cni_tests::agentctl::admin(&node, "status");
    eventually("the agent to say it retries", SETTLE, || {
        agent.log_text().contains("retrying every")
    });
    node.ns.ip(&["link", "set", "lo", "up"]);
    eventually("the endpoint to come up", Duration::from_secs(20), || {
        in_netns(&node.ns, || TcpStream::connect(ADDR).is_ok())
    });
    assert_eq!(get(&node, "/readyz").0, 200);
}
