//! Crash safety: an ADD killed (SIGKILL, no cleanup at all) at each crash
//! point of the plugin or the agent leaves a state that a later DEL, or a GC
//! with an empty valid-attachments list, removes entirely: no link in the
//! node or the pod, no IP reservation, no record, no masquerade entry.
//!
//! Crash points need a debug build (`CNI_EBPF_CRASH_AT`).
use std::time::Duration;

use cni_tests::agentctl::{admin, AgentProc};
use cni_tests::prelude::*;
use cni_tests::residue::residue;
use cni_tests::uplink::{masq_conf, External};

const NET: &str = "crashnet";
const BRIDGE_NAME: &str = "cnicrash0";
const CRASH_ENV: &str = "CNI_EBPF_CRASH_AT";

/// Where the crash happens.
#[derive(Clone, Copy, Debug)]
enum Point {
    /// In the ebpf-bridge ADD.
    Plugin(&'static str),
    /// In the agent, while serving the ADD's masquerade request.
    Agent(&'static str),
}

/// How the crashed attachment is cleaned up.
#[derive(Clone, Copy, Debug)]
enum Cleanup {
    Del,
    GcEmpty,
}

/// ADD killed at `point` (then DEL or GC with the agent running) leaves
/// nothing, twice over: once cleaned by DEL, once by GC.
fn crash_then_clean(tag: &str, point: Point) {
    let node = Node::new(tag);
    let ext = External::direct(&node);
    let mut agent = AgentProc::start(&node, &[]);
    let pod = node.pod(&format!("{tag}pod"));
    let rt = node.runtime(Impl::Ours);
    let conf = masq_conf(&node, NET, BRIDGE_NAME, &ext.pod_subnet());
    let list = conflist_of(&conf);

    // A first ADD+DEL leaves what stays by design (bridge, its address,
    // forwarding), so the baseline holds only that.
    let warm = Attachment::new(&format!("{tag}-warm"), &pod, "eth0");
    let warm_res = rt
        .add_list(&list, &warm)
        .unwrap_or_else(|o| panic!("warm-up ADD: {o}"));
    rt.del_list(&list, &warm, Some(&warm_res))
        .unwrap_or_else(|o| panic!("warm-up DEL: {o}"));
    let baseline = residue(&node, &pod, NET);

    for cleanup in [Cleanup::Del, Cleanup::GcEmpty] {
        let ctx = format!("{point:?}, cleaned by {cleanup:?}");
        let att = Attachment::new(&format!("{tag}-{cleanup:?}").to_lowercase(), &pod, "eth0");
        let inv = Invocation::new("ADD")
            .container(&att.container_id)
            .netns(&att.netns)
            .ifname(&att.ifname)
            .stdin_json(&conf);
        match point {
            Point::Plugin(p) => {
                let out = rt.invoke("ebpf-bridge", inv.env(CRASH_ENV, p)).ran();
                assert_eq!(
                    out.exit_code, None,
                    "{ctx}: the plugin must die at the crash point: {out}"
                );
            }
            Point::Agent(p) => {
                agent.terminate();
                agent = AgentProc::start_with_env(&node, &[], &[(CRASH_ENV, p)]);
                let out = rt.invoke("ebpf-bridge", inv).ran();
                let status = agent.wait_exit(Duration::from_secs(10));
                assert_eq!(
                    std::os::unix::process::ExitStatusExt::signal(&status),
                    Some(libc::SIGKILL),
                    "{ctx}: the agent must die at the crash point"
                );
                let err = out.expect_error();
                eprintln!("{ctx}: ADD failed with code {}: {}", err.code, err.msg);
                agent = AgentProc::start(&node, &[]);
            }
        }
        // Something was left (except where the plugin's own rollback
        // already cleaned up after the agent died).
        if matches!(point, Point::Plugin(_)) {
            assert_ne!(
                residue(&node, &pod, NET),
                baseline,
                "{ctx}: the crash left nothing to clean?"
            );
        }
        match cleanup {
            Cleanup::Del => {
                if let Err(o) = rt.del_list(&list, &att, None) {
                    panic!("{ctx}: DEL after the crash: {o}");
                }
            }
            Cleanup::GcEmpty => {
                if let Err(o) = rt.gc_list(&list, &[], GcKey::ValidAttachments) {
                    panic!("{ctx}: GC after the crash: {o}");
                }
            }
        }
        assert_json_eq(
            "baseline",
            &baseline,
            "after cleanup",
            &residue(&node, &pod, NET),
            &ctx,
        );
    }
    // The node is as good as new: the crashed attachment can be added again.
    let again = Attachment::new(&format!("{tag}-del"), &pod, "eth0");
    let res = rt
        .add_list(&list, &again)
        .unwrap_or_else(|o| panic!("{point:?}: ADD after the cleanups: {o}"));
    assert_eq!(admin(&node, "status")["masqSources"], 1);
    rt.del_list(&list, &again, Some(&res))
        .unwrap_or_else(|o| panic!("{point:?}: final DEL: {o}"));
    assert_json_eq(
        "baseline",
        &baseline,
        "after a last ADD+DEL",
        &residue(&node, &pod, NET),
        &format!("{point:?}"),
    );
    drop(agent);
}

#[test]
fn crash_bridge_after_record() {
    require_e2e!();
    crash_then_clean("cbrec", Point::Plugin("bridge-after-record"));
}

#[test]
fn crash_bridge_after_veth() {
    require_e2e!();
    crash_then_clean("cbveth", Point::Plugin("bridge-after-veth"));
}

#[test]
fn crash_bridge_after_ipam() {
    require_e2e!();
    crash_then_clean("cbipam", Point::Plugin("bridge-after-ipam"));
}

#[test]
fn crash_bridge_after_masq() {
    require_e2e!();
    crash_then_clean("cbmasq", Point::Plugin("bridge-after-masq"));
}

#[test]
fn crash_agent_after_record() {
    require_e2e!();
    crash_then_clean("carec", Point::Agent("agent-after-record"));
}

#[test]
fn crash_agent_after_first_entry() {
    require_e2e!();
    crash_then_clean("caent", Point::Agent("agent-after-first-entry"));
}
