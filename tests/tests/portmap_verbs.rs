//! ebpf-portmap's verbs end to end: conflicting hostPorts and bad input
//! change nothing, DEL (with or without portMappings, twice) removes the
//! mappings and stops a live flow, CHECK notices a map entry removed
//! behind its back, GC removes stale mappings. Same topology as
//! portmap.rs (`cni_tests::hostport_node`), TC mode.
use std::net::Ipv4Addr;
use std::time::Duration;

use cni_tests::agentctl::{admin, record_of};
use cni_tests::hostport::{mapping, mapping_on};
use cni_tests::hostport_node::{fixture, Fixture, Mode, Pod, Setup, NET, POD_PORT};
use cni_tests::prelude::*;
use cni_tests::runtime::plugin_conf;
use cni_tests::traffic::{in_netns, tcp_echo, udp_echo, TcpEchoServer, UdpEchoServer};
use cni_tests::uplink::result_ipv4;

// ---------------------------------------------------------------------------
// 6. Conflicts, bad input, DEL.
// ---------------------------------------------------------------------------

/// Everything a failed portmap ADD could have touched: the node and pod
/// namespaces, the node's dirs (records, IPAM, bpffs pins), and the
/// agent's view (mapping and record counts).
fn observable(fx: &Fixture, pods: &[&NetNs]) -> (NodeSnapshot, Value) {
    let st = fx.status();
    (
        fx.node.snapshot(pods),
        json!({"hostPorts": st["hostPorts"], "records": st["records"],
               "masqSources": st["masqSources"], "records list": admin(&fx.node, "records")}),
    )
}

