//! ebpf-firewall end to end: a node namespace with an uplink to an
//! "external" namespace (198.18.x.0/24), our agent, and pods attached by the
//! harness runtime with ebpf-bridge (+ ebpf-portmap) + ebpf-firewall.
//!
//! - FORWARD policy DROP in the node: pod -> external and external ->
//!   hostPort -> pod pass with the firewall in the chain (forwarded in eBPF,
//!   no rule added), and fail without it;
//! - ingressPolicy same-bridge and isolated between pods on several bridges;
//! - allow/deny rules on TCP and UDP port ranges, stateful replies, and
//!   unsolicited packets the other way refused;
//! - a spoofed source IP, a spoofed MAC and a spoofed ARP sender from a pod
//!   never reach another pod or the outside, and are counted;
//! - DEL removes every entry (DEL twice succeeds), GC too; bad rules are
//!   refused with code 7 naming the field, changing nothing.
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use cni_tests::agentctl::{admin, assert_firewall_removed, record_of, AgentProc};
use cni_tests::hostport::{mapping, stat};
use cni_tests::prelude::*;
use cni_tests::runtime::plugin_conf;
use cni_tests::traffic::{in_netns, tcp_echo, udp_echo, TcpEchoServer, UdpEchoServer};
use cni_tests::uplink::{masq_conf, result_ipv4, External};

const ECHO_PORT: u16 = 7000;

/// A node with an uplink and a running agent. Fields drop in order: agent,
/// external side, node (pods are declared later by the tests, so they go
/// first).
struct Fixture {
    agent: AgentProc,
    ext: External,
    node: Node,
}

fn fixture(tag: &str) -> Fixture {
    let node = Node::new(tag);
    let ext = External::direct(&node);
    let agent = AgentProc::start(&node, &[]);
    Fixture { agent, ext, node }
}

/// One attached pod.
struct Pod {
    att: Attachment,
    result: Value,
    ip: Ipv4Addr,
    ns: NetNs,
}

impl Fixture {
    /// A conflist: ebpf-bridge (gateway, default route, `ip_masq`) on
    /// `bridge` with range `subnet`, ebpf-portmap, then — if `firewall` is
    /// given — ebpf-firewall with those options and the `firewallRules`
    /// capability.
    fn list(
        &self,
        network: &str,
        bridge: &str,
        subnet: &str,
        ip_masq: bool,
        firewall: Option<Value>,
    ) -> Value {
        let mut br = masq_conf(&self.node, network, bridge, subnet);
        br["ipMasq"] = json!(ip_masq);
        let obj = br.as_object_mut().expect("object");
        obj.remove("name");
        let version = obj.remove("cniVersion").expect("cniVersion");
        let mut pm = json!({"type": "ebpf-portmap", "capabilities": {"portMappings": true}});
        merge(&mut pm, &self.node.path_keys());
        let mut plugins = vec![br, pm];
        if let Some(opts) = firewall {
            let mut fw = json!({"type": "ebpf-firewall", "capabilities": {"firewallRules": true}});
            merge(&mut fw, &opts);
            merge(&mut fw, &self.node.path_keys());
            plugins.push(fw);
        }
        json!({"cniVersion": version, "name": network, "plugins": plugins})
    }

    /// ADDs pod `cid` with capability arguments `caps`.
    #[track_caller]
    fn add(&self, list: &Value, cid: &str, caps: Value) -> Pod {
        let ns = self.node.pod(cid);
        let mut att = Attachment::new(cid, &ns, "eth0");
        if let Some(m) = caps.as_object() {
            att.capability_args = m.clone();
        }
        let result = self
            .node
            .runtime(Impl::Ours)
            .add_list(list, &att)
            .unwrap_or_else(|o| panic!("ADD {cid}: {o}"));
        let ip = result_ipv4(&result);
        Pod {
            att,
            result,
            ip,
            ns,
        }
    }

    #[track_caller]
    fn del(&self, list: &Value, pod: &Pod) {
        self.node
            .runtime(Impl::Ours)
            .del_list(list, &pod.att, Some(&pod.result))
            .unwrap_or_else(|o| panic!("DEL {}: {o}", pod.att.container_id));
    }

    fn status(&self) -> Value {
        admin(&self.node, "status")
    }

    /// `cni-agent firewall --json`: the attachment of container `cid`.
    fn fw_attachment(&self, cid: &str) -> Value {
        let fw = admin(&self.node, "firewall");
        fw["attachments"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| {
                a["attachment"]
                    .as_str()
                    .is_some_and(|k| k.contains(&format!("/{cid}/")))
            })
            .cloned()
            .unwrap_or_else(|| panic!("no firewall attachment for {cid}: {fw:#}"))
    }

    fn node_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ext.node_addr, port))
    }

    fn ext_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ext.ext_addr, port))
    }

    /// A pod subnet of this topology other than [`External::pod_subnet`]:
    /// 10.(78 + n).x.0/24.
    fn subnet(&self, n: u8) -> String {
        format!("10.{}.{}.0/24", 78 + n, self.ext.index)
    }
}

/// TCP connect from `ns` to `to` (no data): whether the handshake completes.
fn connects(ns: &NetNs, to: SocketAddr) -> bool {
    in_netns(ns, move || {
        TcpStream::connect_timeout(&to, Duration::from_millis(1500)).is_ok()
    })
}

/// The counter `name` of a `cni-agent firewall` attachment.
fn counter(att: &Value, name: &str) -> u64 {
    att["counters"][name].as_u64().unwrap_or(0)
}

