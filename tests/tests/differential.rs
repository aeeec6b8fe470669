//! Differential tests: the same bridge + host-local config through the
//! reference plugins and through ours, each in its own node + pod namespace
//! pair, must give the same result (after normalising MACs, veth names and
//! sandbox paths), the same kernel state in both namespaces, the same IPAM
//! store, and the same state after DEL.
use cni_tests::prelude::*;
use cni_tests::runtime::version_at_least;

/// What one implementation produced for the differential config.
struct Side {
    label: String,
    result: Value,
    node_after_add: Value,
    pod_after_add: Value,
    store_after_add: Value,
    node_after_del: Value,
    pod_after_del: Value,
    store_after_del: Value,
}

/// Runs ADD, CHECK (0.4.0+), DEL through `bridge_type`/`ipam_type` found in
/// `imp`'s CNI_PATH and records everything observable.
fn run_side(label: &str, version: &str, imp: Impl, bridge_type: &str, ipam_type: &str) -> Side {
    let node = Node::new("dnode");
    let pod = node.pod("dpod");
    let rt = node.runtime(imp);
    let conf = bridge_conf(&node, version, bridge_type, ipam_type);
    let att = Attachment::new("differential-ctr", &pod, "eth0");

    let result = rt.add(&conf, &att);
    assert_eq!(
        result["cniVersion"].as_str(),
        Some(version),
        "{label}: result version"
    );
    if version_at_least(version, "0.3.0") {
        assert_result_matches_kernel(&result, &node.ns, &pod);
    }
    let node_norm = Normalize::across(&[BRIDGE]);
    let pod_norm = Normalize::across(&["eth0"]);
    let node_after_add = with_firewall(kernel_state(&node.ns, &node_norm), &node.ns);
    let pod_after_add = with_firewall(kernel_state(&pod, &pod_norm), &pod);
    let store_after_add = json!(node.reservations(NET_NAME));

    // The reference bridge v1.1.1 fails its own CHECK here: it installs a
    // gateway-less ipam route via the subnet gateway but then expects it
    // without one ("Expected Route {Dst:192.168.0.0/16 GW:<nil>} not found").
    // Ours must pass CHECK right after ADD, so only ours is checked.
    if version_at_least(version, "0.4.0") && imp == Impl::Ours {
        let out = rt.check(&conf, &att, &result);
        assert!(
            out.success(),
            "{label}: CHECK right after ADD failed: {out}"
        );
    }

    let prev = version_at_least(version, "0.4.0").then_some(&result);
    rt.del(&conf, &att, prev).expect_success();
    let node_after_del = with_firewall(kernel_state(&node.ns, &node_norm), &node.ns);
    let pod_after_del = with_firewall(kernel_state(&pod, &pod_norm), &pod);
    let store_after_del = json!(node.reservations(NET_NAME));

    Side {
        label: label.to_string(),
        result,
        node_after_add,
        pod_after_add,
        store_after_add,
        node_after_del,
        pod_after_del,
        store_after_del,
    }
}

/// Adds the namespace's iptables/nft rules to its state: the reference
/// bridge needs none for this config (no ipMasq), and ours must never add any.
fn with_firewall(mut state: Value, ns: &NetNs) -> Value {
    state["firewall_rules"] = json!(ns.firewall_rules());
    state
}

