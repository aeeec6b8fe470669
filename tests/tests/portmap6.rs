//! hostPorts over IPv6 (ebpf-portmap on dual-stack pods), end to end, in
//! both DNAT modes of the agent (TC, XDP): an external client reaching a
//! pod through [node IPv6]:hostPort (TCP, UDP, bulk), `hostIP` IPv6
//! restrictions, hairpin from pods with and without `snat`, node-local
//! clients through the connect6/sendmsg6/recvmsg6/getpeername6 socket
//! hooks (and nothing of another network namespace rewritten), and the
//! same conflist through the reference portmap.
//!
//! Topology (per test): a node namespace whose uplink has an IPv4 and an
//! IPv6 address (fd00:198:18:x::1), an "external" namespace behind it
//! (fd00:198:18:x::2) with no route to the pods, our agent serving the
//! uplink, dual-stack pods (10.77.x.0/24 and fd00:77:x::/64) attached by
//! the harness runtime with ebpf-bridge (ipMasq) + ebpf-portmap. The echo
//! servers answer `<peer as seen> <payload>`, so every exchange shows the
//! source address the pod saw; a client whose connected socket got its
//! echo back from [node]:hostPort proves the reply was translated.
use std::io::Write;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cni_tests::agentctl::{admin, record_of, AgentProc};
use cni_tests::hostport::{bulk_echo, set_tx_checksum, stat};
use cni_tests::prelude::*;
use cni_tests::traffic::{
    blob, blob_reply, echo_on, in_netns, tcp_echo, udp_blob, udp_echo, FragCounters, TcpEchoServer,
    UdpBlobServer, UdpEchoServer,
};
use cni_tests::uplink::{masq_conf_dual, no_dad, result_ipv6, wait_settled, External, UPLINK_IF};

const NET: &str = "pm6net";
const BRIDGE_NAME: &str = "cnipm6";
/// What every pod listens on (TCP and UDP, both families).
const POD_PORT: u16 = 8080;
const BULK_PORT: u16 = 9000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Tc,
    Xdp,
}

/// A dual-stack node with an uplink and a running agent. Fields drop in
/// order: agent, external side, node; pods, declared by the tests
/// afterwards, go before all of them.
struct Fixture {
    agent: AgentProc,
    ext: External,
    node: Node,
}

/// One dual-stack pod attached with the portmap conflist.
struct Pod {
    att: Attachment,
    result: Value,
    ip6: Ipv6Addr,
    /// The pod's IPv6 gateway: the bridge's address.
    gw6: Ipv6Addr,
    ns: NetNs,
}

/// A node `tag` with a dual-stack uplink and our agent in `mode`; the
/// external side sends full checksums (TX offload off) unless
/// `offloading_peer`, so a translation that breaks a checksum loses the
/// packet at the receiver.
fn fixture(tag: &str, mode: Mode, offloading_peer: bool) -> Fixture {
    let node = Node::new(tag);
    let ext = External::direct_dual(&node);
    if !offloading_peer {
        set_tx_checksum(&ext.ns, "eth0", false);
    }
    let arg = match mode {
        Mode::Tc => "tc",
        Mode::Xdp => "xdp",
    };
    let agent = AgentProc::start(&node, &["--hostport-mode", arg]);
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
    let links = node.ns.ip_json(&["-d", "link", "show", "dev", UPLINK_IF]);
    assert_eq!(
        links[0].get("xdp").is_some(),
        mode == Mode::Xdp,
        "XDP program on {UPLINK_IF} in {mode:?} mode"
    );
    Fixture { agent, ext, node }
}

impl Fixture {
    /// ebpf-bridge (dual-stack ranges, ipMasq) + ebpf-portmap.
    fn list(&self, snat: Option<bool>) -> Value {
        let mut br = masq_conf_dual(
            &self.node,
            NET,
            BRIDGE_NAME,
            &self.ext.pod_subnet(),
            &self.ext.pod_subnet6(),
        );
        let obj = br.as_object_mut().expect("object");
        obj.remove("name");
        let version = obj.remove("cniVersion").expect("cniVersion");
        let mut pm = json!({"type": "ebpf-portmap", "capabilities": {"portMappings": true}});
        if let Some(s) = snat {
            pm["snat"] = json!(s);
        }
        merge(&mut pm, &self.node.path_keys());
        json!({"cniVersion": version, "name": NET, "plugins": [br, pm]})
    }

    fn status(&self) -> Value {
        admin(&self.node, "status")
    }

    /// ADDs a dual-stack pod `cid` with `mappings`; its eth0 sends full
    /// checksums.
    #[track_caller]
    fn add_pod(&self, list: &Value, cid: &str, mappings: Vec<Value>) -> Pod {
        let ns = self.node.pod(cid);
        no_dad(&ns);
        let mut att = Attachment::new(cid, &ns, "eth0");
        att.capability_args
            .insert("portMappings".into(), Value::Array(mappings));
        let result = self
            .node
            .runtime(Impl::Ours)
            .add_list(list, &att)
            .unwrap_or_else(|o| panic!("ADD {cid}: {o}"));
        wait_settled(&ns);
        wait_settled(&self.node.ns);
        set_tx_checksum(&ns, "eth0", false);
        let gw6 = result["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|ip| ip["gateway"].as_str()?.parse::<Ipv6Addr>().ok())
            .next()
            .unwrap_or_else(|| panic!("no IPv6 gateway in {result}"));
        Pod {
            ip6: result_ipv6(&result),
            gw6,
            att,
            result,
            ns,
        }
    }

    #[track_caller]
    fn del_pod(&self, list: &Value, pod: &Pod) {
        self.node
            .runtime(Impl::Ours)
            .del_list(list, &pod.att, Some(&pod.result))
            .unwrap_or_else(|o| panic!("DEL {}: {o}", pod.att.container_id));
    }

    fn node6(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ext.node_v6(), port))
    }
}

