//! The operations on attachments, shared by the agent (serving the plugins)
//! and by a plugin whose agent is unreachable during DEL or GC: both work on
//! the same records and pinned maps, under the same lock, so a DEL never has
//! to wait for the agent and never leaves anything behind once it returns.
use std::{
    collections::BTreeSet,
    fs::{self, File, OpenOptions},
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};

use crate::{
    datapath::{conntrack::NatTable, entries::EntryMaps, loader::DatapathError, pins::PinLayout},
    spec::error::{CniError, ErrorCode},
    state::record::{AttachmentKey, Entry, Record, RecordError, RecordStore},
};

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("state lock {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("attachment {key}: {what}")]
    Check { key: AttachmentKey, what: String },
}

impl From<OpsError> for CniError {
    fn from(e: OpsError) -> Self {
        let code = match &e {
            OpsError::Record(RecordError::BadName { .. }) => ErrorCode::InvalidNetworkConfig,
            OpsError::Record(_) | OpsError::Lock { .. } => ErrorCode::Io,
            OpsError::Datapath(_) | OpsError::Check { .. } => ErrorCode::Internal,
        };
        CniError::new(code, e.to_string())
    }
}

/// Paths one instance of the suite works with.
#[derive(Clone, Debug)]
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

/// ADD: the record first (durably), then the entries. If an older record of
/// the same attachment lists entries the new one doesn't, they go.
pub fn add(paths: &Paths, record: &Record) -> Result<(), OpsError> {
    let _guard = lock(&paths.state_dir)?;
    let store = paths.records();
    let mut maps = EntryMaps::open(&paths.layout())?;
    let old = store.read(&record.key)?;
    // The union is recorded first so a crash between the two steps still
    // leaves a record that covers everything that may exist.
    if let Some(old) = &old {
        let mut union = record.clone();
        for e in &old.entries {
            if !union.entries.contains(e) {
                union.entries.push(e.clone());
            }
        }
        store.write(&union)?;
        for e in old.entries.iter().filter(|e| !record.entries.contains(e)) {
            maps.revoke(e)?;
        }
    }
    store.write(record)?;
    for e in &record.entries {
        maps.apply(e)?;
    }
    log::info!("add {}: {} entries", record.key, record.entries.len());
    Ok(())
}

/// DEL: remove exactly what the record lists, then the record. No record:
/// nothing was created, success.
pub fn del(paths: &Paths, key: &AttachmentKey) -> Result<(), OpsError> {
    let _guard = lock(&paths.state_dir)?;
    del_locked(paths, key)
}

fn del_locked(paths: &Paths, key: &AttachmentKey) -> Result<(), OpsError> {
    let store = paths.records();
    let Some(record) = store.read(key)? else {
        return Ok(());
    };
    let layout = paths.layout();
    // Maps that were never created (no agent ever ran) hold nothing.
    if layout.maps_dir().exists() {
        let mut maps = EntryMaps::open(&layout)?;
        let mut nat = NatTable::open(&layout).ok();
        for e in &record.entries {
            maps.revoke(e)?;
            if let (Entry::MasqSource { ip, .. }, Some(nat)) = (e, nat.as_mut()) {
                nat.flush_source(*ip)?;
            }
        }
    }
    store.remove(key)?;
    log::info!("del {key}: removed {} entries", record.entries.len());
    Ok(())
}

/// CHECK: the record lists `expected` and each entry is in the maps.
pub fn check(paths: &Paths, key: &AttachmentKey, expected: &[Entry]) -> Result<(), OpsError> {
    let _guard = lock(&paths.state_dir)?;
    let fail = |what: String| OpsError::Check {
        key: key.clone(),
        what,
    };
    let Some(record) = paths.records().read(key)? else {
        return Err(fail("no record".into()));
    };
    let maps = EntryMaps::open(&paths.layout())?;
    for e in expected {
        if !record.entries.contains(e) {
            return Err(fail(format!("{e:?} is not recorded")));
        }
        if !maps.is_applied(e) {
            return Err(fail(format!("{e:?} is missing from the datapath")));
        }
    }
    Ok(())
}

/// GC: every record of `network` not in `valid` is deleted like a DEL.
/// Returns the attachments removed.
pub fn gc(paths: &Paths, network: &str, valid: &[AttachmentKey]) -> Result<Vec<AttachmentKey>, OpsError> {
    let _guard = lock(&paths.state_dir)?;
    let valid: BTreeSet<(&str, &str)> = valid
        .iter()
        .map(|k| (k.container_id.as_str(), k.ifname.as_str()))
        .collect();
    let mut removed = Vec::new();
    for r in paths.records().list(Some(network))? {
        if !valid.contains(&(r.key.container_id.as_str(), r.key.ifname.as_str())) {
            del_locked(paths, &r.key)?;
            removed.push(r.key);
        }
    }
    if !removed.is_empty() {
        log::info!("gc {network}: removed {} attachments", removed.len());
    }
    Ok(removed)
}