fn forward_drop(node: &Node) {
    let out = node.ns.run("iptables", &["-P", "FORWARD", "DROP"]);
    assert!(out.status.success(), "iptables -P FORWARD DROP: {out:?}");
}

// ---------------------------------------------------------------------------
// FORWARD policy DROP
// ---------------------------------------------------------------------------

/// With `iptables -P FORWARD DROP` in the node, a pod with ebpf-firewall in
/// its chain still reaches the outside (TCP, UDP, ping, masqueraded) and is
/// reached through a hostPort, while a pod on a network without the firewall
/// cannot do either. The firewall's ADD adds no iptables/nft rule: the
/// traffic is forwarded in eBPF past the FORWARD chain (the counters show it).
#[test]
fn forward_drop_passes_only_with_the_firewall() {
    require_e2e!();
    let fx = fixture("fwdrop");
    forward_drop(&fx.node);
    let rules_before = fx.node.ns.firewall_rules();

    let fw_list = fx.list(
        "fwnet",
        "cnifw0",
        &fx.ext.pod_subnet(),
        true,
        Some(json!({})),
    );
    let plain_list = fx.list("plainnet", "cniplain0", &fx.subnet(0), true, None);
    // Control: the firewall with its bypass turned off leaves the pod to
    // the FORWARD chain, like no firewall at all.
    let nobypass_list = fx.list(
        "nobypassnet",
        "cninobyp0",
        &fx.subnet(1),
        true,
        Some(json!({"bypassNetfilter": false})),
    );
    let fw_pod = fx.add(
        &fw_list,
        "fw-ctr",
        json!({"portMappings": [mapping(30080, 8080, "tcp"), mapping(30080, 8080, "udp")]}),
    );
    let plain = fx.add(
        &plain_list,
        "plain-ctr",
        json!({"portMappings": [mapping(30081, 8080, "tcp")]}),
    );
    let nobypass = fx.add(
        &nobypass_list,
        "nobyp-ctr",
        json!({"portMappings": [mapping(30082, 8080, "tcp")]}),
    );
    // A second firewalled network, on another bridge.
    let fw2_list = fx.list("fw2net", "cnifw2", &fx.subnet(2), true, Some(json!({})));
    let fw2 = fx.add(&fw2_list, "fw2-ctr", json!({}));
    assert_eq!(
        fx.node.ns.firewall_rules(),
        rules_before,
        "ebpf-firewall must not add iptables/nft rules"
    );

    let _ext_tcp = TcpEchoServer::start(&fx.ext.ns, ECHO_PORT);
    let _ext_udp = UdpEchoServer::start(&fx.ext.ns, ECHO_PORT);
    let _fw_tcp = TcpEchoServer::start(&fw_pod.ns, 8080);
    let _fw_udp = UdpEchoServer::start(&fw_pod.ns, 8080);
    let _plain_tcp = TcpEchoServer::start(&plain.ns, 8080);
    let _nobypass_tcp = TcpEchoServer::start(&nobypass.ns, 8080);
    let _fw2_tcp = TcpEchoServer::start(&fw2.ns, 8080);

    // Pod -> external.
    let t = tcp_echo(&fw_pod.ns, fx.ext_addr(ECHO_PORT), "out")
        .expect("firewalled pod -> external TCP");
    assert_eq!(
        t.seen_as.ip(),
        fx.ext.node_addr,
        "masqueraded to the uplink address"
    );
    let u = udp_echo(&fw_pod.ns, fx.ext_addr(ECHO_PORT), "out")
        .expect("firewalled pod -> external UDP");
    assert_eq!(u.text, "out");
    let ping = fw_pod.ns.run(
        "ping",
        &[
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "2",
            &fx.ext.ext_addr.to_string(),
        ],
    );
    assert!(
        ping.status.success(),
        "firewalled pod -> external ping: {ping:?}"
    );

    // External -> hostPort -> pod.
    let t = tcp_echo(&fx.ext.ns, fx.node_addr(30080), "in")
        .expect("external -> hostPort -> firewalled pod TCP");
    assert_eq!(t.text, "in");
    assert_eq!(t.seen_as, t.local, "the pod sees the client's own address");
    let u = udp_echo(&fx.ext.ns, fx.node_addr(30080), "in")
        .expect("external -> hostPort -> firewalled pod UDP");
    assert_eq!(u.text, "in");

    // Without the firewall, FORWARD DROP wins both ways.
    assert!(
        !connects(&plain.ns, fx.ext_addr(ECHO_PORT)),
        "a pod without ebpf-firewall must not pass FORWARD DROP"
    );
    assert!(
        !connects(&fx.ext.ns, fx.node_addr(30081)),
        "a hostPort of a pod without ebpf-firewall must not pass FORWARD DROP"
    );
    assert!(
        !connects(&nobypass.ns, fx.ext_addr(ECHO_PORT)),
        "bypassNetfilter=false leaves the pod to FORWARD DROP"
    );
    assert!(!connects(&fx.ext.ns, fx.node_addr(30082)));

    // Between bridges hosting firewalled pods: both ways, judged by the
    // pods' firewalls; pods without the bypass stay with FORWARD DROP.
    let t = tcp_echo(&fw2.ns, SocketAddr::from((fw_pod.ip, 8080)), "x")
        .expect("firewalled pod -> firewalled pod on another bridge");
    assert_eq!(t.seen_as.ip(), fw2.ip, "pod to pod is not masqueraded");
    tcp_echo(&fw_pod.ns, SocketAddr::from((fw2.ip, 8080)), "x").expect("and the other way");
    assert!(
        !connects(&plain.ns, SocketAddr::from((nobypass.ip, 8080))),
        "between pods without the bypass, FORWARD DROP applies"
    );

    let att = fx.fw_attachment("fw-ctr");
    assert!(
        counter(&att, "forwarded") >= 10,
        "forwarded past the stack: {att:#}"
    );
    assert!(counter(&att, "egressAllowed") >= 5, "{att:#}");
    assert!(counter(&att, "ingressAllowed") >= 5, "{att:#}");
    assert!(stat(&fx.status(), "firewallForwarded") >= 10);

    fx.del(&fw2_list, &fw2);
    fx.del(&nobypass_list, &nobypass);
    fx.del(&plain_list, &plain);
    fx.del(&fw_list, &fw_pod);
    assert_eq!(fx.node.ns.firewall_rules(), rules_before);
}

