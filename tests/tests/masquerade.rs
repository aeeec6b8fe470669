//! The eBPF masquerade (`ipMasq: true`) end to end: a node namespace with an
//! uplink to an "external" namespace that has no route back to the pods, our
//! agent serving the uplink, and pods attached by ebpf-bridge through the
//! harness runtime. Replies only come back if the node translates, and the
//! far side reports the source address it saw.
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cni_tests::agentctl::{admin, nat_occupancy, record_of, recorded_masq_ips, AgentProc};
use cni_tests::prelude::*;
use cni_tests::traffic::{
    echo_on, in_netns, spawn_in_netns, tcp_connect_from, tcp_echo, udp_echo, udp_echo_from,
    TcpEchoServer, UdpEchoServer,
};
use cni_tests::uplink::{masq_conf, result_ipv4, External};

const NET: &str = "masqnet";
const BRIDGE_NAME: &str = "cnimasq0";
const TCP_PORT: u16 = 7000;
const UDP_PORT: u16 = 7001;

/// A node with an uplink and a running agent. Fields drop in order: agent
/// first, then the external side, then the node.
struct Fixture {
    _agent: AgentProc,
    ext: External,
    node: Node,
}

fn fixture(tag: &str, agent_args: &[&str]) -> Fixture {
    let node = Node::new(tag);
    let ext = External::direct(&node);
    let agent = AgentProc::start(&node, agent_args);
    let status = admin(&node, "status");
    let uplinks: Vec<&str> = status["uplinks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|u| u["address"].as_str())
        .collect();
    assert_eq!(
        uplinks,
        vec![ext.node_addr.to_string()],
        "the agent must serve the default-route interface: {status}"
    );
    Fixture {
        _agent: agent,
        ext,
        node,
    }
}

impl Fixture {
    fn conf(&self) -> Value {
        conflist_of(&masq_conf(
            &self.node,
            NET,
            BRIDGE_NAME,
            &self.ext.pod_subnet(),
        ))
    }

    fn ext_tcp(&self) -> SocketAddr {
        SocketAddr::from((self.ext.ext_addr, TCP_PORT))
    }

    fn ext_udp(&self) -> SocketAddr {
        SocketAddr::from((self.ext.ext_addr, UDP_PORT))
    }
}

/// ADD through the runtime; panics with the plugin's output on failure.
#[track_caller]
fn add(rt: &Runtime, list: &Value, att: &Attachment) -> Value {
    rt.add_list(list, att)
        .unwrap_or_else(|out| panic!("ADD failed: {out}"))
}

fn bindings_of(nat: &Value, pod_ip: Ipv4Addr) -> Vec<Value> {
    let prefix = format!("{pod_ip}:");
    nat.as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["pod"].as_str().is_some_and(|p| p.starts_with(&prefix)))
        .cloned()
        .collect()
}

