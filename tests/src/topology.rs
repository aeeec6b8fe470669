//! Test topologies: a "node" (a network namespace standing in for the host,
//! plus its private state dir, IPAM dataDir and bpffs pin dir) and pods
//! (namespaces the plugins attach), and the network configs the tests use.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::bpffs::BpfFs;
use crate::netns::NetNs;
use crate::plugin::Impl;
use crate::runtime::Runtime;
use crate::snapshot::NodeSnapshot;
use crate::tempdir::TempDir;

/// Subdirectory of a node's temp dir where its private bpffs is mounted.
pub const BPFFS_SUBDIR: &str = "bpffs";

/// A node: its namespace and private directories, all removed on drop
/// (fields drop in order: namespace, then the bpffs mount, then the dir
/// that holds the mount point).
pub struct Node {
    pub ns: NetNs,
    pub bpffs: BpfFs,
    pub dir: TempDir,
}

impl Node {
    pub fn new(tag: &str) -> Node {
        let ns = NetNs::new(tag);
        let dir = TempDir::new(tag);
        for sub in ["ipam", "state"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("create node dirs");
        }
        let bpffs = BpfFs::mount(&dir.path().join(BPFFS_SUBDIR));
        Node { ns, bpffs, dir }
    }

    /// The IPAM dataDir (host-local keeps `<dataDir>/<network name>/`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("ipam")
    }

    /// The plugins' `stateDir` (attachment records).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The plugins' `agentSocket` (no agent listens unless a test starts one).
    pub fn agent_socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    /// A runtime running `imp`'s plugins inside this node.
    pub fn runtime(&self, imp: Impl) -> Runtime {
        crate::runtime::runtime(&self.ns, imp)
    }

    /// A new pod namespace (the caller owns it; drop deletes it).
    pub fn pod(&self, tag: &str) -> NetNs {
        NetNs::new(tag)
    }

    /// Everything a plugin could change: node and pod namespaces, the
    /// node's dirs (IPAM store, state dir, and the bpffs mounted inside).
    pub fn snapshot(&self, pods: &[&NetNs]) -> NodeSnapshot {
        let mut nss = vec![&self.ns];
        nss.extend_from_slice(pods);
        NodeSnapshot::capture(&nss, &[self.dir.path()])
    }

    /// The IP reservations of a network in the host-local store: IP ->
    /// (container ID, ifname), from the `<ip>` files holding `<id>\r\n<ifname>`.
    pub fn reservations(&self, network: &str) -> BTreeMap<String, (String, String)> {
        reservations_in(&self.data_dir().join(network))
    }

    /// The path keys every plugin of our suite accepts, pointing into this
    /// node, so parallel tests never share state.
    pub fn path_keys(&self) -> Value {
        json!({
            "agentSocket": self.agent_socket(),
            "stateDir": self.state_dir(),
            "bpffsRoot": self.bpffs.path(),
        })
    }
}

/// Reservations of a host-local network dir (see [`Node::reservations`]).
pub fn reservations_in(net_dir: &Path) -> BTreeMap<String, (String, String)> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(net_dir) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.parse::<std::net::IpAddr>().is_err() {
            continue; // lock, last_reserved_ip.N
        }
        let content = std::fs::read_to_string(e.path()).unwrap_or_default();
        let mut parts = content.splitn(2, "\r\n");
        let id = parts.next().unwrap_or("").trim().to_string();
        let ifname = parts.next().unwrap_or("").trim().to_string();
        out.insert(name, (id, ifname));
    }
    out
}

/// Network name used by the default configs.
pub const NET_NAME: &str = "ctnet";
/// Bridge name used by the default configs.
pub const BRIDGE: &str = "cnitest0";
/// Pod subnet of the default configs (private to each node namespace).
pub const SUBNET: &str = "10.22.0.0/24";

/// The bridge config the differential tests use: every option that shapes
/// kernel state (isGateway, isDefaultGateway, mtu, hairpinMode) and a
/// host-local range with routes (one without a gateway, one with).
/// `bridge_type`/`ipam_type` choose the implementation; the suite's path keys
/// are present for both (the reference ignores unknown keys).
pub fn bridge_conf(node: &Node, version: &str, bridge_type: &str, ipam_type: &str) -> Value {
    let mut c = json!({
        "cniVersion": version,
        "name": NET_NAME,
        "type": bridge_type,
        "bridge": BRIDGE,
        "isGateway": true,
        "isDefaultGateway": true,
        "mtu": 1400,
        "hairpinMode": true,
        "ipam": {
            "type": ipam_type,
            "dataDir": node.data_dir(),
            "ranges": [[{"subnet": SUBNET}]],
            "routes": [
                {"dst": "192.168.0.0/16"},
                {"dst": "198.18.0.0/15", "gw": "10.22.0.254"}
            ]
        }
    });
    merge(&mut c, &node.path_keys());
    c
}

/// [`bridge_conf`] for one implementation.
pub fn bridge_conf_for(node: &Node, version: &str, imp: Impl) -> Value {
    bridge_conf(node, version, imp.bridge_type(), imp.ipam_type())
}

/// A network config for calling an IPAM plugin directly: a single range
/// `subnet` in the node's dataDir.
pub fn ipam_conf(node: &Node, version: &str, ipam_type: &str, subnet: &str) -> Value {
    json!({
        "cniVersion": version,
        "name": NET_NAME,
        "type": "bridge",
        "ipam": {
            "type": ipam_type,
            "dataDir": node.data_dir(),
            "ranges": [[{"subnet": subnet}]]
        }
    })
}

/// Shallow-merges the keys of `extra` (an object) into `target`.
pub fn merge(target: &mut Value, extra: &Value) {
    if let (Some(t), Some(e)) = (target.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            t.insert(k.clone(), v.clone());
        }
    }
}
