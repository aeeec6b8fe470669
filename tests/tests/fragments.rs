//! IPv4 fragments through the NAT programs. A 4,000-byte UDP datagram at
//! MTU 1500 travels as three fragments, and only the first carries the UDP
//! header: the masquerade and the hostPort DNAT (TC and XDP, and the
//! hairpin on the bridge) must give every fragment its first fragment's
//! translation, or the receiver cannot reassemble the datagram.
//!
//! Each exchange sends a 4,000-byte request and gets a 4,000-byte reply
//! (the request's bytes inverted); both ends check every byte and the
//! addresses they saw. The namespaces' own IPv4 counters (/proc/net/snmp)
//! show the datagrams were fragmented by the senders and reassembled by the
//! receivers only, never by the node in between (no netfilter defrag there),
//! so the node's programs saw the fragments; the datapath counters show
//! they translated them.
use std::net::{IpAddr, SocketAddr};

use cni_tests::agentctl::{admin, AgentProc};
use cni_tests::hostport::{mapping, stat};
use cni_tests::hostport_node::{delta, fixture, Mode, Setup, POD_PORT};
use cni_tests::prelude::*;
use cni_tests::traffic::{blob, blob_reply, udp_blob, FragCounters, UdpBlobServer};
use cni_tests::uplink::{masq_conf, result_ipv4, External, UPLINK_IF};

/// UDP payload of every datagram: three fragments at MTU 1500.
const LEN: usize = 4000;
const MTU: u64 = 1500;
const EXT_PORT: u16 = 7002;

/// The MTU of `dev` in `ns`.
fn mtu(ns: &NetNs, dev: &str) -> u64 {
    ns.ip_json(&["link", "show", "dev", dev])[0]["mtu"]
        .as_u64()
        .unwrap_or_else(|| panic!("no MTU for {dev}"))
}

/// The fragmentation counters of a set of namespaces, read together.
struct Snmp<'a> {
    namespaces: Vec<(&'a str, &'a NetNs)>,
    before: Vec<FragCounters>,
}

impl<'a> Snmp<'a> {
    fn start(namespaces: Vec<(&'a str, &'a NetNs)>) -> Snmp<'a> {
        let before = namespaces
            .iter()
            .map(|(_, ns)| FragCounters::of(ns))
            .collect();
        Snmp { namespaces, before }
    }

    /// The increase in namespace `name` since `start`.
    fn delta(&self, name: &str) -> FragCounters {
        let i = self
            .namespaces
            .iter()
            .position(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no namespace {name}"));
        FragCounters::of(self.namespaces[i].1).since(self.before[i])
    }
}

/// The sender fragmented a datagram and the receiver reassembled it, in
/// both directions; the node never reassembled anything (it forwarded and
/// translated the fragments as they were).
#[track_caller]
fn assert_fragmented_end_to_end(snmp: &Snmp, client: &str, server: &str) {
    for (who, what) in [(client, "request"), (server, "reply")] {
        let d = snmp.delta(who);
        assert!(d.frag_oks >= 1, "{who} must fragment the {what}: {d:?}");
    }
    for (who, what) in [(server, "request"), (client, "reply")] {
        let d = snmp.delta(who);
        assert!(d.reasm_oks >= 1, "{who} must reassemble the {what}: {d:?}");
    }
    let node = snmp.delta("node");
    assert_eq!(
        (node.reasm_reqds, node.frag_oks),
        (0, 0),
        "the node must pass the fragments on as they are"
    );
}

/// The datapath translated first fragments and later ones: per direction
/// one first fragment remembered and two later fragments translated.
#[track_caller]
fn assert_fragments_translated(before: &Value, after: &Value) {
    let first = delta(before, after, "fragFirstRemembered");
    let later = delta(before, after, "fragTranslated");
    eprintln!("fragFirstRemembered +{first}, fragTranslated +{later}");
    assert!(
        first >= 2,
        "first fragments remembered: +{first}\n{after:#}"
    );
    assert!(
        later >= 4,
        "later fragments translated: +{later}\n{after:#}"
    );
}

/// A pod sends a 4,000-byte UDP datagram to an external server through
/// the masquerade and gets a 4,000-byte reply: the server receives exactly
/// the bytes sent, from the node's uplink address; the pod receives exactly
/// the reply, from the server's address. A 4,000-byte ping (ICMP echo
/// fragments) gets through too.
#[test]
fn masquerade_translates_every_fragment() {
    require_e2e!();
    let node = Node::new("fragmasq");
    let ext = External::direct(&node);
    let _agent = AgentProc::start(&node, &[]);
    let pod = node.pod("fragmpod");
    let rt = node.runtime(Impl::Ours);
    let list = conflist_of(&masq_conf(&node, "fragnet", "cnifrag0", &ext.pod_subnet()));
    let att = Attachment::new("fragm-ctr", &pod, "eth0");
    let result = rt
        .add_list(&list, &att)
        .unwrap_or_else(|o| panic!("ADD: {o}"));
    let pod_ip = result_ipv4(&result);
    assert_eq!(mtu(&node.ns, UPLINK_IF), MTU, "uplink MTU");
    assert_eq!(mtu(&pod, "eth0"), MTU, "pod MTU");

    let server = UdpBlobServer::start(&ext.ns, EXT_PORT);
    let target = SocketAddr::from((ext.ext_addr, EXT_PORT));
    let request = blob(LEN, 1);
    let before = admin(&node, "status");
    let snmp = Snmp::start(vec![("pod", &pod), ("ext", &ext.ns), ("node", &node.ns)]);

    let reply = udp_blob(&pod, target, &request)
        .unwrap_or_else(|e| panic!("pod -> external, {LEN} bytes: {e}"));
    assert_eq!(reply.from, target, "the pod must see the server's address");
    assert_eq!(reply.local.ip(), IpAddr::V4(pod_ip));
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
            IpAddr::V4(ext.node_addr),
            "the server must see the node's uplink address"
        );
        assert!(
            *data == request,
            "the server must receive the {LEN} bytes exactly (got {})",
            data.len()
        );
    }
    assert_fragmented_end_to_end(&snmp, "pod", "ext");
    assert_fragments_translated(&before, &admin(&node, "status"));

    // ICMP echo: the identifier is in the first fragment only.
    let before = admin(&node, "status");
    let ping = pod.run(
        "ping",
        &[
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "2",
            "-s",
            &LEN.to_string(),
            &ext.ext_addr.to_string(),
        ],
    );
    assert!(
        ping.status.success(),
        "{LEN}-byte ping through the masquerade: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    assert_fragments_translated(&before, &admin(&node, "status"));

    rt.del_list(&list, &att, Some(&result))
        .unwrap_or_else(|o| panic!("DEL: {o}"));
}

