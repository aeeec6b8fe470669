//! The eBPF masquerade for IPv6 (`ipMasq: true` on a dual-stack pod), end
//! to end: a node namespace whose uplink has an IPv4 and an IPv6 address,
//! an "external" namespace with an IPv6 address and no route back to the
//! pods' IPv6 subnet, our agent serving the uplink, and dual-stack pods
//! (host-local ranges 10.77.x.0/24 and fd00:77:x::/64, routes 0.0.0.0/0 and
//! ::/0) attached by ebpf-bridge. Replies only come back if the node
//! translates, and the far side reports the source address it saw. The
//! reference bridge (ip6tables MASQUERADE) runs the same conflist for
//! comparison.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use cni_tests::agentctl::{admin, record_of, AgentProc};
use cni_tests::prelude::*;
use cni_tests::traffic::{
    blob, blob_reply, echo_on, in_netns, tcp_connect_from, tcp_echo, udp_blob, udp_echo,
    udp_echo_from, FragCounters, TcpEchoServer, UdpBlobServer, UdpEchoServer,
};
use cni_tests::uplink::{masq_conf_dual, no_dad, result_ipv4, result_ipv6, wait_settled, External};

const NET: &str = "masq6net";
const BRIDGE_NAME: &str = "cnimasq6";
const TCP_PORT: u16 = 7000;
const UDP_PORT: u16 = 7001;

/// A dual-stack node with an uplink and a running agent. Fields drop in
/// order: agent first, then the external side, then the node.
struct Fixture {
    agent: AgentProc,
    ext: External,
    node: Node,
}

/// Waits until the agent serves `uplink0` with both of its addresses (the
/// IPv6 one is taken once it has left "tentative", at a rescan).
fn wait_dual_uplink(node: &Node, ext: &External) {
    let (v4, v6) = (ext.node_addr.to_string(), ext.node_v6().to_string());
    wait_until(
        "the agent to serve uplink0 with its IPv4 and IPv6 addresses",
        SETTLE,
        || {
            let status = admin(node, "status");
            let ups = status["uplinks"].as_array()?.clone();
            (ups.len() == 1
                && ups[0]["address"] == v4.as_str()
                && ups[0]["addressV6"] == v6.as_str())
            .then_some(())
        },
    );
}

fn fixture(tag: &str, agent_args: &[&str]) -> Fixture {
    let node = Node::new(tag);
    let ext = External::direct_dual(&node);
    let agent = AgentProc::start(&node, agent_args);
    wait_dual_uplink(&node, &ext);
    Fixture { agent, ext, node }
}

impl Fixture {
    fn conf(&self) -> Value {
        conflist_of(&masq_conf_dual(
            &self.node,
            NET,
            BRIDGE_NAME,
            &self.ext.pod_subnet(),
            &self.ext.pod_subnet6(),
        ))
    }

    fn ext_tcp6(&self) -> SocketAddr {
        SocketAddr::from((self.ext.ext_v6(), TCP_PORT))
    }

    fn ext_udp6(&self) -> SocketAddr {
        SocketAddr::from((self.ext.ext_v6(), UDP_PORT))
    }

    /// A dual-stack pod, added; DAD off in its namespace.
    fn pod(&self, rt: &Runtime, list: &Value, tag: &str, id: &str) -> (NetNs, Attachment, Value) {
        let pod = self.node.pod(tag);
        no_dad(&pod);
        let att = Attachment::new(id, &pod, "eth0");
        let result = add(rt, list, &att);
        wait_settled(&pod);
        wait_settled(&self.node.ns);
        (pod, att, result)
    }
}

/// ADD through the runtime; panics with the plugin's output on failure.
#[track_caller]
fn add(rt: &Runtime, list: &Value, att: &Attachment) -> Value {
    rt.add_list(list, att)
        .unwrap_or_else(|out| panic!("ADD failed: {out}"))
}

fn bindings_of(nat: &Value, pod_ip: Ipv6Addr) -> Vec<Value> {
    let prefix = format!("[{pod_ip}]:");
    nat.as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["pod"].as_str().is_some_and(|p| p.starts_with(&prefix)))
        .cloned()
        .collect()
}

fn ping6(ns: &NetNs, dst: Ipv6Addr, extra: &[&str]) -> std::process::Output {
    let dst = dst.to_string();
    let mut args = vec!["-6", "-c", "2", "-i", "0.2", "-W", "2"];
    args.extend_from_slice(extra);
    args.push(&dst);
    ns.run("ping", &args)
}

fn stat(node: &Node, name: &str) -> u64 {
    admin(node, "status")["stats"][name].as_u64().unwrap_or(0)
}

