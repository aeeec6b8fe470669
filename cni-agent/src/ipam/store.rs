//! The host-local on-disk store, byte-compatible with the reference plugin
//! (`backend/disk/backend.go`) so either implementation can take over a
//! dataDir the other wrote:
//!
//! ```text
//! <dataDir>/<network>/lock                 flock(LOCK_EX) for every operation
//! <dataDir>/<network>/<ip>                 "<containerID>\r\n<ifname>"
//! <dataDir>/<network>/last_reserved_ip.<N> last address handed out by range set N
//! ```
//!
//! Older reference versions wrote only the container ID into the IP file;
//! such files are still found and released by container ID.
//!
//! Unlike the reference we fsync a new reservation file and the directory
//! before reporting success: a reservation lost in a crash would let the next
//! ADD hand the same address to a second pod.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag};
use nix::sys::stat::Mode;

/// Separator between container ID and ifname in a reservation file.
pub const LINE_BREAK: &str = "\r\n";
/// Prefix of the per-range-set round-robin cursor files.
pub const LAST_IP_FILE_PREFIX: &str = "last_reserved_ip.";
/// Name of the lock file inside the network directory.
pub const LOCK_FILE: &str = "lock";

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

impl StoreError {
    fn io(op: &'static str, path: &Path, source: io::Error) -> StoreError {
        StoreError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// One reserved address as found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub ip: IpAddr,
    /// The container ID, trimmed.
    pub container_id: String,
    /// `None` for the old format holding only the container ID.
    pub ifname: Option<String>,
}

/// An open, exclusively locked network store. The flock is taken by
/// [`Store::open`] and released when the value is dropped, so every
/// operation on it runs under the lock, also against the reference plugin
/// (same lock file, same flock semantics).
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    _lock: Flock<File>,
}

