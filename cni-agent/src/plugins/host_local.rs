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
        // What (container, ifname) already holds, read once for all sets
        // that allocate round-robin (a requested address skips the check).
        let mut held: Option<Vec<IpAddr>> = None;
        for (index, set) in cfg.ranges.iter().enumerate() {
            // The first requested address inside this set, if any.
            let wanted = requested
                .iter()
                .position(|ip| set.contains(*ip))
                .map(|i| requested.remove(i));
            let allocator = Allocator::new(set, &store, index);
            let allocated = match wanted {
                Some(_) => allocator.get(&args.container_id, &args.ifname, wanted),
                None => match &held {
                    Some(held) => allocator.get_next(&args.container_id, &args.ifname, held),
                    None => match store.get_by_id(&args.container_id, &args.ifname) {
                        Ok(found) => {
                            allocator.get_next(&args.container_id, &args.ifname, held.insert(found))
                        }
                        Err(e) => Err(e.into()),
                    },
                },
            };
            match allocated {
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
            routes: cfg.routes.iter().map(|r| Route::new(r.dst, r.gw)).collect(),
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
            // ENOTDIR: some ancestor is a file; walking up reports which.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.kind() == io::ErrorKind::NotADirectory =>
            {
                match dir.parent() {
                    Some(parent) if parent.as_os_str().is_empty() => dir = Path::new("."),
                    Some(parent) => dir = parent,
                    None => return Err(unusable("no existing ancestor".into())),
                }
            }
            Err(e) => return Err(unusable(format!("{dir:?}: {e}"))),
        }
    }
    access(dir, AccessFlags::W_OK | AccessFlags::X_OK)
        .map_err(|e| unusable(format!("{dir:?} is not writable: {e}")))
}

#[cfg(test)]
mod tests {
    //! Verb tests through the spec layer's dispatcher, and differential
    //! tests against the reference host-local (skipped when it is not
    //! installed at /usr/lib/cni/host-local).

    use super::*;
    use serde_json::{json, Value};
    use std::collections::BTreeMap;
    use std::fs;
    use std::process::{Command, Stdio};

    const REFERENCE: &str = "/usr/lib/cni/host-local";

    #[derive(Debug, Clone, PartialEq)]
    struct Out {
        ok: bool,
        json: Value,
    }

    impl Out {
        fn ips(&self) -> Vec<String> {
            assert!(self.ok, "expected success, got {}", self.json);
            self.json["ips"]
                .as_array()
                .unwrap()
                .iter()
                .map(|ip| ip["address"].as_str().unwrap().to_string())
                .collect()
        }

        fn err(&self) -> (u64, String) {
            assert!(!self.ok, "expected failure, got {}", self.json);
            (
                self.json["code"].as_u64().unwrap(),
                self.json["msg"].as_str().unwrap().to_string(),
            )
        }
    }

    fn env(cmd: &str, id: &str, ifname: &str, cni_args: &str) -> Vec<(String, String)> {
        let mut v = vec![
            ("CNI_COMMAND", cmd),
            ("CNI_NETNS", "/nonexistent/netns"),
            ("CNI_PATH", "/usr/lib/cni"),
        ];
        if !id.is_empty() {
            v.push(("CNI_CONTAINERID", id));
            v.push(("CNI_IFNAME", ifname));
        }
        if !cni_args.is_empty() {
            v.push(("CNI_ARGS", cni_args));
        }
        v.into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn parse_out(ok: bool, stdout: &[u8]) -> Out {
        let json = if stdout.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(stdout).unwrap()
        };
        Out { ok, json }
    }

    fn ours(cmd: &str, id: &str, ifname: &str, conf: &Value, cni_args: &str) -> Out {
        let vars: BTreeMap<String, String> = env(cmd, id, ifname, cni_args).into_iter().collect();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = crate::spec::skel::run_with(
            &HostLocal,
            |k| vars.get(k).cloned(),
            serde_json::to_vec(conf).unwrap(),
            &mut out,
            &mut err,
        );
        parse_out(code == 0, &out)
    }

