//! hostPort mapping (ebpf-portmap) end to end, the datapath, in both DNAT
//! modes of the agent (TC ingress, or XDP in front of it on the uplink):
//! an external client reaching a pod through node:hostPort (TCP, UDP,
//! bulk), hostIP restrictions, hairpin from pods, node-local clients
//! through the cgroup socket hooks, ICMP errors about hostPort flows both
//! ways (path MTU discovery through a smaller hop, a pod's port
//! unreachable reaching the client). The verbs (conflicts, bad input, DEL,
//! CHECK, GC) are in portmap_verbs.rs, 500 pods in portmap_scale.rs.
//!
//! Topology (per test, see `cni_tests::hostport_node`): a node namespace
//! with an uplink veth to an "external" namespace (198.18.x.0/24, which
//! has no route to the pods), our agent serving the uplink, pods attached
//! by the harness runtime with the conflist ebpf-bridge (ipMasq) +
//! ebpf-portmap. The echo servers answer `<peer as seen> <payload>`, so
//! every exchange shows the source address the pod saw, and a client that
//! connected to node:hostPort and got its echo back proves the reply left
//! as node:hostPort.
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use cni_tests::agentctl::{admin, record_of, AgentProc};
use cni_tests::hostport::{
    bulk_echo, local_client, mapping, mapping_on, set_tx_checksum, BulkEchoServer, ClientKind,
};
use cni_tests::hostport_node::{
    delta, fixture, uplink_has_xdp, Fixture, Mode, Setup, BRIDGE_NAME, NET, POD_PORT,
};
use cni_tests::prelude::*;
use cni_tests::traffic::{in_netns, tcp_echo, udp_echo, TcpEchoServer, UdpEchoServer};
use cni_tests::uplink::{External, UPLINK_IF};

/// Port of the pods' bulk echo server.
const BULK_PORT: u16 = 9000;

fn probe_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hostport-probe"))
}

// ---------------------------------------------------------------------------
// 1. External client -> node:hostPort -> pod, TCP and UDP, both modes.
// ---------------------------------------------------------------------------