// ---------------------------------------------------------------------------
// ingressPolicy
// ---------------------------------------------------------------------------

/// Three bridges: `same-bridge` pods A1, A2; `isolated` pods B1, B2; an
/// `open` pod C1. Only A2 may open connections to A1 (same bridge); no pod
/// may open one to B1; anyone may to C1; the node itself always may. A
/// policy only concerns connections *to* the pod: B1 and A1 open theirs
/// (and get the replies) as usual. Refusals are counted.
#[test]
fn same_bridge_and_isolated_policies() {
    require_e2e!();
    let fx = fixture("fwpol");
    let sb = fx.list(
        "sbnet",
        "cnisb0",
        &fx.subnet(0),
        true,
        Some(json!({"ingressPolicy": "same-bridge"})),
    );
    let iso = fx.list(
        "isonet",
        "cniiso0",
        &fx.subnet(1),
        true,
        Some(json!({"ingressPolicy": "isolated"})),
    );
    let open = fx.list(
        "opennet",
        "cniopen0",
        &fx.subnet(2),
        true,
        Some(json!({"backend": "iptables"})),
    );
    let a1 = fx.add(&sb, "a1", json!({}));
    let a2 = fx.add(&sb, "a2", json!({}));
    let b1 = fx.add(&iso, "b1", json!({}));
    let b2 = fx.add(&iso, "b2", json!({}));
    let c1 = fx.add(&open, "c1", json!({}));
    let _servers: Vec<TcpEchoServer> = [&a1, &a2, &b1, &b2, &c1]
        .iter()
        .map(|p| TcpEchoServer::start(&p.ns, 8080))
        .collect();
    let to = |p: &Pod| SocketAddr::from((p.ip, 8080));

    // same-bridge
    assert!(connects(&a2.ns, to(&a1)), "same bridge: A2 -> A1 allowed");
    assert!(!connects(&b1.ns, to(&a1)), "other bridge: B1 -> A1 refused");
    assert!(!connects(&c1.ns, to(&a1)), "other bridge: C1 -> A1 refused");
    assert!(connects(&fx.node.ns, to(&a1)), "the node -> A1 allowed");
    // isolated
    assert!(
        !connects(&b2.ns, to(&b1)),
        "isolated: B2 -> B1 refused (same bridge)"
    );
    assert!(!connects(&a1.ns, to(&b1)), "isolated: A1 -> B1 refused");
    assert!(!connects(&c1.ns, to(&b1)), "isolated: C1 -> B1 refused");
    assert!(connects(&fx.node.ns, to(&b1)), "the node -> B1 allowed");
    // open, and the pods' own connections (replies pass their policy)
    let t = tcp_echo(&a1.ns, to(&c1), "a1").expect("A1 -> C1 (open)");
    assert_eq!(t.seen_as.ip(), a1.ip, "pod to pod is not masqueraded");
    tcp_echo(&b1.ns, to(&c1), "b1").expect("B1 -> C1: the isolated pod's own connection");
    tcp_echo(&b1.ns, to(&a2), "b1").expect_err("B1 -> A2: same-bridge refuses B1");
    tcp_echo(&a2.ns, to(&a1), "a2").expect("A2 -> A1 data");

    let a1_fw = fx.fw_attachment("a1");
    let b1_fw = fx.fw_attachment("b1");
    assert_eq!(a1_fw["ingressPolicy"], "same-bridge");
    assert_eq!(b1_fw["ingressPolicy"], "isolated");
    assert!(counter(&a1_fw, "policyDropped") >= 2, "{a1_fw:#}");
    assert!(counter(&b1_fw, "policyDropped") >= 3, "{b1_fw:#}");
    assert_eq!(counter(&fx.fw_attachment("c1"), "policyDropped"), 0);

    for (list, p) in [
        (&sb, &a1),
        (&sb, &a2),
        (&iso, &b1),
        (&iso, &b2),
        (&open, &c1),
    ] {
        fx.del(list, p);
    }
}

// ---------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------

