//! Pinned bpf links: how programs stay attached while no agent runs, and
//! how a new agent takes them over.
//!
//! Every link the datapath creates is pinned as
//! `links/<target>-<hook>-<program>` (`<target>` is an ifindex, or
//! `cg<inode>` for a cgroup). On start the agent swaps its freshly loaded
//! program into every pinned link with BPF_LINK_UPDATE — atomic, no packet
//! ever meets an empty hook — which is what keeps flows alive across a
//! restart or an upgrade. Links whose device or cgroup is gone are unpinned.
use std::{
    fs,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        cgroup_sock_addr::CgroupSockAddr,
        links::{CgroupAttachMode, FdLink, LinkOrder, PinnedLink},
        tc::TcAttachOptions,
        xdp::XdpMode,
        Program, SchedClassifier, Xdp,
    },
    Ebpf,
};

use super::{
    loader::{DatapathError, Hook},
    pins::PinLayout,
    sys,
};

fn hook_name(h: Hook) -> &'static str {
    match h {
        Hook::Ingress => "ingress",
        Hook::Egress => "egress",
        Hook::Xdp => "xdp",
        Hook::Connect4 => "connect4",
        Hook::Sendmsg4 => "sendmsg4",
        Hook::Recvmsg4 => "recvmsg4",
        Hook::Getpeername4 => "getpeername4",
        Hook::Connect6 => "connect6",
        Hook::Sendmsg6 => "sendmsg6",
        Hook::Recvmsg6 => "recvmsg6",
        Hook::Getpeername6 => "getpeername6",
    }
}

/// Where the link of `program` on `target` at `hook` is pinned.
pub fn link_pin(layout: &PinLayout, target: &str, program: &str, hook: Hook) -> PathBuf {
    layout
        .links_dir()
        .join(format!("{target}-{}-{program}", hook_name(hook)))
}

fn prog_err(name: &str) -> impl FnOnce(aya::programs::ProgramError) -> DatapathError + '_ {
    move |source| DatapathError::Program {
        name: name.to_string(),
        source,
    }
}

/// Loads every program of the object and pins it under `progs/`, replacing
/// the pins of a previous agent, so other processes (and later requests)
/// attach the programs of this build.
pub fn load_and_pin_programs(ebpf: &mut Ebpf, layout: &PinLayout) -> Result<(), DatapathError> {
    let names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_string()).collect();
    for name in names {
        let Some(prog) = ebpf.program_mut(&name) else {
            continue;
        };
        match prog {
            Program::SchedClassifier(p) => p.load().map_err(prog_err(&name))?,
            Program::Xdp(p) => p.load().map_err(prog_err(&name))?,
            Program::CgroupSockAddr(p) => p.load().map_err(prog_err(&name))?,
            _ => continue,
        }
        let path = layout.progs_dir().join(&name);
        let _ = fs::remove_file(&path);
        prog.pin(&path)
            .map_err(|source| DatapathError::Pin { path, source })?;
    }
    Ok(())
}

fn prog_fd<'a>(ebpf: &'a Ebpf, name: &str) -> Option<BorrowedFd<'a>> {
    let fd = match ebpf.program(name)? {
        Program::SchedClassifier(p) => p.fd().ok()?,
        Program::Xdp(p) => p.fd().ok()?,
        Program::CgroupSockAddr(p) => p.fd().ok()?,
        _ => return None,
    };
    Some(fd.as_fd())
}

/// BPF_LINK_UPDATE: replace the program of a link in place.
fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> std::io::Result<()> {
    const BPF_LINK_UPDATE: libc::c_long = 29;
    #[repr(C)]
    struct LinkUpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix for this command; the fds
    // are borrowed for the call.
    unsafe { sys::bpf(BPF_LINK_UPDATE, &mut attr) }.map(drop)
}