fn mapping(host_port: u16, container_port: u16, protocol: &str) -> Value {
    json!({"hostPort": host_port, "containerPort": container_port, "protocol": protocol})
}

fn mapping_on(host_ip: IpAddr, host_port: u16, container_port: u16, protocol: &str) -> Value {
    let mut m = mapping(host_port, container_port, protocol);
    m["hostIP"] = json!(host_ip.to_string());
    m
}

fn delta(before: &Value, after: &Value, name: &str) -> u64 {
    stat(after, name) - stat(before, name)
}

/// Echo servers of both families on POD_PORT in a pod.
struct PodServers {
    _tcp4: TcpEchoServer,
    _udp4: UdpEchoServer,
    _tcp6: TcpEchoServer,
    _udp6: UdpEchoServer,
}

fn serve(pod: &Pod) -> PodServers {
    PodServers {
        _tcp4: TcpEchoServer::start(&pod.ns, POD_PORT),
        _udp4: UdpEchoServer::start(&pod.ns, POD_PORT),
        _tcp6: TcpEchoServer::start_v6(&pod.ns, POD_PORT),
        _udp6: UdpEchoServer::start_v6(&pod.ns, POD_PORT),
    }
}

/// A TCP server on [::]:`port` echoing every byte until the client closes
/// (bulk transfers both ways through the translation); stopped on drop.
struct BulkEcho6 {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BulkEcho6 {
    fn start(ns: &NetNs, port: u16) -> BulkEcho6 {
        let listener = in_netns(ns, || {
            TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)).expect("bind bulk server")
        });
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut handlers = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => handlers.push(std::thread::spawn(move || {
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                            if let Ok(mut r) = s.try_clone() {
                                let mut w = &s;
                                let _ = std::io::copy(&mut r, &mut w);
                            }
                            let _ = s.shutdown(std::net::Shutdown::Both);
                        })),
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
                for h in handlers {
                    let _ = h.join();
                }
            })
        };
        BulkEcho6 {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for BulkEcho6 {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------
// 1. External client -> [node]:hostPort -> pod, TCP and UDP, both modes.
// ---------------------------------------------------------------------------

/// An external client reaches the dual-stack pod's TCP and UDP servers
/// through [node IPv6]:hostPort, and the same mappings over IPv4; the pod
/// sees the client's own IPv6 address and port (snat concerns only
/// hairpin and node-local clients); the replies come back from
/// [node]:hostPort (the connected client sockets take nothing else); a
/// 4 MiB echo crosses both ways intact. In XDP mode the XDP program did
/// every DNAT. One map entry per mapping and family, no iptables/nft rule;
/// DEL removes both families' entries and the hostPort stops answering.
fn external_v6_clients_reach_the_pod(tag: &str, mode: Mode, offloading_peer: bool) {
    let fx = fixture(tag, mode, offloading_peer);
    let list = fx.list(None);
    const HP: u16 = 30080;
    const HP_BULK: u16 = 30081;
    let pod = fx.add_pod(
        &list,
        &format!("{tag}-ctr"),
        vec![
            mapping(HP, POD_PORT, "tcp"),
            mapping(HP, POD_PORT, "udp"),
            mapping(HP_BULK, BULK_PORT, "tcp"),
        ],
    );
    assert_eq!(
        fx.node.ns.firewall_rules(),
        Vec::<String>::new(),
        "hostPorts must not be iptables/nft rules"
    );
    assert_eq!(
        fx.status()["hostPorts"],
        6,
        "one map entry per mapping and pod address family"
    );
    let _servers = serve(&pod);
    let before = fx.status();

    let target = fx.node6(HP);
    for i in 0..3 {
        let t = tcp_echo(&fx.ext.ns, target, &format!("tcp6 {i}"))
            .unwrap_or_else(|e| panic!("external -> {target} TCP ({mode:?}): {e}"));
        assert_eq!(t.text, format!("tcp6 {i}"));
        assert_eq!(
            t.seen_as, t.local,
            "the pod must see the external client's own address and port"
        );
        assert_eq!(t.seen_as.ip(), IpAddr::V6(fx.ext.ext_v6()));
        let u = udp_echo(&fx.ext.ns, target, &format!("udp6 {i}"))
            .unwrap_or_else(|e| panic!("external -> {target} UDP ({mode:?}): {e}"));
        assert_eq!(u.text, format!("udp6 {i}"));
        assert_eq!(u.seen_as, u.local, "UDP client address as the pod saw it");
    }
    // The same pod's IPv4 mapping is served as before.
    let t4 = tcp_echo(&fx.ext.ns, SocketAddr::from((fx.ext.node_addr, HP)), "tcp4")
        .unwrap_or_else(|e| panic!("external -> node IPv4:{HP} ({mode:?}): {e}"));
    assert_eq!(t4.seen_as, t4.local);
    let u4 = udp_echo(&fx.ext.ns, SocketAddr::from((fx.ext.node_addr, HP)), "udp4")
        .unwrap_or_else(|e| panic!("external -> node IPv4:{HP} UDP ({mode:?}): {e}"));
    assert_eq!(u4.seen_as, u4.local);

    // Bulk both ways: full-size (GSO/GRO-merged) segments through the DNAT
    // and the reply translation, checksummed by the receivers.
    let bulk = BulkEcho6::start(&pod.ns, BULK_PORT);
    bulk_echo(&fx.ext.ns, fx.node6(HP_BULK), 4 << 20).unwrap_or_else(|e| {
        panic!(
            "4 MiB echo through [{}]:{HP_BULK} ({mode:?}): {e}",
            fx.ext.node_v6()
        )
    });
    drop(bulk);

    let after = fx.status();
    let dnat = delta(&before, &after, "hostPortDnat");
    let dnat_xdp = delta(&before, &after, "hostPortDnatXdp");
    let replies = delta(&before, &after, "hostPortReplies");
    eprintln!(
        "{mode:?}: hostPortDnat +{dnat}, hostPortDnatXdp +{dnat_xdp}, hostPortReplies +{replies}"
    );
    assert!(dnat >= 4 * 4 + 4 + 100, "DNATed packets: {dnat}\n{after:#}");
    assert!(replies >= 4 * 3 + 4, "translated replies: {replies}");
    match mode {
        Mode::Tc => assert_eq!(dnat_xdp, 0, "TC mode: the XDP program must not run"),
        Mode::Xdp => assert_eq!(
            dnat_xdp, dnat,
            "XDP mode: every DNAT done by the XDP program\n{after:#}"
        ),
    }
    assert_eq!(delta(&before, &after, "hostPortHairpin"), 0);

    fx.del_pod(&list, &pod);
    let status = fx.status();
    assert_eq!(status["hostPorts"], 0, "{status:#}");
    assert_eq!(status["records"], 0, "{status:#}");
    let refused = in_netns(&fx.ext.ns, move || {
        TcpStream::connect_timeout(&target, Duration::from_secs(2))
    });
    assert!(refused.is_err(), "IPv6 hostPort still answers after DEL");
}

#[test]
fn external_v6_tc() {
    require_e2e!();
    external_v6_clients_reach_the_pod("ext6tc", Mode::Tc, false);
}

#[test]
fn external_v6_xdp() {
    require_e2e!();
    external_v6_clients_reach_the_pod("ext6xdp", Mode::Xdp, false);
}

/// XDP mode with the external peer's TX checksum offload on: its packets
/// carry partial checksums, which XDP cannot tell from complete ones; the
/// TC program behind it updates the transport checksum from the XDP
/// metadata with the kernel's helper, which handles either kind.
#[test]
fn external_v6_xdp_from_offloading_veth_peer() {
    require_e2e!();
    external_v6_clients_reach_the_pod("ext6xof", Mode::Xdp, true);
}

// ---------------------------------------------------------------------------
// 2. hostIP over IPv6.
// ---------------------------------------------------------------------------

/// A mapping with hostIP = the uplink's IPv6 address answers on that
/// address only: not on a second IPv6 address of the uplink, not on the
/// node's IPv4 address (the mapping is IPv6 only). A mapping without
/// hostIP answers on both IPv6 addresses; a UDP mapping bound to the
/// second address answers only there. The record keeps the hostIPs.
fn host_ip_v6_limits_the_address(tag: &str, mode: Mode) {
    let fx = fixture(tag, mode, false);
    let second = Ipv6Addr::new(0xfd00, 0x198, 0x18, u16::from(fx.ext.index), 0, 0, 0, 3);
    fx.node.ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{second}/64"),
        "dev",
        UPLINK_IF,
        "nodad",
    ]);
    let list = fx.list(None);
    const ONLY_FIRST: u16 = 30090;
    const ANY: u16 = 30091;
    const ONLY_SECOND_UDP: u16 = 30092;
    let first = fx.ext.node_v6();
    let pod = fx.add_pod(
        &list,
        &format!("{tag}-ctr"),
        vec![
            mapping_on(IpAddr::V6(first), ONLY_FIRST, POD_PORT, "tcp"),
            mapping(ANY, POD_PORT, "tcp"),
            mapping_on(IpAddr::V6(second), ONLY_SECOND_UDP, POD_PORT, "udp"),
        ],
    );
    // hostIP mappings: one family; the any-address one: both.
    assert_eq!(fx.status()["hostPorts"], 4);
    let _servers = serve(&pod);
    let ext = &fx.ext.ns;
    let on = |ip: Ipv6Addr, port: u16| SocketAddr::from((ip, port));

    // The agent learns node addresses by polling: wait for the any-address
    // mapping to answer on the new one first, so the negative checks below
    // are not vacuous.
    wait_until(
        "the any-address mapping on the second IPv6 address",
        SETTLE,
        || tcp_echo(ext, on(second, ANY), "any@second").ok(),
    );
    let t = tcp_echo(ext, on(first, ANY), "any@first").expect("any-address mapping");
    assert_eq!(t.seen_as, t.local);

    let t = tcp_echo(ext, on(first, ONLY_FIRST), "first@first")
        .expect("hostIP mapping on its own address");
    assert_eq!(t.text, "first@first");
    assert_eq!(t.seen_as, t.local);
    let wrong = tcp_echo(ext, on(second, ONLY_FIRST), "first@second");
    assert!(
        wrong.is_err(),
        "a mapping with hostIP {first} must not answer on {second}: {wrong:?}"
    );
    let wrong = tcp_echo(
        ext,
        SocketAddr::from((fx.ext.node_addr, ONLY_FIRST)),
        "first@v4",
    );
    assert!(
        wrong.is_err(),
        "a mapping with hostIP {first} must not answer on the node's IPv4 address: {wrong:?}"
    );

    let u = udp_echo(ext, on(second, ONLY_SECOND_UDP), "second@second")
        .expect("UDP hostIP mapping on its own address");
    assert_eq!(u.seen_as, u.local);
    let wrong = udp_echo(ext, on(first, ONLY_SECOND_UDP), "second@first");
    assert!(
        wrong.is_err(),
        "a UDP mapping with hostIP {second} answered on {first}: {wrong:?}"
    );

    let records = admin(&fx.node, "records");
    let entries = record_of(&records, NET, &pod.att.container_id, "eth0").expect("record");
    let host_ips: Vec<String> = entries
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["kind"] == "host-port")
        .map(|e| e["hostIp"].as_str().unwrap_or("-").to_string())
        .collect();
    assert_eq!(
        host_ips,
        vec![
            first.to_string(),
            "-".to_string(),
            "-".to_string(),
            second.to_string()
        ],
        "{entries:#}"
    );
    fx.del_pod(&list, &pod);
    assert_eq!(fx.status()["hostPorts"], 0);
}

