//! Network configuration lists (`.conflist`) and the per-plugin stdin a
//! runtime builds from them.
//!
//! This is the runtime side of the spec (libcni's `buildOneConfig`): our
//! tests and the demo use it as a mini runtime, so it must inject exactly
//! what libcni injects — `name`, `cniVersion`, `prevResult`, and the
//! `runtimeConfig` keys the plugin declared in `capabilities`.

use std::path::Path;

use serde_json::{Map, Value};

use super::config::{decode_document, document_version, validate_network_name, Attachment};
use super::error::{CniError, ErrorCode};
use super::result::CniResult;
use super::version::CniVersion;

/// A parsed `.conflist`.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConfList {
    /// The version every plugin is run at: the highest supported entry of
    /// `cniVersions` if present (spec 1.1.0), else `cniVersion` (default
    /// "0.1.0").
    pub cni_version: String,
    pub name: String,
    pub disable_check: bool,
    pub disable_gc: bool,
    /// Each plugin's own configuration object, as written.
    pub plugins: Vec<Map<String, Value>>,
    /// The whole document.
    pub raw: Value,
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::InvalidNetworkConfig, msg)
}

/// A boolean that libcni also accepts as the strings "true"/"false".
fn flag(obj: &Map<String, Value>, key: &str) -> Result<bool, CniError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(true),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(false),
        Some(_) => Err(invalid(format!("field `{key}` must be a boolean"))),
    }
}

impl NetConfList {
    /// Parses a conflist: JSON errors are code 6; a missing/invalid name,
    /// an empty `plugins` list or a plugin without `type` is code 7.
    pub fn parse(bytes: &[u8]) -> Result<NetConfList, CniError> {
        let obj = decode_document(bytes, "network configuration list")?;
        let name = match obj.get("name") {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) => String::new(),
            Some(_) => return Err(invalid("field `name` must be a string")),
        };
        validate_network_name(&name)?;

        let cni_version = match obj.get("cniVersions") {
            None | Some(Value::Null) => document_version(&obj)?,
            Some(Value::Array(list)) => {
                let best = list
                    .iter()
                    .filter_map(Value::as_str)
                    .filter_map(|s| s.parse::<CniVersion>().ok())
                    .max();
                match best {
                    Some(v) => v.as_str().to_string(),
                    None => document_version(&obj)?,
                }
            }
            Some(_) => return Err(invalid("field `cniVersions` must be an array")),
        };