/// Per-pod rules from runtimeConfig (capability `firewallRules`) on a
/// network without masquerade (the external side routes the pod subnet to
/// the node): first-match allow/deny on TCP and UDP port ranges with a
/// default deny for ingress; the pod's own connections get their replies
/// through that default deny (stateful), while an unsolicited connection
/// the other way is refused; egress deny rules stop connections out; every
/// rule counts its hits. A second pod with a default-deny egress still
/// answers the connections its ingress rules allowed.
#[test]
fn port_range_rules_are_stateful() {
    require_e2e!();
    let fx = fixture("fwrules");
    let subnet = fx.ext.pod_subnet();
    fx.ext.ns.ip(&[
        "route",
        "add",
        &subnet,
        "via",
        &fx.ext.node_addr.to_string(),
    ]);
    let ext_net = format!("198.18.{}.0/24", fx.ext.index);
    let list = fx.list("rulenet", "cnirule0", &subnet, false, Some(json!({})));
    let rules = json!({
        "ingress": {"default": "deny", "rules": [
            {"action": "deny", "protocol": "tcp", "ports": 7150},
            {"action": "allow", "protocol": "tcp", "ports": "7100-7199", "cidr": ext_net},
            {"action": "allow", "protocol": "udp", "ports": "7300-7310"},
            {"action": "allow", "protocol": "icmp"}
        ]},
        "egress": {"default": "allow", "rules": [
            {"action": "deny", "protocol": "tcp", "ports": "7400-7499"},
            {"action": "deny", "protocol": "udp", "ports": 7500, "cidr": format!("{}/32", fx.ext.ext_addr)}
        ]}
    });
    let p = fx.add(&list, "rules-ctr", json!({"firewallRules": rules}));
    let q = fx.add(
        &list,
        "strict-ctr",
        json!({"firewallRules": {
            "ingress": {"default": "deny", "rules": [{"action": "allow", "protocol": "tcp", "ports": 7100}]},
            "egress": {"default": "deny"}
        }}),
    );
    let p_servers: Vec<TcpEchoServer> = [7100, 7150, 7199, 7200, 7600]
        .into_iter()
        .map(|port| TcpEchoServer::start(&p.ns, port))
        .collect();
    let _p_udp: Vec<UdpEchoServer> = [7300, 7320]
        .into_iter()
        .map(|port| UdpEchoServer::start(&p.ns, port))
        .collect();
    let _q_tcp = TcpEchoServer::start(&q.ns, 7100);
    let _ext_tcp: Vec<TcpEchoServer> = [ECHO_PORT, 7450]
        .into_iter()
        .map(|port| TcpEchoServer::start(&fx.ext.ns, port))
        .collect();
    let _ext_udp: Vec<UdpEchoServer> = [ECHO_PORT, 7500]
        .into_iter()
        .map(|port| UdpEchoServer::start(&fx.ext.ns, port))
        .collect();
    let at = |port: u16| SocketAddr::from((p.ip, port));

    // Ingress: port ranges, first match, default deny.
    let t = tcp_echo(&fx.ext.ns, at(7100), "7100").expect("tcp 7100 allowed by the range");
    assert_eq!(t.seen_as, t.local, "no NAT on this network");
    tcp_echo(&fx.ext.ns, at(7199), "7199").expect("tcp 7199 (range end) allowed");
    assert!(
        !connects(&fx.ext.ns, at(7150)),
        "tcp 7150: the earlier deny rule wins"
    );
    assert!(
        !connects(&fx.ext.ns, at(7200)),
        "tcp 7200: outside the range, default deny"
    );
    udp_echo(&fx.ext.ns, at(7300), "7300").expect("udp 7300 allowed by the range");
    udp_echo(&fx.ext.ns, at(7320), "7320").expect_err("udp 7320: default deny");
    let ping = fx
        .ext
        .ns
        .run("ping", &["-c", "1", "-W", "2", &p.ip.to_string()]);
    assert!(ping.status.success(), "icmp allowed: {ping:?}");

    // Egress, and its replies through the ingress default deny.
    let t =
        tcp_echo(&p.ns, fx.ext_addr(ECHO_PORT), "out").expect("pod -> external tcp: reply passes");
    assert_eq!(t.seen_as.ip(), p.ip);
    udp_echo(&p.ns, fx.ext_addr(ECHO_PORT), "out").expect("pod -> external udp: reply passes");
    assert!(
        !connects(&p.ns, fx.ext_addr(7450)),
        "tcp 7450 out: egress deny range"
    );
    udp_echo(&p.ns, fx.ext_addr(7500), "x").expect_err("udp 7500 out to the external /32: denied");
    // The connection the pod opened does not let the far side open one.
    assert!(
        !connects(&fx.ext.ns, at(7600)),
        "unsolicited connection to the pod: default deny"
    );

    // The strict pod answers what its ingress allows, and opens nothing.
    tcp_echo(&fx.ext.ns, SocketAddr::from((q.ip, 7100)), "q").expect("strict pod answers tcp 7100");
    assert!(
        !connects(&q.ns, fx.ext_addr(ECHO_PORT)),
        "strict pod: egress default deny"
    );

    // Counters: per rule and per attachment.
    let a = fx.fw_attachment("rules-ctr");
    let rule = |dir: &str, i: usize| a[dir]["rules"][i].clone();
    assert!(
        rule("ingress", 0)["dropped"].as_u64().unwrap() >= 1,
        "deny 7150: {a:#}"
    );
    assert!(
        rule("ingress", 1)["allowed"].as_u64().unwrap() >= 2,
        "allow 7100-7199: {a:#}"
    );
    assert!(
        rule("ingress", 2)["allowed"].as_u64().unwrap() >= 1,
        "allow udp: {a:#}"
    );
    assert!(
        rule("ingress", 3)["allowed"].as_u64().unwrap() >= 1,
        "allow icmp: {a:#}"
    );
    assert!(
        a["ingress"]["defaultHits"].as_u64().unwrap() >= 3,
        "default deny hits: {a:#}"
    );
    assert!(rule("egress", 0)["dropped"].as_u64().unwrap() >= 1, "{a:#}");
    assert!(rule("egress", 1)["dropped"].as_u64().unwrap() >= 1, "{a:#}");
    assert_eq!(
        rule("ingress", 1)["rule"],
        format!("allow tcp {ext_net} ports 7100-7199")
    );
    assert!(
        counter(&a, "ingressDropped") >= 4 && counter(&a, "egressDropped") >= 2,
        "{a:#}"
    );
    assert!(
        counter(&a, "ingressEstablished") >= 2,
        "replies matched by tracking: {a:#}"
    );
    assert!(a["connections"].as_u64().unwrap() >= 4, "{a:#}");
    // The text form of the same.
    let text = fx.node.ns.run(
        cni_tests::agent::Agent::binary().unwrap().to_str().unwrap(),
        &[
            "firewall",
            "--socket",
            fx.node.agent_socket().to_str().unwrap(),
        ],
    );
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains("[1] allow tcp") && text.contains("allowed"),
        "{text}"
    );

    drop(p_servers);
    fx.del(&list, &p);
    fx.del(&list, &q);
}

