//! CNI error codes and the error object a plugin prints on stdout.
//!
//! Every module keeps its own `thiserror` enum and converts it into a
//! [`CniError`] exactly once (`impl From<ModError> for CniError`), so the code
//! chosen for a failure is decided in one place per module.

use serde_json::{json, Value};

/// The well-known error codes of the CNI specification (SPEC.md, "Error").
///
/// Codes 1-99 are reserved by the spec; 999 is the catch-all "internal" code
/// that libcni-based plugins use for errors that carry no specific code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ErrorCode {
    /// The configuration's `cniVersion` is not supported (or a verb is not
    /// allowed at that version).
    IncompatibleVersion = 1,
    /// A field of the configuration is not supported; the field is named in
    /// the message.
    UnsupportedField = 2,
    /// The container does not exist or is unknown to the plugin.
    UnknownContainer = 3,
    /// A required `CNI_*` variable is missing or invalid.
    InvalidEnvironment = 4,
    /// I/O failure, e.g. reading stdin or the on-disk store.
    Io = 5,
    /// Malformed JSON.
    Decode = 6,
    /// The network configuration is invalid.
    InvalidNetworkConfig = 7,
    /// `CNI_NETNS` is invalid (e.g. it is the plugin's own namespace).
    InvalidNetNs = 8,
    /// A transient failure: the runtime should retry later.
    TryAgainLater = 11,
    /// STATUS: the plugin cannot serve ADDs right now.
    PluginNotAvailable = 50,
    /// STATUS: the plugin works but connectivity is limited.
    LimitedConnectivity = 51,
    /// Anything else.
    Internal = 999,
}

impl ErrorCode {
    /// The numeric code as it appears in the error JSON.
    pub fn as_u32(self) -> u32 {
        self as u32
    }
}

impl From<ErrorCode> for u32 {
    fn from(code: ErrorCode) -> u32 {
        code.as_u32()
    }
}

/// The error object of the CNI spec: `{"cniVersion", "code", "msg", "details"}`.
///
/// `code` is a plain `u32` (not [`ErrorCode`]) because errors relayed from a
/// delegated plugin may carry plugin-specific codes (>= 100) that must be
/// propagated unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.display())]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    /// An error with a well-known code and no details.
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        Self {
            code: code.as_u32(),
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// An error with an arbitrary numeric code (used when relaying a
    /// delegated plugin's error).
    pub fn with_code(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// Attaches the spec's free-form `details` string.
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// Shorthand for [`ErrorCode::Internal`].
    pub fn internal(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, msg)
    }

    /// Shorthand for [`ErrorCode::InvalidNetworkConfig`].
    pub fn invalid_config(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidNetworkConfig, msg)
    }

    /// Shorthand for [`ErrorCode::InvalidEnvironment`].
    pub fn invalid_env(msg: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidEnvironment, msg)
    }

    /// Prefixes the message with context, keeping code and details, so a
    /// caller can say *what* it was doing without losing the original code.
    pub fn context(mut self, ctx: impl std::fmt::Display) -> Self {
        self.msg = format!("{ctx}: {}", self.msg);
        self
    }

    /// The error as the spec's JSON object; `details` is omitted when empty
    /// (like the reference `omitempty`).
    pub fn to_json(&self, cni_version: &str) -> Value {
        let mut v = json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v
    }

    fn display(&self) -> String {
        if self.details.is_empty() {
            format!("{} (code {})", self.msg, self.code)
        } else {
            format!("{} (code {}): {}", self.msg, self.code, self.details)
        }
    }
}

impl From<std::io::Error> for CniError {
    fn from(e: std::io::Error) -> Self {
        CniError::new(ErrorCode::Io, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_the_spec() {
        assert_eq!(ErrorCode::IncompatibleVersion.as_u32(), 1);
        assert_eq!(ErrorCode::UnsupportedField.as_u32(), 2);
        assert_eq!(ErrorCode::UnknownContainer.as_u32(), 3);
        assert_eq!(ErrorCode::InvalidEnvironment.as_u32(), 4);
        assert_eq!(ErrorCode::Io.as_u32(), 5);
        assert_eq!(ErrorCode::Decode.as_u32(), 6);
        assert_eq!(ErrorCode::InvalidNetworkConfig.as_u32(), 7);
        assert_eq!(ErrorCode::InvalidNetNs.as_u32(), 8);
        assert_eq!(ErrorCode::TryAgainLater.as_u32(), 11);
        assert_eq!(ErrorCode::PluginNotAvailable.as_u32(), 50);
        assert_eq!(ErrorCode::LimitedConnectivity.as_u32(), 51);
        assert_eq!(ErrorCode::Internal.as_u32(), 999);
    }

    #[test]
    fn json_omits_empty_details() {
        let e = CniError::new(ErrorCode::Decode, "bad json");
        assert_eq!(
            e.to_json("1.0.0"),
            json!({"cniVersion": "1.0.0", "code": 6, "msg": "bad json"})
        );
        let e = e.with_details("line 1");
        assert_eq!(e.to_json("0.4.0")["details"], "line 1");
        assert_eq!(e.to_json("0.4.0")["cniVersion"], "0.4.0");
    }

    #[test]
    fn display_and_context() {
        let e = CniError::invalid_config("missing x").context("ipam");
        assert_eq!(e.code, 7);
        assert_eq!(e.to_string(), "ipam: missing x (code 7)");
        let e = CniError::with_code(123, "custom").with_details("d");
        assert_eq!(e.to_string(), "custom (code 123): d");
        let io: CniError = std::io::Error::other("boom").into();
        assert_eq!(io.code, 5);
    }
}
