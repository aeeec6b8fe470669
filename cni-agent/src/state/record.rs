//! One JSON file per attachment (network, container ID, ifname) under
//! `<stateDir>/attachments/<network>/`, written atomically (temp file, fsync,
//! rename, fsync of the directory) *before* any map entry or link it lists
//! exists. A crash at any point therefore leaves either no record (and
//! nothing created) or a record that lists a superset of what exists, which
//! DEL and GC remove idempotently.
use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    net::IpAddr,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// What identifies an attachment everywhere (never the IP: IPs are reused).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentKey {
    pub network: String,
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

impl std::fmt::Display for AttachmentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.network, self.container_id, self.ifname)
    }
}

/// Transport protocol of a hostPort mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// IPPROTO_* number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }
}

/// One datapath object an attachment owns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Entry {
    /// A link in the node's network namespace (the host end of a veth).
    Link { name: String },
    /// MASQ_SOURCES[ip]: masquerade traffic from `ip` except to `subnet`.
    MasqSource { ip: IpAddr, subnet: IpNet },
    /// HOSTPORTS[(hostIP or any, hostPort, protocol)] -> (pod_ip, containerPort).
    #[serde(rename_all = "camelCase")]
    HostPort {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host_ip: Option<IpAddr>,
        host_port: u16,
        protocol: Protocol,
        pod_ip: IpAddr,
        container_port: u16,
        snat: bool,
    },
    /// A datapath program on the host end of the pod's veth: `from-pod`
    /// (TC ingress of the host end: what the pod sends) or `to-pod` (TC
    /// egress: what the pod receives). Its link is pinned. ebpf-firewall
    /// and ebpf-bandwidth share the program of a hook (see
    /// [`VethHook::program`]): the first to ADD attaches it, and removing
    /// the entry detaches it only once no other entry of the record holds
    /// it. Records of older builds name one program per plugin.
    VethProgram {
        ifname: String,
        program: String,
        hook: VethHook,
        owner: Owner,
    },
    /// The hostPort program on a bridge (reply and hairpin translation).
    /// Shared by every attachment on that bridge: removing it is a no-op,
    /// the agent drops it with the bridge.
    BridgeHook { bridge: String },
    /// ebpf-firewall's state of one attachment (configuration, endpoints,
    /// compiled rules, counters, tracked connections), keyed by the host
    /// veth's ifindex; see `crate::firewall`.
    Firewall(Box<crate::firewall::FirewallSpec>),
    /// ebpf-firewall's forwarding hooks on a bridge and the uplinks.
    /// Shared by every firewalled attachment on that bridge: removing it is
    /// a no-op, the agent drops the links with their devices.
    FirewallForward { bridge: String },
    /// RATE_BUCKETS[(host veth, direction)]: an ebpf-bandwidth token bucket
    /// of `rate_bps` bits/s and the configured `burst_bits`.
    #[serde(rename_all = "camelCase")]
    RateLimit {
        ifname: String,
        hook: VethHook,
        rate_bps: u64,
        burst_bits: u64,
    },
}

/// Which side of a pod's traffic a veth program sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VethHook {
    FromPod,
    ToPod,
}

impl VethHook {
    /// The program on this hook, which runs both the firewall and the
    /// rate limit of the pod (each only where its entries exist).
    pub fn program(self) -> &'static str {
        match self {
            VethHook::FromPod => cni_ebpf_common::prog_names::VETH_FROM_POD,
            VethHook::ToPod => cni_ebpf_common::prog_names::VETH_TO_POD,
        }
    }
}

/// The plugin an entry belongs to: each plugin's DEL removes its own
/// entries, and the record goes with the last one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Owner {
    Bridge,
    Portmap,
    Bandwidth,
    Firewall,
}

impl Entry {
    /// Whether this entry lives in the eBPF datapath (as opposed to the
    /// kernel's link table, which the plugins manage themselves).
    pub fn is_map_entry(&self) -> bool {
        !matches!(self, Entry::Link { .. })
    }