// ---------------------------------------------------------------------------
// Anti-spoofing
// ---------------------------------------------------------------------------

/// Sends UDP datagrams with a forged IPv4 header (source `src`) from
/// inside `ns`: python3 with a raw socket (IP_HDRINCL).
fn send_raw_udp(ns: &NetNs, src: Ipv4Addr, dst: SocketAddr, payload: &str) {
    const SCRIPT: &str = r#"
import socket, struct, sys
src, dst, dport, payload = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
udp = struct.pack('!HHHH', 40000, dport, 8 + len(payload), 0) + payload
ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                 socket.inet_aton(src), socket.inet_aton(dst))
for _ in range(3):
    s.sendto(ip + udp, (dst, 0))
"#;
    let out = ns.run(
        "python3",
        &[
            "-c",
            SCRIPT,
            &src.to_string(),
            &dst.ip().to_string(),
            &dst.port().to_string(),
            payload,
        ],
    );
    assert!(out.status.success(), "raw send: {out:?}");
}

/// Sends a gratuitous ARP reply "`ip` is at `mac`" out of `ifname` in `ns`.
fn send_arp(ns: &NetNs, ifname: &str, mac: &str, ip: Ipv4Addr) {
    const SCRIPT: &str = r#"
import socket, struct, sys
ifname, mac, ip = sys.argv[1], bytes.fromhex(sys.argv[2].replace(':', '')), socket.inet_aton(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
bcast = b'\xff' * 6
arp = struct.pack('!HHBBH', 1, 0x0800, 6, 4, 2) + mac + ip + bcast + ip
for _ in range(3):
    s.send(bcast + mac + b'\x08\x06' + arp)
"#;
    let out = ns.run("python3", &["-c", SCRIPT, ifname, mac, &ip.to_string()]);
    assert!(out.status.success(), "arp send: {out:?}");
}

fn mac_of(ns: &NetNs, ifname: &str) -> String {
    ns.ip_json(&["link", "show", "dev", ifname])[0]["address"]
        .as_str()
        .expect("address")
        .to_string()
}

/// A pod sending with another pod's IP, an address it does not own, or a
/// MAC that is not its own reaches neither another pod nor the outside, and
/// a forged ARP reply (claiming the gateway) never poisons another pod's
/// neighbour table; the drops are counted per attachment. The same pod's
/// genuine traffic passes before and after.
#[test]
fn spoofed_ip_mac_and_arp_are_dropped() {
    require_e2e!();
    let fx = fixture("fwspoof");
    let list = fx.list(
        "spoofnet",
        "cnispoof0",
        &fx.ext.pod_subnet(),
        true,
        Some(json!({})),
    );
    let s = fx.add(&list, "attacker", json!({}));
    let v = fx.add(&list, "victim", json!({}));
    let w = fx.add(&list, "witness", json!({}));
    let w_udp = UdpEchoServer::start(&w.ns, 9000);
    let ext_udp = UdpEchoServer::start(&fx.ext.ns, ECHO_PORT);
    let w_at = SocketAddr::from((w.ip, 9000));
    let gw = fx.ext.pod_gateway();

    // Control: the raw sender works with the pod's own address.
    send_raw_udp(&s.ns, s.ip, w_at, "genuine");
    eventually("the genuine raw datagram arrives", SETTLE, || {
        w_udp.peers().iter().any(|p| p.ip() == s.ip)
    });

    // Another pod's address, and an address nobody has.
    let unused = Ipv4Addr::new(10, 77, fx.ext.index, 200);
    send_raw_udp(&s.ns, v.ip, w_at, "spoofed-victim");
    send_raw_udp(&s.ns, unused, w_at, "spoofed-unused");
    let ext_before = ext_udp.peers().len();
    send_raw_udp(&s.ns, unused, fx.ext_addr(ECHO_PORT), "spoofed-out");
    send_raw_udp(&s.ns, v.ip, fx.ext_addr(ECHO_PORT), "spoofed-out");
    std::thread::sleep(Duration::from_millis(500));
    let peers = w_udp.peers();
    assert!(
        !peers.iter().any(|p| p.ip() == v.ip || p.ip() == unused),
        "spoofed sources reached another pod: {peers:?}"
    );
    assert_eq!(
        ext_udp.peers().len(),
        ext_before,
        "spoofed sources reached the outside"
    );

    // A MAC that is not the pod's.
    let real_mac = mac_of(&s.ns, "eth0");
    s.ns.ip(&["link", "set", "dev", "eth0", "address", "02:00:5e:10:00:99"]);
    udp_echo(&s.ns, w_at, "bad-mac").expect_err("a spoofed MAC reaches no pod");
    udp_echo(&s.ns, fx.ext_addr(ECHO_PORT), "bad-mac").expect_err("a spoofed MAC does not get out");
    s.ns.ip(&["link", "set", "dev", "eth0", "address", &real_mac]);
    udp_echo(&s.ns, w_at, "good-mac").expect("the pod's own MAC passes again");

    // ARP: "the gateway is at the attacker's MAC", to everyone on the bridge.
    let ping = v.ns.run("ping", &["-c", "1", "-W", "2", &gw.to_string()]);
    assert!(ping.status.success(), "victim -> gateway: {ping:?}");
    let gw_mac = |ns: &NetNs| {
        ns.ip_json(&["neigh", "show", &gw.to_string(), "dev", "eth0"])[0]["lladdr"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let before = gw_mac(&v.ns);
    assert!(!before.is_empty() && before != real_mac);
    send_arp(&s.ns, "eth0", &real_mac, gw);
    std::thread::sleep(Duration::from_millis(1500));
    send_arp(&s.ns, "eth0", &real_mac, gw);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        gw_mac(&v.ns),
        before,
        "the victim's gateway entry was poisoned"
    );

    let a = fx.fw_attachment("attacker");
    assert!(counter(&a, "spoofedIp") >= 12, "{a:#}");
    assert!(counter(&a, "spoofedMac") >= 1, "{a:#}");
    assert!(counter(&a, "spoofedArp") >= 3, "{a:#}");
    assert!(stat(&fx.status(), "firewallSpoofed") >= 16);
    assert_eq!(counter(&fx.fw_attachment("victim"), "spoofedIp"), 0);

    drop(w_udp);
    for p in [&s, &v, &w] {
        fx.del(&list, p);
    }
}

// ---------------------------------------------------------------------------
// Verbs
// ---------------------------------------------------------------------------

/// The firewall maps' occupancy from `cni-agent firewall`.
fn entries(fx: &Fixture) -> Value {
    admin(&fx.node, "firewall")["entries"].clone()
}

fn all_zero(e: &Value) -> bool {
    e.as_object().is_some_and(|m| m.values().all(|v| v == 0))
}

/// The pinned tcx links of the host veth programs (bpffs `links/`).
fn fw_links(fx: &Fixture) -> Vec<String> {
    let dir = fx.node.bpffs.path().join("v1/links");
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with("-veth_from_pod") || n.ends_with("-veth_to_pod"))
        .collect();
    v.sort();
    v
}

/// 100 rules per direction: ADD records them and writes the compiled
/// entries; CHECK passes; traffic creates tracked connections and counters;
/// DEL removes every map entry (rules, endpoints, counters, connections)
/// and the veth programs' links, and a second DEL succeeds. DEL after the
/// pod's netns (and veth) is gone, and GC, clean up the same way.
#[test]
fn del_and_gc_remove_every_entry() {
    require_e2e!();
    let fx = fixture("fwdel");
    let list = fx.list(
        "delnet",
        "cnidel0",
        &fx.ext.pod_subnet(),
        true,
        Some(json!({"ingressPolicy": "same-bridge"})),
    );
    let many: Vec<Value> = (0..100u32)
        .map(|i| json!({"action": if i % 2 == 0 {"deny"} else {"allow"}, "protocol": "tcp", "ports": format!("{}-{}", 20000 + i * 10, 20005 + i * 10), "cidr": format!("10.{}.0.0/16", i)}))
        .collect();
    let caps = json!({"firewallRules": {"ingress": {"rules": many}, "egress": {"rules": many}}});
    let rt = fx.node.runtime(Impl::Ours);
    assert!(all_zero(&entries(&fx)), "{:#}", entries(&fx));

    let p = fx.add(&list, "del-ctr", caps.clone());
    let e = entries(&fx);
    assert_eq!(e["attachments"], 1, "{e:#}");
    assert_eq!(e["endpoints"], 1);
    assert_eq!(e["bridges"], 1);
    assert_eq!(
        e["cidrs"],
        2 * 101,
        "one region per distinct CIDR and 0/0: {e:#}"
    );
    assert!(e["ports"].as_u64().unwrap() >= 200, "{e:#}");
    assert_eq!(
        fw_links(&fx).len(),
        2,
        "veth_from_pod and veth_to_pod links"
    );
    rt.check_list(&list, &p.att, &p.result)
        .unwrap_or_else(|o| panic!("CHECK: {o}"));
    let records = admin(&fx.node, "records");
    let rec = record_of(&records, "delnet", "del-ctr", "eth0").expect("record");
    let kinds: Vec<&str> = rec
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"firewall") && kinds.contains(&"firewall-forward"),
        "{kinds:?}"
    );
    let _srv = TcpEchoServer::start(&fx.ext.ns, ECHO_PORT);
    tcp_echo(&p.ns, fx.ext_addr(ECHO_PORT), "x").expect("traffic");
    let e = entries(&fx);
    assert!(
        e["connections"].as_u64().unwrap() >= 1 && e["counters"].as_u64().unwrap() >= 1,
        "{e:#}"
    );

    fx.del(&list, &p);
    assert_firewall_removed(&fx.node, "after DEL");
    assert!(fw_links(&fx).is_empty(), "{:?}", fw_links(&fx));
    fx.del(&list, &p);
    assert!(all_zero(&entries(&fx)));

    // DEL after the pod's namespace (and so its veth) is gone.
    let p = fx.add(&list, "gone-ctr", caps.clone());
    assert_eq!(entries(&fx)["attachments"], 1);
    p.ns.delete();
    fx.del(&list, &p);
    assert_firewall_removed(&fx.node, "after DEL without netns");

    // GC with no valid attachment.
    let p = fx.add(&list, "gc-ctr", caps);
    assert_eq!(entries(&fx)["attachments"], 1);
    rt.gc_list(&list, &[], GcKey::ValidAttachments)
        .unwrap_or_else(|o| panic!("GC: {o}"));
    assert_firewall_removed(&fx.node, "after GC");
    // GC deleted the veth first (the bridge's entry comes first in the
    // record): its links died with it, the agent unpins them on its scan.
    eventually("the dead veth's link pins are dropped", SETTLE, || {
        fw_links(&fx).is_empty()
    });
    fx.del(&list, &p);
}

