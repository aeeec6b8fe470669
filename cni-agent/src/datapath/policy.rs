//! ebpf-firewall's map operations: applying, revoking and checking one
//! attachment's [`FirewallSpec`] in the maps the programs read (cni-ebpf
//! `policy.rs`), the forwarding hooks on bridges and uplinks, and the
//! counters report. The rule model and its compiler live in
//! [`crate::firewall`].
use std::collections::BTreeMap;

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        HashMap, Map, MapData, MapError, PerCpuHashMap,
    },
    programs::SchedClassifier,
};
use cni_ebpf_common::{
    fw, map_names, prog_names, FwAttach, FwCidrKey, FwCtEntry, FwCtKey, FwEndpoint, FwFragKey,
    FwPortKey, FwRegion, FwRuleKey, FwStats, FwVerdict, IpKey,
};
use serde_json::{json, Value};

use crate::{
    firewall::{compile, Action, FirewallSpec, RuleSet},
    state::record::{Entry, Record},
};

use super::{
    batch::hash_entries,
    entries::{ip_key, link_index},
    links::{ensure_tc, ifindex_exists, link_pin, Placement},
    loader::{DatapathError, Hook},
    pins::{open_pinned, PinLayout},
    uplink::UplinkMap,
};

/// The attachment's configuration entry.
fn attach_value(spec: &FirewallSpec) -> Result<FwAttach, DatapathError> {
    let mac = crate::netlink::parse_mac(&spec.mac)
        .map_err(|_| DatapathError::InvalidMac(spec.mac.clone()))?;
    Ok(FwAttach {
        mac,
        ingress_policy: spec.ingress_policy.code(),
        ingress_default: spec.ingress.default.code(),
        egress_default: spec.egress.default.code(),
        flags: if spec.bypass { fw::FLAG_BYPASS } else { 0 },
        cookie: 0,
        bridge_ifindex: spec.bridge_ifindex,
        ingress_rules: spec.ingress.rules.len() as u16,
        egress_rules: spec.egress.rules.len() as u16,
        ifname: ifname_bytes(&spec.ifname),
    })
}

/// The entry as [`attach_value`] would write it, but for the cookie (which
/// each attachment draws for itself).
fn without_cookie(a: FwAttach) -> FwAttach {
    FwAttach { cookie: 0, ..a }
}

/// A cookie for a new attachment of an ifindex: random, so that it differs
/// (but for a 1 in 65,536 chance) from the cookies of connections an
/// earlier attachment of the same ifindex left for the sweeper; never
/// `old`, the cookie of an entry it replaces.
fn fresh_cookie(old: Option<u16>) -> u16 {
    let mut b = [0u8; 2];
    // SAFETY: `b` is a valid buffer of the length passed.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    let c = if n == 2 {
        u16::from_ne_bytes(b)
    } else {
        (super::conntrack::monotonic_ns() >> 10) as u16
    };
    if Some(c) == old {
        c.wrapping_add(1)
    } else {
        c
    }
}

/// The cookie in a first fragment's verdict as FW_FRAGS holds it (the
/// action in the low half, the attachment's cookie in the high one).
fn frag_cookie(value: u32) -> u16 {
    (value >> 16) as u16
}

fn endpoint_value(spec: &FirewallSpec) -> FwEndpoint {
    FwEndpoint {
        ifindex: spec.ifindex,
        bridge_ifindex: spec.bridge_ifindex,
        flags: if spec.bypass { fw::FLAG_BYPASS } else { 0 },
        _pad: [0; 3],
    }
}

fn ifname_bytes(name: &str) -> [u8; 16] {
    let mut b = [0u8; 16];
    for (d, s) in b.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    b
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

fn ignore_missing(name: &'static str, r: Result<(), MapError>) -> Result<(), DatapathError> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(source) => Err(DatapathError::Map { name, source }),
    }
}

