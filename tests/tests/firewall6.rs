//! ebpf-firewall on IPv6, end to end: a dual-stack node namespace whose
//! uplink has an IPv4 and an IPv6 address, an "external" namespace
//! (198.18.x.0/24, fd00:198:18:x::/64) with no route back to the pods, our
//! agent, and dual-stack pods (10.x/24 and fd00:…/64, masqueraded) attached
//! by ebpf-bridge + ebpf-firewall.
//!
//! - ordered stateful rules with IPv6 CIDRs (egress allow/deny, replies
//!   through an ingress default deny, ICMPv6 errors of an allowed flow);
//! - `ingressPolicy` same-bridge and isolated between pods over IPv6;
//! - with `ip6tables -P FORWARD DROP` and `iptables -P FORWARD DROP` in the
//!   node, the firewalled pod still reaches the outside over IPv6 (no rule
//!   added), a pod without the firewall does not;
//! - a spoofed IPv6 source, a Neighbor Advertisement for an address the
//!   pod does not own and a Neighbor Solicitation carrying another MAC are
//!   dropped: the node's neighbour table keeps the real owners' MACs (and,
//!   as a control, without the firewall the same messages change it);
//! - differential: the same dual-stack conflist (bridge + host-local with
//!   ipMasq, firewall) through the reference plugins and through ours,
//!   FORWARD DROP in both families: the pod reaches the outside over IPv6
//!   and IPv4 with both.
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use cni_tests::agentctl::{admin, AgentProc};
use cni_tests::prelude::*;
use cni_tests::traffic::{in_netns, tcp_echo, udp_echo, TcpEchoServer, UdpEchoServer};
use cni_tests::uplink::{masq_conf_dual, no_dad, result_ipv6, wait_settled, External};

const TCP_PORT: u16 = 7000;
const UDP_PORT: u16 = 7001;

/// A dual-stack node with an uplink and a running agent. Fields drop in
/// order: agent, external side, node (pods are declared later by the tests,
/// so they go first).
struct Fixture {
    _agent: AgentProc,
    ext: External,
    node: Node,
}

fn fixture(tag: &str) -> Fixture {
    let node = Node::new(tag);
    no_dad(&node.ns);
    let ext = External::direct_dual(&node);
    let agent = AgentProc::start(&node, &[]);
    let (v4, v6) = (ext.node_addr.to_string(), ext.node_v6().to_string());
    wait_until(
        "the agent to serve uplink0 with its IPv4 and IPv6 addresses",
        SETTLE,
        || {
            let status = admin(&node, "status");
            let ups = status["uplinks"].as_array()?.clone();
            (ups.len() == 1
                && ups[0]["address"] == v4.as_str()
                && ups[0]["addressV6"] == v6.as_str())
            .then_some(())
        },
    );
    Fixture {
        _agent: agent,
        ext,
        node,
    }
}

/// One attached dual-stack pod.
struct Pod {
    att: Attachment,
    result: Value,
    ip6: Ipv6Addr,
    ns: NetNs,
}

impl Fixture {
    /// A dual-stack conflist: ebpf-bridge (gateway of both families,
    /// default routes of both, ipMasq) on `bridge` with the `n`-th pair of
    /// subnets of this topology, then — if `firewall` is given —
    /// ebpf-firewall with those options and the `firewallRules` capability.
    fn list(&self, network: &str, bridge: &str, n: u8, firewall: Option<Value>) -> Value {
        let (v4, v6) = self.subnets(n);
        let mut br = masq_conf_dual(&self.node, network, bridge, &v4, &v6);
        let obj = br.as_object_mut().expect("object");
        obj.remove("name");
        let version = obj.remove("cniVersion").expect("cniVersion");
        let mut plugins = vec![br];
        if let Some(opts) = firewall {
            let mut fw = json!({"type": "ebpf-firewall", "capabilities": {"firewallRules": true}});
            merge(&mut fw, &opts);
            merge(&mut fw, &self.node.path_keys());
            plugins.push(fw);
        }
        json!({"cniVersion": version, "name": network, "plugins": plugins})
    }

    /// Subnet pair `n` of this topology: 10.(90+n).x.0/24, fd00:(90+n):x::/64.
    fn subnets(&self, n: u8) -> (String, String) {
        let i = self.ext.index;
        (
            format!("10.{}.{i}.0/24", 90 + n),
            format!("fd00:{}:{i}::/64", 90 + u16::from(n)),
        )
    }

