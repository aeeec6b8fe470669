//! The far side of a node's uplink: an "external" network namespace reached
//! through a veth that carries the node's default route, optionally behind a
//! router namespace (for path-MTU tests). The external side has no route to
//! the pod subnet, so a pod's traffic only comes back if the node
//! masquerades it.
//!
//! Addresses come from 198.18.0.0/15 (the benchmarking range), one /24 per
//! topology, and only ever exist inside the namespaces created here.
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::{json, Value};

use crate::netns::NetNs;
use crate::topology::{merge, Node};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Name of the node's uplink veth.
pub const UPLINK_IF: &str = "uplink0";

/// A node's uplink and the namespaces behind it; deleted on drop (which also
/// removes the node's end of the veth).
pub struct External {
    /// Where the test's servers run.
    pub ns: NetNs,
    /// Between the node and `ns`, if built with [`External::routed`].
    pub router: Option<NetNs>,
    /// The node's uplink address: what masqueraded traffic comes from.
    pub node_addr: Ipv4Addr,
    /// The external namespace's address: what pods talk to.
    pub ext_addr: Ipv4Addr,
    /// A small per-topology number, also usable to pick a unique pod subnet.
    pub index: u8,
}

fn next_index() -> u8 {
    // 1..=250; tests only need uniqueness within a process run, and every
    // namespace is private anyway.
    (COUNTER.fetch_add(1, Ordering::SeqCst) % 250 + 1) as u8
}

impl External {
    /// node `uplink0` 198.18.x.1/24 <-> external `eth0` 198.18.x.2/24, the
    /// node's default route via 198.18.x.2. No route back to pods.
    pub fn direct(node: &Node) -> External {
        let x = next_index();
        let ns = NetNs::new(&format!("ext{x}"));
        let node_addr = Ipv4Addr::new(198, 18, x, 1);
        let ext_addr = Ipv4Addr::new(198, 18, x, 2);
        veth(&node.ns, UPLINK_IF, &ns, "eth0");
        node.ns
            .ip(&["addr", "add", &format!("{node_addr}/24"), "dev", UPLINK_IF]);
        ns.ip(&["addr", "add", &format!("{ext_addr}/24"), "dev", "eth0"]);
        for (n, dev) in [(&node.ns, UPLINK_IF), (&ns, "eth0"), (&ns, "lo")] {
            n.ip(&["link", "set", dev, "up"]);
        }
        node.ns
            .ip(&["route", "add", "default", "via", &ext_addr.to_string()]);
        External {
            ns,
            router: None,
            node_addr,
            ext_addr,
            index: x,
        }
    }

    /// node `uplink0` 198.18.x.1/24 <-> router 198.18.x.2/24 (MTU 1500), router
    /// 198.19.x.1/24 <-> external 198.19.x.2/24 with MTU `far_mtu` on that
    /// link. The router knows only the two /24s: it can answer the node's
    /// uplink address (e.g. with "fragmentation needed"), never a pod.
    pub fn routed(node: &Node, far_mtu: u32) -> External {
        let x = next_index();
        let router = NetNs::new(&format!("rtr{x}"));
        let ns = NetNs::new(&format!("ext{x}"));
        let node_addr = Ipv4Addr::new(198, 18, x, 1);
        let router_near = Ipv4Addr::new(198, 18, x, 2);
        let router_far = Ipv4Addr::new(198, 19, x, 1);
        let ext_addr = Ipv4Addr::new(198, 19, x, 2);
        veth(&node.ns, UPLINK_IF, &router, "near");
        veth(&router, "far", &ns, "eth0");
        let mtu = far_mtu.to_string();
        router.ip(&["link", "set", "far", "mtu", &mtu]);
        ns.ip(&["link", "set", "eth0", "mtu", &mtu]);
        node.ns
            .ip(&["addr", "add", &format!("{node_addr}/24"), "dev", UPLINK_IF]);
        router.ip(&["addr", "add", &format!("{router_near}/24"), "dev", "near"]);
        router.ip(&["addr", "add", &format!("{router_far}/24"), "dev", "far"]);
        ns.ip(&["addr", "add", &format!("{ext_addr}/24"), "dev", "eth0"]);
        for (n, dev) in [
            (&node.ns, UPLINK_IF),
            (&router, "near"),
            (&router, "far"),
            (&router, "lo"),
            (&ns, "eth0"),
            (&ns, "lo"),
        ] {
            n.ip(&["link", "set", dev, "up"]);
        }
        let fwd = router.run("sh", &["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]);
        assert!(
            fwd.status.success(),
            "cannot enable forwarding in the router"
        );
        node.ns
            .ip(&["route", "add", "default", "via", &router_near.to_string()]);
        ns.ip(&["route", "add", "default", "via", &router_far.to_string()]);
        External {
            ns,
            router: Some(router),
            node_addr,
            ext_addr,
            index: x,
        }
    }

    /// A pod subnet unique to this topology: 10.77.x.0/24.
    pub fn pod_subnet(&self) -> String {
        format!("10.77.{}.0/24", self.index)
    }

    /// The gateway (bridge) address of [`pod_subnet`](Self::pod_subnet).
    pub fn pod_gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.index, 1)
    }
}

/// A veth pair `a_name` in `a` <-> `b_name` in `b`.
fn veth(a: &NetNs, a_name: &str, b: &NetNs, b_name: &str) {
    a.ip(&[
        "link",
        "add",
        a_name,
        "type",
        "veth",
        "peer",
        "name",
        b_name,
        "netns",
        b.name(),
    ]);
}

/// A single-plugin ebpf-bridge config with `ipMasq` (and a gateway, default
/// route and host-local range `subnet`) for `node`, with the suite's path
/// keys: what a conflist of one carries.
pub fn masq_conf(node: &Node, network: &str, bridge: &str, subnet: &str) -> Value {
    let mut c = json!({
        "cniVersion": "1.1.0",
        "name": network,
        "type": "ebpf-bridge",
        "bridge": bridge,
        "isGateway": true,
        "isDefaultGateway": true,
        "ipMasq": true,
        "ipam": {
            "type": "ebpf-host-local",
            "ranges": [[{"subnet": subnet}]],
            "dataDir": node.data_dir(),
        }
    });
    merge(&mut c, &node.path_keys());
    c
}

/// The first IPv4 address of an ADD result.
pub fn result_ipv4(result: &Value) -> Ipv4Addr {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|a| a.split('/').next()?.parse::<Ipv4Addr>().ok())
        .next()
        .unwrap_or_else(|| panic!("no IPv4 address in {result}"))
}
