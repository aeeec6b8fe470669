//! Where the socket hooks for node-local hostPort clients attach, and whose
//! sockets they rewrite.
//!
//! By default the hooks go to the root of the cgroup v2 hierarchy, so every
//! process of the node reaches hostPorts on the node's addresses and on
//! 127.0.0.1 without any set-up, as with the reference portmap. The root
//! is the one mounted on the machine (read from mountinfo), or, on a host
//! without a cgroup2 mount, one the agent mounts in a private directory,
//! as other eBPF CNIs do. A hook at the root runs for processes of every
//! network namespace; the programs only act on sockets whose netns cookie
//! is the agent's, written here into SOCK_NETNS.
use std::{
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::maps::{Array, Map};
use cni_ebpf_common::map_names;

use super::{
    loader::DatapathError,
    pins::{open_pinned, PinLayout},
};

/// `SO_NETNS_COOKIE` (Linux 5.14): the cookie of a socket's namespace.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The mount point of the cgroup v2 hierarchy in `mountinfo` text.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        (post.split_whitespace().next()? == "cgroup2")
            .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

/// The cgroup v2 root: the machine's, or one mounted at `private` when
/// none is mounted.
pub fn cgroup2_root(private: &Path) -> Result<PathBuf, DatapathError> {
    let err = |path: &Path, source: io::Error| DatapathError::Cgroup {
        path: path.to_path_buf(),
        source,
    };
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| err(Path::new("/proc/self/mountinfo"), e))?;
    if let Some(root) = cgroup2_mount(&mountinfo) {
        return Ok(root);
    }
    std::fs::create_dir_all(private).map_err(|e| err(private, e))?;
    nix::mount::mount(
        Some("none"),
        private,
        Some("cgroup2"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| err(private, io::Error::from(e)))?;
    log::info!(
        "no cgroup2 mount found: mounted one at {}",
        private.display()
    );
    Ok(private.to_path_buf())
}

/// The netns cookie of the calling thread's network namespace.
pub fn own_netns_cookie() -> io::Result<u64> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    // An unbound socket is enough (and needs no address: lo may be down).
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket, and an out-buffer of the size passed.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Makes the socket hooks act on this namespace's sockets (and no other).
pub fn claim_netns(layout: &PinLayout) -> Result<u64, DatapathError> {
    let cookie = own_netns_cookie().map_err(|source| DatapathError::Cgroup {
        path: PathBuf::from("/proc/self/ns/net"),
        source,
    })?;
    let map_err = |source| DatapathError::Map {
        name: map_names::SOCK_NETNS,
        source,
    };
    let data = open_pinned(layout, map_names::SOCK_NETNS)?;
    let mut arr: Array<_, u64> = Array::try_from(Map::Array(data)).map_err(map_err)?;
    arr.set(0, cookie, 0).map_err(map_err)?;
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount() {
        let hybrid = "24 23 0:21 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755\n\
                      25 24 0:22 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount("24 23 0:21 / /sys rw - sysfs sysfs rw\n"),
            None
        );
    }

    #[test]
    fn the_netns_cookie_is_stable() {
        let a = own_netns_cookie().unwrap();
        assert_ne!(a, 0);
        assert_eq!(own_netns_cookie().unwrap(), a);
    }
}
