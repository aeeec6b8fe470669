//! Every verb's contract: ADD, DEL (idempotent, without ADD, without netns,
//! without prevResult), CHECK (passes after ADD, detects drift), VERSION,
//! STATUS and GC.
use std::collections::BTreeSet;

use cni_tests::agent::Agent;
use cni_tests::prelude::*;

/// Files a successful ADD+DEL may legitimately leave changed.
const MOVING_FILES: &[&str] = &["last_reserved_ip."];

/// The host-side veth named in a result (no sandbox, not the bridge).
fn host_veth(result: &Value) -> String {
    result["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["sandbox"].is_null() && i["name"] != BRIDGE)
        .and_then(|i| i["name"].as_str())
        .unwrap_or_else(|| panic!("no host veth in {result}"))
        .to_string()
}

fn pod_ip(result: &Value) -> String {
    result_addresses(result)[0].addr().to_string()
}

/// A config whose ipam routes all carry a gateway: the reference bridge
/// v1.1.1 fails its own CHECK on gateway-less routes, and the baselines
/// below must start from a passing CHECK.
fn conf_checkable_by_reference(node: &Node, imp: Impl) -> Value {
    let mut c = bridge_conf_for(node, "1.0.0", imp);
    c["ipam"]["routes"] = json!([{"dst": "198.18.0.0/15", "gw": "10.22.0.254"}]);
    c
}

// ---------------------------------------------------------------- ADD / DEL

/// ADD then DEL of a second pod brings the node back to where it was
/// (except host-local's round-robin position).
fn add_del_round_trip(imp: Impl) {
    let node = Node::new("rt");
    let first = node.pod("rtfirst");
    let pod = node.pod("rtpod");
    let rt = node.runtime(imp);
    let conf = bridge_conf_for(&node, "1.0.0", imp);
    let first_att = Attachment::new("round-trip-first", &first, "eth0");
    let first_result = rt.add(&conf, &first_att);

    let before = node.snapshot(&[&first, &pod]).without_files(MOVING_FILES);
    let att = Attachment::new("round-trip-ctr", &pod, "eth0");
    let result = rt.add(&conf, &att);
    assert_result_matches_kernel(&result, &node.ns, &pod);
    assert_eq!(pod_ip(&result), "10.22.0.3");
    assert!(node.ns.has_link(&host_veth(&result)));
    assert_eq!(
        node.reservations(NET_NAME).get("10.22.0.3"),
        Some(&("round-trip-ctr".to_string(), "eth0".to_string()))
    );
    rt.del(&conf, &att, Some(&result)).expect_success();
    let after = node.snapshot(&[&first, &pod]).without_files(MOVING_FILES);
    before.assert_unchanged(&after, &format!("{imp:?}: ADD+DEL round trip"));

    rt.del(&conf, &first_att, Some(&first_result))
        .expect_success();
}

#[test]
fn add_del_round_trip_ours() {
    require_e2e!();
    add_del_round_trip(Impl::Ours);
}

#[test]
fn add_del_round_trip_reference_baseline() {
    require_e2e!();
    add_del_round_trip(Impl::Reference);
}

#[test]
fn del_twice() {
    require_e2e!();
    let node = Node::new("deltwice");
    let pod = node.pod("dtpod");
    let rt = node.runtime(Impl::Ours);
    let conf = bridge_conf_for(&node, "1.0.0", Impl::Ours);
    let att = Attachment::new("del-twice-ctr", &pod, "eth0");
    let result = rt.add(&conf, &att);
    rt.del(&conf, &att, Some(&result)).expect_success();
    let after_first = node.snapshot(&[&pod]);
    assert!(!pod.has_link("eth0"), "eth0 still in the pod after DEL");
    assert!(
        !node.ns.has_link(&host_veth(&result)),
        "host veth still there after DEL"
    );
    assert!(node.reservations(NET_NAME).is_empty());
    let out = rt.del(&conf, &att, Some(&result));
    assert!(out.success(), "second DEL must succeed: {out}");
    node.snapshot(&[&pod])
        .assert_unchanged_from(&after_first, "second DEL changed the node");
}

/// DEL for an attachment that was never added succeeds and changes
/// nothing, on a fresh node (no bridge yet: DEL must not create it) and on
/// a node with other pods.
#[test]
fn del_without_add() {
    require_e2e!();
    let node = Node::new("delnoadd");
    let pod = node.pod("dnpod");
    let other = node.pod("dnother");
    let rt = node.runtime(Impl::Ours);
    let conf = bridge_conf_for(&node, "1.0.0", Impl::Ours);
    let att = Attachment::new("never-added", &pod, "eth0");

    // The reference host-local creates the network's store dir and its
    // `lock` on any call, DEL included: bookkeeping, not state, so ignored.
    let bookkeeping = ["lock", NET_NAME];
    let before = node.snapshot(&[&pod, &other]).without_files(&bookkeeping);
    let out = rt.del(&conf, &att, None);
    assert!(out.success(), "DEL without ADD on a fresh node: {out}");
    node.snapshot(&[&pod, &other])
        .without_files(&bookkeeping)
        .assert_unchanged_from(&before, "DEL without ADD on a fresh node");

    let other_att = Attachment::new("del-no-add-other", &other, "eth0");
    let other_result = rt.add(&conf, &other_att);
    let before = node.snapshot(&[&pod, &other]);
    let out = rt.del(&conf, &att, None);
    assert!(out.success(), "DEL without ADD next to another pod: {out}");
    node.snapshot(&[&pod, &other])
        .assert_unchanged_from(&before, "DEL without ADD next to another pod");
    rt.del(&conf, &other_att, Some(&other_result))
        .expect_success();
}

/// The pod's netns is gone (pod deleted before the runtime's DEL): DEL
/// succeeds and still releases the IP and anything recorded on the node.
#[test]
fn del_with_netns_gone() {
    require_e2e!();
    let node = Node::new("delgone");
    let pod = node.pod("dgpod");
    let rt = node.runtime(Impl::Ours);
    let conf = bridge_conf_for(&node, "1.0.0", Impl::Ours);
    let att = Attachment::new("del-netns-gone", &pod, "eth0");
    let result = rt.add(&conf, &att);
    let veth = host_veth(&result);
    pod.delete();
    eventually("host veth to vanish with the pod netns", SETTLE, || {
        !node.ns.has_link(&veth)
    });
    let out = rt.del(&conf, &att, Some(&result));
    assert!(out.success(), "DEL with the netns gone: {out}");
    assert!(
        node.reservations(NET_NAME).is_empty(),
        "IP not released: {:?}",
        node.reservations(NET_NAME)
    );
    // Second DEL: still fine.
    let out = rt.del(&conf, &att, None);
    assert!(out.success(), "second DEL with the netns gone: {out}");
}

/// DEL with an empty prevResult (and with none at all) still removes
/// everything the ADD created.
fn del_cleans_without_useful_prev_result(prev: Option<Value>, tag: &str) {
    let node = Node::new(tag);
    let first = node.pod("epfirst");
    let pod = node.pod("eppod");
    let rt = node.runtime(Impl::Ours);
    let conf = bridge_conf_for(&node, "1.0.0", Impl::Ours);
    let first_att = Attachment::new("empty-prev-first", &first, "eth0");
    let first_result = rt.add(&conf, &first_att);
    let before = node.snapshot(&[&first, &pod]).without_files(MOVING_FILES);

    let att = Attachment::new("empty-prev-ctr", &pod, "eth0");
    let result = rt.add(&conf, &att);
    let out = rt.del(&conf, &att, prev.as_ref());
    assert!(out.success(), "DEL with prevResult {prev:?}: {out}");
    assert!(!pod.has_link("eth0"), "eth0 left in the pod");
    assert!(!node.ns.has_link(&host_veth(&result)), "host veth left");
    node.snapshot(&[&first, &pod])
        .without_files(MOVING_FILES)
        .assert_unchanged_from(&before, &format!("DEL with prevResult {prev:?}"));
    rt.del(&conf, &first_att, Some(&first_result))
        .expect_success();
}

#[test]
fn del_with_empty_prev_result() {
    require_e2e!();
    del_cleans_without_useful_prev_result(
        Some(json!({"cniVersion": "1.0.0", "interfaces": [], "ips": [], "routes": [], "dns": {}})),
        "delempty",
    );
}

#[test]
fn del_without_prev_result() {
    require_e2e!();
    del_cleans_without_useful_prev_result(None, "delnoprev");
}

// -------------------------------------------------------------------- CHECK

#[test]
fn check_passes_after_add() {
    require_e2e!();
    for version in ["0.4.0", "1.0.0", "1.1.0"] {
        let node = Node::new("chkok");
        let pod = node.pod("cpod");
        let rt = node.runtime(Impl::Ours);
        let conf = bridge_conf_for(&node, version, Impl::Ours);
        let att = Attachment::new("check-ok", &pod, "eth0");
        let result = rt.add(&conf, &att);
        let out = rt.check(&conf, &att, &result);
        assert!(out.success(), "CHECK right after ADD ({version}): {out}");
        rt.del(&conf, &att, Some(&result)).expect_success();
    }
}

/// What is removed behind the plugin's back before CHECK.
#[derive(Clone, Copy, Debug)]
enum Drift {
    Address,
    Route,
    HostVeth,
    IpReservation,
}

fn check_detects(drift: Drift, imp: Impl) {
    let node = Node::new("drift");
    let pod = node.pod("drpod");
    let rt = node.runtime(imp);
    let conf = conf_checkable_by_reference(&node, imp);
    let att = Attachment::new("check-drift", &pod, "eth0");
    let result = rt.add(&conf, &att);
    let ok = rt.check(&conf, &att, &result);
    assert!(ok.success(), "{imp:?}: CHECK before the drift: {ok}");

    let ip = pod_ip(&result);
    let words: &[&str] = match drift {
        Drift::Address => {
            pod.ip(&["addr", "del", &format!("{ip}/24"), "dev", "eth0"]);
            &["10.22.0.2", "address", "ip"]
        }
        Drift::Route => {
            pod.ip(&["route", "del", "198.18.0.0/15"]);
            &["198.18.0.0", "route"]
        }
        Drift::HostVeth => {
            node.ns.ip(&["link", "del", &host_veth(&result)]);
            &["eth0", "veth", "interface", "link"]
        }
        Drift::IpReservation => {
            std::fs::remove_file(node.data_dir().join(NET_NAME).join(&ip)).unwrap();
            &["10.22.0.2", "check-drift", "reserv", "alloc"]
        }
    };
    let out = rt.check(&conf, &att, &result);
    let err = out.expect_error();
    let msg = err.msg.to_lowercase();
    assert!(
        words.iter().any(|w| msg.contains(&w.to_lowercase())),
        "{imp:?} {drift:?}: CHECK error should say what drifted ({words:?}): {out}"
    );
    let _ = rt.del(&conf, &att, Some(&result));
}

#[test]
fn check_detects_removed_address() {
    require_e2e!();
    check_detects(Drift::Address, Impl::Ours);
}

#[test]
fn check_detects_removed_route() {
    require_e2e!();
    check_detects(Drift::Route, Impl::Ours);
}

#[test]
fn check_detects_removed_host_veth() {
    require_e2e!();
    check_detects(Drift::HostVeth, Impl::Ours);
}

#[test]
fn check_detects_removed_ip_reservation() {
    require_e2e!();
    check_detects(Drift::IpReservation, Impl::Ours);
}

/// Harness self-test: the reference detects the same four drifts.
#[test]
fn check_drift_reference_baseline() {
    require_e2e!();
    for d in [
        Drift::Address,
        Drift::Route,
        Drift::HostVeth,
        Drift::IpReservation,
    ] {
        check_detects(d, Impl::Reference);
    }
}

// ------------------------------------------------------------------ VERSION

const ALL_VERSIONS: [&str; 7] = [
    "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0",
];

#[test]
fn version_output() {
    require_e2e!();
    let node = Node::new("version");
    for bin in ["ebpf-bridge", "ebpf-host-local"] {
        let path = ours_binary(bin);
        for stdin in [
            &br#"{"cniVersion":"1.1.0"}"#[..],
            &br#"{"cniVersion":"0.3.1"}"#[..],
            b"",
        ] {
            let inv = Invocation::new("VERSION").stdin(stdin.to_vec());
            let out = cni_tests::plugin::run(&inv, Some(&node.ns), &path);
            let v = out.expect_success();
            assert!(
                v["cniVersion"].is_string(),
                "{bin}: VERSION without cniVersion: {out}"
            );
            let got: BTreeSet<&str> = v["supportedVersions"]
                .as_array()
                .unwrap_or_else(|| panic!("{bin}: no supportedVersions: {out}"))
                .iter()
                .filter_map(Value::as_str)
                .collect();
            assert_eq!(
                got,
                ALL_VERSIONS.into_iter().collect(),
                "{bin}: supportedVersions"
            );
        }
    }
}

// ------------------------------------------------------------------- STATUS

fn ipam_status_conf(node: &Node, version: &str) -> Value {
    let mut c = ipam_conf(node, version, "ebpf-host-local", SUBNET);
    c["type"] = json!("ebpf-bridge");
    c
}

#[test]
fn status_host_local_ok() {
    require_e2e!();
    let node = Node::new("sthl");
    let rt = node.runtime(Impl::Ours);
    let out = rt
        .invoke(
            "ebpf-host-local",
            Invocation::new("STATUS").stdin_json(&ipam_status_conf(&node, "1.1.0")),
        )
        .ran();
    assert!(
        out.success(),
        "host-local STATUS with a usable dataDir: {out}"
    );
    assert!(
        out.stdout.trim().is_empty(),
        "STATUS success prints nothing: {out}"
    );
}

/// STATUS is a 1.1.0 verb: an older config version is refused with code 1
/// (what libcni's skel does for "config version does not allow STATUS").
#[test]
fn status_needs_1_1_0() {
    require_e2e!();
    let node = Node::new("stver");
    let rt = node.runtime(Impl::Ours);
    let out = rt
        .invoke(
            "ebpf-host-local",
            Invocation::new("STATUS").stdin_json(&ipam_status_conf(&node, "1.0.0")),
        )
        .ran();
    assert_eq!(
        out.expect_error().code,
        1,
        "STATUS with cniVersion 1.0.0: {out}"
    );
}

/// Without the agent (nothing listens on agentSocket), ebpf-bridge reports
/// code 50 "plugin not available", as the design requires.
#[test]
fn status_bridge_without_agent_is_50() {
    require_e2e!();
    let node = Node::new("stnoag");
    let rt = node.runtime(Impl::Ours);
    let conf = bridge_conf_for(&node, "1.1.0", Impl::Ours);
    let err = rt
        .status_list(&conflist_of(&conf))
        .expect_err("STATUS must fail without the agent");
    let e = err.expect_error();
    assert_eq!(e.code, 50, "STATUS without agent: {err}");
}

#[test]
fn status_bridge_with_agent_ok() {
    require_e2e!();
    assert!(
        Agent::binary().is_some(),
        "cni-agent is not built (cargo build -p cni-agent --bins)"
    );
    let node = Node::new("stag");
    let _agent = Agent::start(&node, &[]);
    let rt = node.runtime(Impl::Ours);
    let conf = bridge_conf_for(&node, "1.1.0", Impl::Ours);
    if let Err(out) = rt.status_list(&conflist_of(&conf)) {
        panic!("STATUS with the agent running: {out}");
    }
}

// ----------------------------------------------------------------------- GC

/// Three attachments; GC with only the first valid releases the other two
/// reservations (and their host veths) and leaves the first working.
fn gc_keeps_only_valid(key: GcKey) {
    let node = Node::new("gc");
    let pods: Vec<NetNs> = (0..3).map(|i| node.pod(&format!("gc{i}"))).collect();
    let rt = node.runtime(Impl::Ours);
    let conf = bridge_conf_for(&node, "1.1.0", Impl::Ours);
    let atts: Vec<Attachment> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| Attachment::new(&format!("gc-ctr-{i}"), p, "eth0"))
        .collect();
    let results: Vec<Value> = atts.iter().map(|a| rt.add(&conf, a)).collect();
    assert_eq!(node.reservations(NET_NAME).len(), 3);

    if let Err(out) = rt.gc_list(&conflist_of(&conf), &atts[..1], key) {
        panic!("GC ({}) failed: {out}", key.key());
    }
    let left: Vec<String> = node
        .reservations(NET_NAME)
        .values()
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(
        left,
        vec!["gc-ctr-0".to_string()],
        "GC via {} must release exactly the reservations not listed",
        key.key()
    );
    let out = rt.check(&conf, &atts[0], &results[0]);
    assert!(out.success(), "the valid attachment must survive GC: {out}");
    for (a, r) in atts.iter().zip(&results) {
        rt.del(&conf, a, Some(r)).expect_success();
    }
}