/// An external client reaches the pod's TCP and UDP servers through
/// node:hostPort; the pod sees the client's real address and port whatever
/// `snat` says (snat only concerns hairpin and node-local traffic, as in
/// the reference); the replies come back from node:hostPort (the client's
/// connected sockets accept nothing else). The counters show which hook
/// translated: in XDP mode the XDP program did every DNAT, in TC mode it
/// did none. No iptables/nft rule exists, and DEL removes the mappings.
fn external_clients_reach_the_pod(tag: &str, setup: Setup, snat: Option<bool>) {
    let mode = setup.mode;
    let fx = fixture(tag, setup);
    let list = fx.list(snat);
    const HP: u16 = 30080;
    const HP_BULK: u16 = 30081;
    let pod = fx.add_pod(
        &list,
        &format!("{tag}-ctr"),
        vec![
            mapping(HP.into(), POD_PORT.into(), "tcp"),
            mapping(HP.into(), POD_PORT.into(), "udp"),
            mapping(HP_BULK.into(), BULK_PORT.into(), "tcp"),
        ],
    );
    if !fx.wire_checksums {
        // The external side sends CHECKSUM_PARTIAL packets (only the
        // pseudo-header sum in the L4 checksum field), which no receiver
        // on veths ever verifies. Without TX checksum offload on the pod's
        // host-side veth, the kernel completes the checksum in software
        // from that field before handing the packet to the pod, whose
        // stack then verifies it: a wrong translation of a partial
        // checksum loses the packet instead of passing unnoticed.
        let host_veth = pod.result["interfaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|i| {
                i["sandbox"].as_str().is_none_or(str::is_empty)
                    && i["name"].as_str() != Some(BRIDGE_NAME)
            })
            .and_then(|i| i["name"].as_str())
            .unwrap_or_else(|| panic!("no host-side veth in {}", pod.result))
            .to_string();
        set_tx_checksum(&fx.node.ns, &host_veth, false);
    }
    assert_eq!(
        fx.node.ns.firewall_rules(),
        Vec::<String>::new(),
        "hostPorts must not be iptables/nft rules"
    );
    assert_eq!(fx.status()["hostPorts"], 3, "one map entry per mapping");
    let _tcp = TcpEchoServer::start(&pod.ns, POD_PORT);
    let _udp = UdpEchoServer::start(&pod.ns, POD_PORT);
    let before = fx.status();

    let target = fx.node_hostport(HP);
    for i in 0..3 {
        let t = tcp_echo(&fx.ext.ns, target, &format!("tcp {i}"))
            .unwrap_or_else(|e| panic!("external -> {target} TCP ({mode:?}): {e}"));
        assert_eq!(t.text, format!("tcp {i}"));
        assert_eq!(
            t.seen_as, t.local,
            "the pod must see the external client's own address and port"
        );
        assert_eq!(t.seen_as.ip(), IpAddr::V4(fx.ext.ext_addr));
        let u = udp_echo(&fx.ext.ns, target, &format!("udp {i}"))
            .unwrap_or_else(|e| panic!("external -> {target} UDP ({mode:?}): {e}"));
        assert_eq!(u.text, format!("udp {i}"));
        assert_eq!(u.seen_as, u.local, "UDP client address as the pod saw it");
    }

    // Bulk both ways: full-size (and GSO/GRO-merged) segments through the
    // DNAT and the reply translation, checksummed by the receiver.
    let bulk = BulkEchoServer::start(&pod.ns, BULK_PORT);
    let bulk_mid = fx.status();
    bulk_echo(&fx.ext.ns, fx.node_hostport(HP_BULK), 4 << 20)
        .unwrap_or_else(|e| panic!("4 MiB echo through {HP_BULK} ({mode:?}): {e}"));
    drop(bulk);
    let bulk_after = fx.status();
    eprintln!(
        "{mode:?} bulk: hostPortDnat +{}, hostPortDnatXdp +{}",
        delta(&bulk_mid, &bulk_after, "hostPortDnat"),
        delta(&bulk_mid, &bulk_after, "hostPortDnatXdp")
    );

    let after = fx.status();
    let dnat = delta(&before, &after, "hostPortDnat");
    let dnat_xdp = delta(&before, &after, "hostPortDnatXdp");
    let replies = delta(&before, &after, "hostPortReplies");
    eprintln!(
        "{mode:?}: hostPortDnat +{dnat}, hostPortDnatXdp +{dnat_xdp}, hostPortReplies +{replies}"
    );
    // 3 TCP connections (SYN, ACK, data, FIN, ACK at least) + 3 datagrams.
    assert!(dnat >= 3 * 4 + 3 + 100, "DNATed packets: {dnat}\n{after:#}");
    assert!(replies >= 3 * 3 + 3, "translated replies: {replies}");
    match mode {
        Mode::Tc => assert_eq!(dnat_xdp, 0, "TC mode: the XDP program must not run"),
        Mode::Xdp => assert_eq!(
            dnat_xdp, dnat,
            "XDP mode: every DNAT done by the XDP program\n{after:#}"
        ),
    }
    assert_eq!(delta(&before, &after, "hostPortHairpin"), 0);
    assert_eq!(delta(&before, &after, "hostPortSocket"), 0);

    fx.del_pod(&list, &pod);
    let status = fx.status();
    assert_eq!(status["hostPorts"], 0, "{status:#}");
    assert_eq!(status["records"], 0, "{status:#}");
    let refused = in_netns(&fx.ext.ns, move || {
        TcpStream::connect_timeout(&target, Duration::from_secs(2))
    });
    assert!(refused.is_err(), "hostPort still answers after DEL");
}

#[test]
fn external_tc_snat_default() {
    require_e2e!();
    external_clients_reach_the_pod("exttc", Setup::mode(Mode::Tc), None);
}

#[test]
fn external_tc_snat_false() {
    require_e2e!();
    external_clients_reach_the_pod("exttcns", Setup::mode(Mode::Tc), Some(false));
}

#[test]
fn external_xdp_snat_true() {
    require_e2e!();
    external_clients_reach_the_pod("extxdp", Setup::mode(Mode::Xdp), Some(true));
}

