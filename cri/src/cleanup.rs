//! Removing everything a private containerd leaves on the machine when it
//! did not get to clean up itself (a failed test, a SIGKILLed parent):
//! its processes (containerd, the runc shims, the containers), the mounts
//! under its directory (overlay rootfs, /dev/shm of sandboxes, the pods'
//! network namespace bind mounts), the containers' cgroups, and the shims'
//! sockets in /run/containerd/s and libcni's result cache in /var/lib/cni.
//!
//! Everything is found through the private directory: a process belongs to
//! it if its command line names the directory (containerd's `--config`,
//! the shims' `-address`), if its root is inside it (a container's rootfs),
//! or if its network namespace is one the runtime bind-mounted inside it.
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{umount2, MntFlags};
use sha2::{Digest, Sha256};

/// What a cleanup found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CleanupReport {
    /// Processes killed (pid, command).
    pub killed: Vec<(i32, String)>,
    /// Mount points detached.
    pub unmounted: Vec<PathBuf>,
    /// Cgroup directories removed.
    pub cgroups: Vec<PathBuf>,
    /// Shim sockets and libcni result-cache files removed.
    pub files: Vec<PathBuf>,
    /// What could not be removed.
    pub errors: Vec<String>,
}

impl CleanupReport {
    /// True when nothing had to be cleaned up by force.
    pub fn is_empty(&self) -> bool {
        self.killed.is_empty()
            && self.unmounted.is_empty()
            && self.cgroups.is_empty()
            && self.files.is_empty()
            && self.errors.is_empty()
    }
}

/// Where the runc shims (v2) put their sockets: containerd's default state
/// dir, whatever `state` says (1.6 hard-codes it).
pub const SHIM_SOCKET_DIR: &str = "/run/containerd/s";

/// Where libcni (go-cni inside containerd 1.6, which sets no cache dir)
/// caches every ADD result: `<network>-<container ID>-<ifname>`.
pub const CNI_RESULT_CACHE: &str = "/var/lib/cni/results";

/// The k8s.io namespace containerd's CRI plugin uses.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// Kills every process of the runtime rooted at `dir` (whose gRPC socket is
/// `grpc_socket`), unmounts everything below `dir`, removes the cgroups and
/// shim sockets of the containers listed in its task state, libcni's
/// cached results of those containers, and finally `dir` itself. Idempotent; never fails, reports instead.
pub fn cleanup_runtime_dir(dir: &Path, grpc_socket: &Path) -> CleanupReport {
    let mut report = CleanupReport::default();
    let ids = task_ids(dir);
    kill_processes_of(dir, &mut report);
    unmount_below(dir, &mut report);
    for id in &ids {
        remove_cgroups(id, &mut report);
        let mut files = vec![shim_socket(grpc_socket, CRI_NAMESPACE, id)];
        files.extend(cni_cache_files(id));
        for f in files.into_iter().filter(|f| f.exists()) {
            match std::fs::remove_file(&f) {
                Ok(()) => report.files.push(f),
                Err(e) => report
                    .errors
                    .push(format!("cannot remove {}: {e}", f.display())),
            }
        }
    }
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            report
                .errors
                .push(format!("cannot remove {}: {e}", dir.display()));
        }
    }
    report
}

/// IDs of the containers (sandboxes included) whose task state lives in
/// `dir` (`<state>/io.containerd.runtime.v2.task/<ns>/<id>`), wherever the
/// state dir is below `dir`.
pub fn task_ids(dir: &Path) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    let mut stack = vec![(dir.to_path_buf(), 0)];
    while let Some((d, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if !ft.is_dir() {
                continue;
            }
            let p = e.path();
            if e.file_name() == "io.containerd.runtime.v2.task" {
                for ns in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                    for c in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                        ids.insert(c.file_name().to_string_lossy().into_owned());
                    }
                }
            } else if depth < 2 {
                stack.push((p, depth + 1));
            }
        }
    }
    ids
}

/// The socket a v2 shim of containerd 1.6 listens on: sha256 of
/// `<containerd address>/<namespace>/<id>` under [`SHIM_SOCKET_DIR`].
pub fn shim_socket(grpc_socket: &Path, namespace: &str, id: &str) -> PathBuf {
    let key = grpc_socket.join(namespace).join(id);
    let digest = Sha256::digest(key.as_os_str().as_encoded_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Path::new(SHIM_SOCKET_DIR).join(hex)
}

/// libcni's cached results of container `id` (every network and ifname).
pub fn cni_cache_files(id: &str) -> Vec<PathBuf> {
    let needle = format!("-{id}-");
    std::fs::read_dir(CNI_RESULT_CACHE)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(&needle))
        .map(|e| e.path())
        .collect()
}