fn open(
    layout: &PinLayout,
    name: &'static str,
    wrap: fn(MapData) -> Map,
) -> Result<Map, DatapathError> {
    Ok(wrap(open_pinned(layout, name)?))
}

/// The firewall's maps, opened from their pins.
pub struct PolicyMaps {
    attach: HashMap<MapData, u32, FwAttach>,
    endpoints: HashMap<MapData, IpKey, FwEndpoint>,
    bridges: HashMap<MapData, u32, u32>,
    cidrs: LpmTrie<MapData, FwCidrKey, FwRegion>,
    ports: LpmTrie<MapData, FwPortKey, FwVerdict>,
    ct: HashMap<MapData, FwCtKey, FwCtEntry>,
    frags: HashMap<MapData, FwFragKey, u32>,
    stats: PerCpuHashMap<MapData, u32, FwStats>,
    hits: PerCpuHashMap<MapData, FwRuleKey, u64>,
}

impl PolicyMaps {
    pub fn open(layout: &PinLayout) -> Result<Self, DatapathError> {
        Ok(Self {
            attach: HashMap::try_from(open(layout, map_names::FW_ATTACH, Map::HashMap)?)
                .map_err(map_err(map_names::FW_ATTACH))?,
            endpoints: HashMap::try_from(open(layout, map_names::FW_ENDPOINTS, Map::HashMap)?)
                .map_err(map_err(map_names::FW_ENDPOINTS))?,
            bridges: HashMap::try_from(open(layout, map_names::FW_BRIDGES, Map::HashMap)?)
                .map_err(map_err(map_names::FW_BRIDGES))?,
            cidrs: LpmTrie::try_from(open(layout, map_names::FW_CIDRS, Map::LpmTrie)?)
                .map_err(map_err(map_names::FW_CIDRS))?,
            ports: LpmTrie::try_from(open(layout, map_names::FW_PORTS, Map::LpmTrie)?)
                .map_err(map_err(map_names::FW_PORTS))?,
            ct: HashMap::try_from(open(layout, map_names::FW_CT, Map::LruHashMap)?)
                .map_err(map_err(map_names::FW_CT))?,
            frags: HashMap::try_from(open(layout, map_names::FW_FRAGS, Map::LruHashMap)?)
                .map_err(map_err(map_names::FW_FRAGS))?,
            stats: PerCpuHashMap::try_from(open(layout, map_names::FW_STATS, Map::PerCpuHashMap)?)
                .map_err(map_err(map_names::FW_STATS))?,
            hits: PerCpuHashMap::try_from(open(
                layout,
                map_names::FW_RULE_HITS,
                Map::PerCpuHashMap,
            )?)
            .map_err(map_err(map_names::FW_RULE_HITS))?,
        })
    }

    /// Whether FW_ATTACH[ifindex] belongs to another device than `ifname`
    /// (the ifindex was reused after ours went away).
    fn owned_by_other(&self, ifindex: u32, ifname: &str) -> bool {
        self.attach
            .get(&ifindex, 0)
            .is_ok_and(|a| a.ifname != ifname_bytes(ifname))
    }