#[test]
fn external_xdp_snat_false() {
    require_e2e!();
    external_clients_reach_the_pod("extxdpns", Setup::mode(Mode::Xdp), Some(false));
}

/// The external peer is a veth with TX checksum offload on (the default):
/// its packets reach the uplink with partial checksums (CHECKSUM_PARTIAL),
/// and the pod's host-side veth completes them in software (see
/// `external_clients_reach_the_pod`). TC mode: the control.
#[test]
fn external_tc_from_offloading_veth_peer() {
    require_e2e!();
    external_clients_reach_the_pod(
        "exttcof",
        Setup {
            mode: Mode::Tc,
            cgroup: false,
            wire_checksums: false,
        },
        None,
    );
}

/// Same in XDP mode, with the external peer's TX checksum offload on: its
/// packets carry partial checksums, which XDP cannot tell from complete
/// ones. The XDP program leaves the transport checksum to the TC program
/// behind it (through the XDP metadata), whose helper updates either kind
/// right; the pod's host veth completes and the pod verifies the checksum.
#[test]
fn external_xdp_from_offloading_veth_peer() {
    require_e2e!();
    external_clients_reach_the_pod(
        "extxdpof",
        Setup {
            mode: Mode::Xdp,
            cgroup: false,
            wire_checksums: false,
        },
        None,
    );
}

// ---------------------------------------------------------------------------
// 2. hostIP.
// ---------------------------------------------------------------------------

/// A mapping with hostIP = the uplink address answers on that address
/// only, not on a second address of the same uplink; a mapping without
/// hostIP answers on both (once the agent has seen the new address); a
/// UDP mapping bound to the second address answers only there.
fn host_ip_limits_the_address(tag: &str, mode: Mode) {
    let fx = fixture(tag, Setup::mode(mode));
    let second = Ipv4Addr::new(198, 18, fx.ext.index, 3);
    fx.node
        .ns
        .ip(&["addr", "add", &format!("{second}/24"), "dev", UPLINK_IF]);
    let list = fx.list(None);
    const ONLY_FIRST: u16 = 30090;
    const ANY: u16 = 30091;
    const ONLY_SECOND_UDP: u16 = 30092;
    let pod = fx.add_pod(
        &list,
        &format!("{tag}-ctr"),
        vec![
            mapping_on(fx.ext.node_addr, ONLY_FIRST.into(), POD_PORT.into(), "tcp"),
            mapping(ANY.into(), POD_PORT.into(), "tcp"),
            mapping_on(second, ONLY_SECOND_UDP.into(), POD_PORT.into(), "udp"),
        ],
    );
    let _tcp = TcpEchoServer::start(&pod.ns, POD_PORT);
    let _udp = UdpEchoServer::start(&pod.ns, POD_PORT);
    let ext = &fx.ext.ns;
    let on = |ip: Ipv4Addr, port: u16| SocketAddr::from((ip, port));

    // The agent learns node addresses by polling: wait for the any-address
    // mapping to answer on the new one first, so the negative checks below
    // are not vacuous.
    wait_until(
        "the any-address mapping on the second address",
        SETTLE,
        || tcp_echo(ext, on(second, ANY), "any@second").ok(),
    );
    let t = tcp_echo(ext, on(fx.ext.node_addr, ANY), "any@first").expect("any-address mapping");
    assert_eq!(t.seen_as, t.local);

    let t = tcp_echo(ext, on(fx.ext.node_addr, ONLY_FIRST), "first@first")
        .expect("hostIP mapping on its own address");
    assert_eq!(t.text, "first@first");
    assert_eq!(t.seen_as, t.local);
    let wrong = tcp_echo(ext, on(second, ONLY_FIRST), "first@second");
    assert!(
        wrong.is_err(),
        "a mapping with hostIP {} must not answer on {second}: {wrong:?}",
        fx.ext.node_addr
    );

    let u = udp_echo(ext, on(second, ONLY_SECOND_UDP), "second@second")
        .expect("UDP hostIP mapping on its own address");
    assert_eq!(u.seen_as, u.local);
    let wrong = udp_echo(ext, on(fx.ext.node_addr, ONLY_SECOND_UDP), "second@first");
    assert!(
        wrong.is_err(),
        "a UDP mapping with hostIP {second} answered on {}: {wrong:?}",
        fx.ext.node_addr
    );

    // The record keeps the hostIP.
    let records = admin(&fx.node, "records");
    let entries = record_of(&records, NET, &pod.att.container_id, "eth0").expect("record");
    let host_ips: Vec<&str> = entries
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "host-port")
        .map(|e| e["hostIp"].as_str().unwrap_or("-"))
        .collect();
    assert_eq!(
        host_ips,
        vec![
            fx.ext.node_addr.to_string().as_str(),
            "-",
            second.to_string().as_str()
        ],
        "{entries:#}"
    );
    fx.del_pod(&list, &pod);
    assert_eq!(fx.status()["hostPorts"], 0);
}