/// Pod → external TCP, UDP and ICMPv6 echo over IPv6 leave with the
/// uplink's IPv6 address (the pod's source port kept, as netfilter keeps a
/// free one) and their replies reach the pod; the same pod's IPv4 still
/// works; `cni-agent nat` shows each IPv6 binding as [address]:port; the
/// ADD installed no iptables/nftables rule; DEL removes both masquerade
/// entries, the record and the pod's IPv6 bindings. A pod of a second
/// network without ipMasq cannot reach the outside over IPv6 (the
/// topology really needs the NAT).
#[test]
fn pod_v6_to_external_is_masqueraded() {
    require_e2e!();
    let fx = fixture("masq6", &["--tcp-closed-timeout", "120"]);
    let rt = fx.node.runtime(Impl::Ours);
    let list = fx.conf();
    let (pod, att, result) = fx.pod(&rt, &list, "m6pod", "masq6-ctr");
    let (pod4, pod6) = (result_ipv4(&result), result_ipv6(&result));
    let node6 = fx.ext.node_v6();

    let status = admin(&fx.node, "status");
    assert_eq!(
        status["masqSources"], 2,
        "one masquerade entry per pod address, IPv6 included: {status}"
    );
    assert_eq!(
        fx.node.ns.firewall_rules(),
        Vec::<String>::new(),
        "the node netns must have no iptables/nft rules after ADD"
    );

    let _tcp6 = TcpEchoServer::start_v6(&fx.ext.ns, TCP_PORT);
    let _udp6 = UdpEchoServer::start_v6(&fx.ext.ns, UDP_PORT);
    let _tcp4 = TcpEchoServer::start(&fx.ext.ns, TCP_PORT);

    let t = tcp_echo(&pod, fx.ext_tcp6(), "hello over tcp6").expect("pod -> external TCP/IPv6");
    assert_eq!(t.text, "hello over tcp6");
    assert_eq!(
        t.local.ip(),
        IpAddr::V6(pod6),
        "the pod's own socket address"
    );
    assert_eq!(
        t.seen_as.ip(),
        IpAddr::V6(node6),
        "the external side must see the node's uplink IPv6 address"
    );
    assert_eq!(
        t.seen_as.port(),
        t.local.port(),
        "a free source port is kept"
    );

    let u = udp_echo(&pod, fx.ext_udp6(), "hello over udp6").expect("pod -> external UDP/IPv6");
    assert_eq!(u.text, "hello over udp6");
    assert_eq!(u.local.ip(), IpAddr::V6(pod6));
    assert_eq!(u.seen_as.ip(), IpAddr::V6(node6), "UDP/IPv6 source");
    assert_eq!(u.seen_as.port(), u.local.port(), "UDP port kept");

    let ping = ping6(&pod, fx.ext.ext_v6(), &[]);
    assert!(
        ping.status.success(),
        "pod -> external ping -6: {}{}",
        String::from_utf8_lossy(&ping.stdout),
        String::from_utf8_lossy(&ping.stderr)
    );

    // The pod's IPv4 is served as before, by the IPv4 programs.
    let t4 = tcp_echo(
        &pod,
        SocketAddr::from((fx.ext.ext_addr, TCP_PORT)),
        "and over tcp4",
    )
    .expect("pod -> external TCP/IPv4");
    assert_eq!(t4.local.ip(), IpAddr::V4(pod4));
    assert_eq!(t4.seen_as.ip(), IpAddr::V4(fx.ext.node_addr));

    // The bindings, as the operator sees them.
    let nat = admin(&fx.node, "nat");
    let mine = bindings_of(&nat, pod6);
    let tcp = mine
        .iter()
        .find(|b| b["proto"] == "tcp" && b["pod"] == t.local.to_string().as_str())
        .unwrap_or_else(|| panic!("no TCP binding for {} in {nat:#}", t.local));
    assert_eq!(tcp["remote"], fx.ext_tcp6().to_string().as_str());
    assert_eq!(tcp["nat"], t.seen_as.to_string().as_str(), "{tcp}");
    assert!(
        tcp["state"].as_str().unwrap_or("").contains("replied"),
        "{tcp}"
    );
    let udp = mine
        .iter()
        .find(|b| b["proto"] == "udp" && b["pod"] == u.local.to_string().as_str())
        .unwrap_or_else(|| panic!("no UDP binding for {} in {nat:#}", u.local));
    assert_eq!(udp["nat"], u.seen_as.to_string().as_str());
    let icmp = mine
        .iter()
        .find(|b| b["proto"] == "icmpv6")
        .unwrap_or_else(|| panic!("no ICMPv6 binding for {pod6} in {nat:#}"));
    assert!(
        icmp["nat"]
            .as_str()
            .is_some_and(|n| n.starts_with(&format!("[{node6}]:"))),
        "ICMPv6 echo translated to the uplink address: {icmp}"
    );
    for b in &mine {
        assert_eq!(b["reply_half_missing"], false, "{b}");
    }
    let stats = admin(&fx.node, "status")["stats"].clone();
    assert!(stats["snatV6Translated"].as_u64() >= Some(3), "{stats:#}");
    assert!(
        stats["snatV6RepliesTranslated"].as_u64() >= Some(3),
        "{stats:#}"
    );

    let records = admin(&fx.node, "records");
    let entries = record_of(&records, NET, "masq6-ctr", "eth0")
        .unwrap_or_else(|| panic!("no record for the attachment: {records:#}"));
    assert!(
        entries
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["kind"] == "masq-source" && e["ip"] == pod6.to_string().as_str()),
        "record lists the IPv6 masquerade source: {entries}"
    );

    // Control: without ipMasq, IPv6 replies cannot come back.
    let plain = fx.node.pod("m6plain");
    no_dad(&plain);
    let mut plain_conf = masq_conf_dual(
        &fx.node,
        "plain6net",
        "cniplain6",
        "10.78.0.0/24",
        "fd00:78::/64",
    );
    plain_conf["ipMasq"] = json!(false);
    let plain_list = conflist_of(&plain_conf);
    let plain_att = Attachment::new("plain6-ctr", &plain, "eth0");
    let plain_result = add(&rt, &plain_list, &plain_att);
    wait_settled(&plain);
    let ext = fx.ext_tcp6();
    let refused = in_netns(&plain, move || {
        TcpStream::connect_timeout(&ext, Duration::from_secs(1))
    });
    assert!(
        refused.is_err(),
        "a pod without ipMasq must not get IPv6 replies from outside"
    );
    rt.del_list(&plain_list, &plain_att, Some(&plain_result))
        .unwrap_or_else(|o| panic!("DEL plain: {o}"));

    // DEL: both masquerade entries and the record go, then the bindings.
    rt.del_list(&list, &att, Some(&result))
        .unwrap_or_else(|o| panic!("DEL: {o}"));
    let status = admin(&fx.node, "status");
    assert_eq!(status["masqSources"], 0, "entries left after DEL: {status}");
    assert_eq!(status["records"], 0, "record left after DEL: {status}");
    // The bindings go with the agent's next sweep.
    eventually(
        "the sweeper to remove the deleted pod's IPv6 bindings",
        SETTLE,
        || bindings_of(&admin(&fx.node, "nat"), pod6).is_empty(),
    );
    drop(fx.agent);
}