impl Store {
    /// Creates `<data_dir>/<network>` if needed and takes its lock, waiting
    /// for other holders.
    pub fn open(data_dir: &Path, network: &str) -> Result<Store, StoreError> {
        let dir = data_dir.join(network);
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir)
            .map_err(|e| StoreError::io("failed to create store directory", &dir, e))?;
        let lock_path = dir.join(LOCK_FILE);
        // O_RDONLY|O_CREAT with mode 0750 as go-filemutex does; std's
        // OpenOptions refuses to create a file opened read-only.
        let fd = nix::fcntl::open(
            &lock_path,
            OFlag::O_CREAT | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o750),
        )
        .map_err(|e| StoreError::io("failed to open lock file", &lock_path, e.into()))?;
        let mut file = File::from(fd);
        let lock = loop {
            match Flock::lock(file, FlockArg::LockExclusive) {
                Ok(lock) => break lock,
                Err((f, Errno::EINTR)) => file = f,
                Err((_, e)) => {
                    return Err(StoreError::io("failed to lock", &lock_path, e.into()));
                }
            }
        };
        Ok(Store { dir, _lock: lock })
    }

    /// The network directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn ip_path(&self, ip: IpAddr) -> PathBuf {
        self.dir.join(ip.to_string())
    }

    fn last_ip_path(&self, range_id: usize) -> PathBuf {
        self.dir.join(format!("{LAST_IP_FILE_PREFIX}{range_id}"))
    }

    /// Reserves `ip` for (id, ifname). `Ok(false)` when the address is already
    /// taken: the file is created with O_EXCL, so two allocators can never
    /// both win, whatever the lock does. On success the round-robin cursor of
    /// range set `range_id` moves to `ip`.
    pub fn reserve(
        &self,
        id: &str,
        ifname: &str,
        ip: IpAddr,
        range_id: usize,
    ) -> Result<bool, StoreError> {
        let path = self.ip_path(ip);
        // The reservation appears whole or not at all: its content is
        // written and synced under a temporary name (never an address, so
        // no scan reads it), then hard-linked to the address's name, which
        // fails if the address is taken (as O_EXCL would). A crash leaves at
        // most the temporary file, never an empty reservation.
        let tmp = self
            .dir
            .join(format!(".reserve-{}-{ip}", std::process::id()));
        let content = format!("{}{LINE_BREAK}{ifname}", id.trim());
        let written = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(content.as_bytes())?;
                f.sync_all()
            });
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::io("failed to write", &tmp, e));
        }
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(StoreError::io("failed to create", &path, e)),
        }
        let last = self.last_ip_path(range_id);
        if let Err(e) = write_file(&last, ip.to_string().as_bytes()) {
            // Do not leave a reservation behind for an ADD that fails.
            let _ = fs::remove_file(&path);
            return Err(StoreError::io("failed to write", &last, e));
        }
        self.sync_dir()?;
        Ok(true)
    }

    /// The last address reserved from range set `range_id`, if recorded and
    /// readable. An unreadable cursor only costs round-robin order, so it is
    /// not an error (the reference only logs it too).
    pub fn last_reserved_ip(&self, range_id: usize) -> Option<IpAddr> {
        let path = self.last_ip_path(range_id);
        match fs::read_to_string(&path) {
            Ok(s) => s.trim().parse::<IpAddr>().ok().map(|ip| ip.to_canonical()),
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    log::warn!("error retrieving last reserved ip from {path:?}: {e}");
                }
                None
            }
        }
    }

    /// Calls `visit` with the address and trimmed content of every
    /// reservation file. Only regular files named by an address count (not
    /// `lock`, not `last_reserved_ip.N`); unreadable or non-UTF-8 files are
    /// skipped as the reference does.
    ///
    /// Looking an attachment up means reading every file (the format has no
    /// index, and the reference writes the same directory), so this is what
    /// ADD and DEL spend growing with the number of pods. Each file is
    /// therefore read with three system calls (`openat` relative to the
    /// directory, one `read` into a reused buffer, `close`) instead of the
    /// five of `fs::read` on a full path, and nothing is allocated per file.
    fn scan(&self, mut visit: impl FnMut(IpAddr, &str)) -> Result<(), StoreError> {
        let read_dir_err = |e| StoreError::io("failed to read store directory", &self.dir, e);
        let dir = nix::fcntl::open(
            &self.dir,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| read_dir_err(e.into()))?;
        let mut buf = vec![0u8; 512];
        for entry in fs::read_dir(&self.dir).map_err(read_dir_err)? {
            let entry = entry.map_err(read_dir_err)?;
            let name = entry.file_name();
            let Some(ip) = name.to_str().and_then(|n| n.parse::<IpAddr>().ok()) else {
                continue;
            };
            // From the directory entry itself (d_type), no stat needed.
            if !entry.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let Some(data) = read_small(&dir, name.as_os_str(), &mut buf) else {
                continue;
            };
            let Ok(text) = std::str::from_utf8(data) else {
                continue;
            };
            visit(ip.to_canonical(), text.trim());
        }
        Ok(())
    }

    /// Every reservation in the directory (see [`Store::scan`] for which
    /// files count), IPv4 first, in address order.
    pub fn reservations(&self) -> Result<Vec<Reservation>, StoreError> {
        let mut out = Vec::new();
        self.scan(|ip, text| {
            let (container_id, ifname) = split_content(text);
            out.push(Reservation {
                ip,
                container_id: container_id.to_string(),
                ifname: ifname.map(str::to_string),
            });
        })?;
        out.sort_by_key(|r| (r.ip.is_ipv6(), r.ip));
        Ok(out)
    }

    /// Addresses held by (id, ifname), including old-format files holding
    /// only `id` (the reference's `GetByID`).
    pub fn get_by_id(&self, id: &str, ifname: &str) -> Result<Vec<IpAddr>, StoreError> {
        let id = id.trim();
        let mut ips = Vec::new();
        self.scan(|ip, text| {
            let content = split_content(text);
            if content == (id, Some(ifname)) || content == (id, None) {
                ips.push(ip);
            }
        })?;
        ips.sort_by_key(|ip| (ip.is_ipv6(), *ip));
        Ok(ips)
    }

    /// Addresses held by (id, ifname); only when there are none, old-format
    /// files holding only `id` (the reference's `FindByID`/`ReleaseByID`
    /// matching).
    pub fn find_by_id(&self, id: &str, ifname: &str) -> Result<Vec<IpAddr>, StoreError> {
        let id = id.trim();
        let (mut new, mut old) = (Vec::new(), Vec::new());
        self.scan(|ip, text| match split_content(text) {
            (cid, Some(ifn)) if cid == id && ifn == ifname => new.push(ip),
            (cid, None) if cid == id => old.push(ip),
            _ => {}
        })?;
        let mut ips = if new.is_empty() { old } else { new };
        ips.sort_by_key(|ip| (ip.is_ipv6(), *ip));
        Ok(ips)
    }

    /// Releases every address of (id, ifname) (see [`Store::find_by_id`] for
    /// the matching) and returns them. Releasing nothing is success.
    pub fn release_by_id(&self, id: &str, ifname: &str) -> Result<Vec<IpAddr>, StoreError> {
        let ips = self.find_by_id(id, ifname)?;
        self.release(&ips)?;
        Ok(ips)
    }

    /// Removes the reservation files of `ips` (missing ones are fine) and
    /// makes the removal durable, so a crash cannot resurrect a reservation
    /// the runtime was told is gone.
    pub fn release(&self, ips: &[IpAddr]) -> Result<(), StoreError> {
        for ip in ips {
            let path = self.ip_path(*ip);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("failed to remove", &path, e)),
            }
        }
        if !ips.is_empty() {
            self.sync_dir()?;
        }
        Ok(())
    }

    fn sync_dir(&self) -> Result<(), StoreError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| StoreError::io("failed to sync", &self.dir, e))
    }
}

