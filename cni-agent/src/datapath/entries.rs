//! Applying and revoking the map entries a record lists. The agent applies
//! them on ADD; both the agent and a plugin whose agent is down revoke them
//! on DEL, through the pinned maps, so a DEL never waits for the agent.
use std::net::IpAddr;

use aya::maps::{HashMap, MapData, MapError};
use cni_ebpf_common::{map_names, IpKey, MasqPolicy, FAMILY_V4, FAMILY_V6};
use ipnet::IpNet;

use super::{
    loader::DatapathError,
    pins::{open_pinned, PinLayout},
};
use crate::state::record::Entry;

/// An address as the datapath keys it (network byte order words).
pub fn addr_words(ip: IpAddr) -> ([u32; 4], u8) {
    match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let mut w = [0u32; 4];
            for (i, chunk) in o.chunks_exact(4).enumerate() {
                w[i] = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
            (w, FAMILY_V6)
        }
    }
}

/// The inverse of [`addr_words`].
pub fn words_addr(words: [u32; 4], family: u8) -> IpAddr {
    if family == FAMILY_V6 {
        let mut o = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(o)
    } else {
        IpAddr::from(words[0].to_ne_bytes())
    }
}

pub fn ip_key(ip: IpAddr) -> IpKey {
    let (addr, family) = addr_words(ip);
    IpKey {
        addr,
        family,
        _pad: [0; 3],
    }
}

pub fn masq_policy(subnet: IpNet) -> MasqPolicy {
    let (exclude_addr, family) = addr_words(subnet.network());
    MasqPolicy {
        exclude_addr,
        exclude_prefix_len: subnet.prefix_len(),
        family,
        _pad: [0; 2],
    }
}

/// The maps that hold per-attachment entries, opened from their pins.
pub struct EntryMaps {
    masq: HashMap<MapData, IpKey, MasqPolicy>,
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

impl EntryMaps {
    pub fn open(layout: &PinLayout) -> Result<Self, DatapathError> {
        let data = open_pinned(layout, map_names::MASQ_SOURCES)?;
        let masq = HashMap::try_from(aya::maps::Map::HashMap(data))
            .map_err(map_err(map_names::MASQ_SOURCES))?;
        Ok(Self { masq })
    }

    /// Writes one map entry (links are the plugins' business) (overwriting: re-applying a record is idempotent).
    pub fn apply(&mut self, entry: &Entry) -> Result<(), DatapathError> {
        match entry {
            Entry::Link { .. } => Ok(()),
            Entry::MasqSource { ip, subnet } => self
                .masq
                .insert(ip_key(*ip), masq_policy(*subnet), 0)
                .map_err(map_err(map_names::MASQ_SOURCES)),
        }
    }

    /// Removes one entry; an entry that is already gone is not an error.
    pub fn revoke(&mut self, entry: &Entry) -> Result<(), DatapathError> {
        let res = match entry {
            Entry::Link { .. } => return Ok(()),
            Entry::MasqSource { ip, .. } => self.masq.remove(&ip_key(*ip)),
        };
        match res {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(source) => Err(DatapathError::Map {
                name: map_names::MASQ_SOURCES,
                source,
            }),
        }
    }

    /// Whether an entry is present with the value the record implies.
    pub fn is_applied(&self, entry: &Entry) -> bool {
        match entry {
            Entry::Link { .. } => true,
            Entry::MasqSource { ip, subnet } => self
                .masq
                .get(&ip_key(*ip), 0)
                .map(|v| v == masq_policy(*subnet))
                .unwrap_or(false),
        }
    }

    /// Number of masquerade sources (occupancy reporting).
    pub fn masq_len(&self) -> usize {
        self.masq.keys().filter(|k| k.is_ok()).count()
    }
}