    /// Writes the attachment's rules, endpoints and configuration (last:
    /// the programs apply no policy until it exists). A repeated ADD of the
    /// same attachment keeps its cookie, and so its connections.
    pub fn apply(&mut self, spec: &FirewallSpec) -> Result<(), DatapathError> {
        let mut value = attach_value(spec)?;
        match self.attach.get(&spec.ifindex, 0) {
            Ok(old) if !self.owned_by_other(spec.ifindex, &spec.ifname) => {
                value.cookie = old.cookie;
                if old != value {
                    // Another rule set (a repeated ADD with other rules):
                    // start from nothing.
                    self.purge_rules(spec.ifindex)?;
                }
            }
            Ok(old) => {
                // A stale entry of a device that had this ifindex before.
                value.cookie = fresh_cookie(Some(old.cookie));
                self.purge_rules(spec.ifindex)?;
            }
            Err(_) => value.cookie = fresh_cookie(None),
        }
        for (dir, set) in [
            (fw::DIR_INGRESS, &spec.ingress),
            (fw::DIR_EGRESS, &spec.egress),
        ] {
            let c =
                compile(spec.ifindex, dir, set).map_err(|source| DatapathError::FirewallRules {
                    ifname: spec.ifname.clone(),
                    source,
                })?;
            for (bits, k, v) in &c.cidrs {
                self.cidrs
                    .insert(&Key::new(*bits, *k), *v, 0)
                    .map_err(map_err(map_names::FW_CIDRS))?;
            }
            for (bits, k, v) in &c.ports {
                self.ports
                    .insert(&Key::new(*bits, *k), *v, 0)
                    .map_err(map_err(map_names::FW_PORTS))?;
            }
        }
        let ep = endpoint_value(spec);
        for ip in &spec.ips {
            self.endpoints
                .insert(ip_key(*ip), ep, 0)
                .map_err(map_err(map_names::FW_ENDPOINTS))?;
        }
        if spec.bridge_ifindex != 0 {
            self.bridges
                .insert(spec.bridge_ifindex, 1, 0)
                .map_err(map_err(map_names::FW_BRIDGES))?;
        }
        self.attach
            .insert(spec.ifindex, value, 0)
            .map_err(map_err(map_names::FW_ATTACH))
    }

    /// Removes everything [`apply`](Self::apply) wrote, plus the
    /// attachment's counters. Its tracked connections are left to
    /// [`sweep`](Self::sweep): finding them is a walk of the whole table,
    /// and they count for no later attachment (cookies). Entries of the
    /// ifindex that belong to another device (reused index) are left alone.
    pub fn revoke(&mut self, spec: &FirewallSpec) -> Result<(), DatapathError> {
        if self.owned_by_other(spec.ifindex, &spec.ifname) {
            return Ok(());
        }
        ignore_missing(map_names::FW_ATTACH, self.attach.remove(&spec.ifindex))?;
        for ip in &spec.ips {
            let key = ip_key(*ip);
            if self
                .endpoints
                .get(&key, 0)
                .is_ok_and(|e| e.ifindex == spec.ifindex)
            {
                ignore_missing(map_names::FW_ENDPOINTS, self.endpoints.remove(&key))?;
            }
        }
        for (dir, set) in [
            (fw::DIR_INGRESS, &spec.ingress),
            (fw::DIR_EGRESS, &spec.egress),
        ] {
            // Rules that never compiled were never written.
            let Ok(c) = compile(spec.ifindex, dir, set) else {
                continue;
            };
            for (bits, k, _) in &c.cidrs {
                ignore_missing(map_names::FW_CIDRS, self.cidrs.remove(&Key::new(*bits, *k)))?;
            }
            for (bits, k, _) in &c.ports {
                ignore_missing(map_names::FW_PORTS, self.ports.remove(&Key::new(*bits, *k)))?;
            }
            let rule_keys = (0..set.rules.len() as u16).chain([fw::RULE_DEFAULT]);
            for rule in rule_keys {
                let key = FwRuleKey {
                    ifindex: spec.ifindex,
                    dir,
                    _pad: 0,
                    rule,
                };
                ignore_missing(map_names::FW_RULE_HITS, self.hits.remove(&key))?;
            }
        }
        ignore_missing(map_names::FW_STATS, self.stats.remove(&spec.ifindex))?;
        self.release_bridge(spec.bridge_ifindex)
    }

    /// Drops the bridge from FW_BRIDGES once no firewalled attachment is on
    /// it any more.
    fn release_bridge(&mut self, bridge_ifindex: u32) -> Result<(), DatapathError> {
        let in_use = self
            .attach
            .iter()
            .filter_map(Result::ok)
            .any(|(_, a)| a.bridge_ifindex == bridge_ifindex);
        if !in_use {
            ignore_missing(map_names::FW_BRIDGES, self.bridges.remove(&bridge_ifindex))?;
        }
        Ok(())
    }