    /// ADDs pod `cid` (DAD off in its namespace) with capability arguments
    /// `caps`, and waits for its IPv6 addresses to be usable.
    #[track_caller]
    fn add(&self, list: &Value, cid: &str, caps: Value) -> Pod {
        let ns = self.node.pod(cid);
        no_dad(&ns);
        let mut att = Attachment::new(cid, &ns, "eth0");
        if let Some(m) = caps.as_object() {
            att.capability_args = m.clone();
        }
        let result = self
            .node
            .runtime(Impl::Ours)
            .add_list(list, &att)
            .unwrap_or_else(|o| panic!("ADD {cid}: {o}"));
        wait_settled(&ns);
        wait_settled(&self.node.ns);
        let ip6 = result_ipv6(&result);
        Pod {
            att,
            result,
            ip6,
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

    fn ext6(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ext.ext_v6(), port))
    }
}

/// The counter `name` of a `cni-agent firewall` attachment.
fn counter(att: &Value, name: &str) -> u64 {
    att["counters"][name].as_u64().unwrap_or(0)
}

/// TCP connect from `ns` to `to` (no data): whether the handshake completes.
fn connects(ns: &NetNs, to: SocketAddr) -> bool {
    in_netns(ns, move || {
        TcpStream::connect_timeout(&to, Duration::from_millis(1500)).is_ok()
    })
}

fn ping6(ns: &NetNs, dst: Ipv6Addr) -> bool {
    ns.run(
        "ping",
        &["-6", "-c", "1", "-W", "2", "-n", &dst.to_string()],
    )
    .status
    .success()
}

/// A UDP datagram from `ns` to `to`, then a wait for the answer: whether an
/// ICMPv6 "port unreachable" came back (the socket reports "connection
/// refused").
fn udp_refused(ns: &NetNs, to: SocketAddr) -> bool {
    in_netns(ns, move || {
        let Ok(s) = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)) else {
            return false;
        };
        if s.connect(to).is_err() || s.set_read_timeout(Some(Duration::from_secs(1))).is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            let _ = s.send(b"anyone?");
            match s.recv(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return true,
                _ => {}
            }
        }
        false
    })
}

// ---------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------