        let plugins = match obj.get("plugins") {
            Some(Value::Array(list)) if !list.is_empty() => list,
            Some(Value::Array(_)) | None | Some(Value::Null) => {
                return Err(invalid(format!(
                    "no plugins in list (field `plugins`) of network {name:?}"
                )))
            }
            Some(_) => return Err(invalid("field `plugins` must be an array")),
        };
        let plugins = plugins
            .iter()
            .enumerate()
            .map(|(i, p)| match p {
                Value::Object(m) => match m.get("type") {
                    Some(Value::String(t)) if !t.is_empty() => Ok(m.clone()),
                    _ => Err(invalid(format!(
                        "missing plugin type (field `plugins[{i}].type`)"
                    ))),
                },
                _ => Err(invalid(format!(
                    "field `plugins[{i}]` must be a JSON object"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?;

        Ok(NetConfList {
            cni_version,
            name,
            disable_check: flag(&obj, "disableCheck")?,
            disable_gc: flag(&obj, "disableGC")?,
            plugins,
            raw: Value::Object(obj),
        })
    }

    /// Reads and parses a conflist file (I/O errors are code 5).
    pub fn load(path: &Path) -> Result<NetConfList, CniError> {
        let bytes = std::fs::read(path).map_err(|e| {
            CniError::new(ErrorCode::Io, format!("reading {}: {e}", path.display()))
        })?;
        Self::parse(&bytes).map_err(|e| e.context(path.display()))
    }

    /// The list's version, if supported (code 1 otherwise).
    pub fn version(&self) -> Result<CniVersion, CniError> {
        CniVersion::from_config(&self.cni_version)
    }

    /// The `type` of plugin `index` (the binary to run).
    pub fn plugin_type(&self, index: usize) -> Option<&str> {
        self.plugins
            .get(index)
            .and_then(|p| p.get("type"))
            .and_then(Value::as_str)
    }

    /// The stdin for plugin `index`: its own object plus the list's `name`
    /// and `cniVersion`, `prevResult` (converted to the list's version) if
    /// given, and `runtimeConfig` holding the keys of `runtime_config` that
    /// the plugin enabled in `capabilities` (omitted when none match).
    pub fn plugin_conf(
        &self,
        index: usize,
        prev_result: Option<&CniResult>,
        runtime_config: &Value,
    ) -> Result<Vec<u8>, CniError> {
        let conf = self.plugin_object(index, prev_result, runtime_config)?;
        serde_json::to_vec(&Value::Object(conf))
            .map_err(|e| CniError::internal(format!("encoding plugin configuration: {e}")))
    }

    /// The stdin for plugin `index` on GC: like [`NetConfList::plugin_conf`]
    /// without a previous result, plus `cni.dev/valid-attachments`.
    pub fn gc_conf(
        &self,
        index: usize,
        valid_attachments: &[Attachment],
    ) -> Result<Vec<u8>, CniError> {
        let mut conf = self.plugin_object(index, None, &Value::Null)?;
        let list = serde_json::to_value(valid_attachments)
            .map_err(|e| CniError::internal(format!("encoding attachments: {e}")))?;
        conf.insert("cni.dev/valid-attachments".into(), list);
        serde_json::to_vec(&Value::Object(conf))
            .map_err(|e| CniError::internal(format!("encoding plugin configuration: {e}")))
    }

    fn plugin_object(
        &self,
        index: usize,
        prev_result: Option<&CniResult>,
        runtime_config: &Value,
    ) -> Result<Map<String, Value>, CniError> {
        let mut conf = self.plugins.get(index).cloned().ok_or_else(|| {
            CniError::internal(format!(
                "plugin index {index} out of range: network {:?} has {} plugins",
                self.name,
                self.plugins.len()
            ))
        })?;
        conf.insert("name".into(), Value::String(self.name.clone()));
        conf.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
        if let Some(prev) = prev_result {
            conf.insert("prevResult".into(), prev.to_json(&self.cni_version)?);
        }

        let mut rc = Map::new();
        if let (Some(Value::Object(caps)), Some(rt)) =
            (conf.get("capabilities"), runtime_config.as_object())
        {
            for (cap, enabled) in caps {
                if enabled == &Value::Bool(true) {
                    if let Some(v) = rt.get(cap) {
                        rc.insert(cap.clone(), v.clone());
                    }
                }
            }
        }
        if !rc.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(rc));
        }
        Ok(conf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::config::NetConf;
    use crate::spec::result::IpConfig;
    use serde_json::json;

    fn list() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "podnet",
            "disableCheck": true,
            "plugins": [
                {"type": "ebpf-bridge", "bridge": "cni0",
                 "ipam": {"type": "ebpf-host-local", "subnet": "10.1.0.0/16"}},
                {"type": "portmap", "capabilities": {"portMappings": true, "ips": false}},
                {"type": "bandwidth", "capabilities": {"bandwidth": true},
                 "runtimeConfig": {"stale": 1}}
            ]
        })
    }

    fn parsed() -> NetConfList {
        NetConfList::parse(list().to_string().as_bytes()).unwrap()
    }

    #[test]
    fn parses() {
        let l = parsed();
        assert_eq!(l.cni_version, "1.0.0");
        assert_eq!(l.version().unwrap(), CniVersion::V1_0_0);
        assert_eq!(l.name, "podnet");
        assert!(l.disable_check);
        assert!(!l.disable_gc);
        assert_eq!(l.plugins.len(), 3);
        assert_eq!(l.plugin_type(1), Some("portmap"));
        assert_eq!(l.plugin_type(3), None);
    }

    #[test]
    fn injects_name_version_and_prev_result() {
        let l = parsed();
        let c0: Value =
            serde_json::from_slice(&l.plugin_conf(0, None, &json!({})).unwrap()).unwrap();
        assert_eq!(c0["name"], "podnet");
        assert_eq!(c0["cniVersion"], "1.0.0");
        assert_eq!(c0["bridge"], "cni0");
        assert!(c0.get("prevResult").is_none());
        assert!(c0.get("runtimeConfig").is_none());
        // The result is what the plugin will parse with NetConf.
        let nc = NetConf::parse(&l.plugin_conf(0, None, &json!({})).unwrap()).unwrap();
        assert_eq!(nc.ipam.unwrap().ipam_type, "ebpf-host-local");

        let mut prev = CniResult::new(CniVersion::V1_1_0);
        prev.ips.push(IpConfig {
            address: "10.1.0.5/16".parse().unwrap(),
            gateway: None,
            interface: None,
        });
        let c1: Value =
            serde_json::from_slice(&l.plugin_conf(1, Some(&prev), &json!({})).unwrap()).unwrap();
        // Converted to the list's version.
        assert_eq!(c1["prevResult"]["cniVersion"], "1.0.0");
        assert_eq!(c1["prevResult"]["ips"][0]["address"], "10.1.0.5/16");
        let nc = NetConf::parse(&serde_json::to_vec(&c1).unwrap()).unwrap();
        assert_eq!(nc.prev_result().unwrap().unwrap().ips, prev.ips);
    }

    #[test]
    fn runtime_config_filtered_by_capabilities() {
        let l = parsed();
        let rt = json!({
            "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}],
            "ips": ["10.1.0.9/16"],
            "bandwidth": {"ingressRate": 1000}
        });
        let conf =
            |i| -> Value { serde_json::from_slice(&l.plugin_conf(i, None, &rt).unwrap()).unwrap() };
        assert!(conf(0).get("runtimeConfig").is_none());
        assert_eq!(
            conf(1)["runtimeConfig"],
            json!({"portMappings": rt["portMappings"]})
        );
        // Replaces what the file had, like libcni.
        assert_eq!(
            conf(2)["runtimeConfig"],
            json!({"bandwidth": {"ingressRate": 1000}})
        );
        // Nothing matching: the plugin's own runtimeConfig is left alone.
        let c: Value =
            serde_json::from_slice(&l.plugin_conf(2, None, &json!({"x": 1})).unwrap()).unwrap();
        assert_eq!(c["runtimeConfig"], json!({"stale": 1}));
    }

    #[test]
    fn prev_result_down_conversion_and_errors() {
        let mut doc = list();
        doc["cniVersion"] = json!("0.2.0");
        let l = NetConfList::parse(doc.to_string().as_bytes()).unwrap();
        let mut prev = CniResult::new(CniVersion::V1_0_0);
        prev.ips.push(IpConfig {
            address: "10.1.0.5/16".parse().unwrap(),
            gateway: None,
            interface: Some(0),
        });
        let c: Value =
            serde_json::from_slice(&l.plugin_conf(1, Some(&prev), &json!({})).unwrap()).unwrap();
        assert_eq!(c["prevResult"]["ip4"]["ip"], "10.1.0.5/16");
        assert_eq!(l.plugin_conf(9, None, &json!({})).unwrap_err().code, 999);
        let empty = CniResult::new(CniVersion::V1_0_0);
        assert!(l.plugin_conf(1, Some(&empty), &json!({})).is_err());
    }

    #[test]
    fn gc_conf_lists_attachments() {
        let mut doc = list();
        doc["cniVersion"] = json!("1.1.0");
        let l = NetConfList::parse(doc.to_string().as_bytes()).unwrap();
        let keep = [Attachment {
            container_id: "c1".into(),
            ifname: "eth0".into(),
        }];
        let bytes = l.gc_conf(0, &keep).unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            v["cni.dev/valid-attachments"],
            json!([{"containerID": "c1", "ifname": "eth0"}])
        );
        let nc = NetConf::parse(&bytes).unwrap();
        assert_eq!(nc.valid_attachments().unwrap(), keep.to_vec());
    }

