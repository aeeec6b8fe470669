//! The operations on attachment records, shared by the agent (serving the
//! plugins) and by the plugins themselves: a plugin records the links it is
//! about to create without needing the agent, and removes an attachment
//! directly when the agent is unreachable. Both sides work on the same
//! records and pinned maps under the same lock, so a DEL never waits for the
//! agent and never leaves anything behind once it returns.
use std::{
    collections::BTreeSet,
    fs::{self, File, OpenOptions},
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};

use crate::{
    datapath::{
        conntrack::NatTable,
        entries::{with_netlink, EntryMaps},
        loader::DatapathError,
        pins::PinLayout,
    },
    netlink::NetlinkError,
    spec::error::{CniError, ErrorCode},
    state::record::{AttachmentKey, Entry, Owner, Record, RecordError, RecordStore},
};

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("state lock {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("attachment {key}: {what}")]
    Check { key: AttachmentKey, what: String },
    #[error("{what} is already mapped by attachment {owner}")]
    Conflict { what: String, owner: AttachmentKey },
}

impl From<OpsError> for CniError {
    fn from(e: OpsError) -> Self {
        let code = match &e {
            OpsError::Record(RecordError::BadName { .. }) => ErrorCode::InvalidNetworkConfig,
            OpsError::Record(_) | OpsError::Lock { .. } => ErrorCode::Io,
            OpsError::Datapath(d) => d.code(),
            OpsError::Netlink(_) | OpsError::Check { .. } | OpsError::Conflict { .. } => {
                ErrorCode::Internal
            }
        };
        CniError::new(code, e.to_string())
    }
}

/// Paths one instance of the suite works with.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Paths {
    pub state_dir: PathBuf,
    pub bpffs_root: PathBuf,
}

impl Paths {
    pub fn layout(&self) -> PinLayout {
        PinLayout::new(&self.bpffs_root)
    }
    pub fn records(&self) -> RecordStore {
        RecordStore::new(&self.state_dir)
    }
}

/// Holds `<stateDir>/lock` exclusively (flock) for one operation, so the
/// agent and plugins never interleave on the same records and maps.
fn lock(state_dir: &Path) -> Result<Flock<File>, OpsError> {
    let path = state_dir.join("lock");
    let err = |source| OpsError::Lock {
        path: path.clone(),
        source,
    };
    fs::create_dir_all(state_dir).map_err(err)?;
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(err)?;
    Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| OpsError::Lock {
        path: path.clone(),
        source: e.into(),
    })
}

/// Adds `entries` to the attachment's record (creating it), durably; a
/// record that already lists them all is not rewritten.
fn record_locked(paths: &Paths, key: &AttachmentKey, entries: &[Entry]) -> Result<(), OpsError> {
    let store = paths.records();
    let existing = store.read(key)?;
    let existed = existing.is_some();
    let mut record = existing.unwrap_or_else(|| Record {
        key: key.clone(),
        entries: Vec::new(),
    });
    let before = record.entries.len();
    for e in entries {
        if !record.entries.contains(e) {
            record.entries.push(e.clone());
        }
    }
    if !existed || record.entries.len() != before {
        store.write(&record)?;
    }
    Ok(())
}

/// Records `entries` for the attachment before the caller creates them
/// (used by plugins for the links they create themselves).
pub fn record(paths: &Paths, key: &AttachmentKey, entries: &[Entry]) -> Result<(), OpsError> {
    let _guard = lock(&paths.state_dir)?;
    record_locked(paths, key, entries)
}

/// Takes `entry` out of the attachment's record without touching what it
/// names: for an entry recorded ahead of a creation that turned out not to
/// be ours (e.g. a link name that was taken meanwhile).
pub fn forget(paths: &Paths, key: &AttachmentKey, entry: &Entry) -> Result<(), OpsError> {
    let _guard = lock(&paths.state_dir)?;
    let store = paths.records();
    if let Some(mut record) = store.read(key)? {
        record.entries.retain(|e| e != entry);
        store.write(&record)?;
    }
    Ok(())
}

/// Refuses hostPort entries that overlap a mapping in force for another
/// pod (or each other): an ADD that would steal a mapping changes nothing.
/// The maps answer in O(node addresses); the records are read only to name
/// the owner of a conflict.
fn check_conflicts(
    paths: &Paths,
    maps: &EntryMaps,
    key: &AttachmentKey,
    entries: &[Entry],
) -> Result<(), OpsError> {
    let conflict = |what: &Entry, owner: AttachmentKey| OpsError::Conflict {
        what: match what {
            Entry::HostPort {
                host_ip,
                host_port,
                protocol,
                ..
            } => format!(
                "hostPort {host_port}/{} on {}",
                format!("{protocol:?}").to_lowercase(),
                host_ip.map_or("every node address".to_string(), |ip| ip.to_string())
            ),
            other => format!("{other:?}"),
        },
        owner,
    };
    for (i, e) in entries.iter().enumerate() {
        if entries[..i].iter().any(|o| o.conflicts_with(e)) {
            return Err(conflict(e, key.clone()));
        }
        if !maps.hostport_taken(e)? {
            continue;
        }
        // Whose is it? (Not ours: re-adding our own entry is no conflict.)
        let owner = paths
            .records()
            .list(None)?
            .into_iter()
            .find(|r| r.key != *key && r.entries.iter().any(|o| o.conflicts_with(e)));
        match owner {
            Some(r) => return Err(conflict(e, r.key)),
            None if paths
                .records()
                .read(key)?
                .is_some_and(|r| r.entries.iter().any(|o| o.conflicts_with(e))) => {}
            None => {
                return Err(conflict(
                    e,
                    AttachmentKey {
                        network: "(unrecorded)".into(),
                        container_id: "-".into(),
                        ifname: "-".into(),
                    },
                ))
            }
        }
    }
    Ok(())
}