/// Per-pod rules with IPv6 CIDRs (capability `firewallRules`), default deny
/// both ways: TCP to the external address's port is allowed and its
/// replies pass the ingress default deny (masqueraded to the node's IPv6
/// address on the way); UDP to the same host is denied by the default; an
/// ICMPv6 "port unreachable" for an allowed UDP flow reaches the pod (a
/// related error); echo passes by an `icmp` rule; the same pod's IPv4
/// traffic meets none of the IPv6 rules and gets the default. Each rule
/// counts its hits. An ingress rule with the pod subnet's IPv6 CIDR lets
/// the node open one port of the pod and not another.
#[test]
fn v6_rules_are_stateful_with_related_errors() {
    require_e2e!();
    let fx = fixture("fw6rules");
    let list = fx.list("fw6rulenet", "cnifw6r0", 0, Some(json!({})));
    let ext6 = fx.ext.ext_v6();
    let (_, subnet6) = fx.subnets(0);
    let rules = json!({
        "ingress": {"default": "deny", "rules": [
            {"action": "allow", "protocol": "tcp", "cidr": subnet6, "ports": 8080},
        ]},
        "egress": {"default": "deny", "rules": [
            {"action": "allow", "protocol": "tcp", "cidr": format!("{ext6}/128"), "ports": TCP_PORT},
            {"action": "allow", "protocol": "udp", "cidr": "fd00:198::/32", "ports": 9},
            {"action": "deny", "protocol": "icmp", "cidr": "2001:db8::/32"},
            {"action": "allow", "protocol": "icmp", "cidr": "fd00:198::/32"},
        ]},
    });
    let pod = fx.add(&list, "r6", json!({"firewallRules": rules}));
    let _tcp6 = TcpEchoServer::start_v6(&fx.ext.ns, TCP_PORT);
    let _tcp4 = TcpEchoServer::start(&fx.ext.ns, TCP_PORT);
    let _udp6 = UdpEchoServer::start_v6(&fx.ext.ns, UDP_PORT);

    let t = tcp_echo(&pod.ns, fx.ext6(TCP_PORT), "v6-allowed").expect("allowed IPv6 TCP");
    assert_eq!(
        t.seen_as.ip(),
        IpAddr::V6(fx.ext.node_v6()),
        "masqueraded to the node's IPv6 address"
    );
    udp_echo(&pod.ns, fx.ext6(UDP_PORT), "v6-denied").expect_err("UDP: egress default deny");
    assert!(
        udp_refused(&pod.ns, fx.ext6(9)),
        "the port-unreachable error of an allowed UDP flow reaches the pod"
    );
    assert!(ping6(&pod.ns, ext6), "ICMPv6 echo allowed by the icmp rule");
    assert!(
        !connects(&pod.ns, SocketAddr::from((fx.ext.ext_addr, TCP_PORT))),
        "IPv4 meets none of the IPv6 rules: egress default deny"
    );
    // Ingress: the node (the bridge's address in the pod subnet) may open
    // port 8080 only.
    let _in_servers: Vec<TcpEchoServer> = [8080, 8081]
        .into_iter()
        .map(|p| TcpEchoServer::start_v6(&pod.ns, p))
        .collect();
    assert!(
        connects(&fx.node.ns, SocketAddr::from((pod.ip6, 8080))),
        "ingress rule allows the pod subnet to port 8080"
    );
    assert!(
        !connects(&fx.node.ns, SocketAddr::from((pod.ip6, 8081))),
        "ingress default deny on port 8081"
    );

    let a = fx.fw_attachment("r6");
    let rules = a["egress"]["rules"]
        .as_array()
        .expect("egress rules")
        .clone();
    assert!(rules[0]["hits"].as_u64() >= Some(1), "tcp rule hit: {a:#}");
    assert!(rules[1]["hits"].as_u64() >= Some(1), "udp rule hit: {a:#}");
    assert!(rules[3]["hits"].as_u64() >= Some(1), "icmp rule hit: {a:#}");
    assert!(counter(&a, "egressDropped") >= 2, "{a:#}");
    assert!(counter(&a, "ingressDropped") >= 1, "{a:#}");
    assert!(
        a["ingress"]["rules"][0]["hits"].as_u64() >= Some(1),
        "{a:#}"
    );
    assert!(counter(&a, "ingressEstablished") >= 1, "{a:#}");
    fx.del(&list, &pod);
    assert_eq!(
        admin(&fx.node, "firewall")["entries"]["cidrs"].as_u64(),
        Some(0),
        "DEL removed the compiled IPv6 rules"
    );
}