/// An external client sends a 4,000-byte UDP datagram to node:hostPort
/// and gets a 4,000-byte reply: the pod receives exactly the bytes, from
/// the client's own address and port; the client receives exactly the
/// reply, from node:hostPort. In XDP mode the XDP program translates every
/// fragment of the request.
fn hostport_translates_every_fragment(tag: &str, mode: Mode) {
    const HP: u16 = 30200;
    let fx = fixture(tag, Setup::mode(mode));
    let list = fx.list(None);
    let pod = fx.add_pod(
        &list,
        &format!("{tag}-ctr"),
        vec![mapping(HP.into(), POD_PORT.into(), "udp")],
    );
    assert_eq!(mtu(&fx.node.ns, UPLINK_IF), MTU, "uplink MTU");
    assert_eq!(mtu(&pod.ns, "eth0"), MTU, "pod MTU");
    let server = UdpBlobServer::start(&pod.ns, POD_PORT);
    let target = fx.node_hostport(HP);
    let request = blob(LEN, 7);
    let before = fx.status();
    let snmp = Snmp::start(vec![
        ("pod", &pod.ns),
        ("ext", &fx.ext.ns),
        ("node", &fx.node.ns),
    ]);

    let reply = udp_blob(&fx.ext.ns, target, &request)
        .unwrap_or_else(|e| panic!("external -> {target}, {LEN} bytes ({mode:?}): {e}"));
    assert_eq!(reply.from, target, "the reply must come from node:hostPort");
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
    assert_fragmented_end_to_end(&snmp, "ext", "pod");
    let after = fx.status();
    assert_fragments_translated(&before, &after);
    let dnat = delta(&before, &after, "hostPortDnat");
    let dnat_xdp = delta(&before, &after, "hostPortDnatXdp");
    eprintln!("{mode:?}: hostPortDnat +{dnat}, hostPortDnatXdp +{dnat_xdp}");
    assert!(dnat >= 3, "every fragment of the request DNATed: +{dnat}");
    match mode {
        Mode::Tc => assert_eq!(dnat_xdp, 0, "TC mode: the XDP program must not run"),
        Mode::Xdp => assert_eq!(dnat_xdp, dnat, "XDP mode: every fragment DNATed at XDP"),
    }
    fx.del_pod(&list, &pod);
}

#[test]
fn hostport_tc_translates_every_fragment() {
    require_e2e!();
    hostport_translates_every_fragment("fraghptc", Mode::Tc);
}

#[test]
fn hostport_xdp_translates_every_fragment() {
    require_e2e!();
    hostport_translates_every_fragment("fraghpxdp", Mode::Xdp);
}

/// Hairpin with snat: a pod sends a 4,000-byte datagram to another pod's
/// hostPort on the node's address; the bridge program translates (and
/// redirects) every fragment both ways. The target pod sees the bridge
/// address, the client gets the reply from node:hostPort.
#[test]
fn hairpin_translates_every_fragment() {
    require_e2e!();
    const HP: u16 = 30201;
    let fx = fixture("fraghair", Setup::mode(Mode::Tc));
    let list = fx.list(Some(true));
    let target_pod = fx.add_pod(
        &list,
        "fraghair-1",
        vec![mapping(HP.into(), POD_PORT.into(), "udp")],
    );
    let client = fx.add_pod(&list, "fraghair-2", vec![]);
    let server = UdpBlobServer::start(&target_pod.ns, POD_PORT);
    let target = fx.node_hostport(HP);
    let request = blob(LEN, 13);
    let before = fx.status();
    let snmp = Snmp::start(vec![
        ("client", &client.ns),
        ("pod", &target_pod.ns),
        ("node", &fx.node.ns),
    ]);

    let reply = udp_blob(&client.ns, target, &request)
        .unwrap_or_else(|e| panic!("pod -> {target}, {LEN} bytes: {e}"));
    assert_eq!(reply.from, target, "the reply must come from node:hostPort");
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
            IpAddr::V4(fx.ext.pod_gateway()),
            "snat: the target pod must see the bridge address"
        );
        assert!(
            *data == request,
            "the target pod must receive the bytes exactly"
        );
    }
    assert_fragmented_end_to_end(&snmp, "client", "pod");
    let after = fx.status();
    assert_fragments_translated(&before, &after);
    assert!(
        delta(&before, &after, "hostPortHairpin") >= 6,
        "every fragment both ways is hairpin-translated\n{after:#}"
    );
    assert_eq!(stat(&after, "hostPortDnat"), stat(&before, "hostPortDnat"));
    fx.del_pod(&list, &client);
    fx.del_pod(&list, &target_pod);
}
