//! The bpffs layout the agent owns, and loading the object so that pinned
//! maps are reused across agent restarts and upgrades.
//!
//! Layout under the configured root (default /sys/fs/bpf/cni-ebpf):
//!   v<MAP_LAYOUT_VERSION>/maps/<MAP>          pinned maps
//!   v<MAP_LAYOUT_VERSION>/progs/<program>      pinned programs (for attaching
//!                                              from outside the loader)
//!   v<MAP_LAYOUT_VERSION>/links/<target>-<hook>-<program>   pinned links
//! A new layout version gets new directories, so an old agent's maps are
//! never read with a new layout. Within a version, aya reuses a pinned map
//! by name without comparing its definition; [`check_pinned_maps`] does that
//! comparison first and refuses a mismatch. A map this build adds to the
//! object (e.g. NAT_FRAGS) is simply missing from an older agent's pins:
//! aya creates and pins it, the older maps are reused as they are, so no
//! version bump is needed for a new map, only for a changed one.
use std::{
    fs,
    mem::size_of,
    path::{Path, PathBuf},
};

use aya::{
    maps::{MapData, MapInfo, MapType},
    Ebpf, EbpfLoader,
};
use cni_ebpf_common::{
    map_names, BridgeInfo, CtKey, HostPortKey, HostPortTarget, HpReply, IpKey, MasqPolicy,
    NatEntry, NatFragKey, NatFragPorts, SockRevKey, SockRevValue, UplinkConfig, MAP_LAYOUT_VERSION,
};

use super::{loader::DatapathError, object::EBPF_OBJECT};

/// bpffs superblock magic (statfs f_type).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The directories of one bpffs root.
#[derive(Clone, Debug)]
pub struct PinLayout {
    pub root: PathBuf,
}

impl PinLayout {
    pub fn new(root: impl AsRef<Path>) -> Self {
        Self {
            root: root.as_ref().to_path_buf(),
        }
    }
    fn versioned(&self) -> PathBuf {
        self.root.join(format!("v{MAP_LAYOUT_VERSION}"))
    }
    pub fn maps_dir(&self) -> PathBuf {
        self.versioned().join("maps")
    }
    pub fn links_dir(&self) -> PathBuf {
        self.versioned().join("links")
    }
    pub fn progs_dir(&self) -> PathBuf {
        self.versioned().join("progs")
    }
    pub fn map_path(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }
    /// Creates the directories, checking they live on a bpf filesystem
    /// (pins elsewhere fail with an obscure EPERM).
    pub fn create(&self) -> Result<(), DatapathError> {
        fs::create_dir_all(self.maps_dir())
            .and_then(|()| fs::create_dir_all(self.links_dir()))
            .and_then(|()| fs::create_dir_all(self.progs_dir()))
            .map_err(|source| DatapathError::Pins {
                path: self.root.clone(),
                source,
            })?;
        if !on_bpffs(&self.root) {
            return Err(DatapathError::NotBpffs(self.root.clone()));
        }
        Ok(())
    }
}

/// Whether `path` is on a bpf filesystem.
pub fn on_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|st| st.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Definition of a pinned map as this build expects it.
pub struct MapSpec {
    pub name: &'static str,
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
}