/// Pod → external TCP, UDP and ICMP echo leave with the uplink address and
/// their replies reach the pod; `cni-agent nat` shows each binding; the ADD
/// installed no iptables/nftables rule; DEL removes the masquerade entry,
/// the record and the pod's bindings. A pod of a second network without
/// ipMasq cannot reach the outside (the topology really needs the NAT).
#[test]
fn pod_to_external_is_masqueraded() {
    require_e2e!();
    // Closed TCP bindings stay listed long enough to be inspected.
    let fx = fixture("masq", &["--tcp-closed-timeout", "120"]);
    let pod = fx.node.pod("masqpod");
    let rt = fx.node.runtime(Impl::Ours);
    let list = fx.conf();
    let att = Attachment::new("masq-ctr", &pod, "eth0");
    let result = add(&rt, &list, &att);
    let pod_ip = result_ipv4(&result);

    // No firewall rules anywhere: ipMasq is the eBPF SNAT.
    assert_eq!(
        fx.node.ns.firewall_rules(),
        Vec::<String>::new(),
        "the node netns must have no iptables/nft rules after a full-chain ADD"
    );
    assert_eq!(
        pod.firewall_rules(),
        Vec::<String>::new(),
        "pod netns rules"
    );

    let _tcp = TcpEchoServer::start(&fx.ext.ns, TCP_PORT);
    let _udp = UdpEchoServer::start(&fx.ext.ns, UDP_PORT);

    let t = tcp_echo(&pod, fx.ext_tcp(), "hello over tcp").expect("pod -> external TCP");
    assert_eq!(t.text, "hello over tcp", "TCP echo content");
    assert_eq!(
        t.local.ip(),
        IpAddr::V4(pod_ip),
        "the pod's own socket address"
    );
    assert_eq!(
        t.seen_as.ip(),
        IpAddr::V4(fx.ext.node_addr),
        "the external side must see the node's uplink address"
    );

    let u = udp_echo(&pod, fx.ext_udp(), "hello over udp").expect("pod -> external UDP");
    assert_eq!(u.text, "hello over udp");
    assert_eq!(u.local.ip(), IpAddr::V4(pod_ip));
    assert_eq!(u.seen_as.ip(), IpAddr::V4(fx.ext.node_addr), "UDP source");

    let ping = pod.run(
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
        "pod -> external ping: {}",
        String::from_utf8_lossy(&ping.stdout)
    );

    // The bindings, as the operator sees them.
    let nat = admin(&fx.node, "nat");
    let mine = bindings_of(&nat, pod_ip);
    let tcp = mine
        .iter()
        .find(|b| b["proto"] == "tcp" && b["pod"] == t.local.to_string().as_str())
        .unwrap_or_else(|| panic!("no TCP binding for {} in {nat:#}", t.local));
    assert_eq!(tcp["remote"], fx.ext_tcp().to_string().as_str());
    assert_eq!(
        tcp["nat"],
        t.seen_as.to_string().as_str(),
        "TCP binding = what the server saw"
    );
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
        .find(|b| b["proto"] == "icmp")
        .unwrap_or_else(|| panic!("no ICMP binding for {pod_ip} in {nat:#}"));
    assert!(
        icmp["nat"]
            .as_str()
            .is_some_and(|n| n.starts_with(&format!("{}:", fx.ext.node_addr))),
        "ICMP echo translated to the uplink address: {icmp}"
    );
    for b in &mine {
        assert_eq!(b["reply_half_missing"], false, "{b}");
    }

    // The attachment's record and the masquerade source.
    let records = admin(&fx.node, "records");
    let entries = record_of(&records, NET, "masq-ctr", "eth0")
        .unwrap_or_else(|| panic!("no record for the attachment: {records:#}"));
    assert!(
        entries
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "masq-source" && e["ip"] == pod_ip.to_string().as_str()),
        "record lists the masquerade source: {entries}"
    );
    assert_eq!(admin(&fx.node, "status")["masqSources"], 1);

    // Control: a pod without ipMasq on another bridge gets no translation,
    // so its SYN reaches the far side, whose answer cannot come back.
    let plain = fx.node.pod("plainpod");
    let mut plain_conf = masq_conf(&fx.node, "plainnet", "cniplain0", "10.78.0.0/24");
    plain_conf["ipMasq"] = json!(false);
    let plain_list = conflist_of(&plain_conf);
    let plain_att = Attachment::new("plain-ctr", &plain, "eth0");
    let plain_result = add(&rt, &plain_list, &plain_att);
    let ext = fx.ext_tcp();
    let refused = in_netns(&plain, move || {
        TcpStream::connect_timeout(&ext, Duration::from_secs(1))
    });
    assert!(
        refused.is_err(),
        "a pod without ipMasq must not get replies from outside"
    );
    assert_eq!(
        admin(&fx.node, "status")["masqSources"],
        1,
        "no entry for ipMasq=false"
    );
    rt.del_list(&plain_list, &plain_att, Some(&plain_result))
        .unwrap_or_else(|o| panic!("DEL plain: {o}"));

    // DEL: the masquerade entry and the record go, then the pod's bindings.
    rt.del_list(&list, &att, Some(&result))
        .unwrap_or_else(|o| panic!("DEL: {o}"));
    let status = admin(&fx.node, "status");
    assert_eq!(
        status["masqSources"], 0,
        "masquerade entry left after DEL: {status}"
    );
    assert_eq!(status["records"], 0, "record left after DEL: {status}");
    let records = admin(&fx.node, "records");
    assert!(
        record_of(&records, NET, "masq-ctr", "eth0").is_none(),
        "{records:#}"
    );
    assert!(recorded_masq_ips(&records).is_empty(), "{records:#}");
    // The bindings go with the agent's next sweep (a DEL does not walk the
    // table under the node lock to find them).
    eventually(
        "the sweeper to remove the deleted pod's bindings",
        SETTLE,
        || bindings_of(&admin(&fx.node, "nat"), pod_ip).is_empty(),
    );
}

