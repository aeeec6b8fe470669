//! A private directory for one containerd (root, state, sockets, runc's
//! state), under the system temp dir, named `<prefix><pid>-<n>` — short,
//! since containerd's Unix sockets live inside. Dropping it kills the
//! runtime's processes, unmounts everything below it and removes it; the
//! directories of processes that died without doing so are cleaned the
//! first time a process creates one with the same prefix.
//!
//! Also here: whether containerd's CRI can be driven on this machine.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU32, Ordering},
        Mutex,
    },
};

use crate::{
    cleanup::cleanup_runtime_dir,
    error::{Error, Result},
    image::HOST_BUSYBOX,
};

static COUNTER: AtomicU32 = AtomicU32::new(0);
/// The prefixes whose stale directories this process has reaped.
static REAPED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Why containerd's CRI cannot be driven here (`cargo xtask setup`
/// installs all of it), or `None`.
pub fn containerd_missing() -> Option<String> {
    for tool in [
        "containerd",
        "ctr",
        "containerd-shim-runc-v2",
        "runc",
        "nsenter",
    ] {
        if which(tool).is_none() {
            return Some(format!(
                "`{tool}` is not installed (apt-get install containerd runc util-linux, or `cargo xtask setup`)"
            ));
        }
    }
    if !Path::new(HOST_BUSYBOX).is_file() {
        return Some(format!(
            "{HOST_BUSYBOX} is missing (apt-get install busybox-static, or `cargo xtask setup`)"
        ));
    }
    None
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// See the module documentation.
#[derive(Debug)]
pub struct RuntimeDir {
    path: PathBuf,
}

impl RuntimeDir {
    /// A new directory `<temp>/<prefix><pid>-<n>`. `prefix` must be this
    /// caller's own (the stale ones with it are removed as dead runtimes').
    pub fn create(prefix: &str) -> Result<RuntimeDir> {
        let first = REAPED
            .lock()
            .map(|mut r| r.insert(prefix.to_string()))
            .unwrap_or(false);
        if first {
            reap_stale(prefix);
        }
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("{prefix}{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|source| Error::Io {
            what: format!("creating {}", path.display()),
            source,
        })?;
        Ok(RuntimeDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// containerd's gRPC socket inside it.
    pub fn grpc_socket(&self) -> PathBuf {
        self.path.join("containerd.sock")
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let report = cleanup_runtime_dir(&self.path, &self.grpc_socket());
        if !report.is_empty() {
            eprintln!(
                "containerd dir {}: forced cleanup {report:?}",
                self.path.display()
            );
        }
    }
}

/// Cleans up the directories with `prefix` of processes that are gone.
fn reap_stale(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let p = e.path();
            let report = cleanup_runtime_dir(&p, &p.join("containerd.sock"));
            eprintln!(
                "removed the stale containerd dir {}: {report:?}",
                p.display()
            );
        }
    }
}