/// What the external side observed of one dual-stack pod, in terms that do
/// not depend on the implementation (addresses named by role).
#[derive(Debug, PartialEq, Eq)]
struct Observed {
    tcp4_source: &'static str,
    udp4_source: &'static str,
    tcp6_source: &'static str,
    udp6_source: &'static str,
    ping4: bool,
    ping6: bool,
    /// Inbound (routed to the pod's own address): what the pod saw of the
    /// client, and what the client saw of the pod.
    inbound_tcp6: &'static str,
    inbound_udp6: &'static str,
}

/// The same dual-stack conflist (cniVersion 1.0.0, `type` names aside)
/// through the reference bridge/host-local (ip6tables MASQUERADE) and
/// through ours: the external side sees the node's uplink address for both
/// families, TCP, UDP and ping work both ways, and a connection the
/// external side opens to the pod's own IPv6 address (routed to the node,
/// as another node routes a pod CIDR) keeps the pod's address both ways,
/// TCP and UDP; our agent tracks that UDP flow as `inbound`.
#[test]
fn dual_stack_masquerade_matches_reference() {
    require_e2e!();
    let mut seen = Vec::new();
    for imp in [Impl::Reference, Impl::Ours] {
        let tag = match imp {
            Impl::Ours => "d6o",
            Impl::Reference => "d6r",
        };
        let node = Node::new(tag);
        let ext = External::direct_dual(&node);
        let _agent = (imp == Impl::Ours).then(|| {
            let a = AgentProc::start(&node, &[]);
            wait_dual_uplink(&node, &ext);
            a
        });
        let mut conf = masq_conf_dual(
            &node,
            NET,
            BRIDGE_NAME,
            &ext.pod_subnet(),
            &ext.pod_subnet6(),
        );
        conf["type"] = json!(imp.bridge_type());
        conf["ipam"]["type"] = json!(imp.ipam_type());
        let list = conflist_of(&conf);
        let pod = node.pod(&format!("{tag}pod"));
        no_dad(&pod);
        let rt = node.runtime(imp);
        let att = Attachment::new(&format!("{tag}-ctr"), &pod, "eth0");
        let result = add(&rt, &list, &att);
        wait_settled(&pod);
        wait_settled(&node.ns);
        let (pod4, pod6) = (result_ipv4(&result), result_ipv6(&result));
        let role = |ip: IpAddr| -> &'static str {
            if ip == IpAddr::V4(ext.node_addr) || ip == IpAddr::V6(ext.node_v6()) {
                "node"
            } else if ip == IpAddr::V4(pod4) || ip == IpAddr::V6(pod6) {
                "pod"
            } else {
                "other"
            }
        };

        let _tcp4 = TcpEchoServer::start(&ext.ns, TCP_PORT);
        let _udp4 = UdpEchoServer::start(&ext.ns, UDP_PORT);
        let _tcp6 = TcpEchoServer::start_v6(&ext.ns, TCP_PORT);
        let _udp6 = UdpEchoServer::start_v6(&ext.ns, UDP_PORT);
        let ext4 = |port| SocketAddr::from((ext.ext_addr, port));
        let ext6 = |port| SocketAddr::from((ext.ext_v6(), port));
        let must = |r: Result<cni_tests::traffic::Echo, String>, what: &str| {
            r.unwrap_or_else(|e| panic!("{imp:?}: {what}: {e}"))
        };
        let tcp4 = must(tcp_echo(&pod, ext4(TCP_PORT), "t4"), "pod -> ext TCP/IPv4");
        let udp4 = must(udp_echo(&pod, ext4(UDP_PORT), "u4"), "pod -> ext UDP/IPv4");
        let tcp6 = must(tcp_echo(&pod, ext6(TCP_PORT), "t6"), "pod -> ext TCP/IPv6");
        let udp6 = must(udp_echo(&pod, ext6(UDP_PORT), "u6"), "pod -> ext UDP/IPv6");
        let ping4 = pod
            .run(
                "ping",
                &["-c", "2", "-i", "0.2", "-W", "2", &ext.ext_addr.to_string()],
            )
            .status
            .success();
        let ping6 = ping6(&pod, ext.ext_v6(), &[]).status.success();

        // Inbound: the external side routes the pod's IPv6 subnet to the node.
        ext.ns.ip(&[
            "-6",
            "route",
            "add",
            &ext.pod_subnet6(),
            "via",
            &ext.node_v6().to_string(),
        ]);
        let _tcp_in_pod = TcpEchoServer::start_v6(&pod, TCP_PORT + 10);
        let _udp_in_pod = UdpEchoServer::start_v6(&pod, UDP_PORT + 10);
        let tin = must(
            tcp_echo(&ext.ns, SocketAddr::from((pod6, TCP_PORT + 10)), "in6"),
            "external -> pod TCP/IPv6",
        );
        // A connected UDP socket only takes replies from the pod's address.
        let uin = must(
            udp_echo(&ext.ns, SocketAddr::from((pod6, UDP_PORT + 10)), "in6"),
            "external -> pod UDP/IPv6",
        );
        let same = |e: &cni_tests::traffic::Echo| {
            if e.seen_as == e.local {
                "client address kept"
            } else {
                "client address changed"
            }
        };
        let obs = Observed {
            tcp4_source: role(tcp4.seen_as.ip()),
            udp4_source: role(udp4.seen_as.ip()),
            tcp6_source: role(tcp6.seen_as.ip()),
            udp6_source: role(udp6.seen_as.ip()),
            ping4,
            ping6,
            inbound_tcp6: same(&tin),
            inbound_udp6: same(&uin),
        };
        eprintln!(
            "{imp:?}: {obs:?} (TCP/IPv6 seen as {}, pod {})",
            tcp6.seen_as, tcp6.local
        );
        if imp == Impl::Ours {
            let nat = admin(&node, "nat");
            let inbound: Vec<Value> = bindings_of(&nat, pod6)
                .into_iter()
                .filter(|b| b["state"].as_str().is_some_and(|s| s.contains("inbound")))
                .collect();
            assert_eq!(
                inbound.len(),
                1,
                "the inbound UDP/IPv6 flow is tracked, untranslated: {nat:#}"
            );
            assert_eq!(inbound[0]["nat"], inbound[0]["pod"], "{nat:#}");
        }
        rt.del_list(&list, &att, Some(&result))
            .unwrap_or_else(|o| panic!("{imp:?}: DEL: {o}"));
        if imp == Impl::Ours {
            eventually(
                "the sweeper to remove the deleted pod's IPv6 bindings, inbound ones too",
                SETTLE,
                || bindings_of(&admin(&node, "nat"), pod6).is_empty(),
            );
        }
        seen.push((imp, obs));
    }
    let expected = Observed {
        tcp4_source: "node",
        udp4_source: "node",
        tcp6_source: "node",
        udp6_source: "node",
        ping4: true,
        ping6: true,
        inbound_tcp6: "client address kept",
        inbound_udp6: "client address kept",
    };
    for (imp, obs) in &seen {
        assert_eq!(obs, &expected, "{imp:?}");
    }
}