/// Traffic that stays on the node keeps the pod's address: pod → pod on the
/// same bridge, pod → its gateway, pod → the node's uplink address.
#[test]
fn pod_to_pod_and_node_keep_pod_addresses() {
    require_e2e!();
    let fx = fixture("local", &[]);
    let pod_a = fx.node.pod("loca");
    let pod_b = fx.node.pod("locb");
    let rt = fx.node.runtime(Impl::Ours);
    let list = fx.conf();
    let att_a = Attachment::new("local-a", &pod_a, "eth0");
    let att_b = Attachment::new("local-b", &pod_b, "eth0");
    let res_a = add(&rt, &list, &att_a);
    let res_b = add(&rt, &list, &att_b);
    let (ip_a, ip_b) = (result_ipv4(&res_a), result_ipv4(&res_b));

    let _in_b = TcpEchoServer::start(&pod_b, TCP_PORT);
    let _in_node = TcpEchoServer::start(&fx.node.ns, TCP_PORT);

    let to_b = tcp_echo(&pod_a, SocketAddr::from((ip_b, TCP_PORT)), "a to b").expect("pod -> pod");
    assert_eq!(
        to_b.seen_as, to_b.local,
        "pod -> pod must not be translated"
    );
    assert_eq!(to_b.seen_as.ip(), IpAddr::V4(ip_a));

    let gw = fx.ext.pod_gateway();
    let to_gw =
        tcp_echo(&pod_a, SocketAddr::from((gw, TCP_PORT)), "a to gw").expect("pod -> gateway");
    assert_eq!(
        to_gw.seen_as, to_gw.local,
        "pod -> gateway must not be translated"
    );
    assert_eq!(to_gw.seen_as.ip(), IpAddr::V4(ip_a));

    let to_up = tcp_echo(
        &pod_a,
        SocketAddr::from((fx.ext.node_addr, TCP_PORT)),
        "a to node",
    )
    .expect("pod -> node uplink address");
    assert_eq!(
        to_up.seen_as, to_up.local,
        "pod -> node address must not be translated"
    );

    let nat = admin(&fx.node, "nat");
    assert!(
        bindings_of(&nat, ip_a).is_empty(),
        "no NAT binding for node-local traffic: {nat:#}"
    );
    rt.del_list(&list, &att_b, Some(&res_b))
        .unwrap_or_else(|o| panic!("{o}"));
    rt.del_list(&list, &att_a, Some(&res_a))
        .unwrap_or_else(|o| panic!("{o}"));
}