/// A reservation file's trimmed content as (container ID, ifname); the
/// ifname is `None` for the old format holding only the container ID.
fn split_content(text: &str) -> (&str, Option<&str>) {
    match text.split_once(LINE_BREAK) {
        Some((id, ifname)) => (id, Some(ifname)),
        None => (text, None),
    }
}

/// Reads the small file `name` of directory `dir` into `buf` (grown if the
/// file does not fit) and returns its bytes; `None` if it cannot be read.
/// A read that does not fill the buffer has reached the end of a regular
/// file, which saves the usual second `read` that returns 0.
fn read_small<'b>(
    dir: &impl std::os::fd::AsFd,
    name: &std::ffi::OsStr,
    buf: &'b mut Vec<u8>,
) -> Option<&'b [u8]> {
    let fd =
        nix::fcntl::openat(dir, name, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty()).ok()?;
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        match nix::unistd::read(&fd, &mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => {
                len += n;
                if len < buf.len() {
                    break;
                }
            }
            Err(Errno::EINTR) => {}
            Err(_) => return None,
        }
    }
    Some(&buf[..len])
}

impl Reservation {
    /// Whether this is a current-format file of (id, ifname).
    pub fn matches(&self, id: &str, ifname: &str) -> bool {
        self.container_id == id.trim() && self.ifname.as_deref() == Some(ifname)
    }

    /// Whether this is an old-format file (container ID only) of `id`.
    pub fn matches_old(&self, id: &str) -> bool {
        self.ifname.is_none() && self.container_id == id.trim()
    }
}