/// IPv6 ports are chosen as for IPv4 (netfilter's way): a pod keeps its own
/// source port when the translated tuple is free, and takes one from the
/// range when another pod's binding or a socket of the node holds it
/// (looked up through the IPv6 half of bpf_sock_tuple). A node socket that
/// picks a tuple a pod's binding holds is translated itself, so neither
/// steals the other's replies.
#[test]
fn v6_source_ports_are_kept_when_free_and_never_collide() {
    require_e2e!();
    let fx = fixture("keep6", &[]);
    let rt = fx.node.runtime(Impl::Ours);
    let list = fx.conf();
    let (pod_a, att_a, res_a) = fx.pod(&rt, &list, "k6a", "keep6-a");
    let (pod_b, att_b, res_b) = fx.pod(&rt, &list, "k6b", "keep6-b");
    let _tcp = TcpEchoServer::start_v6(&fx.ext.ns, TCP_PORT);
    let _tcp2 = TcpEchoServer::start_v6(&fx.ext.ns, TCP_PORT + 2);
    let _udp = UdpEchoServer::start_v6(&fx.ext.ns, UDP_PORT);
    let node_ip = IpAddr::V6(fx.ext.node_v6());
    let echo =
        |s: &TcpStream, what: &str| echo_on(s, what).unwrap_or_else(|e| panic!("{what}: {e}"));
    let connect = |ns: &NetNs, port: u16, server: SocketAddr, what: &str| {
        tcp_connect_from(ns, port, server).unwrap_or_else(|e| panic!("{what}: {e}"))
    };
    let before = admin(&fx.node, "status")["stats"].clone();

    // Free: kept.
    let a1 = connect(&pod_a, 40123, fx.ext_tcp6(), "pod a from 40123");
    assert_eq!(echo(&a1, "a1").seen_as, SocketAddr::new(node_ip, 40123));
    // Held by pod a's binding: pod b gets another port, both flows live.
    let b1 = connect(&pod_b, 40123, fx.ext_tcp6(), "pod b from 40123");
    let seen_b = echo(&b1, "b1").seen_as;
    assert_eq!(seen_b.ip(), node_ip);
    assert_ne!(seen_b.port(), 40123, "a held tuple is not given twice");
    assert_eq!(echo(&a1, "a1 again").seen_as.port(), 40123);
    // Ports are per remote endpoint.
    let b2 = connect(
        &pod_b,
        40123,
        SocketAddr::from((fx.ext.ext_v6(), TCP_PORT + 2)),
        "pod b from 40123 to another port",
    );
    assert_eq!(echo(&b2, "b2").seen_as.port(), 40123);

    // A node connection holds the tuple: the pod's flow goes around it.
    let n1 = connect(&fx.node.ns, 40200, fx.ext_tcp6(), "node from 40200");
    assert_eq!(echo(&n1, "n1").seen_as, SocketAddr::new(node_ip, 40200));
    let a2 = connect(&pod_a, 40200, fx.ext_tcp6(), "pod a from 40200");
    assert_ne!(echo(&a2, "a2").seen_as.port(), 40200, "the node's tuple");
    assert_eq!(echo(&n1, "n1 again").seen_as.port(), 40200);

    // A pod's binding holds the tuple a node socket then picks: the node's
    // flow is translated, both keep their replies.
    let a3 = connect(&pod_a, 40300, fx.ext_tcp6(), "pod a from 40300");
    assert_eq!(echo(&a3, "a3").seen_as.port(), 40300);
    let n2 = connect(&fx.node.ns, 40300, fx.ext_tcp6(), "node from 40300");
    let seen_n2 = echo(&n2, "n2").seen_as;
    assert_eq!(seen_n2.ip(), node_ip);
    assert_ne!(
        seen_n2.port(),
        40300,
        "the node's flow moves off the pod's tuple"
    );
    assert_eq!(echo(&a3, "a3 again").seen_as.port(), 40300);
    assert_eq!(echo(&n2, "n2 again").seen_as, seen_n2);

    // UDP: a bound node socket holds its port for every remote.
    let node_sock = in_netns(&fx.node.ns, || {
        std::net::UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 40400)).expect("node udp [::]:40400")
    });
    let u1 = udp_echo_from(&pod_a, 40400, fx.ext_udp6(), "u1").expect("pod a udp from 40400");
    assert_ne!(u1.seen_as.port(), 40400, "a port a node socket is bound to");
    let u2 = udp_echo_from(&pod_a, 40401, fx.ext_udp6(), "u2").expect("pod a udp from 40401");
    assert_eq!(
        u2.seen_as,
        SocketAddr::new(node_ip, 40401),
        "a free UDP port is kept"
    );
    drop(node_sock);

    let after = admin(&fx.node, "status")["stats"].clone();
    let grew = |k: &str| after[k].as_u64().unwrap_or(0) - before[k].as_u64().unwrap_or(0);
    assert!(grew("snatPortKept") >= 4, "{after:#}");
    assert!(grew("snatNodeFlows") >= 1, "{after:#}");
    assert!(grew("snatPortInUse") >= 2, "{after:#}");
    for s in [a1, b1, b2, n1, a2, a3, n2] {
        drop(s);
    }
    rt.del_list(&list, &att_b, Some(&res_b))
        .unwrap_or_else(|o| panic!("{o}"));
    rt.del_list(&list, &att_a, Some(&res_a))
        .unwrap_or_else(|o| panic!("{o}"));
}