#[test]
fn gc_releases_reservations_not_in_valid_attachments() {
    require_e2e!();
    gc_keeps_only_valid(GcKey::ValidAttachments);
}

#[test]
fn gc_accepts_cni_dev_attachments() {
    require_e2e!();
    gc_keeps_only_valid(GcKey::Attachments);
}

/// GC also removes the host-side links of stale attachments (design: GC
/// removes every record, map entry, link and reservation not listed).
#[test]
fn gc_removes_host_veths_of_stale_attachments() {
    require_e2e!();
    let node = Node::new("gclink");
    let pods: Vec<NetNs> = (0..2).map(|i| node.pod(&format!("gl{i}"))).collect();
    let rt = node.runtime(Impl::Ours);
    let conf = bridge_conf_for(&node, "1.1.0", Impl::Ours);
    let atts: Vec<Attachment> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| Attachment::new(&format!("gclink-ctr-{i}"), p, "eth0"))
        .collect();
    let results: Vec<Value> = atts.iter().map(|a| rt.add(&conf, a)).collect();
    if let Err(out) = rt.gc_list(&conflist_of(&conf), &atts[..1], GcKey::ValidAttachments) {
        panic!("GC failed: {out}");
    }
    assert!(
        node.ns.has_link(&host_veth(&results[0])),
        "valid attachment's veth removed"
    );
    assert!(
        !node.ns.has_link(&host_veth(&results[1])),
        "stale attachment's host veth still present after GC"
    );
    for (a, r) in atts.iter().zip(&results) {
        rt.del(&conf, a, Some(r)).expect_success();
    }
}