#[test]
fn host_ip_tc() {
    require_e2e!();
    host_ip_limits_the_address("hiptc", Mode::Tc);
}

#[test]
fn host_ip_xdp() {
    require_e2e!();
    host_ip_limits_the_address("hipxdp", Mode::Xdp);
}

// ---------------------------------------------------------------------------
// 3. Hairpin.
// ---------------------------------------------------------------------------

/// With snat (the default), a pod reaching a hostPort through the node's
/// uplink address, or through its gateway (the bridge address, also a node
/// address), is answered by the target pod, which sees the bridge address:
/// from another pod, and from the target pod itself. Counted as hairpin
/// and translated on the bridge, never on the uplink.
#[test]
fn hairpin_with_snat() {
    require_e2e!();
    let fx = fixture("hpsnat", Setup::mode(Mode::Tc));
    let list = fx.list(Some(true));
    const HP1: u16 = 30100;
    const HP2: u16 = 30101;
    let pod1 = fx.add_pod(
        &list,
        "hpsnat-1",
        vec![
            mapping(HP1.into(), POD_PORT.into(), "tcp"),
            mapping(HP1.into(), POD_PORT.into(), "udp"),
        ],
    );
    let pod2 = fx.add_pod(
        &list,
        "hpsnat-2",
        vec![mapping(HP2.into(), POD_PORT.into(), "tcp")],
    );
    let _tcp1 = TcpEchoServer::start(&pod1.ns, POD_PORT);
    let _udp1 = UdpEchoServer::start(&pod1.ns, POD_PORT);
    let _tcp2 = TcpEchoServer::start(&pod2.ns, POD_PORT);
    let gw = IpAddr::V4(fx.ext.pod_gateway());
    // The bridge address became a node address with the first ADD; the
    // agent picks it up on its next address scan (every second).
    let t0 = std::time::Instant::now();
    let gw_target = SocketAddr::from((fx.ext.pod_gateway(), HP1));
    wait_until("hostPorts on the bridge address", SETTLE, || {
        tcp_echo(&pod2.ns, gw_target, "probe").ok()
    });
    eprintln!(
        "hostPort on the bridge address answered {:?} after the ADDs",
        t0.elapsed()
    );
    let before = fx.status();

    let mut exchanges = 0;
    for (who, from) in [("pod2", &pod2), ("pod1 itself", &pod1)] {
        for via in [fx.ext.node_addr, fx.ext.pod_gateway()] {
            let target = SocketAddr::from((via, HP1));
            let t = tcp_echo(&from.ns, target, "hairpin tcp")
                .unwrap_or_else(|e| panic!("{who} -> {target} TCP: {e}"));
            assert_eq!(t.text, "hairpin tcp");
            assert_eq!(
                t.seen_as.ip(),
                gw,
                "{who} -> {target}: the target pod must see the bridge address"
            );
            assert_eq!(t.local.ip(), IpAddr::V4(from.ip));
            let u = udp_echo(&from.ns, target, "hairpin udp")
                .unwrap_or_else(|e| panic!("{who} -> {target} UDP: {e}"));
            assert_eq!(u.seen_as.ip(), gw, "{who} -> {target} UDP");
            exchanges += 2;
        }
    }
    // pod1 -> pod2's hostPort too.
    let t = tcp_echo(&pod1.ns, fx.node_hostport(HP2), "1 to 2").expect("pod1 -> node:HP2");
    assert_eq!(t.seen_as.ip(), gw);
    exchanges += 1;

    let after = fx.status();
    let hairpin = delta(&before, &after, "hostPortHairpin");
    eprintln!(
        "hairpin: +{hairpin} hairpin, +{} uplink DNAT, +{} noPort",
        delta(&before, &after, "hostPortDnat"),
        delta(&before, &after, "hostPortNoPort")
    );
    assert!(
        hairpin >= exchanges,
        "hostPortHairpin +{hairpin} for {exchanges} exchanges\n{after:#}"
    );
    assert_eq!(
        delta(&before, &after, "hostPortDnat"),
        0,
        "hairpin traffic never crosses the uplink"
    );
    assert_eq!(delta(&before, &after, "hostPortNoPort"), 0);
    fx.del_pod(&list, &pod2);
    fx.del_pod(&list, &pod1);
}