/// A router with a 1280-byte link towards the far side answers a pod's
/// full-size IPv6 packets with Packet Too Big addressed to the node's
/// uplink address (IPv6 routers never fragment); the node must translate
/// the outer destination and the quoted source back so the pod learns the
/// path MTU: its route cache shows it, a bulk TCP upload over IPv6 whose
/// segments are too big for the path completes, and a too-large ping
/// fails locally naming the MTU.
#[test]
fn packet_too_big_reaches_the_pod() {
    require_e2e!();
    const PATH_MTU: u32 = 1280;
    let node = Node::new("ptb6");
    let ext = External::routed_dual(&node, PATH_MTU);
    // The far host keeps a 1500 MTU, so TCP's MSS does not hide the
    // smaller link: only PMTU discovery can.
    ext.ns.ip(&["link", "set", "eth0", "mtu", "1500"]);
    let _agent = AgentProc::start(&node, &[]);
    wait_dual_uplink(&node, &ext);
    let pod = node.pod("ptb6pod");
    no_dad(&pod);
    let rt = node.runtime(Impl::Ours);
    let list = conflist_of(&masq_conf_dual(
        &node,
        NET,
        BRIDGE_NAME,
        &ext.pod_subnet(),
        &ext.pod_subnet6(),
    ));
    let att = Attachment::new("ptb6-ctr", &pod, "eth0");
    let result = add(&rt, &list, &att);
    wait_settled(&pod);
    wait_settled(&node.ns);
    let far = ext.ext_v6();
    let far_s = far.to_string();

    let ping = ping6(&pod, far, &[]);
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );
    let route = pod.ip(&["-6", "route", "get", &far_s]);
    assert!(!route.contains("mtu"), "no path MTU known yet: {route}");
    let errors_before = stat(&node, "snatIcmpErrorsTranslated");

    // A TCP upload of 1 MiB, full-size segments.
    let listener = in_netns(&ext.ns, || {
        TcpListener::bind((Ipv6Addr::UNSPECIFIED, TCP_PORT)).expect("bind [::]")
    });
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    let sink = std::thread::spawn(move || -> std::io::Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut s = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => return Err(e),
            }
        };
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut n = 0u64;
        let mut buf = [0u8; 65536];
        loop {
            match s.read(&mut buf)? {
                0 => break,
                k => n += k as u64,
            }
        }
        s.write_all(format!("{n}\n").as_bytes())?;
        Ok(n)
    });
    let target = SocketAddr::from((far, TCP_PORT));
    let t0 = Instant::now();
    let upload = in_netns(&pod, move || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
        s.set_write_timeout(Some(Duration::from_secs(15)))?;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        s.write_all(&vec![0x5a; 1 << 20])?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut reply = String::new();
        BufReader::new(&s).read_line(&mut reply)?;
        Ok(reply.trim().to_string())
    });
    let received = sink.join().expect("sink thread");
    assert_eq!(
        upload.as_deref().map_err(|e| e.to_string()),
        Ok("1048576"),
        "1 MiB upload over an IPv6 path with MTU {PATH_MTU} (sink: {received:?})"
    );
    eprintln!(
        "1 MiB IPv6 upload across the {PATH_MTU}-MTU hop took {:?}",
        t0.elapsed()
    );

    eventually("the pod to cache the IPv6 path MTU", SETTLE, || {
        pod.ip(&["-6", "route", "get", &far_s])
            .contains(&format!("mtu {PATH_MTU}"))
    });
    assert!(
        stat(&node, "snatIcmpErrorsTranslated") > errors_before,
        "Packet Too Big translated by the datapath"
    );
    // And a too-large ping now fails locally, naming the path MTU.
    let big = pod.run(
        "ping",
        &["-6", "-c", "1", "-W", "1", "-M", "do", "-s", "1400", &far_s],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&big.stdout),
        String::from_utf8_lossy(&big.stderr)
    );
    assert!(
        !big.status.success(),
        "a 1448-byte ping cannot pass: {text}"
    );
    assert!(
        [
            format!("mtu={PATH_MTU}"),
            format!("mtu = {PATH_MTU}"),
            format!("mtu: {PATH_MTU}")
        ]
        .iter()
        .any(|m| text.contains(m.as_str())),
        "{text}"
    );
    rt.del_list(&list, &att, Some(&result))
        .unwrap_or_else(|o| panic!("{o}"));
}