/// Network-namespace identities (device, inode) of the nsfs bind mounts
/// below `dir`.
fn netns_mounts_below(dir: &Path) -> BTreeSet<(u64, u64)> {
    mounts_below(dir)
        .into_iter()
        .filter(|(_, fstype)| fstype == "nsfs")
        .filter_map(|(p, _)| std::fs::metadata(&p).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect()
}

/// Processes that belong to the runtime rooted at `dir`.
fn processes_of(dir: &Path, netns: &BTreeSet<(u64, u64)>) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    // `<dir>/`: a sibling directory sharing the prefix is not ours.
    let mut needle = dir.as_os_str().as_encoded_bytes().to_vec();
    needle.push(b'/');
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let proc_dir = e.path();
        let cmdline = std::fs::read(proc_dir.join("cmdline")).unwrap_or_default();
        let by_cmdline = cmdline
            .windows(needle.len())
            .any(|w| w == needle.as_slice());
        let by_root = std::fs::read_link(proc_dir.join("root"))
            .map(|r| r.starts_with(dir))
            .unwrap_or(false);
        let by_netns = std::fs::metadata(proc_dir.join("ns/net"))
            .map(|m| netns.contains(&(m.dev(), m.ino())))
            .unwrap_or(false);
        if by_cmdline || by_root || by_netns {
            let comm = std::fs::read_to_string(proc_dir.join("comm")).unwrap_or_default();
            found.push((pid, comm.trim().to_string()));
        }
    }
    found
}

/// SIGKILLs the runtime's processes until none is left (10 s at most:
/// killed shims reparent their containers, which the next round finds).
fn kill_processes_of(dir: &Path, report: &mut CleanupReport) {
    let netns = netns_mounts_below(dir);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let procs = processes_of(dir, &netns);
        if procs.is_empty() {
            return;
        }
        for (pid, comm) in procs {
            // SAFETY: kill(2) with a pid read from /proc; at worst it is gone.
            let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
            if rc == 0 && !report.killed.iter().any(|(p, _)| *p == pid) {
                report.killed.push((pid, comm));
            }
        }
        if Instant::now() >= deadline {
            let left = processes_of(dir, &netns);
            if !left.is_empty() {
                report
                    .errors
                    .push(format!("processes still alive after SIGKILL: {left:?}"));
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Mount points at or below `dir` with their filesystem type, from
/// /proc/self/mountinfo, deepest first.
pub fn mounts_below(dir: &Path) -> Vec<(PathBuf, String)> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut v: Vec<(PathBuf, String)> = text
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let mount_point = unescape(fields.get(4)?);
            let sep = fields.iter().position(|f| *f == "-")?;
            let fstype = fields.get(sep + 1)?.to_string();
            let p = PathBuf::from(mount_point);
            p.starts_with(dir).then_some((p, fstype))
        })
        .collect();
    v.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Detaches every mount at or below `dir`, deepest first (repeated while
/// stacked mounts remain).
fn unmount_below(dir: &Path, report: &mut CleanupReport) {
    for _ in 0..5 {
        let mounts = mounts_below(dir);
        if mounts.is_empty() {
            return;
        }
        for (p, _) in mounts {
            match umount2(&p, MntFlags::MNT_DETACH) {
                Ok(()) => report.unmounted.push(p),
                Err(e) => report
                    .errors
                    .push(format!("cannot unmount {}: {e}", p.display())),
            }
        }
    }
}

/// Removes `<hierarchy>/k8s.io/<id>` (the cgroup containerd's default spec
/// gives a container without a cgroup parent) in every hierarchy mounted
/// under /sys/fs/cgroup; only empty cgroups can go, which is what we want.
fn remove_cgroups(id: &str, report: &mut CleanupReport) {
    let mut candidates = Vec::new();
    for h in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        candidates.push(h.path().join(CRI_NAMESPACE).join(id));
    }
    candidates.push(Path::new("/sys/fs/cgroup").join(CRI_NAMESPACE).join(id));
    for c in candidates {
        if c.is_dir() {
            match std::fs::remove_dir(&c) {
                Ok(()) => report.cgroups.push(c),
                Err(e) => report
                    .errors
                    .push(format!("cannot remove cgroup {}: {e}", c.display())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }

    #[test]
    fn shim_socket_is_under_the_shared_dir() {
        let s = shim_socket(Path::new("/tmp/x/containerd.sock"), "k8s.io", "abc");
        assert!(s.starts_with(SHIM_SOCKET_DIR));
        assert_eq!(s.file_name().map(|n| n.len()), Some(64));
    }
}