/// With `snat: false`, hairpin packets are DNATed on the bridge but keep
/// the client pod's address, so the target pod answers the client
/// directly (bridged, or to itself), bypassing the translation back: like
/// the reference without br_netfilter, the connection does not complete.
/// This test pins only what must hold either way: the DNAT happens, and
/// if an exchange does complete, the server saw the client's real address
/// (nothing masqueraded it). It prints what happened, for the record.
#[test]
fn hairpin_without_snat() {
    require_e2e!();
    let fx = fixture("hpnosnat", Setup::mode(Mode::Tc));
    let list = fx.list(Some(false));
    const HP1: u16 = 30102;
    let pod1 = fx.add_pod(
        &list,
        "hpnosnat-1",
        vec![mapping(HP1.into(), POD_PORT.into(), "tcp")],
    );
    let pod2 = fx.add_pod(&list, "hpnosnat-2", vec![]);
    let _tcp1 = TcpEchoServer::start(&pod1.ns, POD_PORT);
    let before = fx.status();
    for (who, from) in [("pod2", &pod2), ("pod1 itself", &pod1)] {
        let target = fx.node_hostport(HP1);
        let r = quick_tcp_echo(&from.ns, target, "hairpin");
        eprintln!("snat=false: {who} -> {target}: {r:?}");
        if let Ok(seen) = r {
            assert_eq!(
                seen.ip(),
                IpAddr::V4(from.ip),
                "snat=false must not masquerade hairpin traffic"
            );
        }
    }
    let after = fx.status();
    let hairpin = delta(&before, &after, "hostPortHairpin");
    eprintln!("snat=false: hostPortHairpin +{hairpin}");
    assert!(hairpin > 0, "hairpin packets were not DNATed\n{after:#}");
    fx.del_pod(&list, &pod2);
    fx.del_pod(&list, &pod1);
}

/// One TCP line exchange with a 1 s connect timeout; returns the address
/// the server saw.
fn quick_tcp_echo(ns: &NetNs, server: SocketAddr, line: &str) -> Result<SocketAddr, String> {
    use std::io::{BufRead, BufReader, Write};
    let line = line.to_string();
    in_netns(ns, move || {
        let s = TcpStream::connect_timeout(&server, Duration::from_secs(1))
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))
            .map_err(|e| e.to_string())?;
        (&s).write_all(format!("{line}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut reply = String::new();
        BufReader::new(&s)
            .read_line(&mut reply)
            .map_err(|e| format!("echo: {e}"))?;
        reply
            .split(' ')
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("malformed echo {reply:?}"))
    })
}

// ---------------------------------------------------------------------------
// 4. Node-local clients (cgroup socket hooks).
// ---------------------------------------------------------------------------

