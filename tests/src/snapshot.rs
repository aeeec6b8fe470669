//! Snapshots of kernel and on-disk state, read with iproute2 (a witness
//! independent of our netlink code), for two kinds of assertion:
//! - differential: the state our plugins build equals the reference's, with
//!   random things (host veth names, MACs) normalised away;
//! - zero change: a failing or no-op call leaves the node exactly as it was
//!   (nothing normalised).
//!
//! Every piece is rendered as sorted JSON objects and canonical one-line
//! strings (routes, addresses) so a mismatch prints as a readable diff.
use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::diff::assert_json_eq;
use crate::netns::NetNs;

/// How to make a namespace snapshot comparable across implementations.
#[derive(Debug, Clone, Default)]
pub struct Normalize {
    /// Rename veth links not listed in `keep_names` to `veth0`, `veth1`, …
    /// (in ifindex order): host-side veth names are random.
    pub rename_veths: bool,
    /// Names that are configuration (bridge, pod ifname) and stay as they are.
    pub keep_names: Vec<String>,
    /// Replace MAC addresses by `<mac>` (random for veths and new bridges).
    pub hide_macs: bool,
}

impl Normalize {
    /// Nothing normalised: for before/after comparisons of the same node.
    pub fn exact() -> Normalize {
        Normalize::default()
    }

    /// For comparing two implementations: random veth names and MACs hidden;
    /// `keep` are the configured names.
    pub fn across(keep: &[&str]) -> Normalize {
        Normalize {
            rename_veths: true,
            keep_names: keep.iter().map(|s| s.to_string()).collect(),
            hide_macs: true,
        }
    }
}

/// Sysctls of a namespace worth comparing (what bridge/isGateway touch).
pub const SYSCTLS: &[&str] = &["net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"];

/// Links (with addresses and bridge details), routes and sysctls of one
/// namespace, as JSON.
pub fn kernel_state(ns: &NetNs, norm: &Normalize) -> Value {
    let links = ns.ip_json(&["-d", "addr", "show"]);
    let links = links.as_array().cloned().unwrap_or_default();

    // Name map: random veth names -> veth<i> by ifindex.
    let mut sorted: Vec<&Value> = links.iter().collect();
    sorted.sort_by_key(|l| l["ifindex"].as_u64().unwrap_or(0));
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    let mut next_veth = 0;
    for l in &sorted {
        let name = l["ifname"].as_str().unwrap_or("?").to_string();
        let kind = l["linkinfo"]["info_kind"].as_str().unwrap_or("");
        let new = if norm.rename_veths && kind == "veth" && !norm.keep_names.contains(&name) {
            next_veth += 1;
            format!("veth{}", next_veth - 1)
        } else {
            name.clone()
        };
        names.insert(name, new);
    }
    let rename = |n: &str| names.get(n).cloned().unwrap_or_else(|| n.to_string());
    let mac = |m: &Value| -> Value {
        if norm.hide_macs && m.is_string() {
            json!("<mac>")
        } else {
            m.clone()
        }
    };

    let mut out_links = Map::new();
    for l in &sorted {
        let name = l["ifname"].as_str().unwrap_or("?");
        let info = &l["linkinfo"];
        let kind = info["info_kind"]
            .as_str()
            .or(l["link_type"].as_str())
            .unwrap_or("?");
        let flags: Vec<&str> = l["flags"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut o = Map::new();
        o.insert("kind".into(), json!(kind));
        o.insert("mtu".into(), l["mtu"].clone());
        o.insert("up".into(), json!(flags.contains(&"UP")));
        o.insert("promisc_flag".into(), json!(flags.contains(&"PROMISC")));
        o.insert("promiscuity".into(), l["promiscuity"].clone());
        o.insert("qdisc".into(), l["qdisc"].clone());
        o.insert("txqlen".into(), l["txqlen"].clone());
        o.insert("mac".into(), mac(&l["address"]));
        if let Some(m) = l["master"].as_str() {
            o.insert("master".into(), json!(rename(m)));
        }
        if info["info_kind"] == "bridge" {
            let d = &info["info_data"];
            let mut b = Map::new();
            for k in [
                "stp_state",
                "vlan_filtering",
                "mcast_snooping",
                "ageing_time",
                "forward_delay",
            ] {
                b.insert(k.into(), d[k].clone());
            }
            o.insert("bridge".into(), Value::Object(b));
        }
        if info["info_slave_kind"] == "bridge" {
            let d = &info["info_slave_data"];
            let mut p = Map::new();
            for k in [
                "hairpin",
                "learning",
                "flood",
                "guard",
                "isolated",
                "proxy_arp",
            ] {
                p.insert(k.into(), d[k].clone());
            }
            o.insert("bridge_port".into(), Value::Object(p));
        }
        let mut addrs: Vec<String> = l["addr_info"]
            .as_array()
            .map(|a| a.iter().filter_map(address_line).collect())
            .unwrap_or_default();
        addrs.sort();
        o.insert("addrs".into(), json!(addrs));
        out_links.insert(rename(name), Value::Object(o));
    }

    let mut routes = Vec::new();
    for fam in ["-4", "-6"] {
        let r = ns.ip_json(&[fam, "route", "show", "table", "all"]);
        for route in r.as_array().cloned().unwrap_or_default() {
            if let Some(line) = route_line(&route, &rename) {
                routes.push(line);
            }
        }
    }
    routes.sort();

    let mut sysctls = Map::new();
    for k in SYSCTLS {
        sysctls.insert(k.to_string(), json!(ns.sysctl(k)));
    }

    json!({"links": out_links, "routes": routes, "sysctl": sysctls})
}

/// One address as `10.0.0.2/24 brd 10.0.0.255 scope global [flags]`;
/// IPv6 link-local addresses are skipped (derived from the random MAC, and
/// a kernel default, not plugin configuration).
fn address_line(a: &Value) -> Option<String> {
    let local = a["local"].as_str()?;
    if a["family"] == "inet6" && a["scope"] == "link" {
        return None;
    }
    let mut s = format!("{local}/{}", a["prefixlen"]);
    if let Some(p) = a["address"].as_str() {
        s += &format!(" peer {p}");
    }
    if let Some(b) = a["broadcast"].as_str() {
        s += &format!(" brd {b}");
    }
    if let Some(sc) = a["scope"].as_str() {
        s += &format!(" scope {sc}");
    }
    for flag in [
        "secondary",
        "noprefixroute",
        "nodad",
        "home",
        "mngtmpaddr",
        "deprecated",
        "dadfailed",
        "optimistic",
    ] {
        if a[flag] == Value::Bool(true) {
            s += &format!(" {flag}");
        }
    }
    Some(s)
}

/// One route as a canonical line; the local table and IPv6 link-local /
/// multicast routes (kernel-made, follow from addresses and links) are skipped.
fn route_line(r: &Value, rename: &dyn Fn(&str) -> String) -> Option<String> {
    let obj = r.as_object()?;
    if r["table"] == "local" {
        return None;
    }
    let dst = r["dst"].as_str().unwrap_or("?");
    if dst.starts_with("fe80:") || dst.starts_with("ff00:") {
        return None;
    }
    let mut s = String::new();
    if let Some(t) = r["type"].as_str() {
        s += t;
        s += " ";
    }
    s += dst;
    if let Some(gw) = r["gateway"].as_str() {
        s += &format!(" via {gw}");
    }
    if let Some(dev) = r["dev"].as_str() {
        s += &format!(" dev {}", rename(dev));
    }
    for (k, v) in obj {
        match k.as_str() {
            "type" | "dst" | "gateway" | "dev" | "expires" | "cache" => {}
            "flags" => {
                // `linkdown` mirrors the device's carrier, which the kernel
                // updates asynchronously (linkwatch) after the last bridge
                // port goes: state, not configuration.
                for f in v.as_array().into_iter().flatten() {
                    let f = f.as_str().unwrap_or("?");
                    if f != "linkdown" {
                        s += &format!(" {f}");
                    }
                }
            }
            "metrics" => {
                for m in v.as_array().into_iter().flatten() {
                    for (mk, mv) in m.as_object().into_iter().flatten() {
                        s += &format!(" {mk} {mv}");
                    }
                }
            }
            _ => {
                let v = v
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string());
                s += &format!(" {k} {v}");
            }
        }
    }
    Some(s)
}

