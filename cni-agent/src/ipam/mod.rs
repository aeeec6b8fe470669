//! IPAM: the host-local address manager, compatible with the reference
//! host-local plugin's configuration and on-disk store.
//!
//! - [`config`]: the `ipam` section (ranges, routes, dataDir, requested IPs);
//! - [`range`]: ranges, range sets and the round-robin iterator;
//! - [`store`]: the flock'd one-file-per-address store;
//! - [`allocator`]: picking and reserving an address in a range set;
//! - [`resolv_conf`]: DNS settings from a resolv.conf file.
//!
//! The CNI verbs on top of these live in `plugins::host_local`.

pub mod allocator;
pub mod config;
pub mod range;
pub mod resolv_conf;
pub mod store;

use crate::spec::error::{CniError, ErrorCode};

/// Configuration problems are the spec's code 7 (4 for CNI_ARGS, which come
/// from the environment). The reference reports everything as 999; the
/// messages are kept, the codes are the spec's.
impl From<config::ConfigError> for CniError {
    fn from(e: config::ConfigError) -> CniError {
        let code = if e.is_environment() {
            ErrorCode::InvalidEnvironment
        } else {
            ErrorCode::InvalidNetworkConfig
        };
        CniError::new(code, e.to_string())
    }
}

/// The store is files on disk: its failures are the spec's I/O code 5.
impl From<store::StoreError> for CniError {
    fn from(e: store::StoreError) -> CniError {
        CniError::new(ErrorCode::Io, e.to_string())
    }
}

/// Allocation failures (exhaustion, duplicate ADD, unavailable requested
/// address) are 999 as in the reference; store failures keep their code.
impl From<allocator::AllocError> for CniError {
    fn from(e: allocator::AllocError) -> CniError {
        match e {
            allocator::AllocError::Store(e) => e.into(),
            other => CniError::new(ErrorCode::Internal, other.to_string()),
        }
    }
}
