//! The suite's `loopback` plugin against the reference one (the plugin
//! containerd runs for every sandbox from the same bin dir): the same
//! result, `lo` up after ADD and down after DEL, CHECK that sees it, and
//! DEL that succeeds twice, without a netns, and after the netns is gone.
use std::path::PathBuf;

use cni_tests::prelude::*;

const VERSIONS: [&str; 4] = ["0.3.1", "0.4.0", "1.0.0", "1.1.0"];

fn binary(imp: Impl) -> PathBuf {
    match imp {
        Impl::Ours => ours_binary("loopback"),
        Impl::Reference => PathBuf::from(REFERENCE_DIR).join("loopback"),
    }
}

fn conf(version: &str) -> Value {
    json!({"cniVersion": version, "name": "lo-net", "type": "loopback"})
}

fn call(imp: Impl, verb: &str, version: &str, node: &NetNs, pod: Option<&NetNs>) -> Outcome {
    let mut inv = Invocation::new(verb)
        .container("loopback-ctr")
        .ifname("lo")
        .path(REFERENCE_DIR)
        .stdin_json(&conf(version));
    if let Some(pod) = pod {
        inv = inv.netns(pod.path_str());
    }
    cni_tests::plugin::run(&inv, Some(node), &binary(imp))
}

fn lo_is_up(pod: &NetNs) -> bool {
    let links = pod.ip_json(&["link", "show", "dev", "lo"]);
    links[0]["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x == "UP"))
}

/// ADD, CHECK, DEL, DEL through `imp`; returns the ADD result with the
/// sandbox path replaced, for comparison.
fn lifecycle(imp: Impl, version: &str) -> Value {
    let node = NetNs::new("lonode");
    let pod = NetNs::new("lopod");
    assert!(!lo_is_up(&pod), "a new netns starts with lo down");
    let mut result = call(imp, "ADD", version, &node, Some(&pod)).expect_success();
    assert!(lo_is_up(&pod), "{imp:?} {version}: lo up after ADD");
    assert_eq!(
        result["interfaces"][0]["sandbox"].as_str(),
        Some(pod.path_str()),
        "{imp:?} {version}: sandbox path"
    );
    result["interfaces"][0]["sandbox"] = json!("<netns>");
    if version_at_least(version, "0.4.0") {
        call(imp, "CHECK", version, &node, Some(&pod)).expect_success();
    }
    call(imp, "DEL", version, &node, Some(&pod)).expect_success();
    assert!(!lo_is_up(&pod), "{imp:?} {version}: lo down after DEL");
    if version_at_least(version, "0.4.0") {
        call(imp, "CHECK", version, &node, Some(&pod)).expect_error();
    }
    call(imp, "DEL", version, &node, Some(&pod)).expect_success();
    call(imp, "DEL", version, &node, None).expect_success();
    result
}

fn version_at_least(v: &str, min: &str) -> bool {
    cni_tests::runtime::version_at_least(v, min)
}

#[test]
fn loopback_matches_the_reference() {
    require_e2e!();
    for version in VERSIONS {
        let mut ours = lifecycle(Impl::Ours, version);
        // The reference v1.1.1 stops at 1.0.0.
        if !version_at_least(Impl::Reference.max_version(), version) {
            continue;
        }
        let mut reference = lifecycle(Impl::Reference, version);
        // The 0.3.x/0.4.0 layout gives each IP a "version"; the reference
        // loopback v1.1.1 leaves it out (its result is built in the 1.0
        // layout and printed as is). Ours keeps the spec's layout.
        if !version_at_least(version, "1.0.0") {
            for (side, must_have) in [(&mut ours, true), (&mut reference, false)] {
                for ip in side["ips"].as_array_mut().into_iter().flatten() {
                    let had = ip.as_object_mut().and_then(|o| o.remove("version"));
                    if must_have {
                        assert!(had.is_some(), "ours at {version}: ips[].version missing");
                    }
                }
            }
        }
        assert_json_eq(
            "reference",
            &reference,
            "ours",
            &ours,
            &format!("loopback ADD result at {version}"),
        );
    }
}

#[test]
fn loopback_del_after_the_netns_is_gone() {
    require_e2e!();
    let node = NetNs::new("lonode-gone");
    let pod = NetNs::new("lopod-gone");
    call(Impl::Ours, "ADD", "1.0.0", &node, Some(&pod)).expect_success();
    let path = pod.path_str().to_string();
    pod.delete();
    let inv = Invocation::new("DEL")
        .container("loopback-ctr")
        .ifname("lo")
        .netns(&path)
        .path(REFERENCE_DIR)
        .stdin_json(&conf("1.0.0"));
    let out = cni_tests::plugin::run(&inv, Some(&node), &binary(Impl::Ours));
    out.expect_success();
}