/// ebpf-firewall and ebpf-bandwidth on one pod share the host veth's two
/// programs: one tcx link per direction, attached by whichever ADDs first
/// (each attach waits out an RCU grace period, so four were most of an
/// ADD). Each plugin's DEL removes its own entries, and the links stay
/// while the other plugin needs them: after ebpf-bandwidth's DEL the
/// firewall still refuses what its rules deny; after ebpf-firewall's the
/// links are gone and nothing is refused.
#[test]
fn shares_the_veth_programs_with_bandwidth() {
    require_e2e!();
    let fx = fixture("fwshare");
    let mut list = fx.list(
        "sharenet",
        "cnishare0",
        &fx.ext.pod_subnet(),
        true,
        Some(json!({})),
    );
    let mut bw = json!({"type": "ebpf-bandwidth", "capabilities": {"bandwidth": true}});
    merge(&mut bw, &fx.node.path_keys());
    let plugins = list["plugins"].as_array_mut().expect("plugins");
    plugins.push(bw);
    let (fw_index, bw_index) = (plugins.len() - 2, plugins.len() - 1);
    const DENIED: u16 = 7450;
    let caps = json!({
        "firewallRules": {"egress": {"rules": [{"action": "deny", "protocol": "tcp", "ports": DENIED}]}},
        "bandwidth": {"ingressRate": 100_000_000, "ingressBurst": 1_000_000, "egressRate": 100_000_000, "egressBurst": 1_000_000},
    });
    let rate_limits = || fx.status()["rateLimits"].as_array().map_or(0, Vec::len);
    let p = fx.add(&list, "share-ctr", caps);
    let links = fw_links(&fx);
    assert_eq!(links.len(), 2, "one link per direction: {links:?}");
    assert_eq!(rate_limits(), 2, "a bucket per direction");
    assert_eq!(entries(&fx)["attachments"], 1);
    let _servers: Vec<TcpEchoServer> = [ECHO_PORT, DENIED]
        .into_iter()
        .map(|port| TcpEchoServer::start(&fx.ext.ns, port))
        .collect();
    tcp_echo(&p.ns, fx.ext_addr(ECHO_PORT), "x").expect("allowed by the rules");
    assert!(!connects(&p.ns, fx.ext_addr(DENIED)), "denied by the rules");

    let rt = fx.node.runtime(Impl::Ours);
    let del = |index: usize| {
        rt.exec(
            "DEL",
            &p.att,
            &plugin_conf(&list, index, Some(&p.result), &p.att),
        )
        .expect_success();
    };
    del(bw_index);
    assert_eq!(rate_limits(), 0, "ebpf-bandwidth's DEL removes its buckets");
    assert_eq!(fw_links(&fx), links, "the firewall still holds the links");
    assert!(
        !connects(&p.ns, fx.ext_addr(DENIED)),
        "the firewall still refuses after ebpf-bandwidth's DEL"
    );
    tcp_echo(&p.ns, fx.ext_addr(ECHO_PORT), "x").expect("allowed after ebpf-bandwidth's DEL");

    del(fw_index);
    assert!(fw_links(&fx).is_empty(), "{:?}", fw_links(&fx));
    assert_firewall_removed(&fx.node, "after ebpf-firewall's DEL");
    assert!(
        connects(&p.ns, fx.ext_addr(DENIED)),
        "nothing refuses once the firewall is gone"
    );
    fx.del(&list, &p);
}

