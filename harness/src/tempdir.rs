//! Scratch directories (state dir, IPAM dataDir, bpffs mount point, a
//! containerd's files), removed on drop.
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{Context, Result};

use crate::netns::next_seq;

static REAP_STALE: Once = Once::new();

/// Name prefix of every directory created here.
pub const DIR_PREFIX: &str = "cni-tests-";

/// A directory removed with everything in it on drop. Set
/// `CNI_TESTS_KEEP=1` to keep it for a post-mortem (its path is printed).
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `/tmp/cni-tests-<pid>-<n>-<tag>`; panics if it cannot (for tests).
    #[track_caller]
    pub fn new(tag: &str) -> TempDir {
        TempDir::new_in(&std::env::temp_dir(), tag)
    }

    /// Creates `<parent>/cni-tests-<pid>-<n>-<tag>`; panics if it cannot.
    #[track_caller]
    pub fn new_in(parent: &Path, tag: &str) -> TempDir {
        TempDir::create_in(parent, tag).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Creates `/tmp/cni-tests-<pid>-<n>-<tag>`, first reaping the
    /// directories of processes that died without their destructors.
    pub fn create(tag: &str) -> Result<TempDir> {
        TempDir::create_in(&std::env::temp_dir(), tag)
    }

    fn create_in(parent: &Path, tag: &str) -> Result<TempDir> {
        REAP_STALE.call_once(reap_stale_dirs);
        let path = parent.join(format!(
            "{DIR_PREFIX}{}-{}-{tag}",
            std::process::id(),
            next_seq()
        ));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir { path })
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

/// Removes `cni-tests-<pid>-…` dirs in /tmp whose process is gone, first
/// detaching whatever is mounted below them (a node's bpffs).
fn reap_stale_dirs() {
    for path in crate::stale_entries(&std::env::temp_dir(), DIR_PREFIX) {
        detach_mounts_below(&path);
        remove_tree(&path);
    }
}

/// Lazily unmounts every mount point below `dir` (deepest first), so that
/// removing the tree does not reach into a still-mounted filesystem.
fn detach_mounts_below(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    // Field 5 is the mount point, with space, tab, newline and backslash
    // octal-escaped.
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| {
            PathBuf::from(
                p.replace("\\040", " ")
                    .replace("\\011", "\t")
                    .replace("\\012", "\n")
                    .replace("\\134", "\\"),
            )
        })
        .filter(|p| p.starts_with(dir) && p != dir)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let Ok(c) = CString::new(p.as_os_str().as_bytes()) else {
            continue;
        };
        // SAFETY: umount2(2) with a NUL-terminated path that outlives the call.
        unsafe {
            libc::umount2(c.as_ptr(), libc::MNT_DETACH);
        }
    }
}