/// `ingressPolicy` over IPv6, as over IPv4: same-bridge lets pods of the
/// pod's bridge in and keeps pods of other bridges out; isolated keeps
/// every other pod out, its own bridge's included; the node itself gets in
/// to both; an isolated pod's own connections get their replies.
#[test]
fn v6_same_bridge_and_isolated_policies() {
    require_e2e!();
    let fx = fixture("fw6pol");
    let sb = fx.list(
        "sb6net",
        "cnisb6",
        1,
        Some(json!({"ingressPolicy": "same-bridge"})),
    );
    let iso = fx.list(
        "iso6net",
        "cniiso6",
        2,
        Some(json!({"ingressPolicy": "isolated"})),
    );
    let open = fx.list("open6net", "cniopen6", 3, Some(json!({})));
    let a1 = fx.add(&sb, "a1", json!({}));
    let a2 = fx.add(&sb, "a2", json!({}));
    let b1 = fx.add(&iso, "b1", json!({}));
    let b2 = fx.add(&iso, "b2", json!({}));
    let c1 = fx.add(&open, "c1", json!({}));
    let _servers: Vec<TcpEchoServer> = [&a1, &a2, &b1, &b2, &c1]
        .iter()
        .map(|p| TcpEchoServer::start_v6(&p.ns, 8080))
        .collect();
    let to = |p: &Pod| SocketAddr::from((p.ip6, 8080));

    assert!(connects(&a2.ns, to(&a1)), "same bridge: A2 -> A1 allowed");
    assert!(!connects(&b1.ns, to(&a1)), "other bridge: B1 -> A1 refused");
    assert!(!connects(&c1.ns, to(&a1)), "other bridge: C1 -> A1 refused");
    assert!(connects(&fx.node.ns, to(&a1)), "the node -> A1 allowed");
    assert!(!connects(&b2.ns, to(&b1)), "isolated: B2 -> B1 refused");
    assert!(!connects(&a1.ns, to(&b1)), "isolated: A1 -> B1 refused");
    assert!(connects(&fx.node.ns, to(&b1)), "the node -> B1 allowed");
    let t = tcp_echo(&b1.ns, to(&c1), "b1").expect("B1 -> C1: the isolated pod's own connection");
    assert_eq!(
        t.seen_as.ip(),
        IpAddr::V6(b1.ip6),
        "pod to pod is not masqueraded"
    );

    let a1_fw = fx.fw_attachment("a1");
    let b1_fw = fx.fw_attachment("b1");
    assert!(counter(&a1_fw, "policyDropped") >= 2, "{a1_fw:#}");
    assert!(counter(&b1_fw, "policyDropped") >= 2, "{b1_fw:#}");
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
// FORWARD policy DROP
// ---------------------------------------------------------------------------

/// With `ip6tables -P FORWARD DROP` and `iptables -P FORWARD DROP` in the
/// node, a dual-stack pod with ebpf-firewall in its chain reaches the
/// outside over IPv6 (TCP, UDP and ping, masqueraded) and IPv4, while a
/// pod on a network without the firewall cannot over IPv6; the same holds
/// for a connection the external side opens to the pod's own IPv6 address
/// (routed to the node). No iptables, ip6tables or nft rule is added: the
/// firewall forwards in eBPF (its `forwarded` counter shows it).
#[test]
fn v6_forward_drop_passes_only_with_the_firewall() {
    require_e2e!();
    let fx = fixture("fw6drop");
    for tool in ["iptables", "ip6tables"] {
        let out = fx.node.ns.run(tool, &["-P", "FORWARD", "DROP"]);
        assert!(out.status.success(), "{tool} -P FORWARD DROP: {out:?}");
    }
    let rules_before = fx.node.ns.firewall_rules();
    let fw_list = fx.list("fw6dropnet", "cnifw6d0", 4, Some(json!({})));
    let plain_list = fx.list("plain6net", "cniplain6", 5, None);
    let fw_pod = fx.add(&fw_list, "fw6-ctr", json!({}));
    let plain_pod = fx.add(&plain_list, "plain6-ctr", json!({}));
    let _tcp6 = TcpEchoServer::start_v6(&fx.ext.ns, TCP_PORT);
    let _tcp4 = TcpEchoServer::start(&fx.ext.ns, TCP_PORT);
    let _udp6 = UdpEchoServer::start_v6(&fx.ext.ns, UDP_PORT);

    let t = tcp_echo(&fw_pod.ns, fx.ext6(TCP_PORT), "fw6").expect("firewalled pod, IPv6 TCP");
    assert_eq!(t.seen_as.ip(), IpAddr::V6(fx.ext.node_v6()));
    let u = udp_echo(&fw_pod.ns, fx.ext6(UDP_PORT), "fw6").expect("firewalled pod, IPv6 UDP");
    assert_eq!(u.seen_as.ip(), IpAddr::V6(fx.ext.node_v6()));
    assert!(ping6(&fw_pod.ns, fx.ext.ext_v6()), "firewalled pod, ping6");
    tcp_echo(
        &fw_pod.ns,
        SocketAddr::from((fx.ext.ext_addr, TCP_PORT)),
        "fw4",
    )
    .expect("firewalled pod, IPv4 TCP");
    assert!(
        !connects(&plain_pod.ns, fx.ext6(TCP_PORT)),
        "without the firewall, ip6tables' FORWARD DROP holds"
    );
    assert!(!ping6(&plain_pod.ns, fx.ext.ext_v6()));

    // Inbound: the external side routes both pod subnets to the node (as
    // another node routes a pod CIDR); a connection to the firewalled pod's
    // own address is forwarded in eBPF and keeps the pod's address.
    let node6 = fx.ext.node_v6().to_string();
    for n in [4, 5] {
        let (_, subnet6) = fx.subnets(n);
        fx.ext
            .ns
            .ip(&["-6", "route", "add", &subnet6, "via", &node6]);
    }
    let _pod_servers: Vec<TcpEchoServer> = [&fw_pod, &plain_pod]
        .iter()
        .map(|p| TcpEchoServer::start_v6(&p.ns, 8080))
        .collect();
    let t = tcp_echo(&fx.ext.ns, SocketAddr::from((fw_pod.ip6, 8080)), "in6")
        .expect("external -> firewalled pod over IPv6");
    assert_eq!(
        t.seen_as.ip(),
        IpAddr::V6(fx.ext.ext_v6()),
        "the pod sees the external address"
    );
    assert!(
        !connects(&fx.ext.ns, SocketAddr::from((plain_pod.ip6, 8080))),
        "external -> pod without the firewall: FORWARD DROP holds"
    );

    assert_eq!(
        fx.node.ns.firewall_rules(),
        rules_before,
        "the firewall added no netfilter rule"
    );
    let a = fx.fw_attachment("fw6-ctr");
    assert!(counter(&a, "forwarded") >= 6, "{a:#}");
    fx.del(&fw_list, &fw_pod);
    fx.del(&plain_list, &plain_pod);
}

/// The same dual-stack conflist (host-local ranges [[10.x/24],
/// [fd00:…/64]], routes 0.0.0.0/0 and ::/0, ipMasq, then the firewall;
/// only the `type` names differ) through the reference bridge/host-local/
/// firewall and through ours, on a node with `iptables -P FORWARD DROP`
/// and `ip6tables -P FORWARD DROP`: with both, the pod reaches the outside
/// over IPv6 (TCP, UDP, ping) and IPv4, masqueraded to the node's address.
#[test]
fn v6_forward_drop_matches_reference_firewall() {
    require_e2e!();
    for imp in [Impl::Reference, Impl::Ours] {
        let tag = match imp {
            Impl::Ours => "fw6do",
            Impl::Reference => "fw6dr",
        };
        let node = Node::new(tag);
        no_dad(&node.ns);
        let ext = External::direct_dual(&node);
        let _agent = (imp == Impl::Ours).then(|| AgentProc::start(&node, &[]));
        if imp == Impl::Ours {
            let v6 = ext.node_v6().to_string();
            wait_until(
                "the agent to serve the uplink's IPv6 address",
                SETTLE,
                || {
                    let ups = admin(&node, "status")["uplinks"].as_array()?.clone();
                    (ups.len() == 1 && ups[0]["addressV6"] == v6.as_str()).then_some(())
                },
            );
        }
        for tool in ["iptables", "ip6tables"] {
            let out = node.ns.run(tool, &["-P", "FORWARD", "DROP"]);
            assert!(out.status.success(), "{tool} -P FORWARD DROP: {out:?}");
        }
        let mut br = masq_conf_dual(
            &node,
            "fw6diff",
            "cnifw6diff",
            &ext.pod_subnet(),
            &ext.pod_subnet6(),
        );
        br["type"] = json!(imp.bridge_type());
        br["ipam"]["type"] = json!(imp.ipam_type());
        let obj = br.as_object_mut().expect("object");
        obj.remove("name");
        let version = obj.remove("cniVersion").expect("cniVersion");
        let mut fw = json!({"type": match imp {
            Impl::Ours => "ebpf-firewall",
            Impl::Reference => "firewall",
        }});
        if imp == Impl::Ours {
            merge(&mut fw, &node.path_keys());
        }
        let list = json!({"cniVersion": version, "name": "fw6diff", "plugins": [br, fw]});
        let pod = node.pod(&format!("{tag}pod"));
        no_dad(&pod);
        let att = Attachment::new(&format!("{tag}-ctr"), &pod, "eth0");
        let rt = node.runtime(imp);
        let result = rt
            .add_list(&list, &att)
            .unwrap_or_else(|o| panic!("{imp:?}: ADD: {o}"));
        wait_settled(&pod);
        wait_settled(&node.ns);

        let _tcp4 = TcpEchoServer::start(&ext.ns, TCP_PORT);
        let _tcp6 = TcpEchoServer::start_v6(&ext.ns, TCP_PORT);
        let _udp6 = UdpEchoServer::start_v6(&ext.ns, UDP_PORT);
        let ext6 = |port| SocketAddr::from((ext.ext_v6(), port));
        let node6 = IpAddr::V6(ext.node_v6());
        let t = tcp_echo(&pod, ext6(TCP_PORT), "t6")
            .unwrap_or_else(|e| panic!("{imp:?}: pod -> ext TCP/IPv6: {e}"));
        assert_eq!(t.seen_as.ip(), node6, "{imp:?}: TCP/IPv6 masqueraded");
        let u = udp_echo(&pod, ext6(UDP_PORT), "u6")
            .unwrap_or_else(|e| panic!("{imp:?}: pod -> ext UDP/IPv6: {e}"));
        assert_eq!(u.seen_as.ip(), node6, "{imp:?}: UDP/IPv6 masqueraded");
        assert!(ping6(&pod, ext.ext_v6()), "{imp:?}: ping6");
        tcp_echo(&pod, SocketAddr::from((ext.ext_addr, TCP_PORT)), "t4")
            .unwrap_or_else(|e| panic!("{imp:?}: pod -> ext TCP/IPv4: {e}"));
        rt.del_list(&list, &att, Some(&result))
            .unwrap_or_else(|o| panic!("{imp:?}: DEL: {o}"));
    }
}

/// An IPv6-only pod (one host-local range, fd00:…/64, route ::/0) with
/// the firewall, on a node with `ip6tables -P FORWARD DROP`: its TCP
/// reaches the outside, masqueraded and forwarded in eBPF, while its UDP
/// meets an egress deny rule.
#[test]
fn v6_only_pod_is_firewalled_and_forwarded() {
    require_e2e!();
    let fx = fixture("fw6only");
    let out = fx.node.ns.run("ip6tables", &["-P", "FORWARD", "DROP"]);
    assert!(out.status.success(), "ip6tables -P FORWARD DROP: {out:?}");
    let (_, subnet6) = fx.subnets(8);
    let mut br = json!({
        "type": "ebpf-bridge",
        "bridge": "cnifw6only",
        "isGateway": true,
        "ipMasq": true,
        "ipam": {
            "type": "ebpf-host-local",
            "ranges": [[{"subnet": subnet6}]],
            "routes": [{"dst": "::/0"}],
            "dataDir": fx.node.data_dir(),
        }
    });
    merge(&mut br, &fx.node.path_keys());
    let mut fw = json!({"type": "ebpf-firewall", "capabilities": {"firewallRules": true}});
    merge(&mut fw, &fx.node.path_keys());
    let list = json!({"cniVersion": "1.0.0", "name": "fw6onlynet", "plugins": [br, fw]});
    let rules = json!({"egress": {"rules": [{"action": "deny", "protocol": "udp"}]}});
    let pod = fx.add(&list, "v6only", json!({"firewallRules": rules}));
    let ips = pod.result["ips"].as_array().expect("ips").clone();
    assert_eq!(ips.len(), 1, "one IPv6 address: {ips:?}");
    let _tcp6 = TcpEchoServer::start_v6(&fx.ext.ns, TCP_PORT);
    let _udp6 = UdpEchoServer::start_v6(&fx.ext.ns, UDP_PORT);
    let t = tcp_echo(&pod.ns, fx.ext6(TCP_PORT), "only6").expect("IPv6-only pod, TCP");
    assert_eq!(t.seen_as.ip(), IpAddr::V6(fx.ext.node_v6()));
    udp_echo(&pod.ns, fx.ext6(UDP_PORT), "only6").expect_err("UDP: egress deny rule");
    let a = fx.fw_attachment("v6only");
    assert!(counter(&a, "forwarded") >= 2, "{a:#}");
    assert!(counter(&a, "egressDropped") >= 1, "{a:#}");
    fx.del(&list, &pod);
}

// ---------------------------------------------------------------------------
// Anti-spoofing
// ---------------------------------------------------------------------------

/// Sends a UDP datagram from `src` (added to the pod's eth0 first if it is
/// not the pod's, as an attacker would) to `dst`.
fn send_udp6_from(ns: &NetNs, src: Ipv6Addr, dst: SocketAddr, payload: &str) {
    in_netns(ns, move || {
        let s = UdpSocket::bind((src, 0)).expect("bind the source address");
        for _ in 0..3 {
            s.send_to(payload.as_bytes(), dst).expect("send");
        }
    });
}

/// Sends from `ns` an unsolicited Neighbor Advertisement (override flag)
/// "`target` is at `mac`" to all nodes on `ifname`, from the pod's own
/// address `src`.
fn send_na(ns: &NetNs, ifname: &str, src: Ipv6Addr, target: Ipv6Addr, mac: &str) {
    let all_nodes: Ipv6Addr = "ff02::1".parse().expect("ff02::1");
    send_nd(ns, ifname, src, all_nodes, 136, target, mac);
}

/// Sends from `ns` a Neighbor Solicitation for `target` to `dst`, from the
/// pod's own address `src`, whose source link-layer address option says
/// `mac`.
fn send_ns(ns: &NetNs, ifname: &str, src: Ipv6Addr, dst: Ipv6Addr, target: Ipv6Addr, mac: &str) {
    send_nd(ns, ifname, src, dst, 135, target, mac);
}

/// One ND message (135: solicitation with a source link-layer option,
/// 136: advertisement with the override flag and a target link-layer
/// option), three times, hop limit 255 as ND requires; the kernel fills in
/// the checksum.
fn send_nd(
    ns: &NetNs,
    ifname: &str,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    kind: u8,
    target: Ipv6Addr,
    mac: &str,
) {
    const SCRIPT: &str = r#"
import socket, struct, sys
ifname, src, dst, kind, target = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
mac = bytes.fromhex(sys.argv[6].replace(':', ''))
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
s.bind((src, 0))
flags, opt = (0x20000000, 2) if kind == 136 else (0, 1)
msg = struct.pack('!BBHI', kind, 0, 0, flags) + socket.inet_pton(socket.AF_INET6, target)
msg += struct.pack('!BB', opt, 1) + mac
for _ in range(3):
    s.sendto(msg, (dst, 0, 0, socket.if_nametoindex(ifname)))
"#;
    let out = ns.run(
        "python3",
        &[
            "-c",
            SCRIPT,
            ifname,
            &src.to_string(),
            &dst.to_string(),
            &kind.to_string(),
            &target.to_string(),
            mac,
        ],
    );
    assert!(out.status.success(), "ND send: {out:?}");
}

fn mac_of(ns: &NetNs, ifname: &str) -> String {
    ns.ip_json(&["link", "show", "dev", ifname])[0]["address"]
        .as_str()
        .expect("address")
        .to_string()
}

/// The MAC the node's neighbour table holds for `ip` on `dev`.
fn node_neigh(node: &Node, ip: Ipv6Addr, dev: &str) -> String {
    node.ns
        .ip_json(&["-6", "neigh", "show", &ip.to_string(), "dev", dev])
        .get(0)
        .and_then(|n| n["lladdr"].as_str())
        .unwrap_or("")
        .to_string()
}

/// A pod sending from another pod's IPv6 address or one nobody has reaches
/// no other pod (a genuine datagram sent after them arrives alone), and
/// its Neighbor Advertisement claiming another pod's address does not
/// change the node's neighbour entry of that address (while its own
/// advertisement passes), nor does a solicitation carrying another MAC;
/// each is counted. Without the firewall the same advertisement does
/// change the entry.
#[test]
fn v6_spoofed_source_and_neighbour_advertisement_are_dropped() {
    require_e2e!();
    let fx = fixture("fw6spoof");
    let list = fx.list("spoof6net", "cnispoof6", 6, Some(json!({})));
    let s = fx.add(&list, "attacker6", json!({}));
    let v = fx.add(&list, "victim6", json!({}));
    let w = fx.add(&list, "witness6", json!({}));
    let w_udp = UdpEchoServer::start_v6(&w.ns, 9000);
    let w_at = SocketAddr::from((w.ip6, 9000));

    // Another pod's address and an unused one, put on the attacker's eth0.
    let (_, subnet6) = fx.subnets(6);
    let unused: Ipv6Addr = subnet6
        .replace("::/64", "::beef")
        .parse()
        .expect("unused address");
    for a in [v.ip6, unused] {
        s.ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{a}/128"),
            "dev",
            "eth0",
            "nodad",
        ]);
    }
    send_udp6_from(&s.ns, v.ip6, w_at, "spoofed-victim");
    send_udp6_from(&s.ns, unused, w_at, "spoofed-unused");
    send_udp6_from(&s.ns, s.ip6, w_at, "genuine");
    eventually("the genuine datagram arrives", SETTLE, || {
        w_udp.peers().iter().any(|p| p.ip() == IpAddr::V6(s.ip6))
    });
    let peers = w_udp.peers();
    assert!(
        !peers
            .iter()
            .any(|p| p.ip() == IpAddr::V6(v.ip6) || p.ip() == IpAddr::V6(unused)),
        "spoofed IPv6 sources reached another pod: {peers:?}"
    );
    assert!(counter(&fx.fw_attachment("attacker6"), "spoofedIp") >= 6);
    for a in [v.ip6, unused] {
        s.ns.ip(&["-6", "addr", "del", &format!("{a}/128"), "dev", "eth0"]);
    }

    // The node learns the victim's and the attacker's MACs.
    let bridge = "cnispoof6";
    for p in [&v, &s] {
        assert!(ping6(&fx.node.ns, p.ip6), "node -> {}", p.ip6);
    }
    let (v_mac, s_mac) = (mac_of(&v.ns, "eth0"), mac_of(&s.ns, "eth0"));
    assert_eq!(node_neigh(&fx.node, v.ip6, bridge), v_mac);

    // Control: an advertisement of the attacker's own address passes.
    send_na(&s.ns, "eth0", s.ip6, s.ip6, &s_mac);
    assert_eq!(counter(&fx.fw_attachment("attacker6"), "spoofedNd"), 0);
    // "The victim's address is at the attacker's MAC."
    send_na(&s.ns, "eth0", s.ip6, v.ip6, &s_mac);
    eventually("the spoofed advertisement to be dropped", SETTLE, || {
        counter(&fx.fw_attachment("attacker6"), "spoofedNd") >= 1
    });
    assert_eq!(
        node_neigh(&fx.node, v.ip6, bridge),
        v_mac,
        "the node's neighbour entry of the victim still holds the victim's MAC"
    );
    assert!(ping6(&fx.node.ns, v.ip6), "node -> victim still works");

    // A solicitation whose source link-layer option is another MAC (the
    // node would learn "the attacker's address is at that MAC").
    let gw6: Ipv6Addr = subnet6
        .replace("::/64", "::1")
        .parse()
        .expect("gateway address");
    let nd_before = counter(&fx.fw_attachment("attacker6"), "spoofedNd");
    send_ns(&s.ns, "eth0", s.ip6, gw6, gw6, "02:00:5e:10:00:99");
    eventually("the spoofed solicitation to be dropped", SETTLE, || {
        counter(&fx.fw_attachment("attacker6"), "spoofedNd") > nd_before
    });
    assert_eq!(
        node_neigh(&fx.node, s.ip6, bridge),
        s_mac,
        "the node's entry of the attacker keeps the attacker's MAC"
    );

    // Control: without the firewall, the same advertisement does poison
    // the node's entry (so the check above means something).
    let plain = fx.list("plainnd6net", "cniplnd6", 7, None);
    let ps = fx.add(&plain, "plain-attacker6", json!({}));
    let pv = fx.add(&plain, "plain-victim6", json!({}));
    assert!(ping6(&fx.node.ns, pv.ip6), "node -> plain victim");
    let ps_mac = mac_of(&ps.ns, "eth0");
    send_na(&ps.ns, "eth0", ps.ip6, pv.ip6, &ps_mac);
    eventually(
        "the unfirewalled spoofed advertisement to take over the entry",
        SETTLE,
        || node_neigh(&fx.node, pv.ip6, "cniplnd6") == ps_mac,
    );
    let (_, plain6) = fx.subnets(7);
    let plain_gw: Ipv6Addr = plain6.replace("::/64", "::1").parse().expect("gateway");
    assert!(ping6(&fx.node.ns, ps.ip6), "node -> plain attacker");
    send_ns(
        &ps.ns,
        "eth0",
        ps.ip6,
        plain_gw,
        plain_gw,
        "02:00:5e:10:00:99",
    );
    eventually(
        "the unfirewalled solicitation's MAC to take over the entry",
        SETTLE,
        || node_neigh(&fx.node, ps.ip6, "cniplnd6") == "02:00:5e:10:00:99",
    );
    for p in [&ps, &pv] {
        fx.del(&plain, p);
    }
    for p in [&s, &v, &w] {
        fx.del(&list, p);
    }
}
