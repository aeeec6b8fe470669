//! The userspace half of the NAT connection tracking: reading bindings for
//! the admin CLI, and expiring them. The programs only stamp last-seen times
//! and TCP flags; timeouts are decided here so they can follow TCP state
//! (a closed connection frees its port within seconds, an idle established
//! one keeps it for an hour).
use std::{net::IpAddr, time::Duration};

use aya::maps::{HashMap, Map, MapData, MapError};
use cni_ebpf_common::{ct_state, map_names, CtKey, HpReply, IpKey, MasqPolicy, NatEntry};
use serde::Serialize;

use super::{
    batch::hash_entries,
    entries::{hash, words_addr},
    loader::DatapathError,
    pins::{open_pinned, PinLayout},
};

/// How long an idle binding is kept, by state.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub tcp_established: Duration,
    /// SYN seen, no reply yet.
    pub tcp_opening: Duration,
    /// FIN in both directions, or RST in either.
    pub tcp_closed: Duration,
    pub udp: Duration,
    pub icmp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_established: Duration::from_secs(3600),
            tcp_opening: Duration::from_secs(60),
            tcp_closed: Duration::from_secs(10),
            udp: Duration::from_secs(60),
            icmp: Duration::from_secs(30),
        }
    }
}

/// One binding, both halves, as shown by `cni-agent nat`.
#[derive(Clone, Debug, Serialize)]
pub struct Binding {
    pub proto: &'static str,
    pub pod: String,
    pub remote: String,
    pub nat: String,
    pub state: String,
    pub idle_ms: u64,
    /// True when the reply half is missing (evicted); the datapath repairs
    /// the other way round, this only shows in a dump.
    pub reply_half_missing: bool,
}

/// ICMP and ICMPv6: echo bindings key the identifier on one side only.
fn is_icmp(proto: u8) -> bool {
    proto == 1 || proto == 58
}

/// See [`NatTable::ports_in_use`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortUse {
    pub addr: IpAddr,
    pub proto: &'static str,
    pub ports: usize,
    pub bindings: usize,
}

fn proto_name(p: u8) -> &'static str {
    match p {
        1 => "icmp",
        58 => "icmpv6",
        6 => "tcp",
        17 => "udp",
        _ => "other",
    }
}

fn endpoint(addr: IpAddr, port_be: u16) -> String {
    let port = u16::from_be(port_be);
    match addr {
        IpAddr::V6(a) => format!("[{a}]:{port}"),
        IpAddr::V4(a) => format!("{a}:{port}"),
    }
}

fn state_text(bits: u8) -> String {
    let mut v = Vec::new();
    for (b, n) in [
        (ct_state::SYN, "syn"),
        (ct_state::FIN, "fin"),
        (ct_state::RST, "rst"),
        (ct_state::REPLIED, "replied"),
        (ct_state::INBOUND, "inbound"),
    ] {
        if bits & b != 0 {
            v.push(n);
        }
    }
    v.join(",")
}

/// CLOCK_MONOTONIC in ns, the clock bpf_ktime_get_ns() reads.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC);
    ts.map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// An original half, its reply half's key, and the reply half if present.
type Pair = (CtKey, NatEntry, CtKey, Option<NatEntry>);

/// The NAT maps, opened from their pins, and the two maps that say whose
/// bindings they may hold.
pub struct NatTable {
    orig: HashMap<MapData, CtKey, NatEntry>,
    reply: HashMap<MapData, CtKey, NatEntry>,
    hp_orig: HashMap<MapData, CtKey, NatEntry>,
    hp_reply: HashMap<MapData, CtKey, HpReply>,
    /// Masqueraded pods: the sources of the pods' bindings.
    masq: HashMap<MapData, IpKey, MasqPolicy>,
    /// Node addresses: the sources of node flows the masquerade moved off
    /// a pod's tuple.
    node: HashMap<MapData, IpKey, u32>,
}

fn open_lru<V: aya::Pod>(
    layout: &PinLayout,
    name: &'static str,
) -> Result<HashMap<MapData, CtKey, V>, DatapathError> {
    let data = open_pinned(layout, name)?;
    HashMap::try_from(Map::LruHashMap(data)).map_err(|source| DatapathError::Map { name, source })
}

