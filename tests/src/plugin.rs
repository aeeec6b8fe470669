//! Finding and running CNI plugin binaries: ours (built by cargo) and the
//! reference ones (Debian containernetworking-plugins in /usr/lib/cni).
//!
//! A plugin always runs inside a "node" namespace (the child `setns`es into
//! it before exec) so that whatever it does to "the host" happens there,
//! never in the root namespace. Each run has a deadline: a hung plugin fails
//! the test instead of hanging the suite.
//!
//! How a plugin is run is `cni_harness::invoke`, shared with the xtask; what
//! is here is the tests' side: which binaries, and assertions that panic
//! with the run's description ([`Expect`], [`Ran`]).
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use serde_json::Value;

pub use cni_harness::invoke::{CniError as CniErrorOut, Invocation, NodeNs, Outcome};

use crate::netns::NetNs;

/// Where Debian installs the reference plugins.
pub const REFERENCE_DIR: &str = "/usr/lib/cni";

/// How long one plugin run may take; `CNI_TESTS_PLUGIN_TIMEOUT` (seconds) overrides.
pub fn plugin_timeout() -> Duration {
    std::env::var("CNI_TESTS_PLUGIN_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(60))
}

/// Directory of our binaries: `$CNI_EBPF_BIN_DIR`, else `<workspace>/target/debug`.
pub fn ours_bin_dir() -> PathBuf {
    match std::env::var_os("CNI_EBPF_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"),
    }
}

/// Path of one of our binaries; panics with a how-to when it was not built
/// (`cargo test -p cni-tests` does not build another package's binaries).
pub fn ours_binary(name: &str) -> PathBuf {
    let p = ours_bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: build our plugins first with `cargo build -p cni-agent --bins` \
         (or set CNI_EBPF_BIN_DIR), or run `cargo xtask test`",
        p.display()
    );
    p
}

/// Which suite a test drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    /// ebpf-bridge + ebpf-host-local, CNI_PATH = our bin dir + /usr/lib/cni.
    Ours,
    /// bridge + host-local from /usr/lib/cni, CNI_PATH = /usr/lib/cni.
    Reference,
}

impl Impl {
    pub fn bridge_type(self) -> &'static str {
        match self {
            Impl::Ours => "ebpf-bridge",
            Impl::Reference => "bridge",
        }
    }

    pub fn ipam_type(self) -> &'static str {
        match self {
            Impl::Ours => "ebpf-host-local",
            Impl::Reference => "host-local",
        }
    }

    /// CNI_PATH directories, searched in order.
    pub fn cni_path(self) -> Vec<PathBuf> {
        match self {
            Impl::Ours => vec![ours_bin_dir(), PathBuf::from(REFERENCE_DIR)],
            Impl::Reference => vec![PathBuf::from(REFERENCE_DIR)],
        }
    }

    /// Highest cniVersion the suite speaks (the Debian reference stops at 1.0.0).
    pub fn max_version(self) -> &'static str {
        match self {
            Impl::Ours => "1.1.0",
            Impl::Reference => "1.0.0",
        }
    }
}

/// Runs `inv` on `binary` inside `node` (or in the caller's namespace if
/// `None`, only for verbs that touch no network state, like VERSION), with
/// the tests' deadline; panics if the plugin could not be run at all.
#[track_caller]
pub fn run(inv: &Invocation, node: Option<&NetNs>, binary: &Path) -> Outcome {
    let ns = node.map(|n| NodeNs::open(n.path()).unwrap_or_else(|e| panic!("{e:#}")));
    inv.run(binary, ns.as_ref(), Some(plugin_timeout()))
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// The outcome of a run that had to happen: panics (with why) when the
/// plugin could not be run, or, for an operation's error, when no plugin
/// failed (the runtime itself did).
pub trait Ran {
    fn ran(self) -> Outcome;
}

impl Ran for Result<Outcome> {
    #[track_caller]
    fn ran(self) -> Outcome {
        self.unwrap_or_else(|e| panic!("plugin not run: {e:#}"))
    }
}

impl Ran for anyhow::Error {
    #[track_caller]
    fn ran(self) -> Outcome {
        match self.downcast::<Outcome>() {
            Ok(out) => out,
            Err(e) => panic!("no plugin failed, the runtime did: {e:#}"),
        }
    }
}

/// Assertions on a plugin run.
pub trait Expect {
    /// Panics unless the plugin exited 0; returns its stdout JSON (Null if
    /// stdout was empty, as for DEL).
    fn expect_success(&self) -> Value;
    /// Panics unless the plugin failed the spec's way (non-zero exit, error
    /// JSON with `code` and `msg` on stdout); returns the error.
    fn expect_error(&self) -> CniErrorOut;
}

impl Expect for Outcome {
    #[track_caller]
    fn expect_success(&self) -> Value {
        self.result()
            .unwrap_or_else(|e| panic!("plugin failed: {e:#}"))
    }
    #[track_caller]
    fn expect_error(&self) -> CniErrorOut {
        self.error().unwrap_or_else(|e| panic!("{e:#}"))
    }
}

impl Expect for Result<Outcome> {
    #[track_caller]
    fn expect_success(&self) -> Value {
        match self {
            Ok(out) => out.expect_success(),
            Err(e) => panic!("plugin not run: {e:#}"),
        }
    }
    #[track_caller]
    fn expect_error(&self) -> CniErrorOut {
        match self {
            Ok(out) => out.expect_error(),
            Err(e) => panic!("plugin not run: {e:#}"),
        }
    }
}

impl Expect for anyhow::Error {
    #[track_caller]
    fn expect_success(&self) -> Value {
        panic!("plugin failed: {self:#}")
    }
    #[track_caller]
    fn expect_error(&self) -> CniErrorOut {
        match self.downcast_ref::<Outcome>() {
            Some(out) => out.expect_error(),
            None => panic!("expected a plugin's CNI error, the runtime failed: {self:#}"),
        }
    }
}