/// The other ICMPv6 errors about masqueraded flows reach the pod too: a
/// closed UDP port on the far host answers with Destination Unreachable
/// (the pod's connected socket gets "connection refused"), and a ping
/// whose hop limit runs out at the router gets Time Exceeded from it (an
/// error quoting an ICMPv6 echo, whose identifier the masquerade changed).
#[test]
fn icmpv6_unreachable_and_time_exceeded_reach_the_pod() {
    require_e2e!();
    let node = Node::new("err6");
    let ext = External::routed_dual(&node, 1500);
    let _agent = AgentProc::start(&node, &[]);
    wait_dual_uplink(&node, &ext);
    let pod = node.pod("err6pod");
    no_dad(&pod);
    let rt = node.runtime(Impl::Ours);
    let list = conflist_of(&masq_conf_dual(
        &node,
        NET,
        BRIDGE_NAME,
        &ext.pod_subnet(),
        &ext.pod_subnet6(),
    ));
    let att = Attachment::new("err6-ctr", &pod, "eth0");
    let result = add(&rt, &list, &att);
    wait_settled(&pod);
    wait_settled(&node.ns);
    let far = ext.ext_v6();
    let ping = ping6(&pod, far, &[]);
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );
    let errors_before = stat(&node, "snatIcmpErrorsTranslated");

    // Nothing listens on this port of the far host.
    let closed = SocketAddr::from((far, UDP_PORT + 100));
    let refused = in_netns(&pod, move || -> std::io::Result<()> {
        let s = std::net::UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?;
        s.connect(closed)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.send(b"anyone?")?;
        let mut buf = [0u8; 64];
        s.recv(&mut buf).map(|_| ())
    });
    assert_eq!(
        refused.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionRefused),
        "the far host's Destination Unreachable must reach the pod's socket"
    );

    // Hop limit 2: the node forwards with 1, the router must not.
    let out = ping6(&pod, far, &["-t", "2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Time exceeded"),
        "the router's Time Exceeded must reach the pod: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stat(&node, "snatIcmpErrorsTranslated") >= errors_before + 2,
        "both errors translated by the datapath"
    );
    rt.del_list(&list, &att, Some(&result))
        .unwrap_or_else(|o| panic!("{o}"));
}

