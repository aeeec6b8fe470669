//! The conflist `cni-agent install` writes: the whole suite chained the way
//! a Kubernetes node needs it. The pod CIDRs are checked here, so a bad
//! value is refused before anything is written.
use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{json, Map, Value};

use super::InstallError;
use crate::agent::api::{DEFAULT_BPFFS_ROOT, DEFAULT_SOCKET, DEFAULT_STATE_DIR};
use crate::agent::ops::Paths;

/// The spec version of the conflist: the newest that containerd 1.6's
/// go-cni (Debian bookworm's, and still common on nodes) accepts; newer
/// runtimes read it too.
pub const CNI_VERSION: &str = "1.0.0";

/// What shapes the conflist besides the CIDRs.
#[derive(Clone, Debug)]
pub struct NetworkOptions {
    /// The conflist's `name` (records and IPAM directories are per name).
    pub network: String,
    /// The node's pod bridge.
    pub bridge: String,
    /// MTU of the bridge and veths; `None` lets the bridge plugin choose.
    pub mtu: Option<u32>,
    /// host-local's `dataDir` (IP reservations); `None`: its default,
    /// /var/lib/cni/networks.
    pub ipam_data_dir: Option<std::path::PathBuf>,
    /// The agent's socket and the suite's paths; written into every plugin
    /// only where they differ from the defaults, so a default install reads
    /// like a hand-written conflist.
    pub socket: std::path::PathBuf,
    pub paths: Paths,
}

/// One checked pod CIDR, with where it came from for error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCidr {
    pub net: IpNet,
}

/// Parses and checks one pod CIDR. `source` names where it came from
/// (`--pod-cidr`, `node/<name> spec.podCIDRs`) for the one-line error.
pub fn parse_cidr(source: &str, text: &str) -> Result<PodCidr, InstallError> {
    let bad = |why: String| InstallError::InvalidCidr {
        source_of: source.to_string(),
        value: text.to_string(),
        why,
    };
    let net: IpNet = text
        .trim()
        .parse()
        .map_err(|e: ipnet::AddrParseError| bad(e.to_string()))?;
    if net.trunc() != net {
        return Err(bad(format!(
            "host bits are set (the network is {})",
            net.trunc()
        )));
    }
    // host-local needs the network, the gateway and at least one pod
    // address (and the broadcast address on IPv4) inside the range.
    let max_prefix = match net.addr() {
        IpAddr::V4(_) => 29,
        IpAddr::V6(_) => 125,
    };
    if net.prefix_len() > max_prefix {
        return Err(bad(format!(
            "a /{} leaves no room for pods (at most /{max_prefix})",
            net.prefix_len()
        )));
    }
    Ok(PodCidr { net })
}

/// Checks a node's CIDRs together: at least one, no family twice with
/// overlapping ranges, no duplicates.
pub fn check_set(source: &str, cidrs: &[PodCidr]) -> Result<(), InstallError> {
    if cidrs.is_empty() {
        return Err(InstallError::NoPodCidr {
            hint: format!("{source} gave none"),
        });
    }
    for (i, a) in cidrs.iter().enumerate() {
        for b in &cidrs[i + 1..] {
            if a.net.contains(&b.net) || b.net.contains(&a.net) {
                return Err(InstallError::InvalidCidr {
                    source_of: source.to_string(),
                    value: b.net.to_string(),
                    why: format!("overlaps {}", a.net),
                });
            }
        }
    }
    Ok(())
}

/// Sets the suite's path keys on a plugin config where they are not the
/// defaults.
fn path_keys(plugin: &mut Map<String, Value>, opts: &NetworkOptions) {
    let keys = [
        ("agentSocket", &opts.socket, DEFAULT_SOCKET),
        ("stateDir", &opts.paths.state_dir, DEFAULT_STATE_DIR),
        ("bpffsRoot", &opts.paths.bpffs_root, DEFAULT_BPFFS_ROOT),
    ];
    for (key, value, default) in keys {
        if value.as_path() != std::path::Path::new(default) {
            plugin.insert(key.into(), json!(value));
        }
    }
}

