//! The far side of a node's uplink: an "external" network namespace reached
//! through a veth that carries the node's default route, optionally behind a
//! router namespace (for path-MTU tests). The external side has no route to
//! the pod subnet, so a pod's traffic only comes back if the node
//! masquerades it.
//!
//! Addresses come from 198.18.0.0/15 (the benchmarking range), one /24 per
//! topology, and only ever exist inside the namespaces created here. The
//! dual-stack topologies add IPv6 from fd00:198:18:<x>::/64 and
//! fd00:198:19:<x>::/64 (unique local addresses shaped after the same
//! range), again with no route back to the pods.
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

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
    /// The node's uplink IPv6 address (dual-stack topologies only).
    pub node_addr6: Option<Ipv6Addr>,
    /// The external namespace's IPv6 address (dual-stack topologies only).
    pub ext_addr6: Option<Ipv6Addr>,
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
        Self::build_direct(node, false)
    }

    /// [`direct`](Self::direct) plus IPv6: node `uplink0` fd00:198:18:x::1/64
    /// <-> external fd00:198:18:x::2/64, the node's IPv6 default route via
    /// the latter. No route back to the pods' IPv6 subnet either. DAD is
    /// off in the node and external namespaces (every address is usable at
    /// once), and this returns once no address of theirs is tentative.
    pub fn direct_dual(node: &Node) -> External {
        Self::build_direct(node, true)
    }

    fn build_direct(node: &Node, v6: bool) -> External {
        let x = next_index();
        let ns = NetNs::new(&format!("ext{x}"));
        if v6 {
            no_dad(&node.ns);
            no_dad(&ns);
        }
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
        let (mut node_addr6, mut ext_addr6) = (None, None);
        if v6 {
            let (n6, e6) = (v6_addr(0x18, x, 1), v6_addr(0x18, x, 2));
            node.ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{n6}/64"),
                "dev",
                UPLINK_IF,
                "nodad",
            ]);
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{e6}/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            node.ns
                .ip(&["-6", "route", "add", "default", "via", &e6.to_string()]);
            wait_settled(&node.ns);
            wait_settled(&ns);
            (node_addr6, ext_addr6) = (Some(n6), Some(e6));
        }
        External {
            ns,
            router: None,
            node_addr,
            ext_addr,
            index: x,
            node_addr6,
            ext_addr6,
        }
    }

    /// node `uplink0` 198.18.x.1/24 <-> router 198.18.x.2/24 (MTU 1500), router
    /// 198.19.x.1/24 <-> external 198.19.x.2/24 with MTU `far_mtu` on that
    /// link. The router knows only the two /24s: it can answer the node's
    /// uplink address (e.g. with "fragmentation needed"), never a pod.
    pub fn routed(node: &Node, far_mtu: u32) -> External {
        Self::build_routed(node, far_mtu, false)
    }

    /// [`routed`](Self::routed) plus IPv6: node fd00:198:18:x::1/64 <->
    /// router fd00:198:18:x::2/64, router fd00:198:19:x::1/64 <-> external
    /// fd00:198:19:x::2/64 (`far_mtu` on that link: at least 1280, IPv6's
    /// minimum). The router knows only those two /64s, so what it has to
    /// say (Packet Too Big, above all) goes to the node's uplink address.
    pub fn routed_dual(node: &Node, far_mtu: u32) -> External {
        Self::build_routed(node, far_mtu, true)
    }

    fn build_routed(node: &Node, far_mtu: u32, v6: bool) -> External {
        let x = next_index();
        let router = NetNs::new(&format!("rtr{x}"));
        let ns = NetNs::new(&format!("ext{x}"));
        if v6 {
            for n in [&node.ns, &router, &ns] {
                no_dad(n);
            }
        }
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
        let (mut node_addr6, mut ext_addr6) = (None, None);
        if v6 {
            let (n6, near6) = (v6_addr(0x18, x, 1), v6_addr(0x18, x, 2));
            let (far6, e6) = (v6_addr(0x19, x, 1), v6_addr(0x19, x, 2));
            for (n, a, dev) in [
                (&node.ns, n6, UPLINK_IF),
                (&router, near6, "near"),
                (&router, far6, "far"),
                (&ns, e6, "eth0"),
            ] {
                n.ip(&["-6", "addr", "add", &format!("{a}/64"), "dev", dev, "nodad"]);
            }
            let fwd = router.run(
                "sh",
                &["-c", "echo 1 > /proc/sys/net/ipv6/conf/all/forwarding"],
            );
            assert!(
                fwd.status.success(),
                "cannot enable IPv6 forwarding in the router"
            );
            node.ns
                .ip(&["-6", "route", "add", "default", "via", &near6.to_string()]);
            ns.ip(&["-6", "route", "add", "default", "via", &far6.to_string()]);
            for n in [&node.ns, &router, &ns] {
                wait_settled(n);
            }
            (node_addr6, ext_addr6) = (Some(n6), Some(e6));
        }
        External {
            ns,
            router: Some(router),
            node_addr,
            ext_addr,
            index: x,
            node_addr6,
            ext_addr6,
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

    /// An IPv6 pod subnet unique to this topology: fd00:77:x::/64.
    pub fn pod_subnet6(&self) -> String {
        format!("fd00:77:{}::/64", self.index)
    }

    /// The node's uplink IPv6 address (dual-stack topologies).
    pub fn node_v6(&self) -> Ipv6Addr {
        self.node_addr6
            .expect("not a dual-stack topology (use direct_dual/routed_dual)")
    }

    /// The external namespace's IPv6 address (dual-stack topologies).
    pub fn ext_v6(&self) -> Ipv6Addr {
        self.ext_addr6
            .expect("not a dual-stack topology (use direct_dual/routed_dual)")
    }
}

/// fd00:198:<net>:<x>::<host>.
fn v6_addr(net: u16, x: u8, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x198, net, u16::from(x), 0, 0, 0, host)
}