    /// Removes the tracked connections and fragment verdicts that no
    /// attachment counts any more: their ifindex has no FW_ATTACH entry,
    /// or one with another cookie. Run by the agent's sweeper, without the
    /// node lock: each entry's attachment is looked up again just before
    /// it goes, so a connection of an attachment added since the table was
    /// read stays. Returns how many entries went.
    pub fn sweep(&mut self) -> Result<usize, DatapathError> {
        let cookies: BTreeMap<u32, u16> = hash_entries(&self.attach)
            .into_iter()
            .map(|(ifindex, a)| (ifindex, a.cookie))
            .collect();
        let stale = |ifindex: u32, cookie: u16| cookies.get(&ifindex) != Some(&cookie);
        let ct: Vec<(FwCtKey, u16)> = hash_entries(&self.ct)
            .into_iter()
            .map(|(k, v)| (k, v.cookie))
            .filter(|(k, cookie)| stale(k.ifindex, *cookie))
            .collect();
        let frags: Vec<(FwFragKey, u16)> = hash_entries(&self.frags)
            .into_iter()
            .map(|(k, v)| (k, frag_cookie(v)))
            .filter(|(k, cookie)| stale(k.ifindex, *cookie))
            .collect();
        let mut n = 0;
        for (k, cookie) in ct {
            if !self.owns(k.ifindex, cookie) {
                ignore_missing(map_names::FW_CT, self.ct.remove(&k))?;
                n += 1;
            }
        }
        for (k, cookie) in frags {
            if !self.owns(k.ifindex, cookie) {
                ignore_missing(map_names::FW_FRAGS, self.frags.remove(&k))?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Whether the attachment on `ifindex` now has this cookie.
    fn owns(&self, ifindex: u32, cookie: u16) -> bool {
        self.attach
            .get(&ifindex, 0)
            .is_ok_and(|a| a.cookie == cookie)
    }

    /// Removes every compiled rule of `ifindex`, whatever rules produced
    /// them (slow: walks both tries; only for a replaced rule set).
    fn purge_rules(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        let cidrs: Vec<Key<FwCidrKey>> = self
            .cidrs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().ifindex == ifindex)
            .collect();
        for k in cidrs {
            ignore_missing(map_names::FW_CIDRS, self.cidrs.remove(&k))?;
        }
        let ports: Vec<Key<FwPortKey>> = self
            .ports
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().ifindex == ifindex)
            .collect();
        for k in ports {
            ignore_missing(map_names::FW_PORTS, self.ports.remove(&k))?;
        }
        Ok(())
    }

    /// Whether every entry of the attachment is present with its value.
    pub fn is_applied(&self, spec: &FirewallSpec) -> bool {
        let Ok(value) = attach_value(spec) else {
            return false;
        };
        if self.attach.get(&spec.ifindex, 0).ok().map(without_cookie) != Some(value) {
            return false;
        }
        let ep = endpoint_value(spec);
        if !spec
            .ips
            .iter()
            .all(|ip| self.endpoints.get(&ip_key(*ip), 0).ok() == Some(ep))
        {
            return false;
        }
        [
            (fw::DIR_INGRESS, &spec.ingress),
            (fw::DIR_EGRESS, &spec.egress),
        ]
        .into_iter()
        .all(|(dir, set)| {
            compile(spec.ifindex, dir, set).is_ok_and(|c| {
                c.cidrs
                    .iter()
                    .all(|(b, k, v)| self.cidrs.get(&Key::new(*b, *k), 0).ok() == Some(*v))
                    && c.ports
                        .iter()
                        .all(|(b, k, v)| self.ports.get(&Key::new(*b, *k), 0).ok() == Some(*v))
            })
        })
    }

    /// The attachment's counters (`fw::STAT_*` slots), summed over CPUs:
    /// what the agent's /metrics exports per pod.
    pub fn counters(&self, ifindex: u32) -> [u64; fw::STAT_SLOTS] {
        self.stats_of(ifindex)
    }

    fn stats_of(&self, ifindex: u32) -> [u64; fw::STAT_SLOTS] {
        let mut sum = [0u64; fw::STAT_SLOTS];
        if let Ok(per_cpu) = self.stats.get(&ifindex, 0) {
            for s in per_cpu.iter() {
                for (d, v) in sum.iter_mut().zip(s.counters.iter()) {
                    *d += v;
                }
            }
        }
        sum
    }

    fn hits_of(&self, ifindex: u32, dir: u8, rule: u16) -> u64 {
        let key = FwRuleKey {
            ifindex,
            dir,
            _pad: 0,
            rule,
        };
        self.hits.get(&key, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }

    /// Number of tracked connections per attachment ifindex.
    fn connections(&self) -> BTreeMap<u32, u64> {
        let mut m = BTreeMap::new();
        for (k, _) in hash_entries(&self.ct) {
            *m.entry(k.ifindex).or_insert(0) += 1;
        }
        m
    }

    /// The firewall section of the agent's status: per attachment, its
    /// policy, counters, and each rule with its hits (allowed or dropped,
    /// by the rule's action).
    pub fn report(&self, attachments: &[(String, FirewallSpec)]) -> Value {
        let conns = self.connections();
        let list: Vec<Value> = attachments
            .iter()
            .map(|(key, spec)| {
                let stats = self.stats_of(spec.ifindex);
                let counters: serde_json::Map<String, Value> = fw::STAT_NAMES
                    .iter()
                    .map(|(i, n)| ((*n).to_string(), json!(stats[*i])))
                    .collect();
                let dir_report = |dir: u8, set: &RuleSet| {
                    let rules: Vec<Value> = set
                        .rules
                        .iter()
                        .enumerate()
                        .map(|(i, r)| {
                            let hits = self.hits_of(spec.ifindex, dir, i as u16);
                            json!({
                                "index": i,
                                "rule": r.describe(),
                                "action": r.action,
                                "hits": hits,
                                "allowed": if r.action == Action::Allow { hits } else { 0 },
                                "dropped": if r.action == Action::Deny { hits } else { 0 },
                            })
                        })
                        .collect();
                    let dhits = self.hits_of(spec.ifindex, dir, fw::RULE_DEFAULT);
                    json!({
                        "default": set.default,
                        "defaultHits": dhits,
                        "rules": rules,
                    })
                };
                json!({
                    "attachment": key,
                    "ifname": spec.ifname,
                    "ifindex": spec.ifindex,
                    "bridge": spec.bridge,
                    "ips": spec.ips,
                    "mac": spec.mac,
                    "ingressPolicy": spec.ingress_policy,
                    "bypass": spec.bypass,
                    "present": self.attach.get(&spec.ifindex, 0).is_ok(),
                    "connections": conns.get(&spec.ifindex).copied().unwrap_or(0),
                    "counters": counters,
                    "ingress": dir_report(fw::DIR_INGRESS, &spec.ingress),
                    "egress": dir_report(fw::DIR_EGRESS, &spec.egress),
                })
            })
            .collect();
        fn n<I: Iterator<Item = Result<K, MapError>>, K>(it: I) -> usize {
            it.filter(Result::is_ok).count()
        }
        json!({
            "attachments": list,
            "trackedConnections": conns.values().sum::<u64>(),
            // Occupancy of every firewall map: all zero once every
            // firewalled attachment is deleted.
            "entries": {
                "attachments": n(self.attach.keys()),
                "endpoints": n(self.endpoints.keys()),
                "bridges": n(self.bridges.keys()),
                "cidrs": n(self.cidrs.keys()),
                "ports": n(self.ports.keys()),
                "connections": conns.values().sum::<u64>(),
                "fragments": hash_entries(&self.frags).len(),
                "counters": n(self.stats.keys()),
                "ruleHits": n(self.hits.keys()),
            },
        })
    }
}

/// The `firewall` section of the agent's status: every attachment whose
/// record has a firewall entry, with its counters and rule hits.
pub fn status_section(layout: &PinLayout, records: &[Record]) -> Value {
    let specs: Vec<(String, FirewallSpec)> = records
        .iter()
        .flat_map(|r| {
            r.entries.iter().filter_map(|e| match e {
                Entry::Firewall(s) => Some((r.key.to_string(), (**s).clone())),
                _ => None,
            })
        })
        .collect();
    match PolicyMaps::open(layout) {
        Ok(m) => m.report(&specs),
        Err(e) => json!({ "error": e.to_string() }),
    }
}

/// The bridge's forwarding hook (shared by every firewalled attachment with
/// the bypass on that bridge). The uplinks' return-path hook is one of the
/// programs the agent keeps on every uplink.
pub fn hook_forward(layout: &PinLayout, bridge: &str) -> Result<(), DatapathError> {
    let index = link_index(bridge)?;
    attach(layout, prog_names::FW_BRIDGE_FORWARD, bridge, index)
}

/// Whether the forwarding hooks are in place on the bridge and on every
/// current uplink.
pub fn forward_hooked(layout: &PinLayout, bridge: &str) -> bool {
    let Ok(index) = link_index(bridge) else {
        return false;
    };
    let pinned =
        |idx: u32, prog: &str| link_pin(layout, &idx.to_string(), prog, Hook::Ingress).exists();
    pinned(index, prog_names::FW_BRIDGE_FORWARD)
        && UplinkMap::open(layout).is_ok_and(|u| {
            u.list()
                .into_iter()
                .filter(|(i, _, _)| ifindex_exists(*i))
                .all(|(i, _, _)| pinned(i, prog_names::FW_UPLINK_INGRESS))
        })
}

fn attach(
    layout: &PinLayout,
    program: &str,
    ifname: &str,
    ifindex: u32,
) -> Result<(), DatapathError> {
    let mut prog =
        SchedClassifier::from_pin(layout.progs_dir().join(program)).map_err(|source| {
            DatapathError::Program {
                name: program.to_string(),
                source,
            }
        })?;
    ensure_tc(
        &mut prog,
        layout,
        program,
        Hook::Ingress,
        (ifname, ifindex),
        Placement::Last,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::{IngressPolicy, PortRange, Rule, RuleProtocol};

    #[test]
    fn spec_round_trips_in_a_record() {
        let spec = FirewallSpec {
            ifname: "veth1".into(),
            ifindex: 9,
            bridge: "cni0".into(),
            bridge_ifindex: 4,
            mac: "02:00:00:00:00:01".into(),
            ips: vec!["10.1.0.2".parse().unwrap()],
            ingress_policy: IngressPolicy::SameBridge,
            bypass: true,
            ingress: RuleSet {
                default: Action::Deny,
                rules: vec![Rule {
                    action: Action::Allow,
                    cidr: Some("10.0.0.0/8".parse().unwrap()),
                    protocol: RuleProtocol::Tcp,
                    ports: Some(PortRange { from: 80, to: 81 }),
                }],
            },
            egress: RuleSet::default(),
        };
        let text = serde_json::to_string(&spec).unwrap();
        assert!(text.contains("\"ingressPolicy\":\"same-bridge\""), "{text}");
        assert_eq!(serde_json::from_str::<FirewallSpec>(&text).unwrap(), spec);
        assert_eq!(attach_value(&spec).unwrap().mac, [2, 0, 0, 0, 0, 1]);
    }
}