/// Every pinned map of the object with its expected layout.
pub fn map_specs() -> Vec<MapSpec> {
    fn spec<K, V>(name: &'static str, map_type: MapType) -> MapSpec {
        MapSpec {
            name,
            map_type,
            key_size: size_of::<K>() as u32,
            value_size: size_of::<V>() as u32,
        }
    }
    vec![
        spec::<IpKey, MasqPolicy>(map_names::MASQ_SOURCES, MapType::Hash),
        spec::<u32, UplinkConfig>(map_names::UPLINKS, MapType::Hash),
        spec::<CtKey, NatEntry>(map_names::SNAT_ORIG, MapType::LruHash),
        spec::<CtKey, NatEntry>(map_names::SNAT_REPLY, MapType::LruHash),
        spec::<u32, u64>(map_names::STATS, MapType::PerCpuArray),
        spec::<HostPortKey, HostPortTarget>(map_names::HOSTPORTS, MapType::Hash),
        spec::<IpKey, u32>(map_names::NODE_ADDRS, MapType::Hash),
        spec::<u32, BridgeInfo>(map_names::BRIDGES, MapType::Hash),
        spec::<u32, [u32; 4]>(map_names::BRIDGES6, MapType::Hash),
        spec::<CtKey, NatEntry>(map_names::HP_ORIG, MapType::LruHash),
        spec::<CtKey, HpReply>(map_names::HP_REPLY, MapType::LruHash),
        spec::<NatFragKey, NatFragPorts>(map_names::NAT_FRAGS, MapType::LruHash),
        spec::<SockRevKey, SockRevValue>(map_names::SOCK_REVERSE, MapType::LruHash),
        spec::<u32, u64>(map_names::SOCK_NETNS, MapType::Array),
        spec::<cni_ebpf_common::RateKey, cni_ebpf_common::RateBucket>(
            map_names::RATE_BUCKETS,
            MapType::Hash,
        ),
        spec::<u32, cni_ebpf_common::FwAttach>(map_names::FW_ATTACH, MapType::Hash),
        spec::<IpKey, cni_ebpf_common::FwEndpoint>(map_names::FW_ENDPOINTS, MapType::Hash),
        spec::<u32, u32>(map_names::FW_BRIDGES, MapType::Hash),
        spec::<aya::maps::lpm_trie::Key<cni_ebpf_common::FwCidrKey>, cni_ebpf_common::FwRegion>(
            map_names::FW_CIDRS,
            MapType::LpmTrie,
        ),
        spec::<aya::maps::lpm_trie::Key<cni_ebpf_common::FwPortKey>, cni_ebpf_common::FwVerdict>(
            map_names::FW_PORTS,
            MapType::LpmTrie,
        ),
        spec::<cni_ebpf_common::FwCtKey, cni_ebpf_common::FwCtEntry>(
            map_names::FW_CT,
            MapType::LruHash,
        ),
        spec::<cni_ebpf_common::FwFragKey, u32>(map_names::FW_FRAGS, MapType::LruHash),
        spec::<u32, cni_ebpf_common::FwStats>(map_names::FW_STATS, MapType::PerCpuHash),
        spec::<cni_ebpf_common::FwRuleKey, u64>(map_names::FW_RULE_HITS, MapType::PerCpuHash),
    ]
}

/// Compares every already-pinned map with this build's definition. A
/// missing pin is fine (it will be created); a different type, key or value
/// size is refused, since reading it with the new layout would corrupt flows.
pub fn check_pinned_maps(layout: &PinLayout) -> Result<(), DatapathError> {
    for spec in map_specs() {
        let path = layout.map_path(spec.name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|source| DatapathError::Map {
            name: spec.name,
            source,
        })?;
        let map_type = info.map_type().map_err(|source| DatapathError::Map {
            name: spec.name,
            source,
        })?;
        if map_type != spec.map_type
            || info.key_size() != spec.key_size
            || info.value_size() != spec.value_size
        {
            return Err(DatapathError::LayoutMismatch {
                path,
                found: format!(
                    "{map_type:?} key {} value {}",
                    info.key_size(),
                    info.value_size()
                ),
                expected: format!(
                    "{:?} key {} value {}",
                    spec.map_type, spec.key_size, spec.value_size
                ),
            });
        }
    }
    Ok(())
}

/// Entries of each connection-tracking map when nobody asks for a size:
/// a 1,000-pod node holding a few hundred connections per pod.
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 262_144;