    /// Whether both are the same veth program (another plugin's entry for
    /// the program this one attached): a DEL leaves it attached.
    pub fn shares_program_with(&self, other: &Entry) -> bool {
        match (self, other) {
            (
                Entry::VethProgram {
                    ifname,
                    program,
                    hook,
                    ..
                },
                Entry::VethProgram {
                    ifname: i,
                    program: p,
                    hook: h,
                    ..
                },
            ) => ifname == i && program == p && hook == h,
            _ => false,
        }
    }

    pub fn owner(&self) -> Owner {
        match self {
            Entry::Link { .. } | Entry::MasqSource { .. } => Owner::Bridge,
            Entry::HostPort { .. } | Entry::BridgeHook { .. } => Owner::Portmap,
            Entry::VethProgram { owner, .. } => *owner,
            Entry::RateLimit { .. } => Owner::Bandwidth,
            Entry::Firewall(_) | Entry::FirewallForward { .. } => Owner::Firewall,
        }
    }

    /// Whether two hostPort entries claim the same (address, port,
    /// protocol): an any-address mapping overlaps every address.
    pub fn conflicts_with(&self, other: &Entry) -> bool {
        match (self, other) {
            (
                Entry::HostPort {
                    host_ip: a,
                    host_port: pa,
                    protocol: qa,
                    pod_ip: ia,
                    ..
                },
                Entry::HostPort {
                    host_ip: b,
                    host_port: pb,
                    protocol: qb,
                    pod_ip: ib,
                    ..
                },
            ) => {
                pa == pb
                    && qa == qb
                    && ia.is_ipv4() == ib.is_ipv4()
                    && (a.is_none() || b.is_none() || a == b)
            }
            _ => false,
        }
    }
}