/// A process on the node, in the agent's cgroup, reaches the hostPort on
/// the node's address and on 127.0.0.1, by TCP, connected UDP and sendto
/// UDP; the pod sees the bridge address. The same process outside the
/// cgroup gets nothing (the hooks do the work, not some rule).
fn node_local_clients(tag: &str, mode: Mode) {
    let fx = fixture(
        tag,
        Setup {
            mode,
            cgroup: true,
            wire_checksums: true,
        },
    );
    let cg = fx.cgroup.as_ref().expect("cgroup");
    let list = fx.list(None);
    const HP: u16 = 30110;
    let pod = fx.add_pod(
        &list,
        &format!("{tag}-ctr"),
        vec![
            mapping(HP.into(), POD_PORT.into(), "tcp"),
            mapping(HP.into(), POD_PORT.into(), "udp"),
        ],
    );
    let _tcp = TcpEchoServer::start(&pod.ns, POD_PORT);
    let _udp = UdpEchoServer::start(&pod.ns, POD_PORT);
    let gw = IpAddr::V4(fx.ext.pod_gateway());
    let probe = probe_bin();
    let before = fx.status();
    let mut sockets = 0;
    for via in [fx.ext.node_addr, Ipv4Addr::LOCALHOST] {
        let target = SocketAddr::from((via, HP));
        for kind in [
            ClientKind::Tcp,
            ClientKind::UdpConnected,
            ClientKind::UdpSendto,
        ] {
            let payload = format!("{kind:?} via {via}");
            let r = local_client(&probe, &fx.node.ns, Some(cg), kind, target, &payload)
                .unwrap_or_else(|e| panic!("node-local {kind:?} -> {target}: {e}"));
            eprintln!("node-local {kind:?} -> {target}: {r:?}");
            assert_eq!(r.text, payload);
            assert_eq!(
                r.seen_as.ip(),
                gw,
                "{kind:?} -> {target}: the pod sees the node's bridge address"
            );
            sockets += 1;
        }
    }
    let after = fx.status();
    let hooked = delta(&before, &after, "hostPortSocket");
    assert!(
        hooked >= sockets,
        "hostPortSocket +{hooked} for {sockets} clients\n{after:#}"
    );
    assert!(cg.pids().is_empty(), "probes left in the cgroup");

    // Control: outside the cgroup nothing translates.
    for via in [fx.ext.node_addr, Ipv4Addr::LOCALHOST] {
        let target = SocketAddr::from((via, HP));
        let r = local_client(
            &probe,
            &fx.node.ns,
            None,
            ClientKind::Tcp,
            target,
            "no hook",
        );
        assert!(
            r.is_err(),
            "a process outside the cgroup reached {target}: {r:?}"
        );
    }
    fx.del_pod(&list, &pod);
    let r = local_client(
        &probe,
        &fx.node.ns,
        Some(cg),
        ClientKind::Tcp,
        fx.node_hostport(HP),
        "after DEL",
    );
    assert!(
        r.is_err(),
        "hostPort answered node-local clients after DEL: {r:?}"
    );
}

#[test]
fn node_local_tc() {
    require_e2e!();
    node_local_clients("loctc", Mode::Tc);
}

#[test]
fn node_local_xdp() {
    require_e2e!();
    node_local_clients("locxdp", Mode::Xdp);
}

/// With the agent's defaults (no `--cgroup`), a process of the node
/// reaches a hostPort on the node's address and on 127.0.0.1, as with the
/// reference portmap; the hooks sit at the cgroup v2 root, so they see
/// every process of the machine, and a process in another network
/// namespace connecting to the same address and port is left alone (it
/// reaches its own listener there, not the pod).
#[test]
fn node_local_clients_with_agent_defaults() {
    require_e2e!();
    let fx = fixture("nldef", Setup::mode(Mode::Tc));
    let list = fx.list(None);
    const HP: u16 = 30140;
    let pod = fx.add_pod(
        &list,
        "nldef-ctr",
        vec![
            mapping(HP.into(), POD_PORT.into(), "tcp"),
            mapping(HP.into(), POD_PORT.into(), "udp"),
        ],
    );
    let _tcp = TcpEchoServer::start(&pod.ns, POD_PORT);
    let _udp = UdpEchoServer::start(&pod.ns, POD_PORT);
    let gw = IpAddr::V4(fx.ext.pod_gateway());
    for via in [fx.ext.node_addr, Ipv4Addr::LOCALHOST] {
        let target = SocketAddr::from((via, HP));
        let t = tcp_echo(&fx.node.ns, target, "node-local tcp")
            .unwrap_or_else(|e| panic!("node -> {target} (tcp): {e}"));
        assert_eq!(t.seen_as.ip(), gw, "TCP {target}: the pod answered");
        let u = udp_echo(&fx.node.ns, target, "node-local udp")
            .unwrap_or_else(|e| panic!("node -> {target} (udp): {e}"));
        assert_eq!(u.seen_as.ip(), gw, "UDP {target}: the pod answered");
    }

    // Another namespace, with its own listener on the same port: untouched.
    let other = NetNs::new("nldefother");
    other.ip(&["link", "set", "lo", "up"]);
    let _own = TcpEchoServer::start(&other, HP);
    let target = SocketAddr::from((Ipv4Addr::LOCALHOST, HP));
    let t = tcp_echo(&other, target, "elsewhere")
        .unwrap_or_else(|e| panic!("other netns -> {target}: {e}"));
    assert_eq!(
        t.seen_as.ip(),
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        "a socket of another namespace is not rewritten"
    );
    drop(_own);
    let r = tcp_echo(&other, target, "nobody");
    assert!(r.is_err(), "other netns reached something: {r:?}");
    fx.del_pod(&list, &pod);
}

