//! The network configuration a plugin reads from stdin.
//!
//! Only the keys the spec defines are interpreted here; everything else stays
//! in [`NetConf::raw`] and is read by the plugin through
//! [`NetConf::plugin_options`], which reports the offending field by its
//! path so an operator can fix the conflist without reading plugin code.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::decode::{self, get};
use super::error::{CniError, ErrorCode};
use super::is_valid_identifier;
use super::result::{CniResult, Dns};
use super::version::{CniVersion, DEFAULT_CONFIG_VERSION};

/// A single plugin's configuration, as received on stdin.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    /// `"0.1.0"` when the document has no `cniVersion` (libcni convention).
    pub cni_version: String,
    pub name: String,
    /// The `type` key: the plugin binary's name.
    pub plugin_type: String,
    pub capabilities: Map<String, Value>,
    /// `None` when absent or `{}` (an L2-only network, as with the
    /// reference bridge).
    pub ipam: Option<IpamSection>,
    pub dns: Option<Dns>,
    pub prev_result: Option<Value>,
    /// Always an object (`{}` if absent).
    pub runtime_config: Value,
    /// Always an object (`{}` if absent).
    pub args: Value,
    /// The whole document.
    pub raw: Value,
}

/// The `ipam` section: the delegated plugin's name plus everything else.
#[derive(Debug, Clone, PartialEq)]
pub struct IpamSection {
    pub ipam_type: String,
    /// The whole `ipam` object (including `type`).
    pub raw: Value,
}

/// One entry of a GC's list of attachments to keep.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The GC key of spec 1.1.0, and the name used by early implementations.
const VALID_ATTACHMENTS_KEYS: [&str; 2] = ["cni.dev/valid-attachments", "cni.dev/attachments"];

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::InvalidNetworkConfig, msg)
}

/// An optional object-valued key: absent/null -> `{}`, non-object -> code 7.
fn object_or_empty(obj: &Map<String, Value>, key: &str) -> Result<Map<String, Value>, CniError> {
    match get(obj, key) {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(m)) => Ok(m.clone()),
        Some(_) => Err(invalid(format!("field `{key}` must be a JSON object"))),
    }
}

/// A required string key: missing/empty -> code 7 naming the field.
fn required_string(obj: &Map<String, Value>, key: &str, what: &str) -> Result<String, CniError> {
    match get(obj, key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        None | Some(Value::Null) | Some(Value::String(_)) => {
            Err(invalid(format!("missing {what} (field `{key}`)")))
        }
        Some(_) => Err(invalid(format!("field `{key}` must be a string"))),
    }
}

/// Checks a network name against the spec's rule.
pub fn validate_network_name(name: &str) -> Result<(), CniError> {
    if name.is_empty() {
        return Err(invalid("missing network name (field `name`)"));
    }
    if !is_valid_identifier(name) {
        return Err(invalid(format!(
            "invalid characters found in network name (field `name`): {name:?} must match ^[a-zA-Z0-9][a-zA-Z0-9_.\\-]*$"
        )));
    }
    Ok(())
}

/// Parses JSON bytes into a [`Value`], mapping syntax errors to code 6 with
/// serde's line/column.
pub(crate) fn decode_document(bytes: &[u8], what: &str) -> Result<Map<String, Value>, CniError> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| CniError::new(ErrorCode::Decode, format!("error parsing {what}: {e}")))?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(CniError::new(
            ErrorCode::Decode,
            format!("error parsing {what}: not a JSON object"),
        )),
    }
}

/// The `cniVersion` of a document: missing/empty -> "0.1.0", non-string -> 7.
pub(crate) fn document_version(obj: &Map<String, Value>) -> Result<String, CniError> {
    match get(obj, "cniVersion") {
        None | Some(Value::Null) => Ok(DEFAULT_CONFIG_VERSION.to_string()),
        Some(Value::String(s)) if s.is_empty() => Ok(DEFAULT_CONFIG_VERSION.to_string()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(invalid("field `cniVersion` must be a string")),
    }
}

/// The `ipam` section: `None` when absent or `{}` (L2 only).
fn ipam_section(obj: &Map<String, Value>) -> Result<Option<IpamSection>, CniError> {
    let ipam_obj = object_or_empty(obj, "ipam")?;
    if ipam_obj.is_empty() {
        return Ok(None);
    }
    match get(&ipam_obj, "type") {
        Some(Value::String(t)) if !t.is_empty() => Ok(Some(IpamSection {
            ipam_type: t.clone(),
            raw: Value::Object(ipam_obj.clone()),
        })),
        // An ipam section with settings but no plugin would be silently
        // ignored by the reference bridge; say so.
        Some(Value::String(_)) | None | Some(Value::Null) => {
            Err(invalid("missing IPAM plugin type (field `ipam.type`)"))
        }
        Some(_) => Err(invalid("field `ipam.type` must be a string")),
    }
}

fn dns_section(obj: &Map<String, Value>) -> Result<Option<Dns>, CniError> {
    match get(obj, "dns") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => decode::from_value(v)
            .map(Some)
            .map_err(|e| invalid(format!("invalid field `dns`: {e}"))),
    }
}