/// The reply-half key of an original-half binding.
fn reply_key(key: &CtKey, val: &NatEntry) -> CtKey {
    let icmp = is_icmp(key.proto);
    CtKey {
        src: key.dst,
        dst: val.addr,
        sport: if icmp { 0 } else { key.dport },
        dport: val.port,
        proto: key.proto,
        family: key.family,
        _pad: [0; 2],
    }
}

impl NatTable {
    pub fn open(layout: &PinLayout) -> Result<Self, DatapathError> {
        Ok(Self {
            orig: open_lru(layout, map_names::SNAT_ORIG)?,
            reply: open_lru(layout, map_names::SNAT_REPLY)?,
            hp_orig: open_lru(layout, map_names::HP_ORIG)?,
            hp_reply: open_lru(layout, map_names::HP_REPLY)?,
            masq: hash(layout, map_names::MASQ_SOURCES)?,
            node: hash(layout, map_names::NODE_ADDRS)?,
        })
    }

    /// Whether bindings from `src` may live: a masqueraded pod's or the
    /// node's. Asked again of the maps just before a binding goes, so a
    /// pod added since the sweep read them keeps its new bindings.
    fn is_source(&self, src: &IpKey) -> bool {
        self.masq.get(src, 0).is_ok() || self.node.get(src, 0).is_ok()
    }

    /// Every original half with its reply half (if present), plus the
    /// reply halves no original half points at. Each map is read once, in
    /// batches, and joined here: a per-binding lookup of the reply half
    /// would add a syscall per binding, which on a node opening thousands
    /// of connections a second is CPU the sweeper takes from the pods.
    fn pairs(&self) -> (Vec<Pair>, Vec<(CtKey, NatEntry)>) {
        let mut replies: std::collections::HashMap<CtKey, NatEntry> =
            hash_entries(&self.reply).into_iter().collect();
        let pairs = hash_entries(&self.orig)
            .into_iter()
            .map(|(k, v)| {
                let rk = reply_key(&k, &v);
                let rv = replies.remove(&rk);
                (k, v, rk, rv)
            })
            .collect();
        (pairs, replies.into_iter().collect())
    }

    /// Every binding, for the admin CLI.
    pub fn dump(&self) -> Vec<Binding> {
        let now = monotonic_ns();
        self.pairs()
            .0
            .into_iter()
            .map(|(k, v, _, rv)| {
                let last = rv.map_or(v.last_seen_ns, |r| r.last_seen_ns.max(v.last_seen_ns));
                Binding {
                    proto: proto_name(k.proto),
                    pod: endpoint(words_addr(k.src, k.family), k.sport),
                    remote: endpoint(words_addr(k.dst, k.family), k.dport),
                    nat: endpoint(words_addr(v.addr, k.family), v.port),
                    state: state_text(v.state | rv.map_or(0, |r| r.state)),
                    idle_ms: now.saturating_sub(last) / 1_000_000,
                    reply_half_missing: rv.is_none(),
                }
            })
            .collect()
    }