#[test]
fn host_ip_v6_tc() {
    require_e2e!();
    host_ip_v6_limits_the_address("hip6tc", Mode::Tc);
}

#[test]
fn host_ip_v6_xdp() {
    require_e2e!();
    host_ip_v6_limits_the_address("hip6xdp", Mode::Xdp);
}

// ---------------------------------------------------------------------------
// 3. Hairpin over IPv6.
// ---------------------------------------------------------------------------

/// With snat (the default), a pod reaching a hostPort through the node's
/// uplink IPv6 address, or through its IPv6 gateway (the bridge, also a
/// node address), is answered by the target pod, which sees the bridge's
/// IPv6 address: from another pod and from the target pod itself, TCP and
/// UDP. Translated on the bridge, never on the uplink.
#[test]
fn hairpin_v6_with_snat() {
    require_e2e!();
    let fx = fixture("hp6snat", Mode::Tc, false);
    let list = fx.list(Some(true));
    const HP1: u16 = 30100;
    const HP2: u16 = 30101;
    let pod1 = fx.add_pod(
        &list,
        "hp6snat-1",
        vec![mapping(HP1, POD_PORT, "tcp"), mapping(HP1, POD_PORT, "udp")],
    );
    let pod2 = fx.add_pod(&list, "hp6snat-2", vec![mapping(HP2, POD_PORT, "tcp")]);
    let _s1 = serve(&pod1);
    let _s2 = serve(&pod2);
    let gw = pod1.gw6;
    let before = fx.status();

    let mut exchanges = 0;
    for (who, from) in [("pod2", &pod2), ("pod1 itself", &pod1)] {
        for via in [fx.ext.node_v6(), gw] {
            let target = SocketAddr::from((via, HP1));
            let t = tcp_echo(&from.ns, target, "hairpin tcp6")
                .unwrap_or_else(|e| panic!("{who} -> {target} TCP: {e}"));
            assert_eq!(t.text, "hairpin tcp6");
            assert_eq!(
                t.seen_as.ip(),
                IpAddr::V6(gw),
                "{who} -> {target}: the target pod must see the bridge address"
            );
            assert_eq!(t.local.ip(), IpAddr::V6(from.ip6));
            let u = udp_echo(&from.ns, target, "hairpin udp6")
                .unwrap_or_else(|e| panic!("{who} -> {target} UDP: {e}"));
            assert_eq!(u.seen_as.ip(), IpAddr::V6(gw), "{who} -> {target} UDP");
            exchanges += 2;
        }
    }
    let t = tcp_echo(&pod1.ns, fx.node6(HP2), "1 to 2").expect("pod1 -> [node]:HP2");
    assert_eq!(t.seen_as.ip(), IpAddr::V6(gw));
    exchanges += 1;

    let after = fx.status();
    let hairpin = delta(&before, &after, "hostPortHairpin");
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

/// With `snat: false`, IPv6 hairpin packets are DNATed on the bridge but
/// keep the client pod's address, so the target pod answers the client
/// directly, bypassing the translation back (as the reference without
/// br_netfilter, and as our IPv4 hairpin): what must hold is that the
/// DNAT happens, and that an exchange that does complete shows the
/// client's real address.
#[test]
fn hairpin_v6_without_snat() {
    require_e2e!();
    let fx = fixture("hp6nosnat", Mode::Tc, false);
    let list = fx.list(Some(false));
    const HP1: u16 = 30102;
    let pod1 = fx.add_pod(&list, "hp6nosnat-1", vec![mapping(HP1, POD_PORT, "tcp")]);
    let pod2 = fx.add_pod(&list, "hp6nosnat-2", vec![]);
    let _s1 = serve(&pod1);
    let before = fx.status();
    for (who, from) in [("pod2", &pod2), ("pod1 itself", &pod1)] {
        let target = fx.node6(HP1);
        let r = quick_tcp_echo(&from.ns, target, "hairpin");
        eprintln!("snat=false: {who} -> {target}: {r:?}");
        if let Ok(seen) = r {
            assert_eq!(
                seen.ip(),
                IpAddr::V6(from.ip6),
                "snat=false must not masquerade hairpin traffic"
            );
        }
    }
    let after = fx.status();
    let hairpin = delta(&before, &after, "hostPortHairpin");
    assert!(
        hairpin > 0,
        "IPv6 hairpin packets were not DNATed\n{after:#}"
    );
    fx.del_pod(&list, &pod2);
    fx.del_pod(&list, &pod1);
}

/// One TCP line exchange with a 1 s connect timeout; returns the address
/// the server saw.
fn quick_tcp_echo(ns: &NetNs, server: SocketAddr, line: &str) -> Result<SocketAddr, String> {
    use std::io::{BufRead, BufReader};
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
// 4. Node-local IPv6 clients (cgroup socket hooks, agent defaults).
// ---------------------------------------------------------------------------

/// What an unconnected UDP socket saw: the echo and where the reply came
/// from (recvfrom's address, which the recvmsg6 hook must restore).
fn udp_sendto(
    ns: &NetNs,
    server: SocketAddr,
    payload: &str,
) -> Result<(String, SocketAddr), String> {
    let payload = payload.to_string();
    in_netns(ns, move || {
        let s = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(1)))
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 2048];
        let mut last = String::new();
        for _ in 0..3 {
            s.send_to(payload.as_bytes(), server)
                .map_err(|e| format!("sendto {server}: {e}"))?;
            match s.recv_from(&mut buf) {
                Ok((n, from)) => return Ok((String::from_utf8_lossy(&buf[..n]).into(), from)),
                Err(e) => last = e.to_string(),
            }
        }
        Err(format!("no reply from {server}: {last}"))
    })
}

