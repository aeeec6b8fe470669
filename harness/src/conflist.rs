//! What a CNI runtime (libcni for containerd or CRI-O) hands each plugin of
//! a conflist: the attachment's CNI_* values, and the plugin's stdin (its
//! config with the list's name and cniVersion, `prevResult`, and the
//! `runtimeConfig` of the capabilities it declares). Written against the
//! spec independently of the product's spec layer, so it can serve as a
//! witness; the plugin process is then run by [`crate::runtime`].
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::netns::NetNs;

/// Where one container is attached, as the runtime knows it.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub container_id: String,
    /// CNI_NETNS.
    pub netns: String,
    pub ifname: String,
    /// CNI_ARGS key/value pairs.
    pub cni_args: Vec<(String, String)>,
    /// Capability arguments (`portMappings`, `bandwidth`, ...) offered to
    /// plugins that declare the capability.
    pub capability_args: Map<String, Value>,
}

impl Attachment {
    pub fn new(container_id: &str, netns: &NetNs, ifname: &str) -> Attachment {
        Attachment {
            container_id: container_id.to_string(),
            netns: netns.path_str().to_string(),
            ifname: ifname.to_string(),
            cni_args: Vec::new(),
            capability_args: Map::new(),
        }
    }

    /// An attachment shaped like a kubelet's pod sandbox: `eth0`, and the
    /// CNI_ARGS a kubelet passes.
    pub fn pod(container_id: &str, netns: &Path, pod_name: &str) -> Attachment {
        Attachment {
            container_id: container_id.to_string(),
            netns: netns.to_string_lossy().into_owned(),
            ifname: "eth0".to_string(),
            cni_args: vec![
                ("IgnoreUnknown".into(), "1".into()),
                ("K8S_POD_NAMESPACE".into(), "default".into()),
                ("K8S_POD_NAME".into(), pod_name.into()),
                ("K8S_POD_INFRA_CONTAINER_ID".into(), container_id.into()),
            ],
            capability_args: Map::new(),
        }
    }

    /// CNI_ARGS (`k=v;k=v`), or `None` when there are none.
    pub fn cni_args_env(&self) -> Option<String> {
        (!self.cni_args.is_empty()).then(|| {
            self.cni_args
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(";")
        })
    }
}

/// Compares dotted versions numerically ("0.10.0" > "0.4.0").
pub fn version_at_least(v: &str, min: &str) -> bool {
    let parse = |s: &str| -> Vec<u32> { s.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    parse(v) >= parse(min)
}

/// Which key a GC invocation uses for the valid attachments (the spec's, or
/// the older draft name the design asks us to accept too).
#[derive(Debug, Clone, Copy)]
pub enum GcKey {
    ValidAttachments,
    Attachments,
}

impl GcKey {
    pub fn key(self) -> &'static str {
        match self {
            GcKey::ValidAttachments => "cni.dev/valid-attachments",
            GcKey::Attachments => "cni.dev/attachments",
        }
    }
}

/// Wraps a single plugin config in a conflist of one.
pub fn conflist_of(conf: &Value) -> Value {
    let mut plugin = conf.clone();
    let obj = plugin.as_object_mut().expect("config is an object");
    let name = obj.remove("name").unwrap_or(Value::Null);
    let version = obj.remove("cniVersion").unwrap_or(Value::Null);
    json!({"cniVersion": version, "name": name, "plugins": [plugin]})
}

/// `conf` with `prevResult` set (or removed).
pub fn with_prev_result(conf: &Value, prev: Option<&Value>) -> Value {
    let mut c = conf.clone();
    let obj = c.as_object_mut().expect("config is an object");
    match prev {
        Some(p) => {
            obj.insert("prevResult".into(), p.clone());
        }
        None => {
            obj.remove("prevResult");
        }
    }
    c
}

/// The plugins of a conflist.
pub fn plugins(list: &Value) -> &[Value] {
    list["plugins"]
        .as_array()
        .unwrap_or_else(|| panic!("conflist without plugins: {list}"))
}

/// Plugin `i` of a conflist with the list's name and cniVersion.
pub fn list_plugin_base(list: &Value, i: usize) -> Value {
    let mut conf = plugins(list)[i].clone();
    let obj = conf.as_object_mut().expect("plugin config is an object");
    obj.insert("name".into(), list["name"].clone());
    obj.insert("cniVersion".into(), list["cniVersion"].clone());
    conf
}

/// The stdin of plugin `i` of a conflist: name, cniVersion, prevResult and
/// the runtimeConfig entries for the capabilities it declares.
pub fn plugin_conf(list: &Value, i: usize, prev: Option<&Value>, att: &Attachment) -> Value {
    let mut conf = list_plugin_base(list, i);
    if let Some(caps) = conf.get("capabilities").and_then(Value::as_object).cloned() {
        let mut rc = Map::new();
        for (cap, on) in caps {
            if on == Value::Bool(true) {
                if let Some(v) = att.capability_args.get(&cap) {
                    rc.insert(cap, v.clone());
                }
            }
        }
        if !rc.is_empty() {
            conf["runtimeConfig"] = Value::Object(rc);
        }
    }
    with_prev_result(&conf, prev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert!(version_at_least("0.10.0", "0.4.0"));
        assert!(version_at_least("1.0.0", "1.0.0"));
        assert!(!version_at_least("0.3.1", "0.4.0"));
    }

    #[test]
    fn a_plugin_gets_the_list_keys_prev_result_and_its_capabilities_only() {
        let list = json!({"cniVersion": "1.0.0", "name": "n", "plugins": [
            {"type": "a"},
            {"type": "b", "capabilities": {"portMappings": true, "bandwidth": false}},
        ]});
        let mut att = Attachment::pod("c1", Path::new("/run/netns/x"), "p");
        att.capability_args
            .insert("portMappings".into(), json!([{"hostPort": 80}]));
        att.capability_args
            .insert("bandwidth".into(), json!({"ingressRate": 1}));
        let prev = json!({"cniVersion": "1.0.0"});
        assert_eq!(
            plugin_conf(&list, 0, None, &att),
            json!({"type": "a", "name": "n", "cniVersion": "1.0.0"})
        );
        assert_eq!(
            plugin_conf(&list, 1, Some(&prev), &att),
            json!({"type": "b", "name": "n", "cniVersion": "1.0.0",
                   "capabilities": {"portMappings": true, "bandwidth": false},
                   "runtimeConfig": {"portMappings": [{"hostPort": 80}]},
                   "prevResult": prev})
        );
        assert_eq!(
            att.cni_args_env().as_deref(),
            Some("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=p;K8S_POD_INFRA_CONTAINER_ID=c1")
        );
    }
}