/// Turns IPv6 duplicate address detection off for every interface `ns`
/// gets from now on (a bridge a plugin creates later included): an address
/// is usable as soon as it is added. `all` and `default` both, since the
/// kernel skips DAD only when neither the interface's setting nor `all`
/// asks for it.
pub fn no_dad(ns: &NetNs) {
    let out = ns.run(
        "sh",
        &[
            "-c",
            "echo 0 > /proc/sys/net/ipv6/conf/all/accept_dad && \
             echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad",
        ],
    );
    assert!(
        out.status.success(),
        "cannot turn DAD off in {}: {}",
        ns.name(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until no IPv6 address of `ns` is tentative (DAD still running),
/// e.g. link-local addresses of interfaces that existed before [`no_dad`].
pub fn wait_settled(ns: &NetNs) {
    crate::poll::eventually(
        &format!("IPv6 addresses of {} to leave tentative", ns.name()),
        Duration::from_secs(10),
        || {
            ns.ip(&["-6", "addr", "show", "tentative"])
                .trim()
                .is_empty()
        },
    );
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

/// A dual-stack ebpf-bridge config with `ipMasq` for `node`: host-local
/// ranges `subnet` (IPv4) and `subnet6` (IPv6), the bridge as the gateway
/// of both, and default routes of both families (`0.0.0.0/0`, `::/0`) from
/// IPAM, as a dual-stack cluster's conflist has them. cniVersion 1.0.0, so
/// the reference bridge takes it unchanged (`type` names aside).
pub fn masq_conf_dual(
    node: &Node,
    network: &str,
    bridge: &str,
    subnet: &str,
    subnet6: &str,
) -> Value {
    let mut c = json!({
        "cniVersion": "1.0.0",
        "name": network,
        "type": "ebpf-bridge",
        "bridge": bridge,
        "isGateway": true,
        "ipMasq": true,
        "ipam": {
            "type": "ebpf-host-local",
            "ranges": [[{"subnet": subnet}], [{"subnet": subnet6}]],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
            "dataDir": node.data_dir(),
        }
    });
    merge(&mut c, &node.path_keys());
    c
}

/// The first IPv6 address of an ADD result.
pub fn result_ipv6(result: &Value) -> Ipv6Addr {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|a| a.split('/').next()?.parse::<Ipv6Addr>().ok())
        .next()
        .unwrap_or_else(|| panic!("no IPv6 address in {result}"))
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