fn compare(reference: &Side, ours: &Side, norm: &ResultNorm) {
    let ctx = format!("{} vs {}", reference.label, ours.label);
    if std::env::var_os("CNI_TESTS_DUMP").is_some() {
        for side in [reference, ours] {
            eprintln!(
                "== {}\nresult: {:#}\nnode: {:#}\npod: {:#}\nstore: {}\nnode after DEL: {:#}",
                side.label,
                side.result,
                side.node_after_add,
                side.pod_after_add,
                side.store_after_add,
                side.node_after_del
            );
        }
    }
    assert_json_eq(
        &reference.label,
        &normalize_result(&reference.result, norm),
        &ours.label,
        &normalize_result(&ours.result, norm),
        &format!("{ctx}: ADD result"),
    );
    let pairs = [
        (
            "node netns after ADD",
            &reference.node_after_add,
            &ours.node_after_add,
        ),
        (
            "pod netns after ADD",
            &reference.pod_after_add,
            &ours.pod_after_add,
        ),
        (
            "IPAM store after ADD",
            &reference.store_after_add,
            &ours.store_after_add,
        ),
        (
            "node netns after DEL",
            &reference.node_after_del,
            &ours.node_after_del,
        ),
        (
            "pod netns after DEL",
            &reference.pod_after_del,
            &ours.pod_after_del,
        ),
        (
            "IPAM store after DEL",
            &reference.store_after_del,
            &ours.store_after_del,
        ),
    ];
    for (what, r, o) in pairs {
        assert_json_eq(
            &reference.label,
            r,
            &ours.label,
            o,
            &format!("{ctx}: {what}"),
        );
    }
}

fn differential(version: &str) {
    let reference = run_side(
        &format!("reference@{version}"),
        version,
        Impl::Reference,
        "bridge",
        "host-local",
    );
    let ours = run_side(
        &format!("ours@{version}"),
        version,
        Impl::Ours,
        "ebpf-bridge",
        "ebpf-host-local",
    );
    compare(&reference, &ours, &ResultNorm::new(BRIDGE));
}

#[test]
fn same_as_reference_0_3_1() {
    require_e2e!();
    differential("0.3.1");
}

#[test]
fn same_as_reference_0_4_0() {
    require_e2e!();
    differential("0.4.0");
}

#[test]
fn same_as_reference_1_0_0() {
    require_e2e!();
    differential("1.0.0");
}

/// The Debian reference plugins (v1.1.1) speak cniVersion up to 1.0.0 only,
/// so for 1.1.0 we compare ours@1.1.0 against reference@1.0.0, ignoring the
/// `cniVersion` field and the fields 1.1.0 added to interfaces and routes
/// (mtu, socketPath, pciID; route mtu/advmss/priority/table/scope). Kernel
/// state and the IPAM store must still be identical.
#[test]
fn same_as_reference_1_1_0_vs_reference_1_0_0() {
    require_e2e!();
    let reference = run_side(
        "reference@1.0.0",
        "1.0.0",
        Impl::Reference,
        "bridge",
        "host-local",
    );
    let ours = run_side(
        "ours@1.1.0",
        "1.1.0",
        Impl::Ours,
        "ebpf-bridge",
        "ebpf-host-local",
    );
    let mut norm = ResultNorm::new(BRIDGE);
    norm.ignore_version = true;
    norm.drop_1_1_fields = true;
    compare(&reference, &ours, &norm);
}

/// ebpf-bridge must delegate IPAM through CNI_PATH to whatever `ipam.type`
/// names, including the reference host-local.
#[test]
fn ours_with_reference_host_local_ipam() {
    require_e2e!();
    for version in ["0.4.0", "1.0.0"] {
        let reference = run_side(
            &format!("reference@{version}"),
            version,
            Impl::Reference,
            "bridge",
            "host-local",
        );
        let mixed = run_side(
            &format!("ebpf-bridge+host-local@{version}"),
            version,
            Impl::Ours,
            "ebpf-bridge",
            "host-local",
        );
        compare(&reference, &mixed, &ResultNorm::new(BRIDGE));
    }
}

/// Harness self-test: two reference runs must compare equal, so a
/// differential failure is a real difference, not normalisation noise.
#[test]
fn harness_reference_against_itself() {
    require_e2e!();
    let a = run_side(
        "reference-a@1.0.0",
        "1.0.0",
        Impl::Reference,
        "bridge",
        "host-local",
    );
    let b = run_side(
        "reference-b@1.0.0",
        "1.0.0",
        Impl::Reference,
        "bridge",
        "host-local",
    );
    compare(&a, &b, &ResultNorm::new(BRIDGE));
}
