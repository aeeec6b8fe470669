//! ebpf-host-local: the host-local IPAM plugin, a drop-in for the reference
//! `host-local` (same configuration, same on-disk store, same allocation
//! order and messages), with STATUS and GC added.
//!
//! Every verb holds the network's store lock for its whole duration (the
//! reference locks per range set), so an ADD allocating from several range
//! sets is atomic with respect to other ADDs, DELs and GCs, ours or the
//! reference's.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use nix::unistd::{access, AccessFlags};

use crate::ipam::allocator::{AllocError, Allocator};
use crate::ipam::config::{self, ConfigError, ConfigInput, IpamConfig};
use crate::ipam::range::RangeSet;
use crate::ipam::resolv_conf;
use crate::ipam::store::{Store, StoreError};
use crate::spec::error::{CniError, ErrorCode};
use crate::spec::result::{CniResult, Dns, IpConfig, Route};
use crate::spec::{CmdArgs, NetConf, Plugin};

/// Failures of a host-local verb.
#[derive(Debug, thiserror::Error)]
pub enum HostLocalError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Wording of the reference, which prefixes allocator errors this way.
    #[error("failed to allocate for range {index}: {source}")]
    Allocate { index: usize, source: AllocError },
    #[error("failed to allocate all requested IPs: {}", join_ips(.0))]
    RequestedNotAllocated(Vec<IpAddr>),
    #[error("resolvConf {path:?}: {source}")]
    ResolvConf { path: PathBuf, source: io::Error },
    /// CHECK: (container, ifname) holds nothing in a range set. The prefix
    /// is the reference's message.
    #[error("host-local: Failed to find address added by container {id} (ifname {ifname}) in range set {set}")]
    NotFound {
        id: String,
        ifname: String,
        set: String,
    },
    /// CHECK: prevResult lists an address of this network that the store
    /// does not hold for (container, ifname).
    #[error("host-local: address {ip} in prevResult is not reserved for container {id} (ifname {ifname})")]
    NotReserved {
        ip: IpAddr,
        id: String,
        ifname: String,
    },
    /// STATUS: ADD would fail because the store cannot be written.
    #[error("dataDir {path:?} is not usable: {reason}")]
    DataDirUnusable { path: PathBuf, reason: String },
    /// STATUS: ADD would fail because a range set is full.
    #[error("no IP addresses available in range set: {set}")]
    Exhausted { set: String },
}

impl From<HostLocalError> for CniError {
    fn from(e: HostLocalError) -> CniError {
        match e {
            HostLocalError::Config(e) => e.into(),
            HostLocalError::Store(e) => e.into(),
            HostLocalError::Allocate { index, source } => {
                CniError::from(source).context(format!("failed to allocate for range {index}"))
            }
            e @ HostLocalError::ResolvConf { .. } => CniError::new(ErrorCode::Io, e.to_string()),
            e @ (HostLocalError::DataDirUnusable { .. } | HostLocalError::Exhausted { .. }) => {
                CniError::new(ErrorCode::PluginNotAvailable, e.to_string())
            }
            e @ (HostLocalError::RequestedNotAllocated(_)
            | HostLocalError::NotFound { .. }
            | HostLocalError::NotReserved { .. }) => {
                CniError::new(ErrorCode::Internal, e.to_string())
            }
        }
    }
}

