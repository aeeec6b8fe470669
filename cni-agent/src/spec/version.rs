//! CNI specification versions.
//!
//! Versions are matched exactly: the spec requires a plugin to refuse a
//! `cniVersion` it does not implement rather than guess.

use std::fmt;
use std::str::FromStr;

use super::error::{CniError, ErrorCode};

/// Every version of the spec this suite implements, oldest first.
pub const SUPPORTED_VERSIONS: [&str; 7] = [
    "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0",
];

/// The newest supported version, used when no configuration names one (the
/// VERSION verb, error JSON before the config could be read).
pub const LATEST_VERSION: &str = "1.1.0";

/// The version a configuration without `cniVersion` is taken to have, as
/// libcni's config decoder does.
pub const DEFAULT_CONFIG_VERSION: &str = "0.1.0";

/// A supported spec version. Ordered, so verb gates read as comparisons
/// (`v >= CniVersion::V0_4_0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    V0_1_0,
    V0_2_0,
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl CniVersion {
    /// All versions, oldest first (same order as [`SUPPORTED_VERSIONS`]).
    pub const ALL: [CniVersion; 7] = [
        CniVersion::V0_1_0,
        CniVersion::V0_2_0,
        CniVersion::V0_3_0,
        CniVersion::V0_3_1,
        CniVersion::V0_4_0,
        CniVersion::V1_0_0,
        CniVersion::V1_1_0,
    ];

    /// The newest version.
    pub const LATEST: CniVersion = CniVersion::V1_1_0;

    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_1_0 => "0.1.0",
            CniVersion::V0_2_0 => "0.2.0",
            CniVersion::V0_3_0 => "0.3.0",
            CniVersion::V0_3_1 => "0.3.1",
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    /// Which result layout this version uses.
    pub fn result_format(self) -> ResultFormat {
        match self {
            CniVersion::V0_1_0 | CniVersion::V0_2_0 => ResultFormat::V020,
            CniVersion::V0_3_0 | CniVersion::V0_3_1 | CniVersion::V0_4_0 => ResultFormat::V040,
            CniVersion::V1_0_0 | CniVersion::V1_1_0 => ResultFormat::V100,
        }
    }

    /// The CHECK verb exists since 0.4.0.
    pub fn supports_check(self) -> bool {
        self >= CniVersion::V0_4_0
    }

    /// The STATUS and GC verbs exist since 1.1.0.
    pub fn supports_status_and_gc(self) -> bool {
        self >= CniVersion::V1_1_0
    }

    /// Parses a config's `cniVersion`, treating an empty string as the
    /// implied 0.1.0 (libcni convention for a missing field).
    pub fn from_config(s: &str) -> Result<Self, CniError> {
        if s.is_empty() {
            Ok(CniVersion::V0_1_0)
        } else {
            s.parse()
        }
    }
}

/// The three result layouts of the spec's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultFormat {
    /// 0.1.0 / 0.2.0: `ip4` / `ip6` objects.
    V020,
    /// 0.3.x / 0.4.0: `interfaces` / `ips` (with `"version"`) / `routes`.
    V040,
    /// 1.x: like 0.4.0 without the `"version"` field.
    V100,
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CniVersion {
    type Err = CniError;

    /// Exact match against [`SUPPORTED_VERSIONS`]; anything else is code 1.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CniVersion::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| incompatible(s))
    }
}

/// The code-1 error for an unsupported `cniVersion`, naming the field, the
/// value and what is supported.
pub fn incompatible(value: &str) -> CniError {
    CniError::new(
        ErrorCode::IncompatibleVersion,
        format!("incompatible CNI version: cniVersion {value:?} is not supported"),
    )
    .with_details(format!(
        "config is {value:?}, plugin supports [{}]",
        SUPPORTED_VERSIONS.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_supported_version() {
        for (s, v) in SUPPORTED_VERSIONS.iter().zip(CniVersion::ALL) {
            assert_eq!(s.parse::<CniVersion>().unwrap(), v);
            assert_eq!(v.as_str(), *s);
            assert_eq!(v.to_string(), *s);
        }
        assert_eq!(CniVersion::LATEST.as_str(), LATEST_VERSION);
    }

    #[test]
    fn rejects_inexact_versions_with_code_1() {
        for bad in [
            "",
            "1.0",
            "0.5.0",
            "v1.0.0",
            " 1.0.0",
            "1.0.0 ",
            "2.0.0",
            "1.1.0-rc1",
        ] {
            let e = bad.parse::<CniVersion>().unwrap_err();
            assert_eq!(e.code, 1, "{bad}");
            assert!(e.msg.contains("cniVersion"), "{}", e.msg);
            assert!(e.msg.contains(&format!("{bad:?}")), "{}", e.msg);
        }
    }

    #[test]
    fn ordering_and_gates() {
        assert!(CniVersion::V0_1_0 < CniVersion::V0_2_0);
        assert!(CniVersion::V0_3_1 < CniVersion::V0_4_0);
        assert!(CniVersion::V1_0_0 < CniVersion::V1_1_0);
        assert!(!CniVersion::V0_3_1.supports_check());
        assert!(CniVersion::V0_4_0.supports_check());
        assert!(!CniVersion::V1_0_0.supports_status_and_gc());
        assert!(CniVersion::V1_1_0.supports_status_and_gc());
        assert_eq!(CniVersion::from_config("").unwrap(), CniVersion::V0_1_0);
        assert_eq!(CniVersion::V0_2_0.result_format(), ResultFormat::V020);
        assert_eq!(CniVersion::V0_3_0.result_format(), ResultFormat::V040);
        assert_eq!(CniVersion::V1_1_0.result_format(), ResultFormat::V100);
    }
}
