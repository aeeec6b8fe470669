//! Reading JSON objects the way the runtimes' Go code writes them.
//!
//! Every runtime that calls a CNI plugin (containerd and CRI-O through
//! go-cni/libcni, podman, kubelet's dockershim before them) builds the
//! plugin's stdin from Go structs, and the reference plugins read it back
//! with Go's `encoding/json`, which matches object keys to struct fields
//! *case-insensitively* (an exact match first, then any key that folds to
//! the field's name). So `{"HostPort": 8080}` is a valid port mapping —
//! containerd sends exactly that — and a drop-in suite must read it too.
//!
//! Two tools, for the two ways this crate reads configuration:
//! - [`get`] for code that walks a `serde_json::Map` by hand;
//! - [`from_value`] for serde-derived structs: a deserializer over a
//!   [`Value`] that renames each key to the field serde asks for when they
//!   are equal ignoring case, and reports the path of the offending field
//!   (`runtimeConfig.portMappings[0].hostPort`) when a value is refused.
//!
//! Values are never folded: `"protocol": "TCP"` is the plugin's business.
use std::fmt;

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, SeqAccess,
    Visitor,
};
use serde_json::{Map, Value};

/// Whether two keys are equal the way Go's `encoding/json` compares a key
/// with a field name (Unicode simple case folding; `K` folds with the
/// Kelvin sign `K`, as in Go).
pub fn keys_match(a: &str, b: &str) -> bool {
    a == b
        || a.chars()
            .flat_map(char::to_lowercase)
            .eq(b.chars().flat_map(char::to_lowercase))
}

/// The key of `obj` that Go would bind to the field `field`: the exact key
/// if present, else the first key equal to it ignoring case.
pub fn find_key<'a>(obj: &'a Map<String, Value>, field: &str) -> Option<&'a str> {
    if let Some((k, _)) = obj.get_key_value(field) {
        return Some(k.as_str());
    }
    obj.keys()
        .find(|k| keys_match(k, field))
        .map(String::as_str)
}

/// `obj[field]`, with the key matched as Go matches it (see [`find_key`]).
pub fn get<'a>(obj: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    find_key(obj, field).and_then(|k| obj.get(k))
}

/// A refused value and where it is, as a path from the document's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// Segments from the root: `ipam`, `ranges`, `[0]`, ...
    path: Vec<String>,
    msg: String,
}

impl DecodeError {
    /// `a.b[0].c`; empty for the document itself.
    pub fn path(&self) -> String {
        let mut out = String::new();
        for seg in &self.path {
            if !seg.starts_with('[') && !out.is_empty() {
                out.push('.');
            }
            out.push_str(seg);
        }
        out
    }

    /// serde's description of what was wrong.
    pub fn message(&self) -> &str {
        &self.msg
    }

    fn within(mut self, seg: String) -> Self {
        self.path.insert(0, seg);
        self
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.path() {
            p if p.is_empty() => f.write_str(&self.msg),
            p => write!(f, "field `{p}`: {}", self.msg),
        }
    }
}

impl std::error::Error for DecodeError {}

impl de::Error for DecodeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DecodeError {
            path: Vec::new(),
            msg: msg.to_string(),
        }
    }
}

fn from_json_error(e: serde_json::Error) -> DecodeError {
    de::Error::custom(e)
}

/// Deserializes `value` into `T`, matching keys to `T`'s fields (and those
/// of every struct inside it) as Go does.
pub fn from_value<T: DeserializeOwned>(value: &Value) -> Result<T, DecodeError> {
    T::deserialize(Folding(value))
}

/// A [`Value`] read with Go's key matching.
#[derive(Clone, Copy)]
struct Folding<'a>(&'a Value);

impl<'de> Deserializer<'de> for Folding<'de> {
    type Error = DecodeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self.0 {
            Value::Array(items) => visitor.visit_seq(Seq {
                items: items.iter(),
                index: 0,
            }),
            Value::Object(obj) => visitor.visit_map(Fields::new(obj, &[])),
            // Scalars carry no keys: serde_json's own reading is Go's.
            scalar => scalar.deserialize_any(visitor).map_err(from_json_error),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        match self.0 {
            Value::Object(obj) => visitor.visit_map(Fields::new(obj, fields)),
            other => other
                .deserialize_struct(name, fields, visitor)
                .map_err(from_json_error),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DecodeError> {
        // Variant names are values, not keys: matched exactly.
        self.0
            .deserialize_enum(name, variants, visitor)
            .map_err(from_json_error)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map identifier
    }
}

impl<'de> IntoDeserializer<'de, DecodeError> for Folding<'de> {
    type Deserializer = Self;
    fn into_deserializer(self) -> Self {
        self
    }
}

struct Seq<'a> {
    items: std::slice::Iter<'a, Value>,
    index: usize,
}