/// With the agent's defaults (hooks at the cgroup v2 root, acting on the
/// agent's network namespace only), a process of the node reaches a
/// hostPort on the node's IPv6 address and on [::1], by TCP (whose peer,
/// per getpeername, stays the address it connected to), connected UDP and
/// sendto UDP (whose reply comes from the address it sent to); the pod
/// sees the bridge's IPv6 address. A dual-stack socket reaching the IPv4
/// hostPort through a v4-mapped address is served too. A process in
/// another network namespace connecting to [::1] and the same port reaches
/// its own listener there, and nothing when there is none.
#[test]
fn node_local_v6_clients_and_other_netns_untouched() {
    require_e2e!();
    let fx = fixture("nl6", Mode::Tc, false);
    let list = fx.list(None);
    const HP: u16 = 30140;
    let pod = fx.add_pod(
        &list,
        "nl6-ctr",
        vec![mapping(HP, POD_PORT, "tcp"), mapping(HP, POD_PORT, "udp")],
    );
    let _servers = serve(&pod);
    let before = fx.status();
    let mut sockets = 0;
    for via in [fx.ext.node_v6(), Ipv6Addr::LOCALHOST] {
        let target = SocketAddr::from((via, HP));
        let t = tcp_echo(&fx.node.ns, target, "node-local tcp6")
            .unwrap_or_else(|e| panic!("node -> {target} (tcp): {e}"));
        assert_eq!(
            t.seen_as.ip(),
            IpAddr::V6(pod.gw6),
            "TCP {target}: the pod answered"
        );
        let peer = in_netns(&fx.node.ns, move || {
            TcpStream::connect_timeout(&target, Duration::from_secs(5))
                .and_then(|s| s.peer_addr())
                .map_err(|e| e.to_string())
        })
        .unwrap_or_else(|e| panic!("connect {target}: {e}"));
        assert_eq!(
            peer, target,
            "getpeername must show what the client connected to"
        );
        let u = udp_echo(&fx.node.ns, target, "node-local udp6")
            .unwrap_or_else(|e| panic!("node -> {target} (udp): {e}"));
        assert_eq!(
            u.seen_as.ip(),
            IpAddr::V6(pod.gw6),
            "UDP {target}: the pod answered"
        );
        let (text, from) = udp_sendto(&fx.node.ns, target, "where from")
            .unwrap_or_else(|e| panic!("sendto {target}: {e}"));
        assert!(text.ends_with("where from"), "{text:?}");
        assert_eq!(
            from, target,
            "the reply to a datagram sent to {target} must come from it"
        );
        sockets += 4;
    }
    // A dual-stack socket to the node's IPv4 address, v4-mapped.
    let mapped = SocketAddr::from((fx.ext.node_addr.to_ipv6_mapped(), HP));
    let t = tcp_echo(&fx.node.ns, mapped, "v4-mapped")
        .unwrap_or_else(|e| panic!("node -> {mapped} (tcp, v4-mapped): {e}"));
    assert_eq!(
        t.seen_as.ip(),
        IpAddr::V4(fx.ext.pod_gateway()),
        "{mapped}: the pod's IPv4 server answered"
    );
    sockets += 1;
    let after = fx.status();
    let hooked = delta(&before, &after, "hostPortSocket");
    assert!(
        hooked >= sockets,
        "hostPortSocket +{hooked} for {sockets} clients\n{after:#}"
    );

    // Another namespace, with its own listener on [::1] and the same port:
    // untouched.
    let other = NetNs::new("nl6other");
    other.ip(&["link", "set", "lo", "up"]);
    wait_settled(&other);
    let own = TcpEchoServer::start_v6(&other, HP);
    let target = SocketAddr::from((Ipv6Addr::LOCALHOST, HP));
    let t = tcp_echo(&other, target, "elsewhere")
        .unwrap_or_else(|e| panic!("other netns -> {target}: {e}"));
    assert_eq!(
        t.seen_as.ip(),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
        "a socket of another namespace is not rewritten"
    );
    drop(own);
    let r = tcp_echo(&other, target, "nobody");
    assert!(r.is_err(), "other netns reached something: {r:?}");
    let u = udp_sendto(&other, target, "nobody");
    assert!(u.is_err(), "other netns UDP reached something: {u:?}");

    fx.del_pod(&list, &pod);
    let r = tcp_echo(&fx.node.ns, fx.node6(HP), "after DEL");
    assert!(
        r.is_err(),
        "hostPort answered node-local clients after DEL: {r:?}"
    );
}

