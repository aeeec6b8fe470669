//! Teardown trusts the attachment's record, not the request: a full chain
//! (ebpf-bridge with ipMasq + ebpf-host-local, ebpf-portmap, ebpf-firewall,
//! ebpf-bandwidth) added with the exact capability payloads containerd's
//! go-cni sends (Go field names, the 2^32-1 "no burst" sentinel), then
//! deleted with configs that ADD would refuse — malformed `prevResult`,
//! `runtimeConfig` and options every plugin rejects — leaves nothing: no
//! link, reservation, record, hostPort, rate limit, firewall attachment or
//! masquerade entry. A second DEL succeeds too.
use cni_tests::agentctl::{admin, record_of, AgentProc};
use cni_tests::prelude::*;
use cni_tests::residue::residue;
use cni_tests::runtime::plugin_conf;
use cni_tests::uplink::{masq_conf, External};

const NET: &str = "teardownnet";
const BRIDGE_NAME: &str = "cnitear0";

/// bridge (ipMasq) + portmap + firewall + bandwidth, as a conflist.
fn full_chain(node: &Node, subnet: &str) -> Value {
    let mut list = conflist_of(&masq_conf(node, NET, BRIDGE_NAME, subnet));
    let keys = node.path_keys();
    for (plugin_type, caps) in [
        ("ebpf-portmap", json!({"portMappings": true})),
        ("ebpf-firewall", json!({})),
        ("ebpf-bandwidth", json!({"bandwidth": true})),
    ] {
        let mut p = json!({"type": plugin_type, "capabilities": caps});
        merge(&mut p, &keys);
        list["plugins"].as_array_mut().expect("plugins").push(p);
    }
    list
}

/// What go-cni (containerd 1.6/1.7) puts into runtimeConfig for a pod with
/// a hostPort and both bandwidth annotations at 10M.
fn containerd_capabilities(att: &mut Attachment, host_port: u16) {
    att.capability_args.insert(
        "portMappings".into(),
        json!([{"HostPort": host_port, "ContainerPort": 8080, "Protocol": "tcp", "HostIP": ""}]),
    );
    att.capability_args.insert(
        "bandwidth".into(),
        json!({"IngressRate": 10_000_000u64, "IngressBurst": 4_294_967_295u64,
               "EgressRate": 10_000_000u64, "EgressBurst": 4_294_967_295u64}),
    );
}

/// Per plugin of the chain, options its ADD refuses with code 7.
fn refused_options(plugin_type: &str) -> Value {
    match plugin_type {
        "ebpf-bridge" => json!({"vlan": 7, "hairpinMode": true, "promiscMode": true,
                                "mtu": "big"}),
        "ebpf-portmap" => json!({"masqAll": true, "conditionsV4": ["-s", "1.2.3.4"]}),
        "ebpf-firewall" => json!({"backend": "nftables", "firewallRules": 5}),
        "ebpf-bandwidth" => json!({"ingressRate": "1M", "shapedSubnets": ["10.0.0.0/8"]}),
        other => panic!("no refused options for {other}"),
    }
}

#[test]
fn del_with_configs_add_would_refuse_leaves_nothing() {
    require_e2e!();
    let node = Node::new("teardown");
    let ext = External::direct(&node);
    let _agent = AgentProc::start(&node, &[]);
    let pod = node.pod("teardownpod");
    let rt = node.runtime(Impl::Ours);
    let list = full_chain(&node, &ext.pod_subnet());

    // What stays by design after a clean ADD+DEL (bridge, its address).
    let warm = Attachment::new("teardown-warm", &pod, "eth0");
    let res = rt
        .add_list(&list, &warm)
        .unwrap_or_else(|o| panic!("warm-up ADD: {o}"));
    rt.del_list(&list, &warm, Some(&res))
        .unwrap_or_else(|o| panic!("warm-up DEL: {o}"));
    let baseline = residue(&node, &pod, NET);

    let mut att = Attachment::new("teardown-ctr", &pod, "eth0");
    containerd_capabilities(&mut att, 18090);
    let result = rt
        .add_list(&list, &att)
        .unwrap_or_else(|o| panic!("ADD with containerd's payloads: {o}"));
    // Every capability was taken as containerd meant it.
    let status = admin(&node, "status");
    assert_eq!(status["hostPorts"], 1, "the Go-cased hostPort is mapped");
    let rates = status["rateLimits"].as_array().cloned().unwrap_or_default();
    assert_eq!(rates.len(), 2, "both directions limited: {rates:?}");
    for r in &rates {
        assert_eq!(r["rateBps"], 10_000_000, "{r}");
        assert!(
            r["depthBytes"].as_u64().is_some_and(|d| d < 4 << 20),
            "containerd's burst sentinel must not become a 512 MiB bucket: {r}"
        );
    }
    let record = record_of(&admin(&node, "records"), NET, "teardown-ctr", "eth0");
    assert!(record.is_some(), "the attachment is recorded");
    assert_ne!(residue(&node, &pod, NET), baseline);

    for round in ["first", "second"] {
        for i in (0..list["plugins"].as_array().map_or(0, Vec::len)).rev() {
            let mut conf = plugin_conf(&list, i, Some(&result), &att);
            let plugin_type = conf["type"].as_str().unwrap_or_default().to_string();
            merge(&mut conf, &refused_options(&plugin_type));
            conf["prevResult"] = json!("str");
            conf["runtimeConfig"] = json!(1);
            // ADD would refuse this config: the teardown must not.
            let add = rt.exec("ADD", &att, &conf).expect_error();
            assert!(
                add.code == 7 || add.code == 6,
                "{plugin_type}: ADD of the refused config: {add:?}"
            );
            rt.exec("DEL", &att, &conf).expect_success();
        }
        assert_json_eq(
            "baseline",
            &baseline,
            &format!("after the {round} DEL"),
            &residue(&node, &pod, NET),
            "DEL with configs ADD refuses",
        );
    }
}
