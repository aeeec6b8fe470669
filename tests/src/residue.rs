//! Everything an attachment could leave behind on a node, as one JSON value
//! to compare before and after: links, addresses and routes of the node and
//! pod namespaces, IP reservations and the files of the IPAM and state
//! dirs, and the agent's view of its maps (masquerade sources, hostPorts,
//! rate limits, firewall attachments, NAT halves, records).
use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::agentctl::admin;
use crate::netns::NetNs;
use crate::snapshot::{kernel_state, Normalize};
use crate::topology::Node;

/// The residue of network `network` on `node` (with `pod`'s namespace).
/// MACs are hidden (a bridge's MAC follows its ports: not residue); the
/// IPAM round-robin position, the `lock` files and empty directories are
/// left out. Needs the node's agent running.
pub fn residue(node: &Node, pod: &NetNs, network: &str) -> Value {
    let norm = Normalize {
        hide_macs: true,
        ..Normalize::default()
    };
    let status = admin(node, "status");
    json!({
        "node": kernel_state(&node.ns, &norm),
        "pod": kernel_state(pod, &norm),
        "reservations": node.reservations(network),
        "ipam_files": files(&node.data_dir()),
        "state_files": files(&node.state_dir()),
        "masqSources": status["masqSources"],
        "hostPorts": status["hostPorts"],
        "rateLimits": status["rateLimits"],
        "firewall": status["firewall"]["attachments"],
        "records": admin(node, "records"),
        "nat": status["nat"],
    })
}

/// Regular files under `root` (relative path -> content), without `lock`
/// and `last_reserved_ip.*`.
pub fn files(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            if name == "lock" || name.starts_with("last_reserved_ip.") {
                continue;
            }
            let rel = p
                .strip_prefix(root)
                .unwrap_or(&p)
                .to_string_lossy()
                .into_owned();
            out.insert(
                rel,
                String::from_utf8_lossy(&std::fs::read(&p).unwrap_or_default()).into_owned(),
            );
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}