// ---------------------------------------------------------------------------
// 5. The same dual-stack conflist through the reference portmap.
// ---------------------------------------------------------------------------

/// The dual-stack conflist of a new user (cniVersion 1.0.0, host-local
/// ranges of both families, routes 0.0.0.0/0 and ::/0, ipMasq, portmap
/// with a TCP and a UDP hostPort) through the reference plugins and, with
/// only the `type` names changed, through ours: external -> [node
/// IPv6]:hostPort and node IPv4:hostPort reach the pod for both, TCP and
/// UDP, and the pod sees the external client's own address.
#[test]
fn dual_stack_hostport_matches_reference() {
    require_e2e!();
    let mut seen = Vec::new();
    for imp in [Impl::Reference, Impl::Ours] {
        let tag = match imp {
            Impl::Ours => "hp6o",
            Impl::Reference => "hp6r",
        };
        let node = Node::new(tag);
        let ext = External::direct_dual(&node);
        let _agent = (imp == Impl::Ours).then(|| {
            let a = AgentProc::start(&node, &[]);
            let v6 = ext.node_v6().to_string();
            wait_until("the agent to serve uplink0 over IPv6", SETTLE, || {
                let status = admin(&node, "status");
                (status["uplinks"][0]["addressV6"] == v6.as_str()).then_some(())
            });
            a
        });
        let mut br = masq_conf_dual(
            &node,
            NET,
            BRIDGE_NAME,
            &ext.pod_subnet(),
            &ext.pod_subnet6(),
        );
        br["type"] = json!(imp.bridge_type());
        br["ipam"]["type"] = json!(imp.ipam_type());
        let obj = br.as_object_mut().expect("object");
        obj.remove("name");
        obj.remove("cniVersion");
        let mut pm = json!({
            "type": match imp { Impl::Ours => "ebpf-portmap", Impl::Reference => "portmap" },
            "capabilities": {"portMappings": true},
        });
        if imp == Impl::Ours {
            merge(&mut pm, &node.path_keys());
        }
        let list = json!({"cniVersion": "1.0.0", "name": NET, "plugins": [br, pm]});
        let ns = node.pod(&format!("{tag}pod"));
        no_dad(&ns);
        let rt = node.runtime(imp);
        let mut att = Attachment::new(&format!("{tag}-ctr"), &ns, "eth0");
        const HP: u16 = 30200;
        att.capability_args.insert(
            "portMappings".into(),
            json!([mapping(HP, POD_PORT, "tcp"), mapping(HP, POD_PORT, "udp")]),
        );
        let result = rt
            .add_list(&list, &att)
            .unwrap_or_else(|o| panic!("{imp:?}: ADD: {o}"));
        wait_settled(&ns);
        wait_settled(&node.ns);
        let _tcp4 = TcpEchoServer::start(&ns, POD_PORT);
        let _udp4 = UdpEchoServer::start(&ns, POD_PORT);
        let _tcp6 = TcpEchoServer::start_v6(&ns, POD_PORT);
        let _udp6 = UdpEchoServer::start_v6(&ns, POD_PORT);
        let mut row = Vec::new();
        for target in [
            SocketAddr::from((ext.node_v6(), HP)),
            SocketAddr::from((ext.node_addr, HP)),
        ] {
            let t = tcp_echo(&ext.ns, target, "tcp")
                .unwrap_or_else(|e| panic!("{imp:?}: external -> {target} TCP: {e}"));
            let u = udp_echo(&ext.ns, target, "udp")
                .unwrap_or_else(|e| panic!("{imp:?}: external -> {target} UDP: {e}"));
            row.push((target.is_ipv6(), t.seen_as == t.local, u.seen_as == u.local));
        }
        eprintln!("{imp:?}: (IPv6?, TCP client address kept, UDP kept): {row:?}");
        seen.push(row);
        rt.del_list(&list, &att, Some(&result))
            .unwrap_or_else(|o| panic!("{imp:?}: DEL: {o}"));
    }
    assert_eq!(
        seen[1], seen[0],
        "ours (right) must behave as the reference (left)"
    );
    assert!(
        seen[0].iter().all(|(_, t, u)| *t && *u),
        "the reference keeps the client's address: {:?}",
        seen[0]
    );
}

