//! Errors of loading and attaching, and the TC hook names.
//!
//! Programs attach through tcx (rather than a clsact qdisc + cls_bpf filter)
//! so that programs of other agents on the same device keep running next to
//! ours, in an order the kernel keeps for each of them.
use aya::{programs::ProgramError, EbpfError};

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
    #[error("tcx link {0}")]
    Link(String),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
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
