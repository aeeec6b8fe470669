//! Per-test scratch directories (state dir, IPAM dataDir, bpffs mount
//! point), removed on drop.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

static COUNTER: AtomicU32 = AtomicU32::new(0);
static REAP_STALE: Once = Once::new();

/// Name prefix of every directory the harness creates under /tmp.
pub const DIR_PREFIX: &str = "cni-tests-";

/// A directory removed with everything in it on drop. Set
/// `CNI_TESTS_KEEP=1` to keep it for a post-mortem (its path is printed).
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `/tmp/cni-tests-<pid>-<n>-<tag>`.
    pub fn new(tag: &str) -> TempDir {
        TempDir::new_in(&std::env::temp_dir(), tag)
    }

    /// Creates `<parent>/cni-tests-<pid>-<n>-<tag>`.
    pub fn new_in(parent: &Path, tag: &str) -> TempDir {
        REAP_STALE.call_once(reap_stale_dirs);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = parent.join(format!("{DIR_PREFIX}{}-{n}-{tag}", std::process::id()));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `self.path()/rel`, as a string for JSON configs.
    pub fn join_str(&self, rel: &str) -> String {
        self.path.join(rel).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("CNI_TESTS_KEEP").is_some() {
            eprintln!("CNI_TESTS_KEEP: keeping {}", self.path.display());
            return;
        }
        remove_tree(&self.path);
    }
}

/// Removes a tree; on bpffs, pins are unlinked one by one (remove_dir_all
/// does exactly that).
fn remove_tree(path: &Path) {
    if path.exists() {
        if let Err(e) = std::fs::remove_dir_all(path) {
            eprintln!("warning: cannot remove {}: {e}", path.display());
        }
    }
}

/// Removes `cni-tests-<pid>-…` dirs in /tmp whose process is gone (first
/// detaching the bpffs a node mounts in it).
fn reap_stale_dirs() {
    for parent in [std::env::temp_dir()] {
        let Ok(entries) = std::fs::read_dir(&parent) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(DIR_PREFIX) else {
                continue;
            };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                crate::bpffs::unmount(&e.path().join(crate::topology::BPFFS_SUBDIR));
                remove_tree(&e.path());
            }
        }
    }
}
