//! A private bpffs instance per test node.
//!
//! The agent and plugins pin programs, maps and links under `bpffsRoot`,
//! which must be a bpf filesystem. Each `mount -t bpf` makes a new, empty
//! instance, so every test gets its own pins and unmounting drops them all
//! (and with them the maps and links they kept alive). The mount point lives
//! in the node's temp dir, so nothing is created under /sys/fs/bpf (which
//! may not even be a bpffs on the test machine).
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// A mounted bpffs, unmounted (lazily, so open fds don't block it) on drop.
#[derive(Debug)]
pub struct BpfFs {
    path: PathBuf,
}

impl BpfFs {
    /// Creates `path` and mounts a fresh bpffs on it.
    pub fn mount(path: &Path) -> BpfFs {
        std::fs::create_dir_all(path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        mount(
            Some("bpf"),
            path,
            Some("bpf"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("cannot mount a bpffs on {}: {e}", path.display()));
        BpfFs {
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        // Quiet if nothing is mounted there.
        let _ = umount2(&self.path, MntFlags::MNT_DETACH);
    }
}