/// Bad rules (a bad CIDR, a reversed port range, an unknown action, an
/// unknown ingressPolicy), from the config or runtimeConfig: the firewall's
/// ADD fails with code 7 naming the field, and the node (namespaces, state
/// dir, bpffs) is exactly as before.
#[test]
fn bad_rules_are_refused_and_change_nothing() {
    require_e2e!();
    let fx = fixture("fwbad");
    let list = fx.list(
        "badnet",
        "cnibad0",
        &fx.ext.pod_subnet(),
        true,
        Some(json!({})),
    );
    let bridge_only = json!({
        "cniVersion": list["cniVersion"],
        "name": list["name"],
        "plugins": [list["plugins"][0].clone()],
    });
    let pod = fx.node.pod("bad-ctr");
    let att = Attachment::new("bad-ctr", &pod, "eth0");
    let rt = fx.node.runtime(Impl::Ours);
    let prev = rt
        .add_list(&bridge_only, &att)
        .unwrap_or_else(|o| panic!("bridge ADD: {o}"));

    let rc = |rules: Value| json!({"firewallRules": {"ingress": {"rules": rules}}});
    let cases: Vec<(Value, Value, &str)> = vec![
        (
            json!({}),
            rc(json!([{"action": "allow", "cidr": "10.0.0.0/40"}])),
            "runtimeConfig.firewallRules.ingress.rules[0].cidr",
        ),
        (
            json!({}),
            rc(
                json!([{"action": "allow"}, {"action": "allow", "protocol": "udp", "ports": "9000-8000"}]),
            ),
            "runtimeConfig.firewallRules.ingress.rules[1].ports",
        ),
        (
            json!({}),
            rc(json!([{"action": "permit"}])),
            "runtimeConfig.firewallRules.ingress.rules[0].action",
        ),
        (
            json!({"firewallRules": {"egress": {"default": "drop-it"}}}),
            json!({}),
            "firewallRules.egress.default",
        ),
        (
            json!({"ingressPolicy": "closed"}),
            json!({}),
            "ingressPolicy",
        ),
    ];
    for (opts, caps, field) in cases {
        let mut l = list.clone();
        merge(&mut l["plugins"][2], &opts);
        let mut a = att.clone();
        a.capability_args = caps.as_object().cloned().unwrap_or_default();
        let before = fx.node.snapshot(&[&pod]);
        let conf = plugin_conf(&l, 2, Some(&prev), &a);
        let err = rt.exec("ADD", &a, &conf).expect_error();
        assert_eq!(err.code, 7, "{field}: {err:?}");
        assert!(err.msg.contains(field), "{} should name {field}", err.msg);
        fx.node
            .snapshot(&[&pod])
            .assert_unchanged_from(&before, field);
    }
    assert!(all_zero(&entries(&fx)));
    rt.del_list(&list, &att, Some(&prev))
        .unwrap_or_else(|o| panic!("DEL: {o}"));
}