/// A connection a remote opens to a masqueraded pod's own address (routed
/// to the node, as another node of a cluster routes a pod CIDR) is the
/// remote's, not the pod's: TCP and UDP replies leave with the pod's
/// address and the pod sees the client's, as with the reference bridge's
/// conntrack MASQUERADE (checked side by side). The pod's own connections
/// are still masqueraded.
#[test]
fn routed_inbound_connections_keep_pod_addresses() {
    require_e2e!();
    for imp in [Impl::Reference, Impl::Ours] {
        let tag = match imp {
            Impl::Ours => "inbo",
            Impl::Reference => "inbr",
        };
        let node = Node::new(tag);
        let ext = External::direct(&node);
        let _agent = (imp == Impl::Ours).then(|| AgentProc::start(&node, &[]));
        let mut conf = masq_conf(&node, NET, BRIDGE_NAME, &ext.pod_subnet());
        conf["cniVersion"] = json!("1.0.0");
        if imp == Impl::Reference {
            conf["type"] = json!(imp.bridge_type());
            conf["ipam"]["type"] = json!(imp.ipam_type());
        }
        let list = conflist_of(&conf);
        let pod = node.pod(&format!("{tag}pod"));
        let rt = node.runtime(imp);
        let att = Attachment::new(&format!("{tag}-ctr"), &pod, "eth0");
        let result = add(&rt, &list, &att);
        let pod_ip = result_ipv4(&result);
        // The external side routes the pod subnet to the node.
        ext.ns.ip(&[
            "route",
            "add",
            &ext.pod_subnet(),
            "via",
            &ext.node_addr.to_string(),
        ]);

        let _tcp_in_pod = TcpEchoServer::start(&pod, TCP_PORT);
        let _udp_in_pod = UdpEchoServer::start(&pod, UDP_PORT);
        let t = tcp_echo(&ext.ns, SocketAddr::from((pod_ip, TCP_PORT)), "in over tcp")
            .unwrap_or_else(|e| panic!("{imp:?}: external -> pod TCP: {e}"));
        assert_eq!(t.text, "in over tcp", "{imp:?}");
        assert_eq!(
            t.seen_as, t.local,
            "{imp:?}: the pod must see the client's own address"
        );
        // A connected UDP socket only takes replies from the pod's address.
        let u = udp_echo(&ext.ns, SocketAddr::from((pod_ip, UDP_PORT)), "in over udp")
            .unwrap_or_else(|e| panic!("{imp:?}: external -> pod UDP: {e}"));
        assert_eq!(u.text, "in over udp", "{imp:?}");
        assert_eq!(u.seen_as, u.local, "{imp:?}: UDP client address");

        // The pod's own connections still leave masqueraded.
        let _tcp_out = TcpEchoServer::start(&ext.ns, TCP_PORT);
        let _udp_out = UdpEchoServer::start(&ext.ns, UDP_PORT);
        let t = tcp_echo(&pod, SocketAddr::from((ext.ext_addr, TCP_PORT)), "out")
            .unwrap_or_else(|e| panic!("{imp:?}: pod -> external TCP: {e}"));
        assert_eq!(t.seen_as.ip(), IpAddr::V4(ext.node_addr), "{imp:?}");
        let u = udp_echo(&pod, SocketAddr::from((ext.ext_addr, UDP_PORT)), "out")
            .unwrap_or_else(|e| panic!("{imp:?}: pod -> external UDP: {e}"));
        assert_eq!(u.seen_as.ip(), IpAddr::V4(ext.node_addr), "{imp:?}");

        if imp == Impl::Ours {
            let nat = admin(&node, "nat");
            let inbound: Vec<Value> = bindings_of(&nat, pod_ip)
                .into_iter()
                .filter(|b| b["state"].as_str().is_some_and(|s| s.contains("inbound")))
                .collect();
            assert_eq!(
                inbound.len(),
                1,
                "the inbound UDP flow is tracked, untranslated: {nat:#}"
            );
            assert_eq!(inbound[0]["nat"], inbound[0]["pod"], "{nat:#}");
        }
        rt.del_list(&list, &att, Some(&result))
            .unwrap_or_else(|o| panic!("{imp:?}: {o}"));
        if imp == Impl::Ours {
            eventually(
                "the sweeper to remove the deleted pod's bindings, inbound ones too",
                SETTLE,
                || bindings_of(&admin(&node, "nat"), pod_ip).is_empty(),
            );
        }
    }
}

