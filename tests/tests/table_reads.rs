//! The agent's whole-table reads (`datapath/batch.rs`: BPF_MAP_LOOKUP_BATCH)
//! on real pinned maps holding more entries than one batch: every entry is
//! seen once, with its value, through the paths that use them — the NAT
//! table's dump and occupancy, the sweep that removes the bindings of a
//! pod that was deleted, and `cni-agent status`'s per-map occupancy,
//! per-CPU maps included.
use std::net::Ipv4Addr;

use aya::maps::{HashMap, Map, PerCpuHashMap, PerCpuValues};
use cni_agent::datapath::{
    conntrack::{monotonic_ns, NatTable, Timeouts},
    entries::{addr_words, ip_key, masq_policy},
    occupancy::occupancy,
    pins::{load_pinned, open_pinned, MapSizes, PinLayout},
};
use cni_ebpf_common::{map_names, CtKey, FwStats, IpKey, MasqPolicy, NatEntry};
use cni_tests::{bpffs::BpfFs, prelude::*};

/// Bindings of the first pod; the second has `OTHER`. Together several
/// batches (the agent asks for 4,096 entries per call).
const MINE: u16 = 7_000;
const OTHER: u16 = 3_000;

fn key(src: Ipv4Addr, n: u16) -> CtKey {
    let (src, family) = addr_words(src.into());
    let (dst, _) = addr_words(Ipv4Addr::new(198, 18, (n >> 8) as u8, n as u8).into());
    CtKey {
        src,
        dst,
        sport: (20_000 + n).to_be(),
        dport: 443u16.to_be(),
        proto: 6,
        family,
        _pad: [0; 2],
    }
}

fn binding(n: u16) -> NatEntry {
    NatEntry {
        addr: addr_words(Ipv4Addr::new(198, 18, 200, 1).into()).0,
        port: (30_000 + n).to_be(),
        state: 0,
        _pad: 0,
        _pad2: 0,
        // Fresh: nothing expires by time here.
        last_seen_ns: monotonic_ns(),
    }
}

/// The port of an "address:port" endpoint as the NAT dump shows it.
fn port_of(endpoint: &str) -> u16 {
    endpoint
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {endpoint}"))
}

fn entries_of(layout: &PinLayout, name: &str) -> Option<u64> {
    occupancy(layout)
        .into_iter()
        .find(|o| o.name == name)
        .and_then(|o| o.entries)
}

#[test]
fn whole_tables_are_read_in_batches_entry_for_entry() {
    require_e2e!();
    let dir = TempDir::new("batchread");
    let bpffs = BpfFs::mount(&dir.path().join("bpf"));
    let layout = PinLayout::new(bpffs.path().join("root"));
    let _ebpf = load_pinned(&layout, MapSizes::default()).expect("load the object");

    let (a, b) = (Ipv4Addr::new(10, 99, 0, 2), Ipv4Addr::new(10, 99, 0, 3));
    let mut masq: HashMap<_, IpKey, MasqPolicy> = HashMap::try_from(Map::HashMap(
        open_pinned(&layout, map_names::MASQ_SOURCES).expect("MASQ_SOURCES"),
    ))
    .expect("typed MASQ_SOURCES");
    for pod in [a, b] {
        let subnet = "10.99.0.0/24".parse().expect("subnet");
        masq.insert(ip_key(pod.into()), masq_policy(subnet), 0)
            .expect("masquerade source");
    }
    let mut orig: HashMap<_, CtKey, NatEntry> = HashMap::try_from(Map::LruHashMap(
        open_pinned(&layout, map_names::SNAT_ORIG).expect("SNAT_ORIG"),
    ))
    .expect("typed SNAT_ORIG");
    for n in 0..MINE {
        orig.insert(key(a, n), binding(n), 0).expect("insert");
    }
    for n in 0..OTHER {
        orig.insert(key(b, n), binding(n), 0).expect("insert");
    }
    let total = u64::from(MINE) + u64::from(OTHER);

    let mut nat = NatTable::open(&layout).expect("open the NAT table");
    let dump = nat.dump();
    assert_eq!(dump.len() as u64, total, "every binding once");
    let mut seen: Vec<(String, String)> = dump
        .iter()
        .map(|b| (b.pod.clone(), b.nat.clone()))
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len() as u64, total, "no binding twice");
    // Values come with their keys: pod port 20000+n was given 30000+n.
    for b in &dump {
        assert_eq!(port_of(&b.nat) - 30_000, port_of(&b.pod) - 20_000, "{b:?}");
    }
    assert_eq!(nat.occupancy().0 as u64, total);
    assert_eq!(entries_of(&layout, map_names::SNAT_ORIG), Some(total));

    // Both pods live: a sweep keeps every fresh binding.
    let timeouts = Timeouts::default();
    assert_eq!(nat.expire(&timeouts).expect("sweep"), 0);
    // Pod A deleted (its DEL removes its masquerade source, not its
    // bindings): the next sweep removes exactly its bindings.
    masq.remove(&ip_key(a.into())).expect("remove the source");
    assert_eq!(nat.expire(&timeouts).expect("sweep"), usize::from(MINE));
    assert_eq!(nat.occupancy().0, usize::from(OTHER));
    assert!(nat.dump().iter().all(|b| b.pod.starts_with("10.99.0.3:")));
    assert_eq!(
        entries_of(&layout, map_names::SNAT_ORIG),
        Some(u64::from(OTHER))
    );

    // A per-CPU map: its values are one slot per possible CPU.
    let mut stats: PerCpuHashMap<_, u32, FwStats> = PerCpuHashMap::try_from(Map::PerCpuHashMap(
        open_pinned(&layout, map_names::FW_STATS).expect("FW_STATS"),
    ))
    .expect("typed FW_STATS");
    let cpus = aya::util::nr_cpus().expect("possible CPUs");
    for ifindex in 1..=3u32 {
        let values = PerCpuValues::try_from(vec![FwStats::default(); cpus]).expect("values");
        stats.insert(ifindex, values, 0).expect("insert");
    }
    assert_eq!(entries_of(&layout, map_names::FW_STATS), Some(3));
}
