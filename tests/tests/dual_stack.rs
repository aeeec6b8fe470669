//! Issue 11's table, row by row, as a new user tries it: one dual-stack
//! conflist (host-local ranges `[[10.x/24], [fd00:…/64]]`, routes
//! `0.0.0.0/0` and `::/0`, `ipMasq: true`, portmap with a TCP hostPort,
//! firewall), run through the reference plugins and through ours with only
//! the `type` names changed. The node's uplink has an IPv4 and an IPv6
//! address; the external namespace has no route back to the pods. Every
//! row must hold for both, and both must observe the same thing. An
//! IPv6-only network (one range, `::/0`) gets the same masquerade and
//! hostPort checks.
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use cni_tests::agentctl::{admin, AgentProc};
use cni_tests::hostport::mapping;
use cni_tests::prelude::*;
use cni_tests::traffic::{tcp_echo, udp_echo, Echo, TcpEchoServer, UdpEchoServer};
use cni_tests::uplink::{masq_conf_dual, no_dad, wait_settled, External};

const NET: &str = "dualnet";
const BRIDGE_NAME: &str = "cnidual0";
const ECHO_PORT: u16 = 7400;
const HOST_PORT: u32 = 31400;
const POD_PORT: u16 = 8400;

/// Waits until our agent serves `uplink0` with both of its addresses.
fn wait_dual_uplink(node: &Node, ext: &External) {
    let (v4, v6) = (ext.node_addr.to_string(), ext.node_v6().to_string());
    wait_until(
        "the agent to serve uplink0 with both addresses",
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

/// The issue's conflist for `imp`: bridge (ipMasq) + portmap + firewall,
/// the suite's path keys left in for the reference too (it ignores them).
fn conflist(imp: Impl, node: &Node, ranges: Value, routes: Value) -> Value {
    let mut bridge = masq_conf_dual(node, NET, BRIDGE_NAME, "10.0.0.0/24", "fd00::/64");
    let obj = bridge.as_object_mut().expect("bridge config is an object");
    let version = obj.remove("cniVersion").expect("cniVersion");
    obj.remove("name");
    bridge["type"] = json!(imp.bridge_type());
    bridge["ipam"]["type"] = json!(imp.ipam_type());
    bridge["ipam"]["ranges"] = ranges;
    bridge["ipam"]["routes"] = routes;
    let (portmap, firewall) = match imp {
        Impl::Ours => ("ebpf-portmap", "ebpf-firewall"),
        Impl::Reference => ("portmap", "firewall"),
    };
    let mut pm = json!({"type": portmap, "capabilities": {"portMappings": true}});
    let mut fw = json!({"type": firewall});
    merge(&mut pm, &node.path_keys());
    merge(&mut fw, &node.path_keys());
    json!({"cniVersion": version, "name": NET, "plugins": [bridge, pm, fw]})
}

fn ips_of(result: &Value) -> Vec<IpAddr> {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
        .collect()
}

fn ipv6_of(result: &Value) -> Option<Ipv6Addr> {
    ips_of(result).into_iter().find_map(|ip| match ip {
        IpAddr::V6(a) => Some(a),
        IpAddr::V4(_) => None,
    })
}

/// Where a reply says the client came from, as a role on this node.
fn role(e: &Result<Echo, String>, node: &External, pod: &[IpAddr]) -> String {
    match e {
        Ok(e) if e.seen_as.ip() == IpAddr::V4(node.node_addr) => "node".into(),
        Ok(e) if e.seen_as.ip() == IpAddr::V6(node.node_v6()) => "node".into(),
        Ok(e) if pod.contains(&e.seen_as.ip()) => "pod".into(),
        Ok(e) if e.seen_as == e.local => "client".into(),
        Ok(e) => format!("other ({})", e.seen_as),
        Err(err) => format!("failed: {err}"),
    }
}

/// One implementation's answers to the table's rows.
#[derive(Debug, PartialEq, Eq)]
struct Rows {
    both_addresses: bool,
    tcp6_out_seen_as: String,
    udp6_out_seen_as: String,
    hostport6_seen_as: String,
    hostport4_seen_as: String,
    tcp6_out_forward_drop: String,
    tcp4_out_forward_drop: String,
}

fn table_rows(imp: Impl, tag: &str) -> Rows {
    let node = Node::new(tag);
    no_dad(&node.ns);
    let ext = External::direct_dual(&node);
    let _agent = (imp == Impl::Ours).then(|| {
        let a = AgentProc::start(&node, &[]);
        wait_dual_uplink(&node, &ext);
        a
    });
    let list = conflist(
        imp,
        &node,
        json!([[{"subnet": ext.pod_subnet()}], [{"subnet": ext.pod_subnet6()}]]),
        json!([{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]),
    );
    let pod = node.pod(&format!("{tag}pod"));
    no_dad(&pod);
    let mut att = Attachment::new(&format!("{tag}-ctr"), &pod, "eth0");
    att.capability_args.insert(
        "portMappings".into(),
        json!([mapping(HOST_PORT, u32::from(POD_PORT), "tcp")]),
    );
    let rt = node.runtime(imp);
    let result = rt
        .add_list(&list, &att)
        .unwrap_or_else(|o| panic!("{imp:?}: ADD of the dual-stack conflist: {o}"));
    wait_settled(&pod);
    wait_settled(&node.ns);
    let pod_ips = ips_of(&result);
    let pod6 = ipv6_of(&result);
    let both_addresses = pod6.is_some() && pod_ips.iter().any(IpAddr::is_ipv4);

    let _ext_tcp6 = TcpEchoServer::start_v6(&ext.ns, ECHO_PORT);
    let _ext_udp6 = UdpEchoServer::start_v6(&ext.ns, ECHO_PORT);
    let _ext_tcp4 = TcpEchoServer::start(&ext.ns, ECHO_PORT);
    let _pod_tcp6 = TcpEchoServer::start_v6(&pod, POD_PORT);
    let _pod_tcp4 = TcpEchoServer::start(&pod, POD_PORT);
    let ext6 = SocketAddr::from((ext.ext_v6(), ECHO_PORT));
    let ext4 = SocketAddr::from((ext.ext_addr, ECHO_PORT));
    let hp = u16::try_from(HOST_PORT).expect("hostPort fits u16");

    let tcp6 = tcp_echo(&pod, ext6, "t6");
    let udp6 = udp_echo(&pod, ext6, "u6");
    let hp6 = tcp_echo(&ext.ns, SocketAddr::from((ext.node_v6(), hp)), "h6");
    let hp4 = tcp_echo(&ext.ns, SocketAddr::from((ext.node_addr, hp)), "h4");

    for tool in ["iptables", "ip6tables"] {
        let out = node.ns.run(tool, &["-P", "FORWARD", "DROP"]);
        assert!(out.status.success(), "{tool} -P FORWARD DROP: {out:?}");
    }
    let tcp6_drop = tcp_echo(&pod, ext6, "d6");
    let tcp4_drop = tcp_echo(&pod, ext4, "d4");

    let rows = Rows {
        both_addresses,
        tcp6_out_seen_as: role(&tcp6, &ext, &pod_ips),
        udp6_out_seen_as: role(&udp6, &ext, &pod_ips),
        hostport6_seen_as: role(&hp6, &ext, &pod_ips),
        hostport4_seen_as: role(&hp4, &ext, &pod_ips),
        tcp6_out_forward_drop: role(&tcp6_drop, &ext, &pod_ips),
        tcp4_out_forward_drop: role(&tcp4_drop, &ext, &pod_ips),
    };
    eprintln!("{imp:?}: {rows:#?}");
    rt.del_list(&list, &att, Some(&result))
        .unwrap_or_else(|o| panic!("{imp:?}: DEL: {o}"));
    rows
}

/// Every row of issue 11's table holds for the reference and for ours:
/// the pod gets both addresses; TCP and UDP over IPv6 leave masqueraded to
/// the node's IPv6 address; external → [node IPv6]:hostPort and
/// node IPv4:hostPort reach the pod with the client's own address; with
/// FORWARD policy DROP in iptables and ip6tables, the firewalled pod still
/// reaches the outside over both families.
#[test]
fn issue_table_dual_stack_matches_reference() {
    require_e2e!();
    let want = Rows {
        both_addresses: true,
        tcp6_out_seen_as: "node".into(),
        udp6_out_seen_as: "node".into(),
        hostport6_seen_as: "client".into(),
        hostport4_seen_as: "client".into(),
        tcp6_out_forward_drop: "node".into(),
        tcp4_out_forward_drop: "node".into(),
    };
    let reference = table_rows(Impl::Reference, "dsr");
    assert_eq!(reference, want, "the reference plugins on this machine");
    let ours = table_rows(Impl::Ours, "dso");
    assert_eq!(ours, want, "ours, with only the type names changed");
}

/// An IPv6-only network (one IPv6 range, route `::/0`), the same chain:
/// the pod gets only an IPv6 address, reaches the outside masqueraded to
/// the node's IPv6 address, and is reached through [node IPv6]:hostPort
/// with the client's own address, for the reference and for ours.
#[test]
fn ipv6_only_pod_matches_reference() {
    require_e2e!();
    for (imp, tag) in [(Impl::Reference, "v6r"), (Impl::Ours, "v6o")] {
        let node = Node::new(tag);
        no_dad(&node.ns);
        let ext = External::direct_dual(&node);
        let _agent = (imp == Impl::Ours).then(|| {
            let a = AgentProc::start(&node, &[]);
            wait_dual_uplink(&node, &ext);
            a
        });
        let list = conflist(
            imp,
            &node,
            json!([[{"subnet": ext.pod_subnet6()}]]),
            json!([{"dst": "::/0"}]),
        );
        let pod = node.pod(&format!("{tag}pod"));
        no_dad(&pod);
        let mut att = Attachment::new(&format!("{tag}-ctr"), &pod, "eth0");
        att.capability_args.insert(
            "portMappings".into(),
            json!([mapping(HOST_PORT, u32::from(POD_PORT), "tcp")]),
        );
        let rt = node.runtime(imp);
        let result = rt
            .add_list(&list, &att)
            .unwrap_or_else(|o| panic!("{imp:?}: ADD of the IPv6-only conflist: {o}"));
        wait_settled(&pod);
        wait_settled(&node.ns);
        let pod_ips = ips_of(&result);
        assert!(
            pod_ips.len() == 1 && pod_ips[0].is_ipv6(),
            "{imp:?}: one IPv6 address, no IPv4: {result}"
        );
        let _ext_tcp6 = TcpEchoServer::start_v6(&ext.ns, ECHO_PORT);
        let _pod_tcp = TcpEchoServer::start_v6(&pod, POD_PORT);
        let out = tcp_echo(&pod, SocketAddr::from((ext.ext_v6(), ECHO_PORT)), "o6");
        assert_eq!(
            role(&out, &ext, &pod_ips),
            "node",
            "{imp:?}: pod → external"
        );
        let hp = u16::try_from(HOST_PORT).expect("hostPort fits u16");
        let inb = tcp_echo(&ext.ns, SocketAddr::from((ext.node_v6(), hp)), "i6");
        assert_eq!(
            role(&inb, &ext, &pod_ips),
            "client",
            "{imp:?}: external → [node IPv6]:hostPort → pod"
        );
        rt.del_list(&list, &att, Some(&result))
            .unwrap_or_else(|o| panic!("{imp:?}: DEL: {o}"));
    }
}