/// 1,000 connections open at once from one pod to one external server:
/// all complete, the server sees 1,000 distinct source ports all from the
/// uplink address, and after they close the NAT table drains back to its
/// baseline (closed-connection timeout 2 s).
#[test]
fn thousand_concurrent_connections() {
    require_e2e!();
    const THREADS: usize = 10;
    const PER_THREAD: usize = 100;
    const TOTAL: usize = THREADS * PER_THREAD;
    let fx = fixture(
        "conns",
        &["--tcp-closed-timeout", "2", "--nat-ports", "40000-44999"],
    );
    let pod = fx.node.pod("connpod");
    let rt = fx.node.runtime(Impl::Ours);
    let list = fx.conf();
    let att = Attachment::new("conns-ctr", &pod, "eth0");
    let result = add(&rt, &list, &att);
    let pod_ip = result_ipv4(&result);
    let server = TcpEchoServer::start(&fx.ext.ns, TCP_PORT);
    let target = fx.ext_tcp();
    let baseline = nat_occupancy(&admin(&fx.node, "status"));

    // Phases: every thread connects its share and echoes one line on each
    // connection, reports, and keeps them all open until told to close
    // (its `close` sender dropped; also on a panic here, so no thread is
    // left behind).
    let (done_tx, done_rx) = mpsc::channel();
    let mut closers = Vec::new();
    let start = Instant::now();
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let done_tx = done_tx.clone();
            let (close_tx, close_rx) = mpsc::channel::<()>();
            closers.push(close_tx);
            spawn_in_netns(&pod, move || {
                let mut streams = Vec::new();
                let mut errors = Vec::new();
                for _ in 0..PER_THREAD {
                    match TcpStream::connect_timeout(&target, Duration::from_secs(10)) {
                        Ok(s) => streams.push(s),
                        Err(e) => errors.push(format!("connect: {e}")),
                    }
                }
                for (i, s) in streams.iter().enumerate() {
                    if let Err(e) = (&*s).write_all(format!("conn {t}/{i}\n").as_bytes()) {
                        errors.push(format!("send: {e}"));
                    }
                }
                let mut seen = Vec::new();
                for (i, s) in streams.iter().enumerate() {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut reply = String::new();
                    match BufReader::new(s).read_line(&mut reply) {
                        Ok(_) if reply.trim_end().ends_with(&format!(" conn {t}/{i}")) => {
                            match reply.split(' ').next().unwrap_or("").parse::<SocketAddr>() {
                                Ok(peer) => seen.push((peer, s.local_addr().ok())),
                                Err(e) => errors.push(format!("bad peer in {reply:?}: {e}")),
                            }
                        }
                        Ok(_) => errors.push(format!("bad echo {reply:?}")),
                        Err(e) => errors.push(format!("echo: {e}")),
                    }
                }
                let _ = done_tx.send((seen, errors));
                let _ = close_rx.recv_timeout(Duration::from_secs(120));
                drop(streams);
            })
        })
        .collect();
    drop(done_tx);
    let mut seen = Vec::new();
    let mut errors = Vec::new();
    for _ in 0..THREADS {
        let (s, e) = done_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a client thread did not report within 60 s");
        seen.extend(s);
        errors.extend(e);
    }
    let elapsed = start.elapsed();
    let open_status = admin(&fx.node, "status");
    let nat = admin(&fx.node, "nat");
    drop(closers);
    let closed_at = Instant::now();
    for w in workers {
        w.join().expect("client thread");
    }
    eprintln!("{TOTAL} concurrent connections connected and echoed in {elapsed:?}");
    assert!(
        errors.is_empty(),
        "{} failures, e.g. {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert_eq!(seen.len(), TOTAL);

    // What the server saw: TOTAL distinct ports, all from the uplink address.
    let peers = server.peers();
    assert_eq!(peers.len(), TOTAL, "connections accepted by the server");
    let from: BTreeSet<IpAddr> = peers.iter().map(|p| p.ip()).collect();
    assert_eq!(
        from,
        BTreeSet::from([IpAddr::V4(fx.ext.node_addr)]),
        "source addresses"
    );
    let ports: BTreeSet<u16> = peers.iter().map(|p| p.port()).collect();
    assert_eq!(ports.len(), TOTAL, "distinct source ports");
    // The pod's ports are free on the node side: each connection keeps its
    // own (netfilter's choice).
    let kept = seen
        .iter()
        .filter(|(peer, local)| local.is_some_and(|l| l.port() == peer.port()))
        .count();
    assert_eq!(kept, TOTAL, "every connection keeps the pod's source port");
    // Each client's echo names the port its own connection got.
    let echoed_ports: BTreeSet<u16> = seen.iter().map(|(p, _)| p.port()).collect();
    assert_eq!(echoed_ports, ports, "echoed peers = accepted peers");

    // While open: one binding per connection, both halves.
    let (orig, reply) = nat_occupancy(&open_status);
    assert_eq!(
        (orig, reply),
        (baseline.0 + TOTAL as u64, baseline.1 + TOTAL as u64),
        "NAT halves with {TOTAL} open connections: {open_status}"
    );
    let mine = bindings_of(&nat, pod_ip);
    let tcp: Vec<&Value> = mine
        .iter()
        .filter(|b| b["proto"] == "tcp" && b["remote"] == target.to_string().as_str())
        .collect();
    assert_eq!(tcp.len(), TOTAL, "`cni-agent nat` lists every connection");
    let nat_ports: BTreeSet<u16> = tcp
        .iter()
        .filter_map(|b| b["nat"].as_str()?.rsplit(':').next()?.parse().ok())
        .collect();
    assert_eq!(nat_ports, ports, "bindings = what the server saw");

    // After close: the table drains to its baseline.
    let deadline = closed_at + Duration::from_secs(30);
    let drained = loop {
        let occ = nat_occupancy(&admin(&fx.node, "status"));
        if occ == baseline {
            break closed_at.elapsed();
        }
        if Instant::now() >= deadline {
            let nat = admin(&fx.node, "nat");
            let sample: Vec<&Value> = nat.as_array().into_iter().flatten().take(5).collect();
            panic!("NAT table not drained 30 s after close: {occ:?} vs baseline {baseline:?}; e.g. {sample:#?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("NAT table drained {TOTAL} closed bindings in {drained:?} (closed timeout 2 s)");
    rt.del_list(&list, &att, Some(&result))
        .unwrap_or_else(|o| panic!("{o}"));
}

/// A router with a smaller MTU towards the far side answers a pod's DF
/// packets with "fragmentation needed" addressed to the node's uplink
/// address; the node must translate the quoted header back so the pod
/// learns the path MTU: its route cache shows it and a bulk TCP upload,
/// whose segments are too big for the path, completes.
#[test]
fn frag_needed_reaches_the_pod() {
    require_e2e!();
    const PATH_MTU: u32 = 1280;
    let node = Node::new("pmtu");
    let ext = External::routed(&node, PATH_MTU);
    // The far host keeps a 1500 MTU, so TCP's MSS does not hide the
    // smaller link: only PMTU discovery can.
    ext.ns.ip(&["link", "set", "eth0", "mtu", "1500"]);
    let _agent = AgentProc::start(&node, &[]);
    let pod = node.pod("pmtupod");
    let rt = node.runtime(Impl::Ours);
    let list = conflist_of(&masq_conf(&node, NET, BRIDGE_NAME, &ext.pod_subnet()));
    let att = Attachment::new("pmtu-ctr", &pod, "eth0");
    let result = add(&rt, &list, &att);
    let far = ext.ext_addr.to_string();

    // Small packets pass.
    let ping = pod.run("ping", &["-c", "1", "-W", "2", &far]);
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );

    let route = pod.ip(&["-4", "route", "get", &far]);
    assert!(!route.contains("mtu"), "no path MTU known yet: {route}");

    // A TCP upload of 1 MiB, full-size DF segments.
    let listener = in_netns(&ext.ns, || {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, TCP_PORT)).expect("bind")
    });
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    let sink = std::thread::spawn(move || -> std::io::Result<u64> {
        // Gives up (instead of blocking forever) if the client never comes.
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
    let target = SocketAddr::V4(SocketAddrV4::new(ext.ext_addr, TCP_PORT));
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
        "1 MiB upload over a path with MTU {PATH_MTU} (sink: {received:?})"
    );
    eprintln!(
        "1 MiB upload across the {PATH_MTU}-MTU hop took {:?}",
        t0.elapsed()
    );

    // The pod's route cache holds the learned path MTU.
    eventually("the pod to cache the path MTU", SETTLE, || {
        pod.ip(&["-4", "route", "get", &far])
            .contains(&format!("mtu {PATH_MTU}"))
    });
    // And ping with DF and a too-large payload now fails locally, naming it.
    let big = pod.run(
        "ping",
        &["-c", "1", "-W", "1", "-M", "do", "-s", "1400", &far],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&big.stdout),
        String::from_utf8_lossy(&big.stderr)
    );
    assert!(
        !big.status.success(),
        "a 1428-byte DF ping cannot pass: {text}"
    );
    assert!(
        text.contains(&format!("mtu={PATH_MTU}")) || text.contains(&format!("mtu = {PATH_MTU}")),
        "{text}"
    );
    rt.del_list(&list, &att, Some(&result))
        .unwrap_or_else(|o| panic!("{o}"));
}