/// The conflist: ebpf-bridge (gateway, masquerade) with ebpf-host-local
/// (one range set per address family, a default route per family), then
/// ebpf-portmap (hostPorts), ebpf-firewall, ebpf-bandwidth (pod bandwidth
/// annotations). Rendered with a fixed key order and a trailing newline,
/// so the bytes are the same for the same input (re-install is a no-op).
pub fn render(cidrs: &[PodCidr], opts: &NetworkOptions) -> Vec<u8> {
    let mut ranges: Vec<Value> = Vec::new();
    let mut routes: Vec<Value> = Vec::new();
    for (v6, default) in [(false, "0.0.0.0/0"), (true, "::/0")] {
        let family: Vec<Value> = cidrs
            .iter()
            .filter(|c| c.net.addr().is_ipv6() == v6)
            .map(|c| json!({ "subnet": c.net.to_string() }))
            .collect();
        if !family.is_empty() {
            ranges.push(Value::Array(family));
            routes.push(json!({ "dst": default }));
        }
    }
    let mut bridge = Map::new();
    bridge.insert("type".into(), json!("ebpf-bridge"));
    bridge.insert("bridge".into(), json!(opts.bridge));
    bridge.insert("isGateway".into(), json!(true));
    bridge.insert("ipMasq".into(), json!(true));
    if let Some(mtu) = opts.mtu {
        bridge.insert("mtu".into(), json!(mtu));
    }
    path_keys(&mut bridge, opts);
    let mut ipam = json!({
        "type": "ebpf-host-local",
        "ranges": ranges,
        "routes": routes,
    });
    if let Some(dir) = &opts.ipam_data_dir {
        ipam["dataDir"] = json!(dir);
    }
    bridge.insert("ipam".into(), ipam);
    let chained = |ty: &str, caps: Option<Value>, extra: &[(&str, Value)]| {
        let mut p = Map::new();
        p.insert("type".into(), json!(ty));
        if let Some(c) = caps {
            p.insert("capabilities".into(), c);
        }
        for (k, v) in extra {
            p.insert((*k).into(), v.clone());
        }
        path_keys(&mut p, opts);
        Value::Object(p)
    };
    let list = json!({
        "cniVersion": CNI_VERSION,
        "name": opts.network,
        "plugins": [
            Value::Object(bridge),
            chained("ebpf-portmap", Some(json!({"portMappings": true})), &[("snat", json!(true))]),
            chained("ebpf-firewall", None, &[]),
            chained("ebpf-bandwidth", Some(json!({"bandwidth": true})), &[]),
        ],
    });
    // The same input renders the same bytes (serde_json's map is sorted,
    // or in insertion order with `preserve_order`: fixed either way).
    let mut out = serde_json::to_vec_pretty(&list).unwrap_or_default();
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> NetworkOptions {
        NetworkOptions {
            network: "cni-ebpf".into(),
            bridge: "cni-ebpf0".into(),
            mtu: None,
            ipam_data_dir: None,
            socket: DEFAULT_SOCKET.into(),
            paths: Paths {
                state_dir: DEFAULT_STATE_DIR.into(),
                bpffs_root: DEFAULT_BPFFS_ROOT.into(),
            },
        }
    }

    #[test]
    fn dual_stack_gets_a_range_set_and_a_default_route_per_family() {
        let cidrs = [
            parse_cidr("--pod-cidr", "10.244.1.0/24").expect("v4"),
            parse_cidr("--pod-cidr", "fd00:10:244:1::/64").expect("v6"),
        ];
        let list: Value = serde_json::from_slice(&render(&cidrs, &opts())).expect("json");
        let ipam = &list["plugins"][0]["ipam"];
        assert_eq!(
            ipam["ranges"],
            json!([[{"subnet": "10.244.1.0/24"}], [{"subnet": "fd00:10:244:1::/64"}]])
        );
        assert_eq!(
            ipam["routes"],
            json!([{"dst": "0.0.0.0/0"}, {"dst": "::/0"}])
        );
        assert_eq!(list["plugins"][0]["ipMasq"], true);
        assert_eq!(list["plugins"][0]["isGateway"], true);
        assert_eq!(
            list["plugins"][1]["capabilities"],
            json!({"portMappings": true})
        );
        assert_eq!(list["plugins"][2]["type"], "ebpf-firewall");
        assert_eq!(
            list["plugins"][3]["capabilities"],
            json!({"bandwidth": true})
        );
        // Default paths are left out.
        assert!(list["plugins"][0].get("stateDir").is_none());
    }

    #[test]
    fn non_default_paths_go_into_every_plugin() {
        let mut o = opts();
        o.paths.state_dir = "/tmp/state".into();
        let cidrs = [parse_cidr("--pod-cidr", "10.0.0.0/16").expect("v4")];
        let list: Value = serde_json::from_slice(&render(&cidrs, &o)).expect("json");
        for p in list["plugins"].as_array().expect("plugins") {
            assert_eq!(p["stateDir"], "/tmp/state");
            assert!(p.get("agentSocket").is_none());
        }
        assert_eq!(
            list["plugins"][0]["ipam"]["routes"],
            json!([{"dst": "0.0.0.0/0"}])
        );
    }

    #[test]
    fn bad_cidrs_are_named() {
        for (text, why) in [
            ("10.0.0.0/33", "invalid"),
            ("10.0.0.1/24", "host bits"),
            ("10.0.0.0/30", "no room"),
            ("banana", "invalid"),
        ] {
            let e = parse_cidr("--pod-cidr", text).expect_err(text).to_string();
            assert!(e.contains(text) && e.contains("--pod-cidr"), "{e}");
            assert!(e.to_lowercase().contains(why), "{text}: {e}");
        }
        let a = parse_cidr("x", "10.0.0.0/16").expect("a");
        let b = parse_cidr("x", "10.0.1.0/24").expect("b");
        assert!(check_set("x", &[a, b]).is_err());
        assert!(check_set("x", &[]).is_err());
    }
}