/// ADD of datapath entries (the agent's side): checked for conflicts,
/// recorded first, durably, then written to the maps. Re-adding what is
/// there is a no-op.
pub fn add(paths: &Paths, key: &AttachmentKey, entries: &[Entry]) -> Result<(), OpsError> {
    let _guard = lock(&paths.state_dir)?;
    let map_entries: Vec<&Entry> = entries.iter().filter(|e| e.is_map_entry()).collect();
    let mut maps = if map_entries.is_empty() {
        None
    } else {
        let maps = EntryMaps::open(&paths.layout())?;
        check_conflicts(paths, &maps, key, entries)?;
        Some(maps)
    };
    record_locked(paths, key, entries)?;
    crate::crash::point("agent-after-record");
    if let Some(maps) = maps.as_mut() {
        for e in map_entries {
            maps.apply(e)?;
            crate::crash::point("agent-after-first-entry");
        }
    }
    log::info!("add {key}: {} entries", entries.len());
    Ok(())
}

/// DEL: remove exactly what the record lists (only `owner`'s entries if
/// given), then the record once it is empty. No record: nothing was
/// created, success.
pub fn del(paths: &Paths, key: &AttachmentKey, owner: Option<Owner>) -> Result<(), OpsError> {
    let _guard = lock(&paths.state_dir)?;
    del_locked(paths, key, owner)
}

/// Deletes a link of the current network namespace by name.
fn delete_link(name: &str) -> Result<(), OpsError> {
    with_netlink(|nl| nl.delete_link_by_name(name).map(|_| ())).map_err(Into::into)
}

fn del_locked(paths: &Paths, key: &AttachmentKey, owner: Option<Owner>) -> Result<(), OpsError> {
    let store = paths.records();
    let Some(mut record) = store.read(key)? else {
        return Ok(());
    };
    let (gone, kept): (Vec<Entry>, Vec<Entry>) = record
        .entries
        .drain(..)
        .partition(|e| owner.is_none_or(|o| e.owner() == o));
    let layout = paths.layout();
    let has_map_entries = gone.iter().any(Entry::is_map_entry);
    // Maps that were never created (no agent ever ran) hold nothing.
    let (mut maps, mut nat) = if has_map_entries && layout.maps_dir().exists() {
        (
            Some(EntryMaps::open(&layout)?),
            NatTable::open(&layout).ok(),
        )
    } else {
        (None, None)
    };
    for e in &gone {
        if let Entry::Link { name } = e {
            delete_link(name)?;
            continue;
        }
        if kept.iter().any(|k| k.shares_program_with(e)) {
            continue;
        }
        if let Some(maps) = maps.as_mut() {
            maps.revoke(e)?;
        }
        // A hostPort's flows must not go on to the pod that had it (a UDP
        // client keeps its tuple, and the port may map to another pod next).
        // A masqueraded pod's bindings are left to the sweeper, which finds
        // them without holding the node lock: their source is no pod's any
        // more.
        if let (
            Entry::HostPort {
                host_port,
                protocol,
                ..
            },
            Some(nat),
        ) = (e, nat.as_mut())
        {
            nat.flush_hostport(*host_port, protocol.number())?;
        }
    }
    if kept.is_empty() {
        store.remove(key)?;
    } else {
        record.entries = kept;
        store.write(&record)?;
    }
    log::info!("del {key}: removed {} entries", gone.len());
    Ok(())
}

/// CHECK: the record lists `expected` and each map entry is in the maps.
pub fn check(paths: &Paths, key: &AttachmentKey, expected: &[Entry]) -> Result<(), OpsError> {
    let _guard = lock(&paths.state_dir)?;
    let fail = |what: String| OpsError::Check {
        key: key.clone(),
        what,
    };
    let Some(record) = paths.records().read(key)? else {
        return Err(fail("no record".into()));
    };
    let maps = if expected.iter().any(Entry::is_map_entry) {
        Some(EntryMaps::open(&paths.layout())?)
    } else {
        None
    };
    for e in expected {
        if !record.entries.contains(e) {
            return Err(fail(format!("{e:?} is not recorded")));
        }
        if let Some(maps) = &maps {
            if !maps.is_applied(e) {
                return Err(fail(format!("{e:?} is missing from the datapath")));
            }
        }
    }
    Ok(())
}

/// GC: every record of `network` not in `valid` is deleted like a DEL.
/// Returns the attachments removed.
pub fn gc(
    paths: &Paths,
    network: &str,
    valid: &[AttachmentKey],
) -> Result<Vec<AttachmentKey>, OpsError> {
    let _guard = lock(&paths.state_dir)?;
    let valid: BTreeSet<(&str, &str)> = valid
        .iter()
        .map(|k| (k.container_id.as_str(), k.ifname.as_str()))
        .collect();
    let mut removed = Vec::new();
    for r in paths.records().list(Some(network))? {
        if !valid.contains(&(r.key.container_id.as_str(), r.key.ifname.as_str())) {
            del_locked(paths, &r.key, None)?;
            removed.push(r.key);
        }
    }
    if !removed.is_empty() {
        log::info!("gc {network}: removed {} attachments", removed.len());
    }
    Ok(removed)
}
