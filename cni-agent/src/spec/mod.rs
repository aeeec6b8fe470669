//! The CNI specification (0.1.0 … 1.1.0): versions, configuration, results,
//! errors, environment, verb dispatch and delegation.
//!
//! Plugins code against these types only; the JSON shape of each spec
//! version is handled here, once.

pub mod config;
pub mod conflist;
pub mod decode;
pub mod delegate;
pub mod env;
pub mod error;
pub mod result;
pub mod skel;
pub mod version;

pub use config::{Attachment, IpamSection, NetConf};
pub use conflist::NetConfList;
pub use env::{CmdArgs, Command};
pub use error::{CniError, ErrorCode};
pub use result::{CniResult, Dns, Interface, IpConfig, Route};
pub use skel::Plugin;
pub use version::{CniVersion, SUPPORTED_VERSIONS};

/// The spec's rule for network names and container IDs:
/// `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`. Both end up in file and map names, so
/// nothing outside this set is accepted.
pub fn is_valid_identifier(s: &str) -> bool {
    let mut bytes = s.bytes();
    match bytes.next() {
        Some(b) if b.is_ascii_alphanumeric() => {}
        _ => return false,
    }
    bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

#[cfg(test)]
mod tests {
    #[test]
    fn identifier_rule() {
        assert!(super::is_valid_identifier("a"));
        assert!(super::is_valid_identifier("net-1_2.x"));
        assert!(!super::is_valid_identifier(""));
        assert!(!super::is_valid_identifier("-x"));
        assert!(!super::is_valid_identifier("a b"));
        assert!(!super::is_valid_identifier("a/b"));
    }
}