/// A second pod asking for a hostPort+protocol another pod holds (on every
/// address, or on one address overlapping an every-address mapping) gets
/// the agent's conflict error, naming the owner; bad protocols and out of
/// range ports are code 7 naming the field; the unsupported reference
/// options too. None of them changes anything. The same port with the
/// other protocol, or on a different hostIP than a hostIP-bound mapping,
/// is no conflict.
#[test]
fn conflicts_and_bad_input_change_nothing() {
    require_e2e!();
    let fx = fixture("conflict", Setup::mode(Mode::Tc));
    let list = fx.list(None);
    const TAKEN: u16 = 30120;
    const TAKEN_UDP: u16 = 30121;
    const ON_FIRST: u16 = 30122;
    let pod1 = fx.add_pod(
        &list,
        "conflict-1",
        vec![
            mapping(TAKEN.into(), POD_PORT.into(), "tcp"),
            mapping(TAKEN_UDP.into(), POD_PORT.into(), "udp"),
            mapping_on(fx.ext.node_addr, ON_FIRST.into(), POD_PORT.into(), "tcp"),
        ],
    );
    // Pod 2: the bridge ADD done, the portmap ADD to try.
    let ns2 = fx.node.pod("conflict-2");
    let att2 = Attachment::new("conflict-2", &ns2, "eth0");
    let rt = fx.node.runtime(Impl::Ours);
    let bridge_result = rt.add(&plugin_conf(&list, 0, None, &att2), &att2);
    let portmap_add = |mappings: Value, extra: Value| {
        let mut att = att2.clone();
        att.capability_args.insert("portMappings".into(), mappings);
        let mut conf = plugin_conf(&list, 1, Some(&bridge_result), &att);
        merge(&mut conf, &extra);
        rt.exec("ADD", &att, &conf).ran()
    };
    let (snap, agent_view) = observable(&fx, &[&pod1.ns, &ns2]);
    assert_eq!(agent_view["hostPorts"], 3);
    let second = Ipv4Addr::new(198, 18, fx.ext.index, 3);

    let conflicts = [
        (
            json!([mapping(TAKEN.into(), 80, "tcp")]),
            format!("hostport {TAKEN}/tcp on every node address"),
        ),
        (
            json!([mapping_on(fx.ext.node_addr, TAKEN.into(), 80, "tcp")]),
            format!("hostport {TAKEN}/tcp on {}", fx.ext.node_addr),
        ),
        (
            json!([mapping(ON_FIRST.into(), 80, "tcp")]),
            format!("hostport {ON_FIRST}/tcp on every node address"),
        ),
        // The free mapping first: it must not be applied either.
        (
            json!([
                mapping(30129, 80, "tcp"),
                mapping(TAKEN_UDP.into(), 80, "udp")
            ]),
            format!("hostport {TAKEN_UDP}/udp on every node address"),
        ),
        // Twice in one request.
        (
            json!([mapping(30128, 80, "tcp"), mapping(30128, 81, "tcp")]),
            "hostport 30128/tcp on every node address".to_string(),
        ),
    ];
    for (mappings, what) in conflicts {
        let out = portmap_add(mappings.clone(), json!({}));
        let err = out.expect_error();
        assert_eq!(err.code, 999, "conflict {mappings}: {out}");
        let msg = err.msg.to_lowercase();
        assert!(
            msg.contains(&what) && msg.contains("already mapped by attachment"),
            "conflict {mappings}: {:?} should say {what:?} is already mapped",
            err.msg
        );
        if !mappings.to_string().contains("30128") {
            assert!(
                err.msg.contains("conflict-1"),
                "the message names the owner: {:?}",
                err.msg
            );
        }
        let (after, after_view) = observable(&fx, &[&pod1.ns, &ns2]);
        after.assert_unchanged_from(&snap, &format!("after the conflicting ADD {mappings}"));
        assert_json_eq(
            "before",
            &agent_view,
            "after",
            &after_view,
            &format!("agent after {mappings}"),
        );
    }

    let bad = [
        (
            json!([mapping(30130, 80, "sctp")]),
            json!({}),
            "portMappings[0].protocol",
        ),
        (
            json!([mapping(30130, 80, "icmp")]),
            json!({}),
            "portMappings[0].protocol",
        ),
        (
            json!([mapping(30130, 80, "tcp"), mapping(0, 80, "tcp")]),
            json!({}),
            "portMappings[1].hostPort",
        ),
        (
            json!([mapping(70000, 80, "tcp")]),
            json!({}),
            "portMappings[0].hostPort",
        ),
        (
            json!([mapping(30130, 0, "tcp")]),
            json!({}),
            "portMappings[0].containerPort",
        ),
        (
            json!([mapping(30130, 70000, "udp")]),
            json!({}),
            "portMappings[0].containerPort",
        ),
        (
            json!([{"hostPort": 30130, "containerPort": 80, "protocol": "tcp", "hostIP": "not-an-ip"}]),
            json!({}),
            "portMappings[0].hostIP",
        ),
        (
            json!([mapping(30130, 80, "tcp")]),
            json!({"masqAll": true}),
            "masqAll",
        ),
        (
            json!([mapping(30130, 80, "tcp")]),
            json!({"conditionsV4": ["-s", "1.2.3.4"]}),
            "conditionsV4",
        ),
    ];
    for (mappings, extra, field) in bad {
        let out = portmap_add(mappings.clone(), extra.clone());
        let err = out.expect_error();
        assert_eq!(err.code, 7, "{mappings} {extra}: {out}");
        assert!(
            err.msg.contains(field),
            "{mappings} {extra}: {:?} should name {field}",
            err.msg
        );
        let (after, after_view) = observable(&fx, &[&pod1.ns, &ns2]);
        after.assert_unchanged_from(&snap, &format!("after the bad ADD {mappings} {extra}"));
        assert_json_eq(
            "before",
            &agent_view,
            "after",
            &after_view,
            &format!("agent after {mappings}"),
        );
    }

    // No conflict: the other protocol; another address than a
    // hostIP-bound mapping's.
    let ok = portmap_add(
        json!([
            mapping(TAKEN.into(), POD_PORT.into(), "udp"),
            mapping(TAKEN_UDP.into(), POD_PORT.into(), "tcp"),
            mapping_on(second, ON_FIRST.into(), POD_PORT.into(), "tcp"),
        ]),
        json!({}),
    );
    ok.expect_success();
    assert_eq!(fx.status()["hostPorts"], 6);
    let pod2 = Pod {
        ip: result_ipv4(&bridge_result),
        att: {
            let mut a = att2.clone();
            a.capability_args.insert(
                "portMappings".into(),
                json!([
                    mapping(TAKEN.into(), POD_PORT.into(), "udp"),
                    mapping(TAKEN_UDP.into(), POD_PORT.into(), "tcp"),
                    mapping_on(second, ON_FIRST.into(), POD_PORT.into(), "tcp"),
                ]),
            );
            a
        },
        result: bridge_result.clone(),
        ns: ns2,
    };
    // Each protocol goes to its own pod.
    let _t1 = TcpEchoServer::start(&pod1.ns, POD_PORT);
    let _u2 = UdpEchoServer::start(&pod2.ns, POD_PORT);
    let t = tcp_echo(&fx.ext.ns, fx.node_hostport(TAKEN), "tcp").expect("tcp to pod1");
    assert_eq!(t.text, "tcp");
    let u = udp_echo(&fx.ext.ns, fx.node_hostport(TAKEN), "udp").expect("udp to pod2");
    assert_eq!(u.text, "udp");
    fx.del_pod(&list, &pod2);
    fx.del_pod(&list, &pod1);
    let st = fx.status();
    assert_eq!(
        (st["hostPorts"].as_u64(), st["records"].as_u64()),
        (Some(0), Some(0)),
        "{st:#}"
    );
}