/// Files of a directory tree: relative path -> content (`<dir>` for
/// directories, `<unreadable: ...>` for bpffs pins and the like).
pub fn dir_state(root: &Path) -> Value {
    let mut files = BTreeMap::new();
    if !root.exists() {
        return json!("<absent>");
    }
    walk(root, root, &mut files);
    json!(files)
}

fn walk(root: &Path, dir: &Path, files: &mut BTreeMap<String, String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let rel = p
            .strip_prefix(root)
            .unwrap_or(&p)
            .to_string_lossy()
            .into_owned();
        if p.is_dir() {
            files.insert(rel, "<dir>".into());
            walk(root, &p, files);
        } else {
            let content = match std::fs::read(&p) {
                Ok(b) => String::from_utf8_lossy(&b).into_owned(),
                Err(e) => format!("<unreadable: {e}>"),
            };
            files.insert(rel, content);
        }
    }
}

/// The observable state of a node for "zero change" assertions: the exact
/// kernel state of the given namespaces and the files under the given dirs.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSnapshot(pub Value);

impl NodeSnapshot {
    pub fn capture(namespaces: &[&NetNs], dirs: &[&Path]) -> NodeSnapshot {
        let mut ns_map = Map::new();
        for ns in namespaces {
            ns_map.insert(ns.name().to_string(), kernel_state(ns, &Normalize::exact()));
        }
        let mut dir_map = Map::new();
        for d in dirs {
            dir_map.insert(d.to_string_lossy().into_owned(), dir_state(d));
        }
        NodeSnapshot(json!({"netns": ns_map, "files": dir_map}))
    }

    /// The same snapshot without the files whose name starts with one of
    /// `prefixes` (e.g. `last_reserved_ip.`, which a successful ADD+DEL
    /// legitimately moves on).
    pub fn without_files(mut self, prefixes: &[&str]) -> NodeSnapshot {
        if let Some(dirs) = self.0["files"].as_object_mut() {
            for files in dirs.values_mut() {
                if let Some(files) = files.as_object_mut() {
                    files.retain(|rel, _| {
                        let name = rel.rsplit('/').next().unwrap_or(rel);
                        !prefixes.iter().any(|p| name.starts_with(p))
                    });
                }
            }
        }
        self
    }

    /// Panics with a diff unless `self` (taken after) equals `before`.
    #[track_caller]
    pub fn assert_unchanged_from(&self, before: &NodeSnapshot, context: &str) {
        assert_json_eq("before", &before.0, "after", &self.0, context);
    }

    /// Panics with a diff unless `after` equals `self`.
    #[track_caller]
    pub fn assert_unchanged(&self, after: &NodeSnapshot, context: &str) {
        assert_json_eq("before", &self.0, "after", &after.0, context);
    }
}
