//! CNI results: normalising them for differential comparison, and checking
//! a result against what the kernel really holds.
use ipnet::IpNet;
use serde_json::{json, Value};

use crate::netns::NetNs;

/// Interface fields added by spec 1.1.0 (absent from a 1.0.0 result).
pub const IFACE_FIELDS_1_1: &[&str] = &["mtu", "socketPath", "pciID"];
/// Route fields added by spec 1.1.0.
pub const ROUTE_FIELDS_1_1: &[&str] = &["mtu", "advmss", "priority", "table", "scope"];

/// What to hide from a result before comparing two implementations.
#[derive(Debug, Clone)]
pub struct ResultNorm {
    /// The configured bridge name (kept; other host-side names are random).
    pub bridge: String,
    /// Replace `cniVersion` by `<version>` (ours@1.1.0 vs reference@1.0.0).
    pub ignore_version: bool,
    /// Drop the 1.1.0-only fields (same comparison).
    pub drop_1_1_fields: bool,
}

impl ResultNorm {
    pub fn new(bridge: &str) -> ResultNorm {
        ResultNorm {
            bridge: bridge.to_string(),
            ignore_version: false,
            drop_1_1_fields: false,
        }
    }
}

/// MACs -> `<mac>`, sandboxes -> `<sandbox>`, host veth name -> `<host-veth>`.
pub fn normalize_result(result: &Value, norm: &ResultNorm) -> Value {
    let mut r = result.clone();
    if norm.ignore_version && r.get("cniVersion").is_some() {
        r["cniVersion"] = json!("<version>");
    }
    if let Some(ifaces) = r.get_mut("interfaces").and_then(Value::as_array_mut) {
        for i in ifaces {
            let Some(o) = i.as_object_mut() else { continue };
            if o.contains_key("mac") {
                o.insert("mac".into(), json!("<mac>"));
            }
            let in_sandbox = o.get("sandbox").is_some_and(|s| !s.is_null());
            if in_sandbox {
                o.insert("sandbox".into(), json!("<sandbox>"));
            } else if o.get("name").and_then(Value::as_str) != Some(norm.bridge.as_str()) {
                o.insert("name".into(), json!("<host-veth>"));
            }
            if norm.drop_1_1_fields {
                for f in IFACE_FIELDS_1_1 {
                    o.remove(*f);
                }
            }
        }
    }
    if norm.drop_1_1_fields {
        if let Some(routes) = r.get_mut("routes").and_then(Value::as_array_mut) {
            for rt in routes {
                if let Some(o) = rt.as_object_mut() {
                    for f in ROUTE_FIELDS_1_1 {
                        o.remove(*f);
                    }
                }
            }
        }
    }
    r
}

/// The `ips[].address` values of a result (any version).
pub fn result_addresses(result: &Value) -> Vec<IpNet> {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .map(|a| a.parse().unwrap_or_else(|e| panic!("bad address {a}: {e}")))
        .collect()
}

/// Asserts that a (0.3.0+) result describes the kernel truthfully: each
/// interface exists (in the pod netns if it has a sandbox, else in the node
/// netns) with the reported MAC (and MTU if reported), each IP is on its
/// interface, each route is in the pod's routing table.
#[track_caller]
pub fn assert_result_matches_kernel(result: &Value, node: &NetNs, pod: &NetNs) {
    let ifaces = result["interfaces"].as_array().cloned().unwrap_or_default();
    for i in &ifaces {
        let name = i["name"].as_str().expect("interface name");
        let ns = if i["sandbox"].is_string() { pod } else { node };
        let links = ns.ip_json(&["-d", "addr", "show", "dev", name]);
        let link = links.get(0).unwrap_or_else(|| {
            panic!(
                "result interface {name} not found in {}: {result}",
                ns.name()
            )
        });
        if let Some(mac) = i["mac"].as_str() {
            assert_eq!(
                link["address"].as_str().unwrap_or("").to_lowercase(),
                mac.to_lowercase(),
                "MAC of {name} in the result differs from the kernel's"
            );
        }
        if let Some(mtu) = i["mtu"].as_u64() {
            assert_eq!(
                link["mtu"].as_u64(),
                Some(mtu),
                "MTU of {name} in the result"
            );
        }
    }
    for ip in result["ips"].as_array().into_iter().flatten() {
        let addr: IpNet = ip["address"]
            .as_str()
            .expect("address")
            .parse()
            .expect("CIDR");
        let Some(idx) = ip["interface"].as_u64() else {
            continue;
        };
        let iface = &ifaces[idx as usize];
        let name = iface["name"].as_str().expect("name");
        let ns = if iface["sandbox"].is_string() {
            pod
        } else {
            node
        };
        let links = ns.ip_json(&["addr", "show", "dev", name]);
        let found = links[0]["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| {
                a["local"].as_str() == Some(&addr.addr().to_string())
                    && a["prefixlen"].as_u64() == Some(addr.prefix_len() as u64)
            });
        assert!(
            found,
            "address {addr} of the result is not on {name} in {}",
            ns.name()
        );
    }
    for r in result["routes"].as_array().into_iter().flatten() {
        let dst: IpNet = r["dst"].as_str().expect("dst").parse().expect("CIDR");
        let fam = if dst.addr().is_ipv4() { "-4" } else { "-6" };
        let dst_s = dst.trunc().to_string();
        let found = pod.ip_json(&[fam, "route", "show", "table", "all", "to", "exact", &dst_s]);
        let found = found.as_array().cloned().unwrap_or_default();
        assert!(
            !found.is_empty(),
            "route to {dst} of the result is not in the pod's routing tables"
        );
        if let Some(gw) = r["gw"].as_str() {
            assert!(
                found.iter().any(|f| f["gateway"].as_str() == Some(gw)),
                "route to {dst} via {gw} of the result: kernel has {found:?}"
            );
        }
    }
}