fn join_ips(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The ebpf-host-local plugin.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostLocal;

/// The parts of the invocation the IPAM configuration is read from.
fn config_input<'a>(args: &'a CmdArgs, conf: &'a NetConf) -> ConfigInput<'a> {
    ConfigInput {
        name: &conf.name,
        cni_version: &conf.cni_version,
        ipam: conf.ipam.as_ref().map(|s| &s.raw),
        runtime_config: &conf.runtime_config,
        args: &conf.args,
        cni_args: &args.args,
    }
}

impl HostLocal {
    fn cmd_add(&self, args: &CmdArgs, conf: &NetConf) -> Result<CniResult, HostLocalError> {
        let cfg = IpamConfig::parse(&config_input(args, conf))?;
        let dns = match &cfg.resolv_conf {
            Some(path) => {
                let rc = resolv_conf::read(path).map_err(|source| HostLocalError::ResolvConf {
                    path: path.clone(),
                    source,
                })?;
                Dns {
                    nameservers: rc.nameservers,
                    domain: rc.domain,
                    search: rc.search,
                    options: rc.options,
                }
            }
            None => Dns::default(),
        };

        let store = Store::open(&cfg.data_dir, &cfg.name)?;

        // Duplicates collapse, as in the reference's map of requested IPs.
        let mut requested: Vec<IpAddr> = Vec::new();
        for ip in &cfg.requested_ips {
            if !requested.contains(ip) {
                requested.push(*ip);
            }
        }

        let mut ips = Vec::new();
        let mut reserved = Vec::new();
        for (index, set) in cfg.ranges.iter().enumerate() {
            // The first requested address inside this set, if any.
            let wanted = requested
                .iter()
                .position(|ip| set.contains(*ip))
                .map(|i| requested.remove(i));
            match Allocator::new(set, &store, index).get(&args.container_id, &args.ifname, wanted) {
                Ok(a) => {
                    reserved.push(a.address.addr());
                    ips.push(IpConfig {
                        address: a.address,
                        gateway: Some(a.gateway),
                        interface: None,
                    });
                }
                Err(source) => {
                    release_quietly(&store, &reserved);
                    return Err(HostLocalError::Allocate { index, source });
                }
            }
        }
        if !requested.is_empty() {
            release_quietly(&store, &reserved);
            return Err(HostLocalError::RequestedNotAllocated(requested));
        }

        Ok(CniResult {
            cni_version: conf.cni_version.clone(),
            interfaces: Vec::new(),
            ips,
            routes: cfg
                .routes
                .iter()
                .map(|r| Route::new(r.dst, r.gw))
                .collect(),
            dns,
        })
    }

    /// Releases every address of (container, ifname) in this network. Only
    /// the store location is read from the config, so a DEL still cleans up
    /// after the ranges were edited; DEL without a prior ADD succeeds.
    fn cmd_del(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), HostLocalError> {
        let (name, data_dir) = config::store_location(&config_input(args, conf))?;
        let store = Store::open(&data_dir, &name)?;
        store.release_by_id(&args.container_id, &args.ifname)?;
        Ok(())
    }

    /// Stricter than the reference (which is satisfied by any one address of
    /// the container): every range set must hold an address of
    /// (container, ifname), and every address of prevResult that falls in
    /// one of our range sets must be reserved for it.
    fn cmd_check(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        let cfg = IpamConfig::parse(&config_input(args, conf))?;
        let prev = conf.prev_result()?;
        let store = Store::open(&cfg.data_dir, &cfg.name).map_err(HostLocalError::from)?;
        let held = store
            .find_by_id(&args.container_id, &args.ifname)
            .map_err(HostLocalError::from)?;
        for set in &cfg.ranges {
            if !held.iter().any(|ip| set.contains(*ip)) {
                return Err(HostLocalError::NotFound {
                    id: args.container_id.clone(),
                    ifname: args.ifname.clone(),
                    set: set.to_string(),
                }
                .into());
            }
        }
        for ip in prev.iter().flat_map(|r| r.ips.iter()) {
            let addr = ip.address.addr();
            if cfg.ranges.iter().any(|s| s.contains(addr)) && !held.contains(&addr) {
                return Err(HostLocalError::NotReserved {
                    ip: addr,
                    id: args.container_id.clone(),
                    ifname: args.ifname.clone(),
                }
                .into());
            }
        }
        Ok(())
    }

    /// Ready when the config is valid, the store can be written and every
    /// range set still has a free address (otherwise ADD would fail): code 50
    /// if not. Creates nothing.
    fn cmd_status(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), HostLocalError> {
        let cfg = IpamConfig::parse(&config_input(args, conf))?;
        let net_dir = cfg.data_dir.join(&cfg.name);
        check_writable(&net_dir)?;
        if !net_dir.is_dir() {
            return Ok(());
        }
        let store = Store::open(&cfg.data_dir, &cfg.name)?;
        let reservations = store.reservations()?;
        for set in &cfg.ranges {
            let used = reservations
                .iter()
                .filter(|r| allocatable_in(set, r.ip))
                .count() as u128;
            if used >= set.capacity() {
                return Err(HostLocalError::Exhausted {
                    set: set.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Releases every reservation of this network whose (container, ifname)
    /// is not in `cni.dev/valid-attachments`. Old-format reservations
    /// (container ID only) stay while any attachment of that container is
    /// valid. Without an attachment list nothing is collected.
    fn cmd_gc(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        let Some(valid) = conf.try_valid_attachments()? else {
            return Ok(());
        };
        let (name, data_dir) = config::store_location(&config_input(args, conf))?;
        if !data_dir.join(&name).is_dir() {
            return Ok(());
        }
        let store = Store::open(&data_dir, &name).map_err(HostLocalError::from)?;
        let stale: Vec<IpAddr> = store
            .reservations()
            .map_err(HostLocalError::from)?
            .into_iter()
            .filter(|r| {
                !valid.iter().any(|a| match &r.ifname {
                    Some(ifname) => a.container_id == r.container_id && &a.ifname == ifname,
                    None => a.container_id == r.container_id,
                })
            })
            .map(|r| r.ip)
            .collect();
        for ip in &stale {
            log::info!("gc: releasing {ip} of network {name}");
        }
        store.release(&stale).map_err(HostLocalError::from)?;
        Ok(())
    }
}

impl Plugin for HostLocal {
    fn add(&self, args: &CmdArgs, conf: &NetConf) -> Result<CniResult, CniError> {
        Ok(self.cmd_add(args, conf)?)
    }

    fn del(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        Ok(self.cmd_del(args, conf)?)
    }

    fn check(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        self.cmd_check(args, conf)
    }

    fn status(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        Ok(self.cmd_status(args, conf)?)
    }

    fn gc(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        self.cmd_gc(args, conf)
    }

    fn about(&self) -> &'static str {
        concat!(
            "CNI ebpf-host-local plugin (host-local compatible IPAM) version ",
            env!("CARGO_PKG_VERSION")
        )
    }
}

/// Undoes this ADD's reservations after a later range set failed. Only what
/// this ADD reserved is released (the reference releases everything of the
/// container, including addresses of an earlier ADD). Errors are logged:
/// the original failure is what the runtime must see.
fn release_quietly(store: &Store, ips: &[IpAddr]) {
    if let Err(e) = store.release(ips) {
        log::warn!("failed to roll back reservations {ips:?}: {e}");
    }
}

/// Whether `ip` is an address of `set` the allocator could hand out.
fn allocatable_in(set: &RangeSet, ip: IpAddr) -> bool {
    set.range_for(ip)
        .is_some_and(|r| !r.is_reserved_address(ip))
}

/// The store directory, or the closest ancestor that exists (the store
/// creates the rest), must be a writable directory.
fn check_writable(net_dir: &Path) -> Result<(), HostLocalError> {
    let unusable = |reason: String| HostLocalError::DataDirUnusable {
        path: net_dir.to_path_buf(),
        reason,
    };
    let mut dir = net_dir;
    loop {
        match std::fs::metadata(dir) {
            Ok(md) if md.is_dir() => break,
            Ok(_) => return Err(unusable(format!("{dir:?} is not a directory"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => match dir.parent() {
                Some(parent) if parent.as_os_str().is_empty() => dir = Path::new("."),
                Some(parent) => dir = parent,
                None => return Err(unusable("no existing ancestor".into())),
            },
            Err(e) => return Err(unusable(format!("{dir:?}: {e}"))),
        }
    }
    access(dir, AccessFlags::W_OK | AccessFlags::X_OK)
        .map_err(|e| unusable(format!("{dir:?} is not writable: {e}")))
}