/// How [`NetConf`] treats a spec key of the wrong shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// ADD, CHECK, STATUS: refused with code 7 naming the field.
    Strict,
    /// DEL and GC: the attachment's record, not the request, says what to
    /// remove, so a malformed optional section is logged and left out.
    Teardown,
}

impl Reading {
    /// `section` as read, or `None` (logged) when teardown tolerates it.
    fn tolerate<T>(self, section: Result<T, CniError>) -> Result<Option<T>, CniError> {
        match (section, self) {
            (Ok(v), _) => Ok(Some(v)),
            (Err(e), Reading::Teardown) => {
                log::warn!("ignoring a malformed section for teardown: {}", e.msg);
                Ok(None)
            }
            (Err(e), Reading::Strict) => Err(e),
        }
    }
}

impl NetConf {
    /// Parses and validates the spec-defined keys. Malformed JSON is code 6;
    /// a missing/invalid `name` or `type`, or a spec key of the wrong shape,
    /// is code 7 naming the field. `cniVersion` is not checked here (see
    /// [`NetConf::version`]) so a caller can still report errors in the
    /// config's own version. Keys match as in Go (`RuntimeConfig` is
    /// `runtimeConfig`). `prevResult` is kept as given and only read by
    /// [`NetConf::prev_result`].
    pub fn parse(bytes: &[u8]) -> Result<NetConf, CniError> {
        Self::parse_as(bytes, Reading::Strict)
    }

    /// [`NetConf::parse`] for DEL and GC: only the document itself, `name`
    /// and `type` must be valid; `capabilities`, `runtimeConfig`, `args`,
    /// `ipam` and `dns` of the wrong shape are left out with a warning, so
    /// a teardown is never refused for what the request carries.
    pub fn parse_for_teardown(bytes: &[u8]) -> Result<NetConf, CniError> {
        Self::parse_as(bytes, Reading::Teardown)
    }

    fn parse_as(bytes: &[u8], reading: Reading) -> Result<NetConf, CniError> {
        let obj = decode_document(bytes, "network configuration")?;
        let cni_version = document_version(&obj)?;
        let name = required_string(&obj, "name", "network name")?;
        validate_network_name(&name)?;
        let plugin_type = required_string(&obj, "type", "plugin type")?;

        let object = |key| -> Result<Map<String, Value>, CniError> {
            Ok(reading
                .tolerate(object_or_empty(&obj, key))?
                .unwrap_or_default())
        };
        let capabilities = object("capabilities")?;
        let runtime_config = Value::Object(object("runtimeConfig")?);
        let args = Value::Object(object("args")?);
        let ipam = reading.tolerate(ipam_section(&obj))?.flatten();
        let dns = reading.tolerate(dns_section(&obj))?.flatten();
        let prev_result = get(&obj, "prevResult").filter(|v| !v.is_null()).cloned();

        Ok(NetConf {
            cni_version,
            name,
            plugin_type,
            capabilities,
            ipam,
            dns,
            prev_result,
            runtime_config,
            args,
            raw: Value::Object(obj),
        })
    }

    /// The configuration's version, if supported (code 1 otherwise).
    pub fn version(&self) -> Result<CniVersion, CniError> {
        CniVersion::from_config(&self.cni_version)
    }

    /// Deserializes the whole document into a plugin-specific options struct.
    /// Errors are code 7 and name the offending field by its path
    /// (`ipam.ranges[0][1].subnet`), because serde's own message for a type
    /// mismatch does not say where it happened.
    pub fn plugin_options<T: DeserializeOwned>(&self) -> Result<T, CniError> {
        deserialize_with_path(&self.raw)
    }