/// Replaces a small file's content (mode 0644 when created), as Go's
/// `ioutil.WriteFile` does for the reference.
fn write_file(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(path)?;
    f.write_all(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn layout_and_format_match_the_reference() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), "net1").unwrap();
        let dir = tmp.path().join("net1");
        assert_eq!(store.dir(), dir);
        assert!(store.reserve(" c1 ", "eth0", ip("10.0.0.2"), 0).unwrap());
        assert!(store.reserve("c1", "eth1", ip("fd00::2"), 1).unwrap());
        assert_eq!(fs::read(dir.join("10.0.0.2")).unwrap(), b"c1\r\neth0");
        assert_eq!(fs::read(dir.join("fd00::2")).unwrap(), b"c1\r\neth1");
        assert_eq!(
            fs::read(dir.join("last_reserved_ip.0")).unwrap(),
            b"10.0.0.2"
        );
        assert_eq!(
            fs::read(dir.join("last_reserved_ip.1")).unwrap(),
            b"fd00::2"
        );
        let lock = fs::metadata(dir.join("lock")).unwrap();
        assert_eq!(lock.len(), 0);
        assert_eq!(lock.permissions().mode() & 0o700, 0o700);
        assert_eq!(store.last_reserved_ip(0), Some(ip("10.0.0.2")));
        assert_eq!(store.last_reserved_ip(7), None);
    }

    #[test]
    fn reserve_is_exclusive() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), "n").unwrap();
        assert!(store.reserve("a", "eth0", ip("10.0.0.5"), 0).unwrap());
        assert!(!store.reserve("b", "eth0", ip("10.0.0.5"), 0).unwrap());
        assert_eq!(
            fs::read(tmp.path().join("n/10.0.0.5")).unwrap(),
            b"a\r\neth0"
        );
    }

    #[test]
    fn reservations_skip_non_address_files() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), "n").unwrap();
        store.reserve("a", "eth0", ip("10.0.0.5"), 0).unwrap();
        fs::write(store.dir().join("10.0.0.6"), "old-style\n").unwrap();
        fs::write(store.dir().join("garbage"), "a\r\neth0").unwrap();
        fs::create_dir(store.dir().join("10.0.0.7")).unwrap();
        let all = store.reservations().unwrap();
        assert_eq!(
            all,
            vec![
                Reservation {
                    ip: ip("10.0.0.5"),
                    container_id: "a".into(),
                    ifname: Some("eth0".into())
                },
                Reservation {
                    ip: ip("10.0.0.6"),
                    container_id: "old-style".into(),
                    ifname: None
                },
            ]
        );
    }

    #[test]
    fn release_by_id_matches_like_the_reference() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), "n").unwrap();
        store.reserve("a", "eth0", ip("10.0.0.2"), 0).unwrap();
        store.reserve("a", "eth1", ip("10.0.0.3"), 0).unwrap();
        store.reserve("a", "eth0", ip("fd00::2"), 1).unwrap();
        fs::write(store.dir().join("10.0.0.9"), "a").unwrap();
        // get_by_id: both formats.
        let mut got = store.get_by_id("a", "eth0").unwrap();
        got.sort();
        assert_eq!(got, [ip("10.0.0.2"), ip("10.0.0.9"), ip("fd00::2")]);
        // release: current format first; the old file stays.
        assert_eq!(
            store.release_by_id("a", "eth0").unwrap(),
            [ip("10.0.0.2"), ip("fd00::2")]
        );
        assert!(store.dir().join("10.0.0.9").exists());
        assert!(store.dir().join("10.0.0.3").exists());
        assert_eq!(store.release_by_id("a", "eth1").unwrap(), [ip("10.0.0.3")]);
        // Nothing current left: the old-format file goes.
        assert_eq!(store.release_by_id("a", "eth7").unwrap(), [ip("10.0.0.9")]);
        assert!(store.release_by_id("a", "eth0").unwrap().is_empty());
        // The cursor files are untouched.
        assert!(store.dir().join("last_reserved_ip.0").exists());
    }

    #[test]
    fn files_larger_than_the_read_buffer_are_read_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path(), "n").unwrap();
        let long_id = "x".repeat(3000);
        assert!(store.reserve(&long_id, "eth0", ip("10.0.0.2"), 0).unwrap());
        // Surrounding whitespace is trimmed, as the reference does.
        fs::write(store.dir().join("10.0.0.3"), "  b\r\neth0\n").unwrap();
        assert_eq!(store.get_by_id(&long_id, "eth0").unwrap(), [ip("10.0.0.2")]);
        assert_eq!(store.find_by_id("b", "eth0").unwrap(), [ip("10.0.0.3")]);
        assert!(store.find_by_id("b", "eth1").unwrap().is_empty());
        let all = store.reservations().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].container_id, long_id);
    }

    #[test]
    fn lock_excludes_other_holders() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let tmp = tempfile::tempdir().unwrap();
        let held = Arc::new(AtomicBool::new(false));
        let store = Store::open(tmp.path(), "n").unwrap();
        held.store(true, Ordering::SeqCst);
        let (path, h) = (tmp.path().to_path_buf(), held.clone());
        let t = std::thread::spawn(move || {
            let _s = Store::open(&path, "n").unwrap();
            assert!(!h.load(Ordering::SeqCst), "lock taken while held");
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        held.store(false, Ordering::SeqCst);
        drop(store);
        t.join().unwrap();
    }
}