/// The firewall lives in pinned maps and links: with the agent stopped,
/// a firewalled pod keeps passing FORWARD DROP and its rules keep holding;
/// a new agent takes the programs over, and CHECK and DEL work as before.
#[test]
fn survives_an_agent_restart() {
    require_e2e!();
    let mut fx = fixture("fwrestart");
    forward_drop(&fx.node);
    let list = fx.list(
        "rsnet",
        "cnirs0",
        &fx.ext.pod_subnet(),
        true,
        Some(json!({"firewallRules": {"egress": {"rules": [
            {"action": "deny", "protocol": "tcp", "ports": 7450}
        ]}}})),
    );
    let p = fx.add(&list, "rs-ctr", json!({}));
    let _srv: Vec<TcpEchoServer> = [ECHO_PORT, 7450]
        .into_iter()
        .map(|port| TcpEchoServer::start(&fx.ext.ns, port))
        .collect();
    let check = |fx: &Fixture, when: &str| {
        tcp_echo(&p.ns, fx.ext_addr(ECHO_PORT), when)
            .unwrap_or_else(|e| panic!("{when}: pod -> external: {e}"));
        assert!(!connects(&p.ns, fx.ext_addr(7450)), "{when}: deny rule");
    };
    check(&fx, "before");
    fx.agent.terminate();
    check(&fx, "agent stopped");
    fx.agent = AgentProc::start(&fx.node, &[]);
    check(&fx, "new agent");
    let rt = fx.node.runtime(Impl::Ours);
    rt.check_list(&list, &p.att, &p.result)
        .unwrap_or_else(|o| panic!("CHECK after restart: {o}"));
    let a = fx.fw_attachment("rs-ctr");
    assert!(
        a["egress"]["rules"][0]["dropped"].as_u64().unwrap() >= 2,
        "{a:#}"
    );
    fx.del(&list, &p);
    assert_firewall_removed(&fx.node, "after DEL");
}

// ---------------------------------------------------------------------------
// Cost against rule count (a measurement, not a timed test)
// ---------------------------------------------------------------------------

/// Connection rate (every connection's first packet meets the rules) and
/// request/response round trips (tracked connections) pod -> external with
/// 0, 100 and 1000 egress rules that do not match the traffic; prints the
/// numbers. Run with `--ignored --nocapture`.
#[test]
#[ignore]
fn cost_is_flat_in_rule_count() {
    use std::io::{BufRead, BufReader, Write};
    use std::time::Instant;
    require_e2e!();
    let fx = fixture("fwcost");
    let _srv = TcpEchoServer::start(&fx.ext.ns, ECHO_PORT);
    let to = fx.ext_addr(ECHO_PORT);
    for (i, n) in [0u32, 100, 1000].into_iter().enumerate() {
        let rules: Vec<Value> = (0..n)
            .map(|r| {
                json!({"action": "deny", "protocol": "tcp",
                       "ports": format!("{}-{}", 1000 + r % 50, 1100 + r % 50),
                       "cidr": format!("10.{}.{}.0/24", 100 + r / 250, r % 250)})
            })
            .collect();
        let list = fx.list(
            &format!("cost{i}"),
            &format!("cnicost{i}"),
            &fx.subnet(i as u8),
            true,
            Some(json!({})),
        );
        let p = fx.add(
            &list,
            &format!("cost{i}"),
            json!({"firewallRules": {"egress": {"rules": rules}, "ingress": {"rules": rules}}}),
        );
        tcp_echo(&p.ns, to, "warm").expect("warm-up");
        let (conns, rr) = in_netns(&p.ns, move || {
            let start = Instant::now();
            let mut conns = 0;
            while start.elapsed() < Duration::from_secs(3) {
                let s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).expect("connect");
                drop(s);
                conns += 1;
            }
            let s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).expect("connect");
            s.set_nodelay(true).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let mut line = String::new();
            let start = Instant::now();
            let mut rr = 0;
            while start.elapsed() < Duration::from_secs(3) {
                w.write_all(b"ping\n").unwrap();
                line.clear();
                r.read_line(&mut line).unwrap();
                rr += 1;
            }
            (conns as f64 / 3.0, rr as f64 / 3.0)
        });
        eprintln!("{n:>5} rules: {conns:>8.0} connections/s, {rr:>8.0} round trips/s");
        fx.del(&list, &p);
    }
}