/// An uplink with IPv6 alone (the node's only default route is IPv6) is
/// served: `cni-agent status` shows its IPv6 address and no IPv4 one, a
/// dual-stack pod's IPv6 is masqueraded through it, and its IPv4 — for
/// which the uplink has no address to give — is left alone (no binding to
/// 0.0.0.0).
#[test]
fn v6_only_uplink_is_served_for_ipv6_alone() {
    require_e2e!();
    let node = Node::new("only6");
    let ext = External::direct_dual(&node);
    node.ns.ip(&["-4", "route", "del", "default"]);
    node.ns.ip(&[
        "addr",
        "del",
        &format!("{}/24", ext.node_addr),
        "dev",
        cni_tests::uplink::UPLINK_IF,
    ]);
    // IPv4 to the external side still leaves through the uplink, without
    // an address of its own there.
    let ext_net4 = format!("198.18.{}.0/24", ext.index);
    node.ns.ip(&[
        "route",
        "add",
        &ext_net4,
        "dev",
        cni_tests::uplink::UPLINK_IF,
    ]);
    let _agent = AgentProc::start(&node, &[]);
    let v6 = ext.node_v6().to_string();
    wait_until("the agent to serve uplink0 with IPv6 alone", SETTLE, || {
        let status = admin(&node, "status");
        let ups = status["uplinks"].as_array()?.clone();
        (ups.len() == 1 && ups[0]["address"].is_null() && ups[0]["addressV6"] == v6.as_str())
            .then_some(())
    });
    let rt = node.runtime(Impl::Ours);
    let list = conflist_of(&masq_conf_dual(
        &node,
        NET,
        BRIDGE_NAME,
        &ext.pod_subnet(),
        &ext.pod_subnet6(),
    ));
    let pod = node.pod("only6pod");
    no_dad(&pod);
    let att = Attachment::new("only6-ctr", &pod, "eth0");
    let result = add(&rt, &list, &att);
    wait_settled(&pod);
    wait_settled(&node.ns);
    let pod4 = result_ipv4(&result);

    let _tcp6 = TcpEchoServer::start_v6(&ext.ns, TCP_PORT);
    let t = tcp_echo(&pod, SocketAddr::from((ext.ext_v6(), TCP_PORT)), "v6 only")
        .expect("pod -> external TCP/IPv6 through a v6-only uplink");
    assert_eq!(t.seen_as.ip(), IpAddr::V6(ext.node_v6()));

    let _tcp4 = TcpEchoServer::start(&ext.ns, TCP_PORT);
    let target4 = SocketAddr::from((ext.ext_addr, TCP_PORT));
    let r = in_netns(&pod, move || {
        TcpStream::connect_timeout(&target4, Duration::from_secs(1))
    });
    assert!(r.is_err(), "no IPv4 masquerade without an IPv4 address");
    let nat = admin(&node, "nat");
    let prefix = format!("{pod4}:");
    assert!(
        !nat.as_array()
            .into_iter()
            .flatten()
            .any(|b| b["pod"].as_str().is_some_and(|p| p.starts_with(&prefix))),
        "no IPv4 binding on an uplink without an IPv4 address: {nat:#}"
    );
    rt.del_list(&list, &att, Some(&result))
        .unwrap_or_else(|o| panic!("{o}"));
}