/// A node-local UDP client that does not connect its socket (sendto, as
/// DNS stub resolvers do) must get the reply from the address it sent to,
/// node:hostPort, as with the reference's conntrack DNAT: resolvers drop
/// replies from any other source. The sendmsg4 hook rewrites the
/// destination; the recvmsg4 hook must show the reply as coming from
/// node:hostPort again.
#[test]
fn node_local_udp_sendto_reply_source() {
    require_e2e!();
    let fx = fixture(
        "locsrc",
        Setup {
            mode: Mode::Tc,
            cgroup: true,
            wire_checksums: true,
        },
    );
    let cg = fx.cgroup.as_ref().expect("cgroup");
    let list = fx.list(None);
    const HP: u16 = 30111;
    let pod = fx.add_pod(
        &list,
        "locsrc-ctr",
        vec![mapping(HP.into(), POD_PORT.into(), "udp")],
    );
    let _udp = UdpEchoServer::start(&pod.ns, POD_PORT);
    for via in [fx.ext.node_addr, Ipv4Addr::LOCALHOST] {
        let target = SocketAddr::from((via, HP));
        let r = local_client(
            &probe_bin(),
            &fx.node.ns,
            Some(cg),
            ClientKind::UdpSendto,
            target,
            "where from",
        )
        .unwrap_or_else(|e| panic!("sendto {target}: {e}"));
        assert_eq!(
            r.reply_from, target,
            "the reply to a datagram sent to {target} must come from it"
        );
    }
    fx.del_pod(&list, &pod);
}

// ---------------------------------------------------------------------------
// 5. ICMP errors about hostPort flows.
// ---------------------------------------------------------------------------