impl<'de> SeqAccess<'de> for Seq<'de> {
    type Error = DecodeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DecodeError> {
        let Some(item) = self.items.next() else {
            return Ok(None);
        };
        let at = self.index;
        self.index += 1;
        seed.deserialize(Folding(item))
            .map(Some)
            .map_err(|e| e.within(format!("[{at}]")))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

/// An object's entries with each key renamed to the struct field it binds
/// to. Where several keys bind to one field, Go keeps one value: here the
/// exact key's, else the first one's; the others are left out rather than
/// reported as duplicates.
struct Fields<'a> {
    entries: std::vec::IntoIter<(&'a str, &'a str, &'a Value)>,
    /// The document's key of the entry being read, for error paths.
    current: &'a str,
    value: Option<&'a Value>,
}

impl<'a> Fields<'a> {
    fn new(obj: &'a Map<String, Value>, fields: &'static [&'static str]) -> Self {
        let mut taken: Vec<&'static str> = Vec::new();
        let mut entries = Vec::with_capacity(obj.len());
        for (key, value) in obj {
            let field = match fields.iter().find(|f| **f == key.as_str()) {
                Some(f) => Some(*f),
                None => match fields.iter().find(|f| keys_match(f, key)) {
                    // The exact key, or an earlier folded one, binds it.
                    Some(f) if obj.contains_key(*f) || taken.contains(f) => continue,
                    other => other.copied(),
                },
            };
            match field {
                Some(f) => {
                    taken.push(f);
                    entries.push((f, key.as_str(), value));
                }
                None => entries.push((key.as_str(), key.as_str(), value)),
            }
        }
        Fields {
            entries: entries.into_iter(),
            current: "",
            value: None,
        }
    }
}

impl<'de> MapAccess<'de> for Fields<'de> {
    type Error = DecodeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DecodeError> {
        let Some((field, key, value)) = self.entries.next() else {
            return Ok(None);
        };
        self.current = key;
        self.value = Some(value);
        let name: de::value::StrDeserializer<'_, DecodeError> = field.into_deserializer();
        seed.deserialize(name).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, DecodeError> {
        let value = self
            .value
            .take()
            .ok_or_else(|| <DecodeError as de::Error>::custom("value requested before key"))?;
        seed.deserialize(Folding(value))
            .map_err(|e| e.within(self.current.to_string()))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "camelCase")]
    struct Mapping {
        host_port: Option<i64>,
        container_port: Option<i64>,
        #[serde(default)]
        protocol: Option<String>,
        #[serde(default, rename = "hostIP")]
        host_ip: Option<String>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "camelCase")]
    struct Runtime {
        #[serde(default)]
        port_mappings: Vec<Mapping>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "camelCase")]
    struct Conf {
        runtime_config: Option<Runtime>,
        mtu: Option<u32>,
    }

    #[test]
    fn keys_match_as_go_folds_them() {
        assert!(keys_match("hostPort", "HostPort"));
        assert!(keys_match("hostPort", "hostport"));
        assert!(keys_match("hostPort", "HOSTPORT"));
        assert!(keys_match("hostIP", "HostIP"));
        // U+212A KELVIN SIGN folds to k, as in Go.
        assert!(keys_match("kind", "\u{212A}ind"));
        assert!(!keys_match("hostPort", "host_port"));
        assert!(!keys_match("hostPort", "hostPorts"));
    }

    #[test]
    fn go_cased_payloads_read_like_camel_case() {
        // What go-cni (containerd 1.6/1.7) writes for a pod's hostPort.
        let go: Conf = from_value(&json!({"runtimeConfig": {"portMappings": [
            {"HostPort": 18090, "ContainerPort": 8080, "Protocol": "tcp", "HostIP": ""}]}}))
        .unwrap();
        let camel: Conf = from_value(&json!({"runtimeConfig": {"portMappings": [
            {"hostPort": 18090, "containerPort": 8080, "protocol": "tcp", "hostIP": ""}]}}))
        .unwrap();
        assert_eq!(go, camel);
        let lower: Conf = from_value(&json!({"RUNTIMECONFIG": {"PORTMAPPINGS": [
            {"hostport": 18090, "containerport": 8080, "protocol": "tcp", "hostip": ""}]}}))
        .unwrap();
        assert_eq!(lower, camel);
        assert_eq!(
            camel.runtime_config.unwrap().port_mappings[0].host_port,
            Some(18090)
        );
    }

    #[test]
    fn an_exact_key_wins_over_a_folded_one() {
        let c: Conf = from_value(&json!({"MTU": 1, "mtu": 2})).unwrap();
        assert_eq!(c.mtu, Some(2));
        let c: Conf = from_value(&json!({"Mtu": 1, "MTU": 1})).unwrap();
        assert_eq!(c.mtu, Some(1));
    }

    #[test]
    fn errors_name_the_path_as_the_document_spells_it() {
        let e = from_value::<Conf>(&json!({"runtimeConfig": {"portMappings": [
            {"hostPort": 1}, {"HostPort": "x"}]}}))
        .unwrap_err();
        assert_eq!(e.path(), "runtimeConfig.portMappings[1].HostPort");
        assert!(e.message().contains("invalid type"), "{e}");
        let e = from_value::<Conf>(&json!({"mtu": -1})).unwrap_err();
        assert_eq!(e.to_string().split(':').next(), Some("field `mtu`"));
    }

    #[test]
    fn get_prefers_the_exact_key() {
        let obj = json!({"Default": "deny", "rules": []});
        let obj = obj.as_object().unwrap();
        assert_eq!(get(obj, "default"), Some(&json!("deny")));
        assert_eq!(get(obj, "Rules"), Some(&json!([])));
        assert_eq!(get(obj, "action"), None);
        let obj = json!({"CIDR": "a", "cidr": "b"});
        assert_eq!(get(obj.as_object().unwrap(), "cidr"), Some(&json!("b")));
    }
}
