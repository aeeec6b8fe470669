//! Network namespace handles: open a path given by the runtime (CNI_NETNS),
//! check that it really is a network namespace, and run code inside it.
//!
//! `setns(CLONE_NEWNET)` switches only the calling *thread*. Rather than
//! switching the plugin's main thread back and forth (and risking being left in
//! the wrong namespace after an error), [`NetNs::run`] executes the closure on a
//! short-lived dedicated thread that enters the namespace and then exits. Any
//! netlink socket created on that thread lives in the namespace for its whole
//! life, so `ns.run(Netlink::connect)` yields a handle usable from any thread,
//! and `/proc/sys/net` writes made on that thread hit the namespace's sysctls.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};
use nix::sys::statfs::{fstatfs, NSFS_MAGIC, PROC_SUPER_MAGIC};

use super::NetlinkError;

/// An open network namespace. Holding the file keeps the namespace alive even
/// if its bind mount is removed meanwhile.
#[derive(Debug)]
pub struct NetNs {
    file: File,
    path: PathBuf,
}

impl NetNs {
    /// Opens `path` and checks it is a network namespace: the file must live on
    /// nsfs (or procfs, for `/proc/<pid>/ns/net` on old kernels) and, where the
    /// kernel can tell (`NS_GET_NSTYPE`), be of type `CLONE_NEWNET` — a mount or
    /// pid namespace file would otherwise be accepted and fail later at setns.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, NetlinkError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                NetlinkError::NetnsNotFound { path: path.clone() }
            } else {
                NetlinkError::NetnsOpen {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        let fs = fstatfs(&file).map_err(|e| NetlinkError::NetnsOpen {
            path: path.clone(),
            source: e.into(),
        })?;
        let fs_type = fs.filesystem_type();
        if fs_type != NSFS_MAGIC && fs_type != PROC_SUPER_MAGIC {
            return Err(NetlinkError::NotANetns {
                reason: format!("unknown filesystem magic {:#x}", fs_type.0),
                path,
            });
        }
        // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd, which
        // stays open for the duration of the call.
        let nstype = unsafe { libc::ioctl(file.as_raw_fd(), libc::NS_GET_NSTYPE as _) };
        if nstype == -1 {
            // nsfs without NS_GET_NSTYPE is a pre-4.11 kernel: the filesystem
            // check is all we can do there. On procfs the ioctl fails for any
            // ordinary file (e.g. /proc/self/status): not a namespace.
            if fs_type != NSFS_MAGIC {
                return Err(NetlinkError::NotANetns {
                    reason: "not a namespace file".into(),
                    path,
                });
            }
        } else if nstype != libc::CLONE_NEWNET {
            return Err(NetlinkError::NotANetns {
                reason: format!("namespace type {nstype:#x} is not a network namespace"),
                path,
            });
        }
        Ok(Self { file, path })
    }

    /// The network namespace of the calling thread.
    pub fn current() -> Result<Self, NetlinkError> {
        Self::open("/proc/thread-self/ns/net")
    }

    /// The path this namespace was opened from (what goes into `sandbox`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a dedicated thread that has entered this namespace and
    /// returns its result. The thread ends with the closure, so nothing else
    /// ever runs in the wrong namespace.
    pub fn run<F, T>(&self, f: F) -> Result<T, NetlinkError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        std::thread::scope(|scope| self.spawn_scoped(scope, f)?.join())
    }

    /// Like [`NetNs::run`], but returns at once: `f` runs in this namespace
    /// on a thread of `scope` while the caller goes on, and
    /// [`NetNsTask::join`] collects its result. For work the caller need
    /// not wait for, such as a link deletion whose last phase (an RCU
    /// barrier in the kernel) takes a grace period.
    pub fn spawn_scoped<'scope, 'env, F, T>(
        &'env self,
        scope: &'scope std::thread::Scope<'scope, 'env>,
        f: F,
    ) -> Result<NetNsTask<'scope, 'env, T>, NetlinkError>
    where
        F: FnOnce() -> T + Send + 'scope,
        T: Send + 'scope,
    {
        let handle = std::thread::Builder::new()
            .name("netns".into())
            .spawn_scoped(scope, move || {
                setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map(|()| f())
            })
            .map_err(|e| NetlinkError::Thread {
                path: self.path.clone(),
                reason: e.to_string(),
            })?;
        Ok(NetNsTask { ns: self, handle })
    }
}

/// Work running inside a namespace (see [`NetNs::spawn_scoped`]).
pub struct NetNsTask<'scope, 'env, T> {
    ns: &'env NetNs,
    handle: std::thread::ScopedJoinHandle<'scope, nix::Result<T>>,
}

impl<T> NetNsTask<'_, '_, T> {
    /// Whether the work is done (so [`NetNsTask::join`] will not block).
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Waits for the work and returns its result.
    pub fn join(self) -> Result<T, NetlinkError> {
        match self.handle.join() {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(NetlinkError::Setns {
                path: self.ns.path.clone(),
                source,
            }),
            Err(_) => Err(NetlinkError::Thread {
                path: self.ns.path.clone(),
                reason: "panicked".into(),
            }),
        }
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_path_is_not_found() {
        let err = NetNs::open("/nonexistent/netns/x").unwrap_err();
        assert!(matches!(err, NetlinkError::NetnsNotFound { .. }), "{err}");
    }

    #[test]
    fn regular_file_is_not_a_netns() {
        let err = NetNs::open("/proc/self/status").unwrap_err();
        // procfs magic passes the filesystem check; the ioctl must reject it.
        assert!(
            matches!(err, NetlinkError::NotANetns { .. }),
            "{err:?} for a procfs regular file"
        );
        let dir = std::env::temp_dir();
        let err = NetNs::open(&dir).unwrap_err();
        assert!(matches!(err, NetlinkError::NotANetns { .. }), "{err:?}");
    }

    #[test]
    fn other_namespace_type_is_rejected() {
        let err = NetNs::open("/proc/self/ns/uts").unwrap_err();
        assert!(matches!(err, NetlinkError::NotANetns { .. }), "{err:?}");
    }

    #[test]
    fn current_namespace_opens_and_runs() {
        let ns = NetNs::current().unwrap();
        assert_eq!(ns.run(|| 41 + 1).unwrap(), 42);
    }
}
