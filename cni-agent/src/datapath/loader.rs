//! Errors of loading and attaching, and the TC hook names.
//!
//! Programs attach through tcx (rather than a clsact qdisc + cls_bpf filter)
//! so that programs of other agents on the same device keep running next to
//! ours, in an order the kernel keeps for each of them.
use aya::{programs::ProgramError, EbpfError};

use crate::spec::error::ErrorCode;

/// What can go wrong while loading or attaching.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] EbpfError),
    #[error("program {0} is not in the eBPF object")]
    MissingProgram(String),
    #[error("map {0} is not in the eBPF object")]
    MissingMap(&'static str),
    #[error("program {name}: {source}")]
    Program {
        name: String,
        #[source]
        source: ProgramError,
    },
    #[error("bpffs pin directory {path}: {source}")]
    Pins {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not on a bpf filesystem; mount one there (mount -t bpf bpf <dir>) or pass another bpffs root")]
    NotBpffs(std::path::PathBuf),
    #[error("pinned map {path} has layout {found}, this agent expects {expected}: refusing to reuse it (remove it, or use another bpffs root)")]
    LayoutMismatch {
        path: std::path::PathBuf,
        found: String,
        expected: String,
    },
    #[error("pinned map {path} holds {found} entries, the agent was asked for {asked} (--conntrack-size): refusing to reuse it; restart with --conntrack-size {found}, or remove the pins (tracked connections are lost)")]
    SizeMismatch {
        path: std::path::PathBuf,
        found: u32,
        asked: u32,
    },
    #[error("cgroup hooks: {path}: {source}")]
    Cgroup {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A link to attach to (a pod's veth, a bridge) is not in the node's
    /// namespace, or netlink could not say.
    #[error("link {ifname}: {source}")]
    LinkLookup {
        ifname: String,
        #[source]
        source: crate::netlink::NetlinkError,
    },
    /// A TC attachment asked for a hook that is not TC (a caller's bug).
    #[error("program {name}: {hook:?} is not a TC hook")]
    NotTcHook { name: String, hook: Hook },
    /// An attached program's link could not be made an fd link to pin.
    #[error("link of {target}: {source}")]
    FdLink {
        target: String,
        #[source]
        source: aya::programs::links::LinkError,
    },
    /// A program or link could not be pinned on bpffs.
    #[error("pin {path}: {source}")]
    Pin {
        path: std::path::PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    /// A firewall attachment whose MAC does not parse (the plugin checks
    /// it first; a hand-made request can still carry one).
    #[error("firewall: invalid MAC {0:?}")]
    InvalidMac(String),
    /// Firewall rules that do not fit the datapath's tables.
    #[error("firewall rules of {ifname}: {source}")]
    FirewallRules {
        ifname: String,
        #[source]
        source: crate::firewall::CompileError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

impl DatapathError {
    /// The CNI error code of each failure, in one place: a bpffs root that
    /// is not bpffs is the configuration's fault, a pin directory or
    /// cgroup that cannot be read or written is I/O; rules or a MAC
    /// the datapath cannot take are the configuration's; the rest is internal.
    pub fn code(&self) -> ErrorCode {
        match self {
            DatapathError::NotBpffs(_)
            | DatapathError::InvalidMac(_)
            | DatapathError::FirewallRules { .. } => ErrorCode::InvalidNetworkConfig,
            DatapathError::Pins { .. } | DatapathError::Cgroup { .. } => ErrorCode::Io,
            DatapathError::Load(_)
            | DatapathError::MissingProgram(_)
            | DatapathError::MissingMap(_)
            | DatapathError::Program { .. }
            | DatapathError::LayoutMismatch { .. }
            | DatapathError::SizeMismatch { .. }
            | DatapathError::LinkLookup { .. }
            | DatapathError::NotTcHook { .. }
            | DatapathError::FdLink { .. }
            | DatapathError::Pin { .. }
            | DatapathError::Map { .. } => ErrorCode::Internal,
        }
    }
}

/// Where a program hooks in: TC ingress/egress of a device (named from the
/// device's point of view), XDP, or a cgroup's socket-address hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Ingress,
    Egress,
    Xdp,
    Connect4,
    Sendmsg4,
    Recvmsg4,
    Getpeername4,
    Connect6,
    Sendmsg6,
    Recvmsg6,
    Getpeername6,
}