// ---------------------------------------------------------------------------
// 6. ICMPv6 errors about DNATed flows.
// ---------------------------------------------------------------------------

/// A router with a 1280-byte link towards the external client answers the
/// pod's full-size replies (sent as [node]:hostPort) with Packet Too Big
/// addressed to the node's uplink address; the datapath must hand it to
/// the pod, or a download through the hostPort stalls in a path-MTU black
/// hole. A 1 MiB download through [node]:hostPort completes, the pod's
/// route cache holds the path MTU, and the counter shows the translation.
#[test]
fn packet_too_big_reaches_the_pod_through_a_hostport() {
    require_e2e!();
    const PATH_MTU: u32 = 1280;
    const HP: u16 = 30300;
    const LEN: usize = 1 << 20;
    let node = Node::new("ptb6hp");
    let ext = External::routed_dual(&node, PATH_MTU);
    // The client keeps a 1500 MTU, so its MSS does not hide the smaller
    // link: only path MTU discovery can.
    ext.ns.ip(&["link", "set", "eth0", "mtu", "1500"]);
    let agent = AgentProc::start(&node, &[]);
    let v6 = ext.node_v6().to_string();
    wait_until("the agent to serve uplink0 over IPv6", SETTLE, || {
        let status = admin(&node, "status");
        (status["uplinks"][0]["addressV6"] == v6.as_str()).then_some(())
    });
    let fx = Fixture { agent, ext, node };
    let list = fx.list(None);
    let pod = fx.add_pod(&list, "ptb6hp-ctr", vec![mapping(HP, BULK_PORT, "tcp")]);
    let far = fx.ext.ext_v6().to_string();
    let route = pod.ns.ip(&["-6", "route", "get", &far]);
    assert!(!route.contains("mtu"), "no path MTU known yet: {route}");
    let before = fx.status();

    // The pod serves LEN bytes to whoever connects.
    let listener = in_netns(&pod.ns, || {
        TcpListener::bind((Ipv6Addr::UNSPECIFIED, BULK_PORT)).expect("bind [::]")
    });
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_write_timeout(Some(Duration::from_secs(20)))?;
        s.write_all(&vec![0x5a; LEN])?;
        s.shutdown(std::net::Shutdown::Write)
    });
    let target = fx.node6(HP);
    let got = in_netns(&fx.ext.ns, move || -> std::io::Result<usize> {
        use std::io::Read;
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
        "1 MiB download through {target} across a {PATH_MTU}-MTU hop (server: {served:?})"
    );
    eventually("the pod to cache the IPv6 path MTU", SETTLE, || {
        pod.ns
            .ip(&["-6", "route", "get", &far])
            .contains(&format!("mtu {PATH_MTU}"))
    });
    let after = fx.status();
    assert!(
        delta(&before, &after, "hostPortIcmpErrorsTranslated") > 0,
        "Packet Too Big translated by the datapath\n{after:#}"
    );
    fx.del_pod(&list, &pod);
}