/// The maps sized by `--conntrack-size`.
const CONNTRACK_MAPS: [&str; 5] = [
    map_names::SNAT_ORIG,
    map_names::SNAT_REPLY,
    map_names::HP_ORIG,
    map_names::HP_REPLY,
    map_names::FW_CT,
];

/// Sizes of the maps that are sized at load time.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    /// Entries of each connection-tracking map. `None`: pinned maps keep
    /// the size they were created with, new ones get
    /// [`DEFAULT_CONNTRACK_ENTRIES`]. A size asked for is checked against
    /// the pins: a pinned map of another size is refused, never reused.
    pub conntrack: Option<u32>,
    pub masq_sources: u32,
    /// NAT_FRAGS (LRU): one entry per fragmented datagram whose first
    /// fragment was translated, needed only while its later fragments
    /// pass. 16,384 entries (about 100 bytes each) keep an entry for over a
    /// second at 1 Gbit/s of 8 KiB datagrams, far longer than a datagram's
    /// fragments take; Cilium's default is 8,192.
    pub frags: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            conntrack: None,
            masq_sources: 65536,
            frags: 16384,
        }
    }
}

/// Compares the pinned connection-tracking maps' sizes with the size the
/// agent was asked for (if it was). Without a size, a pinned map keeps its
/// own, and the log says so.
fn check_pinned_sizes(layout: &PinLayout, sizes: MapSizes) -> Result<(), DatapathError> {
    for name in CONNTRACK_MAPS {
        let path = layout.map_path(name);
        if !path.exists() {
            continue;
        }
        let info =
            MapInfo::from_pin(&path).map_err(|source| DatapathError::Map { name, source })?;
        match sizes.conntrack {
            Some(asked) if asked != info.max_entries() => {
                return Err(DatapathError::SizeMismatch {
                    path,
                    found: info.max_entries(),
                    asked,
                })
            }
            Some(_) => {}
            None => log::info!(
                "{name} keeps its pinned size of {} entries (--conntrack-size not given)",
                info.max_entries()
            ),
        }
    }
    Ok(())
}

/// Loads the embedded object, reusing the maps pinned under `layout` (after
/// checking them) and pinning the ones that are new.
pub fn load_pinned(layout: &PinLayout, sizes: MapSizes) -> Result<Ebpf, DatapathError> {
    layout.create()?;
    check_pinned_maps(layout)?;
    check_pinned_sizes(layout, sizes)?;
    let maps_dir = layout.maps_dir();
    let conntrack = sizes.conntrack.unwrap_or(DEFAULT_CONNTRACK_ENTRIES);
    let mut loader = EbpfLoader::new();
    loader
        .default_map_pin_directory(&maps_dir)
        .map_max_entries(map_names::MASQ_SOURCES, sizes.masq_sources)
        .map_max_entries(map_names::NAT_FRAGS, sizes.frags);
    for name in CONNTRACK_MAPS {
        loader.map_max_entries(name, conntrack);
    }
    Ok(loader.load(EBPF_OBJECT)?)
}

/// Opens one pinned map (used by the plugins and the admin CLI, which work
/// on the agent's maps without loading anything).
pub fn open_pinned(layout: &PinLayout, name: &'static str) -> Result<MapData, DatapathError> {
    MapData::from_pin(layout.map_path(name)).map_err(|source| DatapathError::Map { name, source })
}

/// The per-CPU datapath counters, summed over CPUs, by name.
pub fn read_stats(layout: &PinLayout) -> Result<Vec<(&'static str, u64)>, DatapathError> {
    use aya::maps::PerCpuArray;
    use cni_ebpf_common::stat;
    let data = open_pinned(layout, map_names::STATS)?;
    let arr: PerCpuArray<MapData, u64> = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))
        .map_err(|source| DatapathError::Map {
        name: map_names::STATS,
        source,
    })?;
    Ok(stat::NAMES
        .iter()
        .map(|(i, name)| (*name, arr.get(i, 0).map(|v| v.iter().sum()).unwrap_or(0)))
        .collect())
}