    /// The parsed `prevResult`. A result without its own `cniVersion` is
    /// read at the configuration's version, as libcni does.
    pub fn prev_result(&self) -> Result<Option<CniResult>, CniError> {
        match &self.prev_result {
            None => Ok(None),
            Some(v) if !v.is_object() => Err(invalid("field `prevResult` must be a JSON object")),
            Some(v) => CniResult::from_json_with_default(v, Some(&self.cni_version))
                .map(Some)
                .map_err(|e| e.context("invalid field `prevResult`")),
        }
    }

    /// The GC input: attachments the runtime still uses. `None` when the key
    /// is absent *or malformed*: a plugin must then not collect anything,
    /// since deleting on a partial list would destroy live attachments.
    pub fn valid_attachments(&self) -> Option<Vec<Attachment>> {
        match self.try_valid_attachments() {
            Ok(v) => v,
            Err(e) => {
                log::warn!("ignoring GC attachment list: {e}");
                None
            }
        }
    }

    /// Like [`NetConf::valid_attachments`], but reports a malformed list.
    pub fn try_valid_attachments(&self) -> Result<Option<Vec<Attachment>>, CniError> {
        let Some(obj) = self.raw.as_object() else {
            return Ok(None);
        };
        for key in VALID_ATTACHMENTS_KEYS {
            match get(obj, key) {
                None | Some(Value::Null) => continue,
                Some(v) => {
                    return decode::from_value::<Vec<Attachment>>(v)
                        .map(Some)
                        .map_err(|e| invalid(format!("invalid field `{key}`: {e}")));
                }
            }
        }
        Ok(None)
    }

    /// Whether the runtime enabled `capability` for this plugin.
    pub fn has_capability(&self, capability: &str) -> bool {
        self.capabilities.get(capability) == Some(&Value::Bool(true))
    }
}