    fn reference_available() -> bool {
        let ok = std::path::Path::new(REFERENCE).exists();
        if !ok {
            eprintln!("{REFERENCE} not installed: skipping the differential part");
        }
        ok
    }

    fn reference(cmd: &str, id: &str, ifname: &str, conf: &Value, cni_args: &str) -> Out {
        use std::io::Write;
        let mut child = Command::new(REFERENCE)
            .env_clear()
            .envs(env(cmd, id, ifname, cni_args))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&serde_json::to_vec(conf).unwrap())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        parse_out(out.status.success(), &out.stdout)
    }

    fn conf(version: &str, data_dir: &std::path::Path, ipam: Value) -> Value {
        let mut ipam = ipam;
        ipam["type"] = json!("host-local");
        ipam["dataDir"] = json!(data_dir);
        json!({"cniVersion": version, "name": "net1", "type": "bridge", "ipam": ipam})
    }

    /// File name -> content of a network's store, without the lock.
    fn store_files(data_dir: &std::path::Path) -> BTreeMap<String, Vec<u8>> {
        fs::read_dir(data_dir.join("net1"))
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name() != "lock")
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    fs::read(e.path()).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn add_result_shape() {
        let tmp = tempfile::tempdir().unwrap();
        let resolv = tmp.path().join("resolv.conf");
        fs::write(
            &resolv,
            "nameserver 10.0.0.53\nsearch a.example\noptions ndots:2\n",
        )
        .unwrap();
        let c = conf(
            "1.1.0",
            tmp.path(),
            json!({
                "ranges": [[{"subnet": "10.0.0.0/24"}], [{"subnet": "fd00::/64"}]],
                "routes": [{"dst": "0.0.0.0/0"}, {"dst": "192.168.0.0/16", "gw": "10.0.0.254"}],
                "resolvConf": resolv,
            }),
        );
        let out = ours("ADD", "c1", "eth0", &c, "");
        assert!(out.ok, "{}", out.json);
        assert_eq!(
            out.json,
            json!({
                "cniVersion": "1.1.0",
                "ips": [
                    {"address": "10.0.0.2/24", "gateway": "10.0.0.1"},
                    {"address": "fd00::2/64", "gateway": "fd00::1"}
                ],
                "routes": [{"dst": "0.0.0.0/0"}, {"dst": "192.168.0.0/16", "gw": "10.0.0.254"}],
                "dns": {"nameservers": ["10.0.0.53"], "search": ["a.example"], "options": ["ndots:2"]}
            })
        );
        // An old version gets the old layout.
        let old = conf("0.2.0", tmp.path(), json!({"subnet": "10.9.0.0/24"}));
        let out = ours("ADD", "c2", "eth0", &old, "");
        assert_eq!(out.json["ip4"]["ip"], "10.9.0.2/24");
    }

    #[test]
    fn config_errors_are_code_7_and_args_errors_code_4() {
        let tmp = tempfile::tempdir().unwrap();
        let c = conf(
            "1.0.0",
            tmp.path(),
            json!({"ranges": [[{"subnet": "10.0.0.0/33"}]]}),
        );
        assert_eq!(
            ours("ADD", "c1", "eth0", &c, "").err(),
            (
                7,
                r#"ipam.ranges[0][0].subnet: invalid CIDR "10.0.0.0/33""#.to_string()
            )
        );
        let c = conf("1.0.0", tmp.path(), json!({"subnet": "10.0.0.0/24"}));
        assert_eq!(ours("ADD", "c1", "eth0", &c, "FOO=bar").err().0, 4);
        let missing_resolv = conf(
            "1.0.0",
            tmp.path(),
            json!({"subnet": "10.0.0.0/24", "resolvConf": "/nonexistent/resolv.conf"}),
        );
        assert_eq!(ours("ADD", "c1", "eth0", &missing_resolv, "").err().0, 5);
        // Nothing was reserved by the failed ADDs.
        assert!(!tmp.path().join("net1/10.0.0.2").exists());
    }

    #[test]
    fn requested_ips_and_rollback() {
        let tmp = tempfile::tempdir().unwrap();
        let c = conf(
            "1.0.0",
            tmp.path(),
            json!({"ranges": [[{"subnet": "10.0.0.0/24"}], [{"subnet": "10.1.0.0/24"}]]}),
        );
        let out = ours(
            "ADD",
            "c1",
            "eth0",
            &c,
            "IgnoreUnknown=1;K8S_POD_NAME=x;IP=10.1.0.9",
        );
        assert_eq!(out.ips(), ["10.0.0.2/24", "10.1.0.9/24"]);
        // An address outside every set: everything of this ADD is undone.
        let out = ours("ADD", "c2", "eth0", &c, "IP=10.7.0.9");
        assert_eq!(
            out.err(),
            (
                999,
                "failed to allocate all requested IPs: 10.7.0.9".to_string()
            )
        );
        // A failure in the second set undoes the first set's reservation.
        let out = ours("ADD", "c3", "eth0", &c, "IP=10.1.0.9");
        assert_eq!(
            out.err(),
            (
                999,
                "failed to allocate for range 1: requested IP address 10.1.0.9 is not available in range set 10.1.0.1-10.1.0.254"
                    .to_string()
            )
        );
        let files = store_files(tmp.path());
        let ips: Vec<&String> = files.keys().filter(|k| !k.starts_with("last")).collect();
        assert_eq!(ips, ["10.0.0.2", "10.1.0.9"]);
    }

    #[test]
    fn del_check_status_gc() {
        let tmp = tempfile::tempdir().unwrap();
        let c = conf(
            "1.1.0",
            tmp.path(),
            json!({"ranges": [[{"subnet": "10.0.0.0/29"}], [{"subnet": "fd00::/125"}]]}),
        );
        // DEL and CHECK before any ADD.
        assert!(ours("DEL", "c1", "eth0", &c, "").ok);
        let (code, msg) = ours("CHECK", "c1", "eth0", &c, "").err();
        assert_eq!(code, 999);
        assert!(msg.starts_with("host-local: Failed to find address added by container c1"));
        assert!(ours("STATUS", "", "", &c, "").ok);

        for id in ["a", "b", "c", "d", "e"] {
            assert!(ours("ADD", id, "eth0", &c, "").ok);
        }
        assert!(ours("CHECK", "a", "eth0", &c, "").ok);
        // prevResult naming an address that is not ours.
        let mut with_prev = c.clone();
        with_prev["prevResult"] =
            json!({"cniVersion": "1.1.0", "ips": [{"address": "10.0.0.6/29"}]});
        let (_, msg) = ours("CHECK", "a", "eth0", &with_prev, "").err();
        assert_eq!(msg, "host-local: address 10.0.0.6 in prevResult is not reserved for container a (ifname eth0)");
        with_prev["prevResult"]["ips"][0]["address"] = json!("10.0.0.2/29");
        assert!(ours("CHECK", "a", "eth0", &with_prev, "").ok);
        // A missing reservation in one set.
        fs::remove_file(tmp.path().join("net1/fd00::2")).unwrap();
        let (_, msg) = ours("CHECK", "a", "eth0", &c, "").err();
        assert!(msg.ends_with("in range set fd00::1-fd00::7"), "{msg}");

        // /29 has 5 addresses: STATUS reports exhaustion with code 50.
        assert_eq!(
            ours("STATUS", "", "", &c, "").err(),
            (
                50,
                "no IP addresses available in range set: 10.0.0.1-10.0.0.6".to_string()
            )
        );
        assert_eq!(
            ours("ADD", "f", "eth0", &c, "").err(),
            (999, "failed to allocate for range 0: no IP addresses available in range set: 10.0.0.1-10.0.0.6".to_string())
        );

        // DEL twice.
        assert!(ours("DEL", "b", "eth0", &c, "").ok);
        assert!(ours("DEL", "b", "eth0", &c, "").ok);
        assert!(ours("STATUS", "", "", &c, "").ok);

        // GC keeps only valid attachments (and old-format files of a valid
        // container); the cursor files stay.
        fs::write(tmp.path().join("net1/10.0.0.3"), "a").unwrap();
        fs::write(tmp.path().join("net1/fd00::7"), "zzz").unwrap();
        let mut gc = c.clone();
        gc["cni.dev/valid-attachments"] =
            json!([{"containerID": "a", "ifname": "eth0"}, {"containerID": "d", "ifname": "eth9"}]);
        assert!(ours("GC", "", "", &gc, "").ok);
        let left: Vec<String> = store_files(tmp.path()).into_keys().collect();
        assert_eq!(
            left,
            [
                "10.0.0.2",
                "10.0.0.3",
                "last_reserved_ip.0",
                "last_reserved_ip.1"
            ]
        );
        // No list: nothing collected.
        assert!(ours("GC", "", "", &c, "").ok);
        assert_eq!(store_files(tmp.path()).len(), 4);
    }

    #[test]
    fn status_reports_an_unusable_data_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("not-a-dir");
        fs::write(&file, "").unwrap();
        let c = conf("1.1.0", &file, json!({"subnet": "10.0.0.0/24"}));
        let (code, msg) = ours("STATUS", "", "", &c, "").err();
        assert_eq!(code, 50);
        assert!(msg.contains("is not a directory"), "{msg}");
        // A dataDir that does not exist yet is fine: ADD creates it.
        let c = conf(
            "1.1.0",
            &tmp.path().join("a/b"),
            json!({"subnet": "10.0.0.0/24"}),
        );
        assert!(ours("STATUS", "", "", &c, "").ok);
        assert!(!tmp.path().join("a").exists());
    }

    /// The same sequence of verbs against the reference and against us, on
    /// two fresh dataDirs: same addresses, same errors, identical stores.
    #[test]
    fn differential_round_robin_and_store() {
        if !reference_available() {
            return;
        }
        let (ref_dir, our_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let ipam = json!({
            "ranges": [
                [{"subnet": "10.0.0.0/29"}, {"subnet": "10.0.1.0/29", "rangeStart": "10.0.1.4", "gateway": "10.0.1.5"}],
                [{"subnet": "fd00::/125"}]
            ],
            "routes": [{"dst": "0.0.0.0/0"}]
        });
        let (rc, oc) = (
            conf("1.0.0", ref_dir.path(), ipam.clone()),
            conf("1.0.0", our_dir.path(), ipam),
        );
        let ops: Vec<(&str, &str, &str, &str)> = vec![
            ("ADD", "c0", "eth0", ""),
            ("ADD", "c1", "eth0", ""),
            ("ADD", "c1", "eth1", ""),
            ("ADD", "c2", "eth0", "IP=10.0.1.6"),
            ("DEL", "c0", "eth0", ""),
            ("ADD", "c3", "eth0", ""),
            ("ADD", "c1", "eth0", ""),
            ("ADD", "c4", "eth0", "IgnoreUnknown=1;IP=10.0.0.6"),
            ("ADD", "c5", "eth0", ""),
            ("ADD", "c6", "eth0", ""),
            ("DEL", "c3", "eth0", ""),
            ("DEL", "c1", "eth1", ""),
            ("ADD", "c7", "eth0", ""),
            ("ADD", "c8", "eth0", ""),
            ("ADD", "c9", "eth0", "IP=10.0.0.1"),
            ("ADD", "c9", "eth0", "IP=10.0.0.9"),
            ("DEL", "c9", "eth0", ""),
            ("DEL", "c2", "eth0", ""),
            ("ADD", "c10", "eth0", ""),
        ];
        for (cmd, id, ifname, args) in ops {
            let r = reference(cmd, id, ifname, &rc, args);
            let o = ours(cmd, id, ifname, &oc, args);
            assert_eq!(
                r.ok, o.ok,
                "{cmd} {id} {ifname}: reference {} vs ours {}",
                r.json, o.json
            );
            if r.ok {
                assert_eq!(r.json, o.json, "{cmd} {id} {ifname}");
            } else {
                assert_eq!(r.err(), o.err(), "{cmd} {id} {ifname}");
            }
            assert_eq!(
                store_files(ref_dir.path()),
                store_files(our_dir.path()),
                "after {cmd} {id} {ifname}"
            );
        }
    }

    /// A store written by one implementation is used by the other.
    #[test]
    fn differential_store_takeover() {
        if !reference_available() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let c = conf(
            "1.0.0",
            tmp.path(),
            json!({"ranges": [[{"subnet": "10.0.0.0/24"}]]}),
        );
        assert_eq!(
            reference("ADD", "r1", "eth0", &c, "").ips(),
            ["10.0.0.2/24"]
        );
        assert_eq!(
            reference("ADD", "r2", "eth0", &c, "").ips(),
            ["10.0.0.3/24"]
        );
        // Ours sees the reference's reservations and continues its cursor.
        assert!(ours("CHECK", "r1", "eth0", &c, "").ok);
        assert_eq!(ours("ADD", "r1", "eth0", &c, "").err().1,
            "failed to allocate for range 0: 10.0.0.2 has been allocated to r1, duplicate allocation is not allowed");
        assert_eq!(ours("ADD", "o1", "eth0", &c, "").ips(), ["10.0.0.4/24"]);
        assert!(ours("DEL", "r1", "eth0", &c, "").ok);
        assert!(!reference("CHECK", "r1", "eth0", &c, "").ok);
        // The reference sees ours and continues after it.
        assert!(reference("CHECK", "o1", "eth0", &c, "").ok);
        assert_eq!(
            reference("ADD", "r3", "eth0", &c, "").ips(),
            ["10.0.0.5/24"]
        );
        assert!(reference("DEL", "o1", "eth0", &c, "").ok);
        assert!(!ours("CHECK", "o1", "eth0", &c, "").ok);
        // Old-format files (container ID only) are released by ours.
        fs::write(tmp.path().join("net1/10.0.0.77"), "old1").unwrap();
        assert!(ours("CHECK", "old1", "eth3", &c, "").ok);
        assert!(ours("DEL", "old1", "eth3", &c, "").ok);
        assert!(!tmp.path().join("net1/10.0.0.77").exists());
        // Interleaved from here on.
        assert_eq!(ours("ADD", "o2", "eth0", &c, "").ips(), ["10.0.0.6/24"]);
        assert_eq!(
            reference("ADD", "r4", "eth0", &c, "").ips(),
            ["10.0.0.7/24"]
        );
        let left: Vec<String> = store_files(tmp.path()).into_keys().collect();
        assert_eq!(
            left,
            [
                "10.0.0.3",
                "10.0.0.5",
                "10.0.0.6",
                "10.0.0.7",
                "last_reserved_ip.0"
            ]
        );
    }

    /// Messages of the errors the reference and we share, side by side.
    #[test]
    fn differential_error_messages() {
        if !reference_available() {
            return;
        }
        let (ref_dir, our_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let ipam = json!({"ranges": [[{"subnet": "10.0.0.0/30"}]]});
        let (rc, oc) = (
            conf("1.0.0", ref_dir.path(), ipam.clone()),
            conf("1.0.0", our_dir.path(), ipam),
        );
        let cases = [
            ("x1", ""),
            ("x1", ""),
            ("x2", ""),
            ("x3", "IP=10.0.0.1"),
            ("x3", "IP=10.0.0.2"),
            ("x3", "IP=10.0.0.99"),
            ("x3", "FOO=bar"),
            ("x3", "IP=bogus"),
        ];
        for (id, args) in cases {
            let (r, o) = (
                reference("ADD", id, "eth0", &rc, args),
                ours("ADD", id, "eth0", &oc, args),
            );
            assert_eq!(r.ok, o.ok, "{id} {args}");
            if r.ok {
                assert_eq!(r.json, o.json);
            } else {
                assert_eq!(r.err().1, o.err().1, "{id} {args}");
            }
        }
    }
}