/// DEL of the portmap plugin with an empty portMappings succeeds (and,
/// unlike the reference, which returns early and would leave its rules,
/// removes what the ADD recorded); a second DEL succeeds; a UDP flow that
/// was exchanging through the hostPort stops (the same socket's datagrams
/// no longer reach the pod), and TCP is refused. DEL of the whole list,
/// twice, succeeds.
#[test]
fn del_stops_mappings_and_stale_flows() {
    require_e2e!();
    let fx = fixture("delflow", Setup::mode(Mode::Tc));
    let list = fx.list(None);
    const HP: u16 = 30140;
    let pod = fx.add_pod(
        &list,
        "delflow-ctr",
        vec![
            mapping(HP.into(), POD_PORT.into(), "udp"),
            mapping(HP.into(), POD_PORT.into(), "tcp"),
        ],
    );
    let udp = UdpEchoServer::start(&pod.ns, POD_PORT);
    let _tcp = TcpEchoServer::start(&pod.ns, POD_PORT);
    let target = fx.node_hostport(HP);

    // A long-lived "flow": one connected socket in the external namespace.
    let flow = in_netns(&fx.ext.ns, move || {
        let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
        s.connect(target).expect("connect");
        s
    });
    flow.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let exchange = |payload: &str| -> Option<String> {
        let mut buf = [0u8; 512];
        for _ in 0..3 {
            let _ = flow.send(payload.as_bytes());
            if let Ok(n) = flow.recv(&mut buf) {
                return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        None
    };
    for i in 0..5 {
        let reply = exchange(&format!("live {i}")).expect("flow through the hostPort");
        assert!(reply.ends_with(&format!(" live {i}")), "{reply}");
    }
    let received_live = udp.peers().len();

    // DEL of the portmap plugin with no portMappings at all.
    let rt = fx.node.runtime(Impl::Ours);
    let mut att_empty = pod.att.clone();
    att_empty
        .capability_args
        .insert("portMappings".into(), json!([]));
    let del_conf = plugin_conf(&list, 1, Some(&pod.result), &att_empty);
    rt.exec("DEL", &att_empty, &del_conf).expect_success();
    let st = fx.status();
    assert_eq!(st["hostPorts"], 0, "DEL removes what ADD recorded: {st:#}");
    let records = admin(&fx.node, "records");
    let entries = record_of(&records, NET, &pod.att.container_id, "eth0")
        .expect("the bridge's entries stay recorded");
    assert!(
        entries
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["kind"] != "host-port"),
        "{entries:#}"
    );
    rt.exec("DEL", &att_empty, &del_conf).expect_success();

    // The stale flow: the same 5-tuple gets nothing back any more, and
    // the pod receives nothing more.
    for i in 0..3 {
        let reply = exchange(&format!("stale {i}"));
        assert_eq!(reply, None, "a datagram to a removed hostPort was answered");
    }
    assert_eq!(
        udp.peers().len(),
        received_live,
        "datagrams to a removed hostPort reached the pod"
    );
    let refused = tcp_echo(&fx.ext.ns, target, "after DEL");
    assert!(refused.is_err(), "TCP after DEL: {refused:?}");

    // DEL of the whole list, twice.
    fx.del_pod(&list, &pod);
    rt.del_list(&list, &pod.att, Some(&pod.result))
        .unwrap_or_else(|o| panic!("second DEL of the list: {o}"));
    let st = fx.status();
    assert_eq!(
        (st["hostPorts"].as_u64(), st["records"].as_u64()),
        (Some(0), Some(0)),
        "{st:#}"
    );
}

// ---------------------------------------------------------------------------
// 7. CHECK, GC, STATUS.
// ---------------------------------------------------------------------------

/// CHECK passes after ADD; fails when one of the mappings' map entries is
/// removed behind the plugin's back (the other mapping still works, the
/// removed one does not); fails when asked about a mapping never added.
/// DEL still succeeds afterwards.
#[test]
fn check_detects_a_missing_map_entry() {
    require_e2e!();
    use aya::maps::{HashMap, Map, MapData};
    use cni_agent::datapath::pins::PinLayout;
    use cni_ebpf_common::{map_names, HostPortKey, HostPortTarget, FAMILY_V4};

    let fx = fixture("check", Setup::mode(Mode::Tc));
    let list = fx.list(None);
    const HP: u16 = 30150;
    let pod = fx.add_pod(
        &list,
        "check-ctr",
        vec![
            mapping(HP.into(), POD_PORT.into(), "tcp"),
            mapping(HP.into(), POD_PORT.into(), "udp"),
        ],
    );
    let rt = fx.node.runtime(Impl::Ours);
    rt.check_list(&list, &pod.att, &pod.result)
        .unwrap_or_else(|o| panic!("CHECK after ADD: {o}"));
    rt.status_list(&list)
        .unwrap_or_else(|o| panic!("STATUS: {o}"));

    // CHECK of a mapping that was never added.
    let mut other = pod.att.clone();
    other
        .capability_args
        .insert("portMappings".into(), json!([mapping(30159, 80, "tcp")]));
    let out = rt
        .exec(
            "CHECK",
            &other,
            &plugin_conf(&list, 1, Some(&pod.result), &other),
        )
        .ran();
    assert!(
        !out.success(),
        "CHECK of a mapping never added passed: {out}"
    );

    let _tcp = TcpEchoServer::start(&pod.ns, POD_PORT);
    let _udp = UdpEchoServer::start(&pod.ns, POD_PORT);
    tcp_echo(&fx.ext.ns, fx.node_hostport(HP), "before").expect("tcp before");

    // Remove the TCP entry from the pinned HOSTPORTS map.
    let path = PinLayout::new(fx.node.bpffs.path()).map_path(map_names::HOSTPORTS);
    let data = MapData::from_pin(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut map: HashMap<MapData, HostPortKey, HostPortTarget> =
        HashMap::try_from(Map::HashMap(data)).expect("HOSTPORTS is a hash map");
    let key = HostPortKey {
        addr: [0; 4],
        port: HP.to_be(),
        proto: 6,
        family: FAMILY_V4,
    };
    let target = map.get(&key, 0).expect("the TCP mapping's entry");
    assert_eq!(target.port, POD_PORT.to_be());
    map.remove(&key).expect("remove the entry");
    assert_eq!(fx.status()["hostPorts"], 1);

    let out = rt
        .exec(
            "CHECK",
            &pod.att,
            &plugin_conf(&list, 1, Some(&pod.result), &pod.att),
        )
        .ran();
    let err = out.expect_error();
    assert!(
        err.msg.contains("missing") || err.msg.contains(&HP.to_string()),
        "CHECK should name what is missing: {out}"
    );
    assert!(rt.check_list(&list, &pod.att, &pod.result).is_err());
    assert!(
        tcp_echo(&fx.ext.ns, fx.node_hostport(HP), "after").is_err(),
        "the removed TCP mapping still answers"
    );
    udp_echo(&fx.ext.ns, fx.node_hostport(HP), "udp still").expect("the UDP mapping still works");

    fx.del_pod(&list, &pod);
    let st = fx.status();
    assert_eq!(
        (st["hostPorts"].as_u64(), st["records"].as_u64()),
        (Some(0), Some(0)),
        "{st:#}"
    );
}

/// GC with only one pod still valid removes the other pod's mappings (and
/// nothing of the valid one's).
#[test]
fn gc_removes_stale_mappings() {
    require_e2e!();
    let fx = fixture("gc", Setup::mode(Mode::Tc));
    let list = fx.list(None);
    let keep = fx.add_pod(
        &list,
        "gc-keep",
        vec![mapping(30160, POD_PORT.into(), "tcp")],
    );
    let gone = fx.add_pod(
        &list,
        "gc-gone",
        vec![mapping(30161, POD_PORT.into(), "tcp")],
    );
    assert_eq!(fx.status()["hostPorts"], 2);
    let rt = fx.node.runtime(Impl::Ours);
    rt.gc_list(
        &list,
        std::slice::from_ref(&keep.att),
        GcKey::ValidAttachments,
    )
    .unwrap_or_else(|o| panic!("GC: {o}"));
    let st = fx.status();
    assert_eq!(st["hostPorts"], 1, "{st:#}");
    let records = admin(&fx.node, "records");
    assert!(
        record_of(&records, NET, "gc-gone", "eth0").is_none(),
        "{records:#}"
    );
    let _t = TcpEchoServer::start(&keep.ns, POD_PORT);
    let _t2 = TcpEchoServer::start(&gone.ns, POD_PORT);
    tcp_echo(&fx.ext.ns, fx.node_hostport(30160), "kept").expect("the valid pod's mapping");
    assert!(tcp_echo(&fx.ext.ns, fx.node_hostport(30161), "gone").is_err());
    fx.del_pod(&list, &keep);
    fx.del_pod(&list, &gone);
}

/// What the datapath cannot honour fails ADD with code 7 naming the key
/// and value, and the runtime's DEL after it leaves the node as it was;
/// never a silent half-done ADD: a `hostIP` of a family the pod has no
/// address of (the reference would skip that mapping and map nothing),
/// IPv6 and IPv4 alike, and SCTP (the datapath translates TCP and UDP) on
/// a dual-stack pod. Dual-stack hostPorts themselves work (portmap6.rs).
#[test]
fn hostports_the_datapath_cannot_serve_are_refused() {
    require_e2e!();
    use cni_tests::agentctl::AgentProc;
    use cni_tests::residue::residue;
    let node = Node::new("hp6");
    let _agent = AgentProc::start(&node, &[]);
    let pod = node.pod("hp6pod");
    let rt = node.runtime(Impl::Ours);
    let ranges = |v4: bool, v6: bool| {
        let mut r = Vec::new();
        if v4 {
            r.push(json!([{"subnet": "10.66.0.0/24"}]));
        }
        if v6 {
            r.push(json!([{"subnet": "fd00:66::/64"}]));
        }
        Value::Array(r)
    };
    let list = |v4: bool, v6: bool| {
        let keys = node.path_keys();
        let mut bridge = json!({
            "type": "ebpf-bridge", "bridge": "cnihp6", "isGateway": true,
            "ipam": {"type": "ebpf-host-local", "ranges": ranges(v4, v6),
                     "dataDir": node.data_dir()}});
        merge(&mut bridge, &keys);
        let mut portmap = json!({"type": "ebpf-portmap", "capabilities": {"portMappings": true}});
        merge(&mut portmap, &keys);
        json!({"cniVersion": "1.0.0", "name": "hp6net", "plugins": [bridge, portmap]})
    };
    // A first ADD+DEL of a dual-stack pod (bridge only) leaves what stays
    // by design: the bridge and its gateway addresses.
    let warm = Attachment::new("hp6-warm", &pod, "eth0");
    let mut bridge_only = list(true, true);
    bridge_only["plugins"]
        .as_array_mut()
        .expect("plugins")
        .truncate(1);
    let res = rt
        .add_list(&bridge_only, &warm)
        .unwrap_or_else(|o| panic!("warm-up: {o}"));
    rt.del_list(&bridge_only, &warm, Some(&res))
        .unwrap_or_else(|o| panic!("warm-up DEL: {o}"));
    let baseline = residue(&node, &pod, "hp6net");

    for ((v4, v6), mapping, expect) in [
        (
            (true, false),
            json!({"hostPort": 30161, "containerPort": 80, "protocol": "tcp", "hostIP": "fd00:1::1"}),
            "portMappings[0].hostIP: fd00:1::1 is IPv6, and the pod has no IPv6 address",
        ),
        (
            (false, true),
            json!({"hostPort": 30162, "containerPort": 80, "protocol": "udp", "hostIP": "198.18.0.1"}),
            "portMappings[0].hostIP: 198.18.0.1 is IPv4, and the pod has no IPv4 address",
        ),
        (
            (true, true),
            json!({"hostPort": 30163, "containerPort": 80, "protocol": "sctp"}),
            "portMappings[0].protocol: sctp is not supported",
        ),
    ] {
        let mut att = Attachment::new("hp6-ctr", &pod, "eth0");
        att.capability_args
            .insert("portMappings".into(), json!([mapping]));
        let out = rt
            .add_list(&list(v4, v6), &att)
            .expect_err("a mapping the datapath cannot serve must not be accepted");
        let err = out.expect_error();
        assert_eq!(err.code, 7, "{err:?}");
        assert!(err.msg.contains(expect), "{} should say {expect}", err.msg);
        assert_json_eq(
            "baseline",
            &baseline,
            "after the refused ADD and the runtime's DEL",
            &residue(&node, &pod, "hp6net"),
            expect,
        );
    }
}