    /// Per translated address and protocol: how many distinct ports the
    /// masquerade holds and how many bindings use them (a port serves one
    /// binding per remote endpoint). Inbound pass-through flows translate
    /// nothing and are left out.
    pub fn ports_in_use(&self) -> Vec<PortUse> {
        use std::collections::{BTreeMap, BTreeSet};
        let mut by: BTreeMap<(IpAddr, &'static str), (BTreeSet<u16>, usize)> = BTreeMap::new();
        for (k, v) in hash_entries(&self.orig) {
            if v.state & ct_state::INBOUND != 0 {
                continue;
            }
            let e = by
                .entry((words_addr(v.addr, k.family), proto_name(k.proto)))
                .or_default();
            e.0.insert(u16::from_be(v.port));
            e.1 += 1;
        }
        by.into_iter()
            .map(|((addr, proto), (ports, bindings))| PortUse {
                addr,
                proto,
                ports: ports.len(),
                bindings,
            })
            .collect()
    }

    /// (original halves, reply halves) currently in the maps.
    pub fn occupancy(&self) -> (usize, usize) {
        (
            hash_entries(&self.orig).len(),
            hash_entries(&self.reply).len(),
        )
    }

    /// Removes every binding idle for longer than its state allows, and
    /// every binding of a source that is no longer a masqueraded pod or a
    /// node address (a DEL leaves a pod's bindings here: finding them is a
    /// walk of the whole table, which the DEL would do under the node
    /// lock), both halves together; and reply halves whose original half
    /// is gone and which are idle past the longest timeout. Returns how
    /// many bindings were removed.
    pub fn expire(&mut self, t: &Timeouts) -> Result<usize, DatapathError> {
        let now = monotonic_ns();
        let mut removed = 0;
        let sources: std::collections::HashSet<IpKey> = hash_entries(&self.masq)
            .into_iter()
            .map(|(k, _)| k)
            .chain(hash_entries(&self.node).into_iter().map(|(k, _)| k))
            .collect();
        let (pairs, unpaired) = self.pairs();
        for (k, v, rk, rv) in pairs {
            let state = v.state | rv.map_or(0, |r| r.state);
            let last = rv.map_or(v.last_seen_ns, |r| r.last_seen_ns.max(v.last_seen_ns));
            let timeout = match k.proto {
                6 if state & ct_state::RST != 0 => t.tcp_closed,
                6 if v.state & ct_state::FIN != 0
                    && rv.is_some_and(|r| r.state & ct_state::FIN != 0) =>
                {
                    t.tcp_closed
                }
                6 if state & ct_state::REPLIED == 0 => t.tcp_opening,
                6 => t.tcp_established,
                17 => t.udp,
                _ => t.icmp,
            };
            let src = IpKey {
                addr: k.src,
                family: k.family,
                _pad: [0; 3],
            };
            let idle = now.saturating_sub(last) >= timeout.as_nanos() as u64;
            if idle || (!sources.contains(&src) && !self.is_source(&src)) {
                // Reply half first: once it is gone the port is free again,
                // and a racing packet of the flow re-creates both halves.
                ignore_missing(self.reply.remove(&rk))?;
                ignore_missing(self.orig.remove(&k))?;
                removed += 1;
            }
        }
        // Orphaned reply halves (their original half was evicted and the
        // flow went quiet before a reply could repair it).
        let longest = t.tcp_established.as_nanos() as u64;
        let orphans = unpaired
            .into_iter()
            .filter(|(_, v)| now.saturating_sub(v.last_seen_ns) >= longest)
            .map(|(k, _)| k);
        for k in orphans {
            ignore_missing(self.reply.remove(&k))?;
        }
        removed += self.expire_hostports(t, now)?;
        Ok(removed)
    }
}

/// Removes every entry of `map` that `pred` selects; returns how many.
fn remove_where<V: aya::Pod>(
    map: &mut HashMap<MapData, CtKey, V>,
    pred: impl Fn(&CtKey, &V) -> bool,
) -> Result<usize, DatapathError> {
    let keys: Vec<CtKey> = hash_entries(map)
        .into_iter()
        .filter(|(k, v)| pred(k, v))
        .map(|(k, _)| k)
        .collect();
    for k in &keys {
        ignore_missing(map.remove(k))?;
    }
    Ok(keys.len())
}

impl NatTable {
    /// Removes the hostPort reply (and hairpin) bindings of a mapping that
    /// was removed, so stale flows to it stop at once.
    pub fn flush_hostport(&mut self, host_port: u16, proto: u8) -> Result<usize, DatapathError> {
        let port_be = host_port.to_be();
        let n = remove_where(&mut self.hp_reply, |k, v| {
            k.proto == proto && v.src_port == port_be
        })?;
        remove_where(&mut self.hp_orig, |k, _| {
            k.proto == proto && k.dport == port_be
        })?;
        Ok(n)
    }

    /// Expires idle hostPort bindings with the same timeouts as the
    /// masquerade's.
    fn expire_hostports(&mut self, t: &Timeouts, now: u64) -> Result<usize, DatapathError> {
        let idle = |proto: u8, state: u8, last: u64| {
            now.saturating_sub(last) >= timeout_of(proto, state, t).as_nanos() as u64
        };
        let n = remove_where(&mut self.hp_reply, |k, v| {
            idle(k.proto, v.state, v.last_seen_ns)
        })?;
        remove_where(&mut self.hp_orig, |k, v| {
            idle(k.proto, v.state, v.last_seen_ns)
        })?;
        Ok(n)
    }
}

/// The idle timeout of a binding in `state` (bits of both directions).
fn timeout_of(proto: u8, state: u8, t: &Timeouts) -> Duration {
    match proto {
        6 if state & (ct_state::RST | ct_state::FIN) != 0 => t.tcp_closed,
        6 => t.tcp_established,
        17 => t.udp,
        _ => t.icmp,
    }
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), DatapathError> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(source) => Err(DatapathError::Map {
            name: map_names::SNAT_ORIG,
            source,
        }),
    }
}