/// A UDP datagram through [node]:hostPort to a pod port nobody listens on:
/// the pod answers with Destination Unreachable, which the datapath sends
/// on as [node]:hostPort's, so the client's connected socket gets
/// "connection refused" at once instead of waiting for a reply.
#[test]
fn pod_port_unreachable_reaches_the_client() {
    require_e2e!();
    let fx = fixture("unr6hp", Mode::Tc, false);
    let list = fx.list(None);
    const HP: u16 = 30301;
    let pod = fx.add_pod(&list, "unr6hp-ctr", vec![mapping(HP, POD_PORT, "udp")]);
    let before = fx.status();
    let target = fx.node6(HP);
    let r = in_netns(&fx.ext.ns, move || -> std::io::Result<usize> {
        let s = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?;
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

// ---------------------------------------------------------------------------
// 7. Agent restart.
// ---------------------------------------------------------------------------

/// An established TCP connection through [node IPv6]:hostPort keeps
/// working while the agent is SIGKILLed and after a new agent took over
/// the pinned programs and maps; new connections work after it too.
#[test]
fn v6_hostport_flow_survives_agent_restart() {
    require_e2e!();
    let mut fx = fixture("rst6hp", Mode::Tc, false);
    let list = fx.list(None);
    const HP: u16 = 30400;
    let pod = fx.add_pod(&list, "rst6hp-ctr", vec![mapping(HP, POD_PORT, "tcp")]);
    let _servers = serve(&pod);
    let target = fx.node6(HP);
    let conn = in_netns(&fx.ext.ns, move || {
        TcpStream::connect_timeout(&target, Duration::from_secs(5))
    })
    .unwrap_or_else(|e| panic!("connect {target}: {e}"));
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let check = |what: &str| {
        let e = echo_on(&conn, what).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(e.text, what);
        assert_eq!(e.seen_as, e.local, "{what}: the pod sees the client");
    };
    check("before");
    fx.agent.kill();
    check("agent down");
    fx.agent = AgentProc::start(&fx.node, &["--hostport-mode", "tc"]);
    check("after restart");
    let t = tcp_echo(&fx.ext.ns, target, "new").expect("a new connection after the restart");
    assert_eq!(t.seen_as, t.local);
    drop(conn);
    fx.del_pod(&list, &pod);
}

// ---------------------------------------------------------------------------
// 8. Conflicts are per family.
// ---------------------------------------------------------------------------

/// A hostPort is taken per address family: pod A holds 30500/tcp on the
/// node's IPv6 address only (hostIP); pod B asking for 30500/tcp on every
/// address is refused with the agent's conflict error naming A (its IPv6
/// half collides), and the runtime's DEL after it leaves A's mapping
/// working; pod C asking for 30500/tcp on the node's IPv4 address gets it,
/// and each family reaches its own pod.
#[test]
fn hostport_conflicts_are_per_family() {
    require_e2e!();
    let fx = fixture("cf6hp", Mode::Tc, false);
    let list = fx.list(None);
    const HP: u16 = 30500;
    let node6 = IpAddr::V6(fx.ext.node_v6());
    let node4 = IpAddr::V4(fx.ext.node_addr);
    let a = fx.add_pod(
        &list,
        "cf6hp-a",
        vec![mapping_on(node6, HP, POD_PORT, "tcp")],
    );
    let _sa = serve(&a);

    let ns_b = fx.node.pod("cf6hp-b");
    no_dad(&ns_b);
    let mut att_b = Attachment::new("cf6hp-b", &ns_b, "eth0");
    att_b
        .capability_args
        .insert("portMappings".into(), json!([mapping(HP, POD_PORT, "tcp")]));
    let out = fx
        .node
        .runtime(Impl::Ours)
        .add_list(&list, &att_b)
        .expect_err("30500/tcp on IPv6 is pod A's");
    let err = out.expect_error();
    assert_eq!(err.code, 999, "{out}");
    assert!(
        err.msg.contains("already mapped by attachment") && err.msg.contains("cf6hp-a"),
        "{}",
        err.msg
    );

    let c = fx.add_pod(
        &list,
        "cf6hp-c",
        vec![mapping_on(node4, HP, BULK_PORT, "tcp")],
    );
    // Pod C listens only on another container port than A's, so an answer
    // shows which pod the mapping reached.
    let _sc = TcpEchoServer::start(&c.ns, BULK_PORT);
    let t6 = tcp_echo(&fx.ext.ns, fx.node6(HP), "to a").expect("IPv6 -> pod A");
    assert_eq!(t6.seen_as, t6.local);
    let t4 = tcp_echo(&fx.ext.ns, SocketAddr::from((fx.ext.node_addr, HP)), "to c")
        .expect("IPv4 -> pod C (the only one listening on its container port)");
    assert_eq!(t4.seen_as, t4.local);
    assert_eq!(fx.status()["hostPorts"], 2);
    fx.del_pod(&list, &c);
    fx.del_pod(&list, &a);
}

/// An external client's 4,000-byte UDP datagram to [node IPv6]:hostPort at
/// MTU 1500 travels as three fragments, only the first with the UDP
/// header: the DNAT must give every fragment the pod's address, and every
/// fragment of the pod's 4,000-byte reply [node]'s, or neither end can
/// reassemble. Both ends check every byte and the addresses they saw; the
/// IPv6 counters (/proc/net/snmp6) show the node fragmented and
/// reassembled nothing. In XDP mode the XDP program leaves fragments to
/// `hostport6_ingress` (they carry an extension header), with the same
/// result.
fn v6_fragments_through_a_hostport(tag: &str, mode: Mode) {
    const HP: u16 = 30090;
    const LEN: usize = 4000;
    let fx = fixture(tag, mode, false);
    let list = fx.list(None);
    let pod = fx.add_pod(
        &list,
        &format!("{tag}-ctr"),
        vec![mapping(HP, POD_PORT, "udp")],
    );
    let server = UdpBlobServer::start_v6(&pod.ns, POD_PORT);
    let target = fx.node6(HP);
    let request = blob(LEN, 9);
    let before = fx.status();
    let namespaces = [&pod.ns, &fx.ext.ns, &fx.node.ns];
    let snmp = namespaces.map(FragCounters::of6);

    let reply = udp_blob(&fx.ext.ns, target, &request)
        .unwrap_or_else(|e| panic!("external -> {target}, {LEN} bytes ({mode:?}): {e}"));
    assert_eq!(
        reply.from, target,
        "the reply must come from [node]:hostPort"
    );
    assert!(
        reply.data == blob_reply(&request),
        "the client must receive the {LEN}-byte reply exactly (got {} bytes)",
        reply.data.len()
    );
    let received = server.received();
    assert!(!received.is_empty(), "the pod received nothing");
    for (peer, data) in &received {
        assert_eq!(
            *peer, reply.local,
            "the pod must see the client's own address and port"
        );
        assert!(
            *data == request,
            "the pod must receive the {LEN} bytes exactly (got {})",
            data.len()
        );
    }
    let [p, e, n] = [0, 1, 2].map(|i| FragCounters::of6(namespaces[i]).since(snmp[i]));
    assert!(
        e.frag_oks >= 1 && p.reasm_oks >= 1,
        "client fragments, pod reassembles: {e:?} {p:?}"
    );
    assert!(
        p.frag_oks >= 1 && e.reasm_oks >= 1,
        "pod fragments, client reassembles: {p:?} {e:?}"
    );
    assert_eq!(
        (n.reasm_reqds, n.frag_oks),
        (0, 0),
        "the node must pass the fragments on as they are"
    );
    let after = fx.status();
    let first = delta(&before, &after, "fragFirstRemembered");
    let later = delta(&before, &after, "fragTranslated");
    let dnat = delta(&before, &after, "hostPortDnat");
    eprintln!(
        "{mode:?}: fragFirstRemembered +{first}, fragTranslated +{later}, hostPortDnat +{dnat}"
    );
    assert!(
        first >= 2,
        "a first fragment remembered per direction: +{first}"
    );
    assert!(
        later >= 4,
        "two later fragments translated per direction: +{later}"
    );
    assert!(dnat >= 3, "every fragment of the request DNATed: +{dnat}");
    fx.del_pod(&list, &pod);
}

#[test]
fn v6_fragments_through_a_hostport_tc() {
    require_e2e!();
    v6_fragments_through_a_hostport("pm6fragtc", Mode::Tc);
}

#[test]
fn v6_fragments_through_a_hostport_xdp() {
    require_e2e!();
    v6_fragments_through_a_hostport("pm6fragxdp", Mode::Xdp);
}

/// Hairpin with snat over IPv6: a pod sends a 4,000-byte datagram to
/// another pod's hostPort on the node's IPv6 address; the bridge program
/// translates (and redirects) every fragment both ways. The target pod sees
/// the bridge's IPv6 address, the client gets the reply from
/// [node]:hostPort, and nothing crosses the uplink.
#[test]
fn v6_fragments_through_a_hairpin() {
    require_e2e!();
    const HP: u16 = 30091;
    const LEN: usize = 4000;
    let fx = fixture("pm6fraghp", Mode::Tc, false);
    let list = fx.list(Some(true));
    let target_pod = fx.add_pod(&list, "pm6fraghp-1", vec![mapping(HP, POD_PORT, "udp")]);
    let client = fx.add_pod(&list, "pm6fraghp-2", vec![]);
    let server = UdpBlobServer::start_v6(&target_pod.ns, POD_PORT);
    let target = fx.node6(HP);
    let request = blob(LEN, 11);
    let before = fx.status();

    let reply = udp_blob(&client.ns, target, &request)
        .unwrap_or_else(|e| panic!("pod -> {target}, {LEN} bytes: {e}"));
    assert_eq!(
        reply.from, target,
        "the reply must come from [node]:hostPort"
    );
    assert!(
        reply.data == blob_reply(&request),
        "the client must receive the {LEN}-byte reply exactly (got {} bytes)",
        reply.data.len()
    );
    let received = server.received();
    assert!(!received.is_empty(), "the target pod received nothing");
    for (peer, data) in &received {
        assert_eq!(
            peer.ip(),
            IpAddr::V6(target_pod.gw6),
            "snat: the target pod must see the bridge's IPv6 address"
        );
        assert!(
            *data == request,
            "the target pod must receive the bytes exactly"
        );
    }
    let after = fx.status();
    let first = delta(&before, &after, "fragFirstRemembered");
    let later = delta(&before, &after, "fragTranslated");
    let hairpin = delta(&before, &after, "hostPortHairpin");
    eprintln!("fragFirstRemembered +{first}, fragTranslated +{later}, hostPortHairpin +{hairpin}");
    assert!(
        first >= 2,
        "a first fragment remembered per direction: +{first}"
    );
    assert!(
        later >= 4,
        "two later fragments translated per direction: +{later}"
    );
    assert!(
        hairpin >= 6,
        "every fragment both ways hairpin-translated: +{hairpin}"
    );
    assert_eq!(
        delta(&before, &after, "hostPortDnat"),
        0,
        "hairpin traffic never crosses the uplink"
    );
    fx.del_pod(&list, &client);
    fx.del_pod(&list, &target_pod);
}