    #[test]
    fn versions_and_flags() {
        let l = NetConfList::parse(br#"{"name":"n","plugins":[{"type":"t"}]}"#).unwrap();
        assert_eq!(l.cni_version, "0.1.0");
        assert!(!l.disable_check);
        let l = NetConfList::parse(
            br#"{"name":"n","cniVersion":"0.4.0","cniVersions":["1.0.0","1.1.0","9.0.0"],
                 "disableCheck":"true","disableGC":true,"plugins":[{"type":"t"}]}"#,
        )
        .unwrap();
        assert_eq!(l.cni_version, "1.1.0");
        assert!(l.disable_check && l.disable_gc);
        let l = NetConfList::parse(
            br#"{"name":"n","cniVersion":"0.4.0","cniVersions":["9.0.0"],"plugins":[{"type":"t"}]}"#,
        )
        .unwrap();
        assert_eq!(l.cni_version, "0.4.0");
        let l =
            NetConfList::parse(br#"{"name":"n","cniVersion":"0.5.0","plugins":[{"type":"t"}]}"#)
                .unwrap();
        assert_eq!(l.version().unwrap_err().code, 1);
    }

    #[test]
    fn errors() {
        let cases: [(&[u8], u32, &str); 10] = [
            (b"{", 6, "line"),
            (br#"{"plugins":[{"type":"t"}]}"#, 7, "name"),
            (
                br#"{"name":"bad name","plugins":[{"type":"t"}]}"#,
                7,
                "name",
            ),
            (br#"{"name":"n"}"#, 7, "plugins"),
            (br#"{"name":"n","plugins":[]}"#, 7, "plugins"),
            (br#"{"name":"n","plugins":{}}"#, 7, "plugins"),
            (br#"{"name":"n","plugins":[{"x":1}]}"#, 7, "plugins[0].type"),
            (
                br#"{"name":"n","plugins":[{"type":"t"},3]}"#,
                7,
                "plugins[1]",
            ),
            (
                br#"{"name":"n","disableCheck":3,"plugins":[{"type":"t"}]}"#,
                7,
                "disableCheck",
            ),
            (
                br#"{"name":"n","cniVersions":"1.0.0","plugins":[{"type":"t"}]}"#,
                7,
                "cniVersions",
            ),
        ];
        for (doc, code, needle) in cases {
            let e = NetConfList::parse(doc).unwrap_err();
            assert_eq!(e.code, code, "{}", String::from_utf8_lossy(doc));
            assert!(
                e.msg.contains(needle),
                "{}: {}",
                String::from_utf8_lossy(doc),
                e.msg
            );
        }
        let e = NetConfList::load(Path::new("/nonexistent/x.conflist")).unwrap_err();
        assert_eq!(e.code, 5);
        assert!(e.msg.contains("/nonexistent/x.conflist"));
    }
}
