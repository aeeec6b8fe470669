//! Loading the embedded object and attaching its TC programs through tcx.
//!
//! tcx (rather than a clsact qdisc + cls_bpf filter) is used so that programs
//! of other agents on the same device keep running next to ours, in an order
//! the kernel keeps for each of them.
use aya::{
    programs::{
        links::LinkOrder, tc::SchedClassifierLinkId, ProgramError, SchedClassifier,
        TcAttachType,
    },
    Ebpf, EbpfError,
};

use super::object::EBPF_OBJECT;

/// What can go wrong while loading or attaching.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] EbpfError),
    #[error("program {0} is not in the eBPF object")]
    MissingProgram(&'static str),
    #[error("map {0} is not in the eBPF object")]
    MissingMap(&'static str),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
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
    #[error("tcx link {0}")]
    Link(String),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// Direction of a TC hook, named from the device's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Ingress,
    Egress,
}

impl From<Hook> for TcAttachType {
    fn from(h: Hook) -> Self {
        match h {
            Hook::Ingress => TcAttachType::Ingress,
            Hook::Egress => TcAttachType::Egress,
        }
    }
}

/// Loads the embedded object into the kernel (maps created, nothing attached).
pub fn load_object() -> Result<Ebpf, DatapathError> {
    Ok(Ebpf::load(EBPF_OBJECT)?)
}

/// Loads (if not yet loaded) the TC program `name` and attaches it to
/// `ifname` at `hook` through tcx, after the programs already there.
///
/// Runs in the network namespace of the calling thread: the interface name is
/// resolved there.
pub fn attach_tcx(
    ebpf: &mut Ebpf,
    name: &'static str,
    ifname: &str,
    hook: Hook,
) -> Result<SchedClassifierLinkId, DatapathError> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })?;
    if prog.fd().is_err() {
        prog.load()
            .map_err(|source| DatapathError::Program { name, source })?;
    }
    prog.attach_with_options(
        ifname,
        hook.into(),
        aya::programs::tc::TcAttachOptions::TcxOrder(LinkOrder::default()),
    )
    .map_err(|source| DatapathError::Program { name, source })
}
