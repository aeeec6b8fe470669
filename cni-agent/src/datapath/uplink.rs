//! Attaching the uplink programs (SNAT egress, reverse SNAT ingress) through
//! tcx links pinned in bpffs, and keeping the UPLINKS map in step.
//!
//! A tcx link lives as long as a file descriptor or a pin refers to it, so
//! pinned links keep translating while the agent is stopped. On start the
//! agent swaps its freshly loaded program into each existing link
//! (BPF_LINK_UPDATE: atomic, no packet sees an empty hook) instead of
//! detaching and re-attaching, which is what keeps flows alive across a
//! restart or an upgrade.
use std::{fs, net::Ipv4Addr, path::PathBuf};

use aya::{
    maps::{HashMap, MapData},
    programs::{
        links::{FdLink, LinkOrder, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        SchedClassifier,
    },
    Ebpf,
};
use cni_ebpf_common::{map_names, prog_names, UplinkConfig};

use super::{
    loader::{DatapathError, Hook},
    pins::{open_pinned, PinLayout},
};

/// The programs every uplink gets.
pub const UPLINK_PROGRAMS: [(&str, Hook); 2] = [
    (prog_names::SNAT_EGRESS, Hook::Egress),
    (prog_names::SNAT_INGRESS, Hook::Ingress),
];

fn hook_name(h: Hook) -> &'static str {
    match h {
        Hook::Ingress => "ingress",
        Hook::Egress => "egress",
    }
}

/// Where the link of `program` on `ifindex` is pinned.
pub fn link_pin(layout: &PinLayout, ifindex: u32, program: &str, hook: Hook) -> PathBuf {
    layout
        .links_dir()
        .join(format!("{ifindex}-{}-{program}", hook_name(hook)))
}

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> DatapathError {
    move |source| DatapathError::Program { name, source }
}

/// Loads (once) the named TC program of `ebpf`.
pub fn classifier<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier, DatapathError> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?
        .try_into()
        .map_err(prog_err(name))?;
    if prog.fd().is_err() {
        prog.load().map_err(prog_err(name))?;
    }
    Ok(prog)
}

/// Makes sure `name` runs on `ifname`/`ifindex` at `hook` through a pinned
/// tcx link: an existing pinned link gets this program swapped in; otherwise
/// a new link is attached and pinned. Returns true when a link was created.
pub fn ensure_link(
    ebpf: &mut Ebpf,
    layout: &PinLayout,
    name: &'static str,
    hook: Hook,
    ifname: &str,
    ifindex: u32,
) -> Result<bool, DatapathError> {
    let pin = link_pin(layout, ifindex, name, hook);
    let prog = classifier(ebpf, name)?;
    if pin.exists() {
        match PinnedLink::from_pin(&pin) {
            Ok(pinned) => {
                let fd_link: FdLink = pinned.into();
                let link = SchedClassifierLink::try_from(fd_link)
                    .map_err(|e| DatapathError::Link(format!("{}: {e}", pin.display())))?;
                let id = prog.attach_to_link(link).map_err(prog_err(name))?;
                // Release our handle without detaching: the pin keeps it.
                let link = prog.take_link(id).map_err(prog_err(name))?;
                let _fd: FdLink = link
                    .try_into()
                    .map_err(|e| DatapathError::Link(format!("{}: {e}", pin.display())))?;
                return Ok(false);
            }
            Err(e) => {
                // A pin whose link died with its device: replace it.
                log::warn!("stale link pin {}: {e}; re-attaching", pin.display());
                let _ = fs::remove_file(&pin);
            }
        }
    }
    let id = prog
        .attach_with_options(ifname, hook.into(), TcAttachOptions::TcxOrder(LinkOrder::default()))
        .map_err(prog_err(name))?;
    let link = prog.take_link(id).map_err(prog_err(name))?;
    let fd_link: FdLink = link
        .try_into()
        .map_err(|e| DatapathError::Link(format!("{ifname}: {e}")))?;
    fd_link
        .pin(&pin)
        .map_err(|e| DatapathError::Link(format!("pin {}: {e}", pin.display())))?;
    Ok(true)
}

/// Detaches and unpins every uplink link of `ifindex` (the uplink left).
pub fn remove_links(layout: &PinLayout, ifindex: u32) {
    for (name, hook) in UPLINK_PROGRAMS {
        let pin = link_pin(layout, ifindex, name, hook);
        if let Ok(pinned) = PinnedLink::from_pin(&pin) {
            if let Ok(fd_link) = pinned.unpin() {
                use aya::programs::links::Link as _;
                let _ = fd_link.detach();
            }
        }
        let _ = fs::remove_file(&pin);
    }
}

/// The ifindexes that have pinned uplink links.
pub fn pinned_uplinks(layout: &PinLayout) -> Vec<u32> {
    let mut v: Vec<u32> = fs::read_dir(layout.links_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.split('-').next().and_then(|i| i.parse().ok()))
        })
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// The UPLINKS map, opened from its pin.
pub struct UplinkMap(HashMap<MapData, u32, UplinkConfig>);

impl UplinkMap {
    pub fn open(layout: &PinLayout) -> Result<Self, DatapathError> {
        let data = open_pinned(layout, map_names::UPLINKS)?;
        HashMap::try_from(aya::maps::Map::HashMap(data))
            .map(Self)
            .map_err(|source| DatapathError::Map {
                name: map_names::UPLINKS,
                source,
            })
    }

    pub fn set(&mut self, ifindex: u32, addr: Ipv4Addr, ports: (u16, u16)) -> Result<(), DatapathError> {
        let cfg = UplinkConfig {
            addr_v4: u32::from_ne_bytes(addr.octets()),
            addr_v6: [0; 4],
            port_min: ports.0,
            port_max: ports.1,
        };
        if self.0.get(&ifindex, 0).ok() == Some(cfg) {
            return Ok(());
        }
        self.0.insert(ifindex, cfg, 0).map_err(|source| DatapathError::Map {
            name: map_names::UPLINKS,
            source,
        })
    }

    pub fn remove(&mut self, ifindex: u32) {
        let _ = self.0.remove(&ifindex);
    }

    /// (ifindex, address) of every configured uplink.
    pub fn list(&self) -> Vec<(u32, Ipv4Addr)> {
        self.0
            .iter()
            .filter_map(Result::ok)
            .map(|(i, c)| (i, Ipv4Addr::from(c.addr_v4.to_ne_bytes())))
            .collect()
    }
}