/// BPF_OBJ_GET: open a pinned object.
fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    const BPF_OBJ_GET: libc::c_long = 7;
    #[repr(C)]
    struct ObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix for BPF_OBJ_GET and `c`
    // outlives the call.
    let r = unsafe { sys::bpf(BPF_OBJ_GET, &mut attr) }?;
    // SAFETY: the kernel returned a new fd we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// Swaps this agent's programs into every pinned link (and drops pins of
/// links that died with their device). Returns how many were taken over.
pub fn take_over(ebpf: &Ebpf, layout: &PinLayout) -> usize {
    let mut n = 0;
    for ent in fs::read_dir(layout.links_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let path = ent.path();
        let name = ent.file_name().to_string_lossy().into_owned();
        let Some(program) = name.splitn(3, '-').nth(2) else {
            continue;
        };
        let link = match obj_get(&path) {
            Ok(fd) => fd,
            Err(e) => {
                log::warn!("link pin {}: {e}; removing it", path.display());
                let _ = fs::remove_file(&path);
                continue;
            }
        };
        let target = name.split('-').next().unwrap_or_default();
        if target.parse::<u32>().is_ok_and(|i| !ifindex_exists(i)) {
            log::info!("link {name}: its device or cgroup is gone; unpinning");
            let _ = fs::remove_file(&path);
            continue;
        }
        match prog_fd(ebpf, program) {
            Some(fd) => match link_update(link.as_fd(), fd) {
                Ok(()) => n += 1,
                Err(e) => log::warn!("link {name}: cannot swap in the new program: {e}"),
            },
            None => log::warn!("link {name}: this build has no program {program}; leaving it"),
        }
    }
    n
}

/// Whether a device with this index exists in our network namespace (a
/// link pinned for a device that was deleted is defunct).
pub fn ifindex_exists(index: u32) -> bool {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes as the call requires.
    !unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) }.is_null()
}

/// Where a new tcx link goes in the device's list of programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// After what is there: for programs whose order among themselves
    /// matters (the uplink's, attached in their order).
    Last,
    /// Before what is there: for enforcement (policy, rate limits), which a
    /// foreign program returning "pass" ahead of it must not bypass.
    First,
}

/// Makes sure the TC program runs on `ifname` at `hook` through a pinned
/// tcx link placed as `placement` says. Returns true when created.
pub fn ensure_tc(
    prog: &mut SchedClassifier,
    layout: &PinLayout,
    name: &str,
    hook: Hook,
    (ifname, ifindex): (&str, u32),
    placement: Placement,
) -> Result<bool, DatapathError> {
    let pin = link_pin(layout, &ifindex.to_string(), name, hook);
    if pin.exists() {
        return Ok(false);
    }
    let attach = match hook {
        Hook::Ingress => aya::programs::TcAttachType::Ingress,
        Hook::Egress => aya::programs::TcAttachType::Egress,
        _ => {
            return Err(DatapathError::NotTcHook {
                name: name.to_string(),
                hook,
            })
        }
    };
    let order = match placement {
        Placement::Last => LinkOrder::default(),
        Placement::First => LinkOrder::first(),
    };
    let id = prog
        .attach_with_options(ifname, attach, TcAttachOptions::TcxOrder(order))
        .map_err(prog_err(name))?;
    let link = prog.take_link(id).map_err(prog_err(name))?;
    let fd_link: FdLink = link.try_into().map_err(|source| DatapathError::FdLink {
        target: ifname.to_string(),
        source,
    })?;
    pin_link(fd_link, &pin)?;
    Ok(true)
}