/// Deserializes `value` into `T`, matching keys as Go does (see
/// [`decode`]); on failure the message names the JSON path of the
/// offending field (code 7).
pub fn deserialize_with_path<T: DeserializeOwned>(value: &Value) -> Result<T, CniError> {
    decode::from_value(value).map_err(|e| invalid(format!("invalid network configuration: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<NetConf, CniError> {
        NetConf::parse(v.to_string().as_bytes())
    }

    #[test]
    fn parses_full_config() {
        let c = parse(json!({
            "cniVersion": "1.0.0",
            "name": "mynet",
            "type": "ebpf-bridge",
            "bridge": "cni0",
            "capabilities": {"portMappings": true, "bandwidth": false},
            "ipam": {"type": "host-local", "subnet": "10.1.0.0/16"},
            "dns": {"nameservers": ["10.1.0.1"], "search": ["svc"]},
            "runtimeConfig": {"portMappings": []},
            "args": {"cni": {"ips": ["10.1.0.9"]}},
            "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.9/16"}]}
        }))
        .unwrap();
        assert_eq!(c.cni_version, "1.0.0");
        assert_eq!(c.version().unwrap(), CniVersion::V1_0_0);
        assert_eq!(c.name, "mynet");
        assert_eq!(c.plugin_type, "ebpf-bridge");
        assert!(c.has_capability("portMappings"));
        assert!(!c.has_capability("bandwidth"));
        let ipam = c.ipam.as_ref().unwrap();
        assert_eq!(ipam.ipam_type, "host-local");
        assert_eq!(ipam.raw["subnet"], "10.1.0.0/16");
        assert_eq!(c.dns.as_ref().unwrap().search, vec!["svc"]);
        assert_eq!(c.runtime_config, json!({"portMappings": []}));
        assert_eq!(c.args["cni"]["ips"][0], "10.1.0.9");
        let prev = c.prev_result().unwrap().unwrap();
        assert_eq!(prev.ips[0].address.to_string(), "10.1.0.9/16");
        assert_eq!(c.raw["bridge"], "cni0");
    }

    #[test]
    fn defaults() {
        let c = parse(json!({"name": "n", "type": "t"})).unwrap();
        assert_eq!(c.cni_version, "0.1.0");
        assert!(c.capabilities.is_empty());
        assert_eq!(c.ipam, None);
        assert_eq!(c.dns, None);
        assert_eq!(c.prev_result, None);
        assert_eq!(c.runtime_config, json!({}));
        assert_eq!(c.args, json!({}));
        assert_eq!(c.prev_result().unwrap(), None);
        // "ipam": {} means no IPAM (L2 only).
        let c = parse(json!({"name": "n", "type": "t", "ipam": {}, "cniVersion": ""})).unwrap();
        assert_eq!(c.ipam, None);
        assert_eq!(c.cni_version, "0.1.0");
    }

    #[test]
    fn decode_errors_are_code_6_with_position() {
        let e = NetConf::parse(b"{\"name\": \"n\",\n \"type\": }").unwrap_err();
        assert_eq!(e.code, 6);
        assert!(e.msg.contains("line 2"), "{}", e.msg);
        assert_eq!(NetConf::parse(b"").unwrap_err().code, 6);
        assert_eq!(NetConf::parse(b"[1,2]").unwrap_err().code, 6);
    }

    #[test]
    fn missing_or_bad_fields_are_code_7() {
        let cases = [
            (json!({"type": "t"}), "`name`"),
            (json!({"name": "", "type": "t"}), "`name`"),
            (json!({"name": 5, "type": "t"}), "`name`"),
            (json!({"name": "n"}), "`type`"),
            (json!({"name": "n", "type": ""}), "`type`"),
            (json!({"name": "bad name", "type": "t"}), "`name`"),
            (json!({"name": "-n", "type": "t"}), "`name`"),
            (
                json!({"name": "n", "type": "t", "cniVersion": 1}),
                "`cniVersion`",
            ),
            (
                json!({"name": "n", "type": "t", "capabilities": []}),
                "`capabilities`",
            ),
            (
                json!({"name": "n", "type": "t", "runtimeConfig": 1}),
                "`runtimeConfig`",
            ),
            (json!({"name": "n", "type": "t", "args": "x"}), "`args`"),
            (
                json!({"name": "n", "type": "t", "ipam": {"subnet": "x"}}),
                "`ipam.type`",
            ),
            (
                json!({"name": "n", "type": "t", "ipam": {"type": 1}}),
                "`ipam.type`",
            ),
            (json!({"name": "n", "type": "t", "ipam": "x"}), "`ipam`"),
            (
                json!({"name": "n", "type": "t", "dns": {"nameservers": "x"}}),
                "`dns`",
            ),
        ];
        for (doc, field) in cases {
            let e = parse(doc.clone()).unwrap_err();
            assert_eq!(e.code, 7, "{doc}");
            assert!(e.msg.contains(field), "{doc}: {}", e.msg);
        }
    }

    #[test]
    fn a_malformed_prev_result_is_refused_when_read() {
        let c = parse(json!({"name": "n", "type": "t", "prevResult": "str"})).unwrap();
        let e = c.prev_result().unwrap_err();
        assert_eq!(e.code, 7);
        assert!(e.msg.contains("`prevResult`"), "{}", e.msg);
    }

    #[test]
    fn teardown_tolerates_malformed_sections() {
        let doc = json!({"name": "n", "type": "t", "capabilities": [], "runtimeConfig": 1,
                         "args": "x", "ipam": {"subnet": "x"}, "dns": {"nameservers": "x"},
                         "prevResult": "str"});
        assert_eq!(parse(doc.clone()).unwrap_err().code, 7);
        let c = NetConf::parse_for_teardown(doc.to_string().as_bytes()).unwrap();
        assert!(c.capabilities.is_empty());
        assert_eq!(c.runtime_config, json!({}));
        assert_eq!(c.ipam, None);
        assert_eq!(c.dns, None);
        // Name and type are the attachment's key and the plugin: still needed.
        let e = NetConf::parse_for_teardown(br#"{"type": "t"}"#).unwrap_err();
        assert_eq!(e.code, 7);
    }

    #[test]
    fn spec_keys_match_as_in_go() {
        let c = parse(json!({"CNIVersion": "1.0.0", "Name": "n", "Type": "t",
                             "RuntimeConfig": {"portMappings": []},
                             "IPAM": {"Type": "host-local"},
                             "PrevResult": {"cniVersion": "1.0.0", "IPs": [{"Address": "10.0.0.2/24"}]}}))
        .unwrap();
        assert_eq!((c.cni_version.as_str(), c.name.as_str()), ("1.0.0", "n"));
        assert_eq!(c.plugin_type, "t");
        assert_eq!(c.runtime_config, json!({"portMappings": []}));
        assert_eq!(c.ipam.unwrap().ipam_type, "host-local");
        let prev = c.prev_result.as_ref().map(|_| ());
        assert!(prev.is_some());
    }

    #[test]
    fn version_is_checked_separately() {
        let c = parse(json!({"cniVersion": "0.9.9", "name": "n", "type": "t"})).unwrap();
        let e = c.version().unwrap_err();
        assert_eq!(e.code, 1);
        assert!(e.msg.contains("cniVersion") && e.msg.contains("0.9.9"));
    }

    #[test]
    fn bad_prev_result() {
        let c = parse(json!({"cniVersion": "1.0.0", "name": "n", "type": "t",
                             "prevResult": {"ips": [{"address": "x"}]}}))
        .unwrap();
        let e = c.prev_result().unwrap_err();
        assert_eq!(e.code, 6);
        assert!(e.msg.contains("prevResult"));
        // Without its own cniVersion it is read at the config's version.
        let c = parse(json!({"cniVersion": "0.2.0", "name": "n", "type": "t",
                             "prevResult": {"ip4": {"ip": "10.0.0.2/8"}}}))
        .unwrap();
        assert_eq!(c.prev_result().unwrap().unwrap().cni_version, "0.2.0");
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Range {
        subnet: String,
        gateway: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Ipam {
        ranges: Vec<Vec<Range>>,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Opts {
        name: String,
        mtu: Option<u32>,
        ipam: Ipam,
    }

    fn opts(doc: Value) -> Result<Opts, CniError> {
        let mut d = json!({"name": "n", "type": "t"});
        for (k, v) in doc.as_object().unwrap() {
            d[k] = v.clone();
        }
        parse(d).unwrap().plugin_options::<Opts>()
    }

    #[test]
    fn plugin_options_name_the_field() {
        let ok = opts(json!({"mtu": 1400, "ipam": {"type": "x", "ranges": [[{"subnet": "a"}]]}}))
            .unwrap();
        assert_eq!(ok.mtu, Some(1400));
        assert_eq!(ok.ipam.ranges[0][0].subnet, "a");

        let e = opts(json!({"mtu": "big", "ipam": {"type": "x", "ranges": []}})).unwrap_err();
        assert_eq!(e.code, 7);
        assert!(e.msg.contains("field `mtu`"), "{}", e.msg);
        assert!(!e.msg.contains(" at line "), "{}", e.msg);

        let e = opts(json!({"ipam": {"type": "x", "ranges": [[{"subnet": "a"}], [{"subnet": "b", "gateway": 7}]]}}))
            .unwrap_err();
        assert!(
            e.msg.contains("field `ipam.ranges[1][0].gateway`"),
            "{}",
            e.msg
        );

        let e = opts(json!({"ipam": {"type": "x", "ranges": [[{"gateway": "g"}]]}})).unwrap_err();
        assert!(e.msg.contains("field `ipam.ranges[0][0]`"), "{}", e.msg);
        assert!(e.msg.contains("missing field `subnet`"), "{}", e.msg);

        let e = opts(json!({"ipam": {"type": "x", "ranges": [[{"subnet": "a", "bogus": 1}]]}}))
            .unwrap_err();
        assert!(e.msg.contains("unknown field `bogus`"), "{}", e.msg);
        assert!(e.msg.contains("ipam.ranges[0][0]"), "{}", e.msg);

        let e = opts(json!({})).unwrap_err();
        assert!(e.msg.contains("missing field `ipam`"), "{}", e.msg);

        let e = opts(json!({"mtu": -1, "ipam": {"type": "x", "ranges": []}})).unwrap_err();
        assert!(e.msg.contains("field `mtu`"), "{}", e.msg);
    }

    #[test]
    fn gc_attachments() {
        let c = parse(json!({"cniVersion": "1.1.0", "name": "n", "type": "t"})).unwrap();
        assert_eq!(c.valid_attachments(), None);
        for key in VALID_ATTACHMENTS_KEYS {
            let c = parse(json!({"cniVersion": "1.1.0", "name": "n", "type": "t",
                key: [{"containerID": "c1", "ifname": "eth0"}, {"containerID": "c2", "ifname": "net1"}]}))
            .unwrap();
            let a = c.valid_attachments().unwrap();
            assert_eq!(a.len(), 2);
            assert_eq!(
                a[1],
                Attachment {
                    container_id: "c2".into(),
                    ifname: "net1".into()
                }
            );
        }
        let c = parse(json!({"cniVersion": "1.1.0", "name": "n", "type": "t",
            "cni.dev/valid-attachments": [{"containerID": "c1"}]}))
        .unwrap();
        assert_eq!(c.valid_attachments(), None);
        assert_eq!(c.try_valid_attachments().unwrap_err().code, 7);
        let c = parse(json!({"cniVersion": "1.1.0", "name": "n", "type": "t",
            "cni.dev/valid-attachments": []}))
        .unwrap();
        assert_eq!(c.valid_attachments(), Some(vec![]));
    }
}