/// The IPv6 masquerade is in the pinned datapath like the IPv4 one: an
/// established TCP/IPv6 connection keeps working while the agent is down
/// and after a new agent took the pinned links over.
#[test]
fn v6_flow_survives_agent_restart() {
    require_e2e!();
    let mut fx = fixture("rst6", &[]);
    let rt = fx.node.runtime(Impl::Ours);
    let list = fx.conf();
    let (pod, att, result) = fx.pod(&rt, &list, "rst6pod", "rst6-ctr");
    let _tcp6 = TcpEchoServer::start_v6(&fx.ext.ns, TCP_PORT);
    let conn = tcp_connect_from(&pod, 0, fx.ext_tcp6()).expect("pod -> external TCP/IPv6");
    let first = echo_on(&conn, "before").expect("echo before the restart");
    assert_eq!(first.seen_as.ip(), IpAddr::V6(fx.ext.node_v6()));

    fx.agent.terminate();
    let down = echo_on(&conn, "agent down").expect("echo with the agent stopped");
    assert_eq!(down.seen_as, first.seen_as, "same binding with no agent");

    fx.agent = AgentProc::start(&fx.node, &[]);
    wait_dual_uplink(&fx.node, &fx.ext);
    let after = echo_on(&conn, "after").expect("echo after the restart");
    assert_eq!(
        after.seen_as, first.seen_as,
        "same binding after the restart"
    );
    drop(conn);
    rt.del_list(&list, &att, Some(&result))
        .unwrap_or_else(|o| panic!("{o}"));
}

/// A pod's 4,000-byte UDP datagram over IPv6 at MTU 1500 travels as three
/// fragments, which the pod makes itself (IPv6 routers never fragment) and
/// only the first of which carries the UDP header: the masquerade must give
/// every fragment the uplink's address, and every fragment of the server's
/// 4,000-byte reply the pod's, or neither end can reassemble. Both ends
/// check every byte and the addresses they saw; the namespaces' IPv6
/// counters (/proc/net/snmp6) show the ends fragmented and reassembled and
/// the node neither (it translated the fragments as they came), the
/// datapath counters that it remembered the first fragments and translated
/// the others.
#[test]
fn v6_fragments_are_masqueraded_both_ways() {
    require_e2e!();
    const LEN: usize = 4000;
    const BLOB_PORT: u16 = 7002;
    let fx = fixture("masq6frag", &[]);
    let rt = fx.node.runtime(Impl::Ours);
    let list = fx.conf();
    let (pod, att, result) = fx.pod(&rt, &list, "m6fpod", "masq6f-ctr");
    let pod6 = result_ipv6(&result);
    let server = UdpBlobServer::start_v6(&fx.ext.ns, BLOB_PORT);
    let target = SocketAddr::from((fx.ext.ext_v6(), BLOB_PORT));
    let request = blob(LEN, 5);
    let (first0, later0) = (
        stat(&fx.node, "fragFirstRemembered"),
        stat(&fx.node, "fragTranslated"),
    );
    let namespaces = [&pod, &fx.ext.ns, &fx.node.ns];
    let before = namespaces.map(FragCounters::of6);

    let reply = udp_blob(&pod, target, &request).unwrap_or_else(|e| {
        let snmp = [0, 1, 2].map(|i| FragCounters::of6(namespaces[i]).since(before[i]));
        panic!(
            "pod -> {target}, {LEN} bytes over IPv6: {e}\n(pod, ext, node) {snmp:?}\n{:#}",
            admin(&fx.node, "status")["stats"]
        )
    });
    assert_eq!(reply.from, target, "the pod must see the server's address");
    assert_eq!(reply.local.ip(), IpAddr::V6(pod6));
    assert!(
        reply.data == blob_reply(&request),
        "the pod must receive the {LEN}-byte reply exactly (got {} bytes)",
        reply.data.len()
    );
    let received = server.received();
    assert!(!received.is_empty(), "the server received nothing");
    for (peer, data) in &received {
        assert_eq!(
            peer.ip(),
            IpAddr::V6(fx.ext.node_v6()),
            "the server must see the node's uplink IPv6 address"
        );
        assert!(
            *data == request,
            "the server must receive the {LEN} bytes exactly (got {})",
            data.len()
        );
    }
    let [p, e, n] = [0, 1, 2].map(|i| FragCounters::of6(namespaces[i]).since(before[i]));
    assert!(
        p.frag_oks >= 1 && e.reasm_oks >= 1,
        "pod fragments, server reassembles: {p:?} {e:?}"
    );
    assert!(
        e.frag_oks >= 1 && p.reasm_oks >= 1,
        "server fragments, pod reassembles: {e:?} {p:?}"
    );
    assert_eq!(
        (n.reasm_reqds, n.frag_oks),
        (0, 0),
        "the node must pass the fragments on as they are"
    );
    let first = stat(&fx.node, "fragFirstRemembered") - first0;
    let later = stat(&fx.node, "fragTranslated") - later0;
    eprintln!("fragFirstRemembered +{first}, fragTranslated +{later}");
    assert!(
        first >= 2,
        "a first fragment remembered per direction: +{first}"
    );
    assert!(
        later >= 4,
        "two later fragments translated per direction: +{later}"
    );

    rt.del_list(&list, &att, Some(&result))
        .unwrap_or_else(|o| panic!("DEL: {o}"));
}