/// The record of one attachment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    #[serde(flatten)]
    pub key: AttachmentKey,
    pub entries: Vec<Entry>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("state dir {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("record {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{field} {value:?} cannot name a record file")]
    BadName { field: &'static str, value: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RecordError + '_ {
    move |source| RecordError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The records under one state directory.
#[derive(Clone, Debug)]
pub struct RecordStore {
    root: PathBuf,
}

/// Container IDs up to this length name their record file directly.
const MAX_PLAIN_ID: usize = 200;

/// `<containerID>@<ifname>.json`. File names are limited to 255 bytes and
/// runtimes may use container IDs of thousands of characters (the spec sets
/// no limit), so a longer ID is named by its first characters and its
/// SHA-256; the record inside holds the whole key.
fn file_name(key: &AttachmentKey) -> String {
    let id = &key.container_id;
    if id.len() <= MAX_PLAIN_ID {
        return format!("{id}@{}.json", key.ifname);
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(id.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    // IDs are ASCII (the spec's identifier rule), so any byte index is a
    // character boundary.
    format!("{}~{hex}@{}.json", &id[..64], key.ifname)
}

impl RecordStore {
    pub fn new(state_dir: impl AsRef<Path>) -> Self {
        Self {
            root: state_dir.as_ref().join("attachments"),
        }
    }

    fn check_name(field: &'static str, value: &str) -> Result<(), RecordError> {
        // The spec's rules for network names, container IDs and ifnames
        // already exclude '/', but records must stay safe on their own.
        if value.is_empty()
            || value == "."
            || value == ".."
            || value.contains('/')
            || value.contains('\0')
            || value.contains('@')
        {
            return Err(RecordError::BadName {
                field,
                value: value.to_string(),
            });
        }
        Ok(())
    }

    fn path_of(&self, key: &AttachmentKey) -> Result<PathBuf, RecordError> {
        Self::check_name("network", &key.network)?;
        Self::check_name("containerID", &key.container_id)?;
        Self::check_name("ifname", &key.ifname)?;
        Ok(self.root.join(&key.network).join(file_name(key)))
    }

    /// Durably writes `record`, replacing any previous one for its key.
    pub fn write(&self, record: &Record) -> Result<(), RecordError> {
        let path = self.path_of(&record.key)?;
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let tmp = dir.join(format!(
            ".{}.tmp",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("record")
        ));
        let body = serde_json::to_vec_pretty(record).map_err(|source| RecordError::Corrupt {
            path: path.clone(),
            source,
        })?;
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(io_err(&tmp))?;
            f.write_all(&body).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
        }
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&dir))?;
        Ok(())
    }

    /// The record of `key`, if any.
    pub fn read(&self, key: &AttachmentKey) -> Result<Option<Record>, RecordError> {
        let path = self.path_of(key)?;
        Self::read_path(&path)
    }

    fn read_path(path: &Path) -> Result<Option<Record>, RecordError> {
        match fs::read(path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| RecordError::Corrupt {
                        path: path.to_path_buf(),
                        source,
                    })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(path)(e)),
        }
    }

    /// Removes the record of `key`; absent is fine (DEL is idempotent).
    pub fn remove(&self, key: &AttachmentKey) -> Result<(), RecordError> {
        let path = self.path_of(key)?;
        match fs::remove_file(&path) {
            Ok(()) => {
                if let Some(dir) = path.parent() {
                    let _ = File::open(dir).and_then(|d| d.sync_all());
                }
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Every record, optionally of one network only. Leftover temp files of
    /// a crashed write are removed on the way (they were never renamed, so
    /// nothing was created from them).
    pub fn list(&self, network: Option<&str>) -> Result<Vec<Record>, RecordError> {
        let mut out = Vec::new();
        let nets: Vec<PathBuf> = match network {
            Some(n) => {
                Self::check_name("network", n)?;
                vec![self.root.join(n)]
            }
            None => match fs::read_dir(&self.root) {
                Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
                Err(e) => return Err(io_err(&self.root)(e)),
            },
        };
        for dir in nets {
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&dir)(e)),
            };
            for ent in rd.flatten() {
                let path = ent.path();
                let name = ent.file_name();
                let name = name.to_string_lossy();
                if name.starts_with('.') && name.ends_with(".tmp") {
                    let _ = fs::remove_file(&path);
                    continue;
                }
                if !name.ends_with(".json") {
                    continue;
                }
                if let Some(r) = Self::read_path(&path)? {
                    out.push(r);
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(c: &str) -> AttachmentKey {
        AttachmentKey {
            network: "net1".into(),
            container_id: c.into(),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn write_read_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::new(dir.path());
        let rec = Record {
            key: key("abc"),
            entries: vec![Entry::MasqSource {
                ip: "10.1.0.5".parse().unwrap(),
                subnet: "10.1.0.0/24".parse().unwrap(),
            }],
        };
        store.write(&rec).unwrap();
        assert_eq!(store.read(&key("abc")).unwrap(), Some(rec.clone()));
        // A temp file from a crashed write is ignored and cleaned.
        std::fs::write(dir.path().join("attachments/net1/.x@eth0.json.tmp"), b"{").unwrap();
        assert_eq!(store.list(None).unwrap(), vec![rec.clone()]);
        assert!(!dir
            .path()
            .join("attachments/net1/.x@eth0.json.tmp")
            .exists());
        store.remove(&key("abc")).unwrap();
        store.remove(&key("abc")).unwrap();
        assert_eq!(store.read(&key("abc")).unwrap(), None);
        assert!(store.list(Some("net1")).unwrap().is_empty());
    }

    #[test]
    fn rejects_names_that_escape() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::new(dir.path());
        let mut k = key("../x");
        assert!(store.read(&k).is_err());
        k.container_id = "ok".into();
        k.ifname = "a@b".into();
        assert!(store.read(&k).is_err());
    }
}