/// With every port of the masquerade range taken for one remote endpoint,
/// new flows to it are dropped and counted (`snatNoPort` in `cni-agent
/// status`), and the agent logs that at most once a second instead of a
/// line per dropped packet. (ICMP echo identifiers always come from the
/// range: a two-port range holds two pings.)
#[test]
fn port_exhaustion_is_counted_and_logged_once_a_second() {
    require_e2e!();
    let node = Node::new("noport");
    let ext = External::direct(&node);
    let agent = AgentProc::start(&node, &["--nat-ports", "61000-61001"]);
    let pod = node.pod("noportpod");
    let rt = node.runtime(Impl::Ours);
    let list = conflist_of(&masq_conf(&node, NET, BRIDGE_NAME, &ext.pod_subnet()));
    let att = Attachment::new("noport-ctr", &pod, "eth0");
    let result = add(&rt, &list, &att);
    let ext_addr = ext.ext_addr.to_string();

    // Two pings take the two ports; the others find none, for 3 s.
    let started = Instant::now();
    let mut answered = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let out = pod.run("ping", &["-c", "1", "-W", "1", &ext_addr]);
        if out.status.success() {
            answered += 1;
        }
    }
    let elapsed = started.elapsed().as_secs() + 1;
    assert!(answered >= 1, "the first pings get the ports");
    let dropped = admin(&node, "status")["stats"]["snatNoPort"]
        .as_u64()
        .unwrap_or(0);
    assert!(dropped > 0, "drops are counted");
    // The agent reports what it counted within a scan interval or two.
    let log_lines = || {
        agent
            .log_text()
            .lines()
            .filter(|l| l.contains("no free source port"))
            .count() as u64
    };
    wait_until("the agent's log line", Duration::from_secs(5), || {
        (log_lines() > 0).then_some(())
    });
    let lines = log_lines();
    assert!(
        lines <= elapsed + 3,
        "at most one log line a second: {lines} lines for {dropped} drops in {elapsed} s"
    );
    rt.del_list(&list, &att, Some(&result))
        .unwrap_or_else(|o| panic!("{o}"));
}

