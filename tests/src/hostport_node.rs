//! The hostPort tests' topology: a node with an uplink to an "external"
//! namespace, our agent in a chosen hostPort mode (TC or XDP), optionally
//! a cgroup for node-local clients, and pods attached through the harness
//! runtime with the ebpf-bridge (ipMasq) + ebpf-portmap conflist.
use std::net::{Ipv4Addr, SocketAddr};

use serde_json::Value;

use crate::agentctl::{admin, AgentProc};
use crate::hostport::{portmap_conflist, set_tx_checksum, stat, tx_checksum, TestCgroup};
use crate::netns::NetNs;
use crate::plugin::Impl;
use crate::runtime::Attachment;
use crate::topology::Node;
use crate::uplink::{result_ipv4, External, UPLINK_IF};

pub const NET: &str = "pmnet";
pub const BRIDGE_NAME: &str = "cnipm0";
/// What every pod listens on (TCP and UDP).
pub const POD_PORT: u16 = 8080;

/// Where the agent does hostPort DNAT on the uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Tc,
    Xdp,
}

impl Mode {
    pub fn arg(self) -> &'static str {
        match self {
            Mode::Tc => "tc",
            Mode::Xdp => "xdp",
        }
    }
}

/// A node with an uplink, a running agent and (optionally) a cgroup for
/// node-local clients. Fields drop in order: agent, cgroup, external side,
/// node; pods, declared by the tests afterwards, go before all of them.
pub struct Fixture {
    pub agent: AgentProc,
    pub cgroup: Option<TestCgroup>,
    pub wire_checksums: bool,
    pub ext: External,
    pub node: Node,
}

/// How to build a [`Fixture`].
pub struct Setup {
    pub mode: Mode,
    /// Give the agent a cgroup (node-local clients).
    pub cgroup: bool,
    /// Turn off TX checksum offload on the external side's veth (and on
    /// the pods' eth0 that [`Fixture::add_pod`] attaches), so packets
    /// carry full checksums as on a wire, and the receiving stack verifies
    /// them: a translation that breaks a checksum then loses the packet.
    pub wire_checksums: bool,
}

impl Setup {
    /// `mode`, no cgroup, wire checksums.
    pub fn mode(mode: Mode) -> Setup {
        Setup {
            mode,
            cgroup: false,
            wire_checksums: true,
        }
    }
}

/// A node `tag` with an uplink and an agent started for `setup`; checks
/// that an XDP program sits on the uplink exactly in XDP mode.
pub fn fixture(tag: &str, setup: Setup) -> Fixture {
    let node = Node::new(tag);
    let ext = External::direct(&node);
    if setup.wire_checksums {
        set_tx_checksum(&ext.ns, "eth0", false);
    } else {
        assert!(tx_checksum(&ext.ns, "eth0"), "veth default: TX offload on");
    }
    let cgroup = setup
        .cgroup
        .then(|| TestCgroup::new(tag).expect("no cgroup v2 hierarchy mounted on this host"));
    let mut args = vec!["--hostport-mode", setup.mode.arg()];
    let cg_path;
    if let Some(cg) = &cgroup {
        cg_path = cg.path().to_string_lossy().into_owned();
        args.extend(["--cgroup", &cg_path]);
    }
    let agent = AgentProc::start(&node, &args);
    let xdp = uplink_has_xdp(&node);
    assert_eq!(
        xdp,
        setup.mode == Mode::Xdp,
        "XDP program on {UPLINK_IF} in {:?} mode",
        setup.mode
    );
    Fixture {
        agent,
        cgroup,
        wire_checksums: setup.wire_checksums,
        ext,
        node,
    }
}

/// Whether an XDP program is attached to the node's uplink (iproute2 as
/// the witness).
pub fn uplink_has_xdp(node: &Node) -> bool {
    let links = node.ns.ip_json(&["-d", "link", "show", "dev", UPLINK_IF]);
    links[0].get("xdp").is_some()
}

/// One pod attached through the runtime with the portmap conflist.
pub struct Pod {
    pub att: Attachment,
    /// The ADD result (the runtime's cache).
    pub result: Value,
    pub ip: Ipv4Addr,
    pub ns: NetNs,
}

impl Fixture {
    /// The bridge + portmap conflist on this topology's pod subnet.
    pub fn list(&self, snat: Option<bool>) -> Value {
        portmap_conflist(&self.node, NET, BRIDGE_NAME, &self.ext.pod_subnet(), snat)
    }

    /// `cni-agent status --json`.
    pub fn status(&self) -> Value {
        admin(&self.node, "status")
    }

    /// ADDs pod `cid` with `mappings` (the runtime's portMappings).
    #[track_caller]
    pub fn add_pod(&self, list: &Value, cid: &str, mappings: Vec<Value>) -> Pod {
        let ns = self.node.pod(cid);
        let pod = self.add_pod_in(list, cid, mappings, ns);
        if self.wire_checksums {
            // Replies and hairpin packets then carry full checksums too,
            // which the receiving stack verifies.
            set_tx_checksum(&pod.ns, "eth0", false);
        }
        pod
    }

    /// [`add_pod`](Self::add_pod) into an existing namespace, leaving
    /// its checksum offload alone.
    #[track_caller]
    pub fn add_pod_in(&self, list: &Value, cid: &str, mappings: Vec<Value>, ns: NetNs) -> Pod {
        let mut att = Attachment::new(cid, &ns, "eth0");
        att.capability_args
            .insert("portMappings".into(), Value::Array(mappings));
        let result = self
            .node
            .runtime(Impl::Ours)
            .add_list(list, &att)
            .unwrap_or_else(|o| panic!("ADD {cid}: {o}"));
        let ip = result_ipv4(&result);
        Pod {
            att,
            result,
            ip,
            ns,
        }
    }

    #[track_caller]
    /// DEL of the whole list with the cached result.
    pub fn del_pod(&self, list: &Value, pod: &Pod) {
        self.node
            .runtime(Impl::Ours)
            .del_list(list, &pod.att, Some(&pod.result))
            .unwrap_or_else(|o| panic!("DEL {}: {o}", pod.att.container_id));
    }

    /// node uplink address:`port`.
    pub fn node_hostport(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ext.node_addr, port))
    }
}

/// Counter deltas between two `status` outputs.
pub fn delta(before: &Value, after: &Value, name: &str) -> u64 {
    stat(after, name) - stat(before, name)
}