/// A router with a 1280-byte link towards the external client answers the
/// pod's full-size DF replies (sent as node:hostPort) with "fragmentation
/// needed" addressed to the node's uplink address; the datapath must hand
/// it to the pod, or a download through the hostPort stalls in a path-MTU
/// black hole. A 1 MiB download through node:hostPort completes, the
/// pod's route cache holds the path MTU, and the counter shows the
/// translation. In XDP mode the XDP program passes ICMP on, and the TC
/// program behind it translates it.
fn frag_needed_reaches_the_pod_through_a_hostport(tag: &str, mode: Mode) {
    const PATH_MTU: u32 = 1280;
    const HP: u16 = 30200;
    const LEN: usize = 1 << 20;
    let node = Node::new(tag);
    let ext = External::routed(&node, PATH_MTU);
    // The client keeps a 1500 MTU, so its MSS does not hide the smaller
    // link: only path MTU discovery can.
    ext.ns.ip(&["link", "set", "eth0", "mtu", "1500"]);
    let agent = AgentProc::start(&node, &["--hostport-mode", mode.arg()]);
    let v4 = ext.node_addr.to_string();
    wait_until("the agent to serve uplink0", SETTLE, || {
        let status = admin(&node, "status");
        (status["uplinks"][0]["address"] == v4.as_str()).then_some(())
    });
    let fx = Fixture {
        agent,
        cgroup: None,
        // The pod sends full checksums, which the client verifies.
        wire_checksums: true,
        ext,
        node,
    };
    assert_eq!(
        uplink_has_xdp(&fx.node),
        mode == Mode::Xdp,
        "XDP program on {UPLINK_IF} in {mode:?} mode"
    );
    let list = fx.list(None);
    let pod = fx.add_pod(
        &list,
        &format!("{tag}-ctr"),
        vec![mapping(HP.into(), BULK_PORT.into(), "tcp")],
    );
    let far = fx.ext.ext_addr.to_string();
    let route = pod.ns.ip(&["-4", "route", "get", &far]);
    assert!(!route.contains("mtu"), "no path MTU known yet: {route}");
    let before = fx.status();

    // The pod serves LEN bytes to whoever connects (DF set: Linux TCP
    // does path MTU discovery).
    let listener = in_netns(&pod.ns, || {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, BULK_PORT)).expect("bind 0.0.0.0")
    });
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        // Gives up (instead of blocking forever) if the client never comes.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut s = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => return Err(e),
            }
        };
        s.set_nonblocking(false)?;
        s.set_write_timeout(Some(Duration::from_secs(20)))?;
        s.write_all(&vec![0x5a; LEN])?;
        s.shutdown(std::net::Shutdown::Write)
    });
    let target = fx.node_hostport(HP);
    let got = in_netns(&fx.ext.ns, move || -> std::io::Result<usize> {
        let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        Ok(buf.len())
    });
    let served = server.join().expect("server thread");
    assert_eq!(
        got.map_err(|e| e.to_string()),
        Ok(LEN),
        "1 MiB download through {target} across a {PATH_MTU}-MTU hop ({mode:?}; server: {served:?})"
    );
    eventually("the pod to cache the path MTU", SETTLE, || {
        pod.ns
            .ip(&["-4", "route", "get", &far])
            .contains(&format!("mtu {PATH_MTU}"))
    });
    let after = fx.status();
    assert!(
        delta(&before, &after, "hostPortIcmpErrorsTranslated") > 0,
        "fragmentation needed translated by the datapath\n{after:#}"
    );
    if mode == Mode::Xdp {
        assert!(
            delta(&before, &after, "hostPortDnatXdp") > 0,
            "the client's packets DNATed at XDP\n{after:#}"
        );
    }
    fx.del_pod(&list, &pod);
}

#[test]
fn frag_needed_reaches_the_pod_through_a_hostport_tc() {
    require_e2e!();
    frag_needed_reaches_the_pod_through_a_hostport("fnhptc", Mode::Tc);
}

#[test]
fn frag_needed_reaches_the_pod_through_a_hostport_xdp() {
    require_e2e!();
    frag_needed_reaches_the_pod_through_a_hostport("fnhpxdp", Mode::Xdp);
}

/// A UDP datagram through node:hostPort to a pod port nobody listens on:
/// the pod answers with port unreachable, which the datapath sends on as
/// node:hostPort's, quoting what the client sent, so the client's
/// connected socket gets "connection refused" at once instead of waiting
/// for a reply (and the pod's address never leaves the node).
#[test]
fn pod_port_unreachable_reaches_the_client() {
    require_e2e!();
    let fx = fixture("unrhp", Setup::mode(Mode::Tc));
    let list = fx.list(None);
    const HP: u16 = 30201;
    let pod = fx.add_pod(
        &list,
        "unrhp-ctr",
        vec![mapping(HP.into(), POD_PORT.into(), "udp")],
    );
    let before = fx.status();
    let target = fx.node_hostport(HP);
    let r = in_netns(&fx.ext.ns, move || -> std::io::Result<usize> {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        s.connect(target)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.send(b"anyone?")?;
        let mut buf = [0u8; 64];
        s.recv(&mut buf)
    });
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        other => panic!("expected connection refused from {target}, got {other:?}"),
    }
    let after = fx.status();
    assert!(
        delta(&before, &after, "hostPortIcmpErrorsTranslated") > 0,
        "{after:#}"
    );
    fx.del_pod(&list, &pod);
}