/// Same for the XDP program on `ifname` (native mode where the driver has
/// it, generic otherwise).
pub fn ensure_xdp(
    prog: &mut Xdp,
    layout: &PinLayout,
    name: &str,
    ifname: &str,
    ifindex: u32,
) -> Result<bool, DatapathError> {
    let pin = link_pin(layout, &ifindex.to_string(), name, Hook::Xdp);
    if pin.exists() {
        return Ok(false);
    }
    let id = match prog.attach(ifname, XdpMode::Driver) {
        Ok(id) => id,
        Err(e) => {
            log::info!("{ifname}: native XDP unavailable ({e}); using generic XDP");
            prog.attach(ifname, XdpMode::Skb).map_err(prog_err(name))?
        }
    };
    let link = prog.take_link(id).map_err(prog_err(name))?;
    let fd_link: FdLink = link.try_into().map_err(|source| DatapathError::FdLink {
        target: ifname.to_string(),
        source,
    })?;
    pin_link(fd_link, &pin)?;
    Ok(true)
}

/// Same for a cgroup sock_addr program on the cgroup directory `cgroup`.
pub fn ensure_cgroup(
    prog: &mut CgroupSockAddr,
    layout: &PinLayout,
    name: &str,
    hook: Hook,
    cgroup: &Path,
) -> Result<bool, DatapathError> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(cgroup).map_err(|source| DatapathError::Cgroup {
        path: cgroup.to_path_buf(),
        source,
    })?;
    let pin = link_pin(layout, &format!("cg{}", meta.ino()), name, hook);
    if pin.exists() {
        return Ok(false);
    }
    let dir = fs::File::open(cgroup).map_err(|source| DatapathError::Cgroup {
        path: cgroup.to_path_buf(),
        source,
    })?;
    // Through bpf_link_create, a cgroup link always coexists with other
    // programs; the kernel wants no multi-attach flag for it.
    let id = prog
        .attach(&dir, CgroupAttachMode::Single)
        .map_err(prog_err(name))?;
    let link = prog.take_link(id).map_err(prog_err(name))?;
    let fd_link: FdLink = link.try_into().map_err(|source| DatapathError::FdLink {
        target: cgroup.display().to_string(),
        source,
    })?;
    pin_link(fd_link, &pin)?;
    Ok(true)
}

fn pin_link(link: FdLink, pin: &Path) -> Result<(), DatapathError> {
    link.pin(pin)
        .map(drop)
        .map_err(|source| DatapathError::Pin {
            path: pin.to_path_buf(),
            source,
        })
}

/// Detaches and unpins the links of `programs` (all if empty) on `target`
/// (an ifindex as text).
pub fn remove_links(layout: &PinLayout, target: &str, programs: &[&str]) {
    let prefix = format!("{target}-");
    for ent in fs::read_dir(layout.links_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = ent.file_name().to_string_lossy().into_owned();
        let program = name.splitn(3, '-').nth(2).unwrap_or_default();
        if !name.starts_with(&prefix) || !(programs.is_empty() || programs.contains(&program)) {
            continue;
        }
        let path = ent.path();
        if let Ok(pinned) = PinnedLink::from_pin(&path) {
            if let Ok(fd_link) = pinned.unpin() {
                use aya::programs::links::Link as _;
                let _ = fd_link.detach();
            }
        }
        let _ = fs::remove_file(&path);
    }
}

/// Drops the pin of one link, named exactly: no walk of `links/`, which
/// holds a few pins per pod. The pin is the link's last reference once no
/// agent holds it open, so the kernel detaches it (after an RCU grace
/// period, on its own workqueue rather than in the caller's DEL). A pin
/// already gone is fine.
pub fn unpin_link(layout: &PinLayout, target: &str, program: &str, hook: Hook) {
    let path = link_pin(layout, target, program, hook);
    if let Err(e) = fs::remove_file(&path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("unpinning {}: {e}", path.display());
        }
    }
}

/// The ifindexes that have pinned links for any of `programs` (any
/// program if empty).
pub fn pinned_ifindexes(layout: &PinLayout, programs: &[&str]) -> Vec<u32> {
    let mut v: Vec<u32> = fs::read_dir(layout.links_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let mut parts = name.splitn(3, '-');
            let index = parts.next()?.parse().ok()?;
            let prog = parts.nth(1)?;
            (programs.is_empty() || programs.contains(&prog)).then_some(index)
        })
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}