/// Masquerade picks ports as netfilter does: a pod keeps its own source
/// port when the translated tuple is free (ports are per remote endpoint),
/// and takes one from the range when another pod's binding, a socket of
/// the node or a hostPort holds it. A node socket that picks a tuple a
/// pod's binding holds is translated itself, so neither steals the
/// other's replies.
#[test]
fn source_ports_are_kept_when_free_and_never_collide() {
    require_e2e!();
    let fx = fixture("keep", &[]);
    let (pod_a, pod_b) = (fx.node.pod("keepa"), fx.node.pod("keepb"));
    let rt = fx.node.runtime(Impl::Ours);
    let list = fx.conf();
    let att_a = Attachment::new("keep-a", &pod_a, "eth0");
    let att_b = Attachment::new("keep-b", &pod_b, "eth0");
    let res_a = add(&rt, &list, &att_a);
    let res_b = add(&rt, &list, &att_b);
    let _tcp = TcpEchoServer::start(&fx.ext.ns, TCP_PORT);
    let _tcp2 = TcpEchoServer::start(&fx.ext.ns, TCP_PORT + 2);
    let _udp = UdpEchoServer::start(&fx.ext.ns, UDP_PORT);
    let node_ip = IpAddr::V4(fx.ext.node_addr);
    let echo =
        |s: &TcpStream, what: &str| echo_on(s, what).unwrap_or_else(|e| panic!("{what}: {e}"));
    let connect = |ns: &NetNs, port: u16, server: SocketAddr, what: &str| {
        tcp_connect_from(ns, port, server).unwrap_or_else(|e| panic!("{what}: {e}"))
    };

    // Free: kept.
    let a1 = connect(&pod_a, 40123, fx.ext_tcp(), "pod a from 40123");
    let seen = echo(&a1, "a1").seen_as;
    assert_eq!(seen, SocketAddr::new(node_ip, 40123), "a free port is kept");
    // Held by pod a's binding: pod b gets another port, both flows live.
    let b1 = connect(&pod_b, 40123, fx.ext_tcp(), "pod b from 40123");
    let seen_b = echo(&b1, "b1").seen_as;
    assert_eq!(seen_b.ip(), node_ip);
    assert_ne!(seen_b.port(), 40123, "a held tuple is not given twice");
    assert_eq!(echo(&a1, "a1 again").seen_as.port(), 40123);
    // Ports are per remote endpoint: the same port to another one is free.
    let b2 = connect(
        &pod_b,
        40123,
        SocketAddr::from((fx.ext.ext_addr, TCP_PORT + 2)),
        "pod b from 40123 to another port",
    );
    assert_eq!(echo(&b2, "b2").seen_as.port(), 40123);

    // A node connection holds the tuple: the pod's flow goes around it.
    let n1 = connect(&fx.node.ns, 40200, fx.ext_tcp(), "node from 40200");
    assert_eq!(echo(&n1, "n1").seen_as, SocketAddr::new(node_ip, 40200));
    let a2 = connect(&pod_a, 40200, fx.ext_tcp(), "pod a from 40200");
    assert_ne!(echo(&a2, "a2").seen_as.port(), 40200, "the node's tuple");
    assert_eq!(echo(&n1, "n1 again").seen_as.port(), 40200);

    // A pod's binding holds the tuple a node socket then picks: the node's
    // flow is translated, and both keep their replies.
    let a3 = connect(&pod_a, 40300, fx.ext_tcp(), "pod a from 40300");
    assert_eq!(echo(&a3, "a3").seen_as.port(), 40300);
    let n2 = connect(&fx.node.ns, 40300, fx.ext_tcp(), "node from 40300");
    let seen_n2 = echo(&n2, "n2").seen_as;
    assert_eq!(seen_n2.ip(), node_ip);
    assert_ne!(
        seen_n2.port(),
        40300,
        "the node's flow is moved off the pod's tuple"
    );
    assert_eq!(echo(&a3, "a3 again").seen_as.port(), 40300);
    assert_eq!(echo(&n2, "n2 again").seen_as, seen_n2);

    // UDP: a bound node socket holds its port for every remote.
    let node_sock = in_netns(&fx.node.ns, || {
        std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 40400)).expect("node udp 40400")
    });
    let u1 = udp_echo_from(&pod_a, 40400, fx.ext_udp(), "u1").expect("pod a udp from 40400");
    assert_ne!(u1.seen_as.port(), 40400, "a port a node socket is bound to");
    let u2 = udp_echo_from(&pod_a, 40401, fx.ext_udp(), "u2").expect("pod a udp from 40401");
    assert_eq!(
        u2.seen_as,
        SocketAddr::new(node_ip, 40401),
        "a free UDP port is kept"
    );
    drop(node_sock);

    let stats = admin(&fx.node, "status")["stats"].clone();
    assert!(stats["snatPortKept"].as_u64() >= Some(4), "{stats:#}");
    assert!(stats["snatNodeFlows"].as_u64() >= Some(1), "{stats:#}");
    assert!(stats["snatPortInUse"].as_u64() >= Some(2), "{stats:#}");
    for s in [a1, b1, b2, n1, a2, a3, n2] {
        drop(s);
    }
    rt.del_list(&list, &att_b, Some(&res_b))
        .unwrap_or_else(|o| panic!("{o}"));
    rt.del_list(&list, &att_a, Some(&res_a))
        .unwrap_or_else(|o| panic!("{o}"));
}
