//! Kernel network configuration through rtnetlink: namespaces, links, addresses, routes, sysctls.
//!
//! The plugins are short-lived synchronous processes, so the rtnetlink (async)
//! plumbing is hidden behind [`Netlink`], a blocking handle that owns a tokio
//! current-thread runtime and one netlink socket. The socket belongs to the
//! network namespace of the thread that called [`Netlink::connect`]; to work in
//! a container namespace, connect from inside [`NetNs::run`]. Async callers
//! (the agent) can use [`Netlink::handle`] or the lower-level `rtnetlink` API.
//!
//! Every failure is a [`NetlinkError`], mapped once to a CNI error code below.

mod addr;
mod link;
mod netns;
mod route;
pub mod sysctl;

use std::future::Future;
use std::io;
use std::path::PathBuf;

use crate::spec::error::{CniError, ErrorCode};

pub use addr::Address;
pub use link::{format_mac, parse_mac, BridgeSpec, Link, VethSpec};
pub use netns::NetNs;
pub use route::{Route, RouteSpec};

/// Everything that can go wrong while configuring the kernel.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("network namespace {path:?} does not exist")]
    NetnsNotFound { path: PathBuf },
    #[error("{path:?} is not a network namespace: {reason}")]
    NotANetns { path: PathBuf, reason: String },
    #[error("cannot open network namespace {path:?}: {source}")]
    NetnsOpen { path: PathBuf, source: io::Error },
    #[error("cannot enter network namespace {path:?}: {source}")]
    Setns { path: PathBuf, source: nix::Error },
    #[error("worker thread for network namespace {path:?} failed: {reason}")]
    Thread { path: PathBuf, reason: String },
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("link {0:?} not found")]
    LinkNotFound(String),
    #[error("{name:?} already exists but is not a bridge (kind {kind})")]
    NotABridge { name: String, kind: String },
    #[error("link {0:?} already exists")]
    LinkExists(String),
    #[error("invalid MAC address {0:?}")]
    InvalidMac(String),
    #[error("{op}: {}", describe(source))]
    Request {
        op: String,
        source: rtnetlink::Error,
    },
    #[error("sysctl {key}: {source}")]
    Sysctl { key: String, source: io::Error },
    #[error("invalid sysctl key {0:?}")]
    InvalidSysctlKey(String),
}

impl NetlinkError {
    /// The kernel's errno for a failed netlink request (positive, e.g.
    /// `libc::EEXIST`), so callers can treat "exists"/"no such device" as the
    /// idempotent outcomes they often are.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Request {
                source: rtnetlink::Error::NetlinkError(msg),
                ..
            } => Some(-msg.raw_code()),
            Self::Sysctl { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// Builds the error for a failed request, naming the operation.
    pub(crate) fn request(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Self {
        let op = op.into();
        move |source| Self::Request { op, source }
    }
}

/// Kernel errors as `strerror` text instead of rtnetlink's debug dump.
fn describe(err: &rtnetlink::Error) -> String {
    match err {
        rtnetlink::Error::NetlinkError(msg) => {
            io::Error::from_raw_os_error(-msg.raw_code()).to_string()
        }
        other => other.to_string(),
    }
}

impl From<NetlinkError> for CniError {
    fn from(err: NetlinkError) -> Self {
        let code = match &err {
            // The runtime asked about a namespace that is gone: the container is
            // unknown (spec: no cleanup needed by the runtime).
            NetlinkError::NetnsNotFound { .. } => ErrorCode::UnknownContainer,
            NetlinkError::NotANetns { .. } => ErrorCode::InvalidEnvironment,
            NetlinkError::InvalidMac(_) => ErrorCode::InvalidNetworkConfig,
            NetlinkError::NetnsOpen { .. } | NetlinkError::Sysctl { .. } => ErrorCode::Io,
            _ if matches!(err.errno(), Some(libc::EBUSY) | Some(libc::EAGAIN)) => {
                ErrorCode::TryAgainLater
            }
            _ => ErrorCode::Internal,
        };
        let msg = match &err {
            NetlinkError::NetnsNotFound { .. } | NetlinkError::NotANetns { .. } => {
                format!("CNI_NETNS: {err}")
            }
            _ => err.to_string(),
        };
        CniError::new(code, msg)
    }
}

/// A blocking rtnetlink connection bound to one network namespace.
///
/// Owns a current-thread tokio runtime: requests are driven by `block_on`, so
/// it must not be used from inside another tokio runtime (use
/// [`Netlink::handle`] there).
pub struct Netlink {
    runtime: tokio::runtime::Runtime,
    handle: rtnetlink::Handle,
}

impl Netlink {
    /// Opens a netlink socket in the calling thread's network namespace.
    pub fn connect() -> Result<Self, NetlinkError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(NetlinkError::Socket)?;
        let handle = runtime.block_on(async {
            let (connection, handle, _) =
                rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
            tokio::spawn(connection);
            Ok::<_, NetlinkError>(handle)
        })?;
        Ok(Self { runtime, handle })
    }

    /// Opens a netlink socket inside `ns` (see [`NetNs::run`]).
    pub fn connect_in(ns: &NetNs) -> Result<Self, NetlinkError> {
        ns.run(Self::connect)?
    }

    /// The underlying rtnetlink handle, for requests this module does not wrap.
    pub fn handle(&self) -> &rtnetlink::Handle {
        &self.handle
    }

    /// Drives `fut` (typically built from [`Netlink::handle`]) to completion.
    pub fn block_on<F: Future>(&self, fut: F) -> F::Output {
        self.runtime.block_on(fut)
    }
}
