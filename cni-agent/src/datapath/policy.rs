//! ebpf-firewall in the datapath: the per-attachment firewall state as a
//! record holds it ([`FirewallSpec`]), compiling its rules into the maps the
//! programs read (cni-ebpf `policy.rs`), applying, revoking and checking it,
//! the forwarding hooks on bridges and uplinks, and the counters report.
//!
//! Rules compile into two LPM tries per attachment and direction, so the
//! datapath's cost per new connection does not depend on the number of
//! rules (see [`compile`]). Compilation is deterministic: revoking an
//! attachment recompiles its recorded rules and removes exactly the keys
//! they produce, so the record (which lists the rules) determines every map
//! entry.
use std::{collections::BTreeMap, net::IpAddr};

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        HashMap, Map, MapData, MapError, PerCpuHashMap,
    },
    programs::SchedClassifier,
};
use cni_ebpf_common::{
    fw, map_names, prog_names, FwAttach, FwCidrKey, FwCtEntry, FwCtKey, FwEndpoint, FwFragKey,
    FwPortKey, FwRegion, FwRuleKey, FwStats, FwVerdict, IpKey, FAMILY_V4,
};
use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::state::record::{Entry, Record};

use super::{
    entries::{ip_key, link_index},
    links::{ensure_tc, ifindex_exists, link_pin, Placement},
    loader::{DatapathError, Hook},
    pins::{open_pinned, PinLayout},
    uplink::UplinkMap,
};

/// What a rule (or a direction's default) does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    fn code(self) -> u8 {
        match self {
            Action::Allow => fw::ACTION_ALLOW,
            Action::Deny => fw::ACTION_DENY,
        }
    }
}

/// The protocols a rule can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleProtocol {
    Any,
    Tcp,
    Udp,
    Icmp,
}

/// An inclusive port range (host order), `from <= to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRange {
    pub from: u16,
    pub to: u16,
}

/// One validated rule. It matches a new connection whose remote address
/// (the source for ingress, the destination for egress) is in `cidr` (any
/// if none), whose protocol is `protocol`, and — for TCP and UDP — whose
/// destination port is in `ports` (any if none; a rule with ports only
/// matches TCP and UDP).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<IpNet>,
    pub protocol: RuleProtocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<PortRange>,
}

impl Rule {
    /// The rule as an operator wrote it, for counters.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} {}",
            match self.action {
                Action::Allow => "allow",
                Action::Deny => "deny",
            },
            match self.protocol {
                RuleProtocol::Any => "any",
                RuleProtocol::Tcp => "tcp",
                RuleProtocol::Udp => "udp",
                RuleProtocol::Icmp => "icmp",
            }
        );
        if let Some(c) = self.cidr {
            s.push_str(&format!(" {c}"));
        }
        if let Some(p) = self.ports {
            if p.from == p.to {
                s.push_str(&format!(" port {}", p.from));
            } else {
                s.push_str(&format!(" ports {}-{}", p.from, p.to));
            }
        }
        s
    }

    fn v4_net(&self) -> Ipv4Net {
        match self.cidr {
            Some(IpNet::V4(n)) => n.trunc(),
            // IPv6 CIDRs are refused by the plugin; they never match v4.
            _ => Ipv4Net::default(),
        }
    }

    fn matches_proto(&self, proto: u8) -> bool {
        match self.protocol {
            RuleProtocol::Any => self.ports.is_none() || proto == 6 || proto == 17,
            RuleProtocol::Tcp => proto == 6,
            RuleProtocol::Udp => proto == 17,
            RuleProtocol::Icmp => proto == 1,
        }
    }
}

/// One direction's ordered first-match rules and default action.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleSet {
    pub default: Action,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

impl Default for RuleSet {
    fn default() -> Self {
        Self {
            default: Action::Allow,
            rules: Vec::new(),
        }
    }
}

/// `ingressPolicy`, as the reference firewall plugin defines it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IngressPolicy {
    /// Every connection to the pod is subject to its rules only.
    #[default]
    Open,
    /// Pods on other bridges may not open connections to the pod.
    SameBridge,
    /// No other pod (any bridge) may open connections to the pod.
    Isolated,
}

impl IngressPolicy {
    fn code(self) -> u8 {
        match self {
            IngressPolicy::Open => fw::POLICY_OPEN,
            IngressPolicy::SameBridge => fw::POLICY_SAME_BRIDGE,
            IngressPolicy::Isolated => fw::POLICY_ISOLATED,
        }
    }
}

/// Everything the firewall keeps for one attachment, as its record lists
/// it. The ifindexes are resolved by the plugin at ADD, so a DEL finds the
/// entries after the veth (and its name) are gone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FirewallSpec {
    /// Host end of the pod's veth.
    pub ifname: String,
    pub ifindex: u32,
    pub bridge: String,
    pub bridge_ifindex: u32,
    /// The pod's MAC (aa:bb:cc:dd:ee:ff).
    pub mac: String,
    /// The pod's addresses: the only sources it may use.
    pub ips: Vec<IpAddr>,
    pub ingress_policy: IngressPolicy,
    /// Forward the pod's routed traffic past the host stack.
    pub bypass: bool,
    pub ingress: RuleSet,
    pub egress: RuleSet,
}

/// Why a rule set cannot be compiled.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("{count} rules, more than the limit of {max} per direction")]
    TooManyRules { count: usize, max: usize },
    #[error("the rules compile to {count} datapath entries, more than the limit of {max} per direction (use fewer port ranges or fewer nested CIDRs)")]
    TooManyEntries { count: usize, max: usize },
}

/// Compiled entries of one direction are capped so that one attachment
/// cannot fill the shared tries.
pub const MAX_COMPILED_ENTRIES: usize = 65536;

/// Bits of the trie keys that are always matched (ifindex, dir, ...).
const KEY_FIXED_BITS: u32 = 64;

/// The map entries one direction of one attachment compiles to: (LPM
/// prefix length, key data, value).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub cidrs: Vec<(u32, FwCidrKey, FwRegion)>,
    pub ports: Vec<(u32, FwPortKey, FwVerdict)>,
}

fn verdict(rule: Option<(usize, &Rule)>) -> FwVerdict {
    match rule {
        Some((i, r)) => FwVerdict {
            rule: i as u16,
            action: r.action.code(),
            _pad: 0,
        },
        None => FwVerdict {
            rule: fw::RULE_DEFAULT,
            action: fw::ACTION_NONE,
            _pad: 0,
        },
    }
}

/// First-match resolution of port ranges: the disjoint intervals of
/// 0..=65535 that some rule claims, each with the first rule that does.
fn resolve_ports<'a>(
    rules: impl Iterator<Item = (usize, &'a Rule)>,
) -> Vec<(u32, u32, usize, &'a Rule)> {
    let mut free: Vec<(u32, u32)> = vec![(0, 65535)];
    let mut out = Vec::new();
    for (i, r) in rules {
        if free.is_empty() {
            break;
        }
        let (a, b) = r
            .ports
            .map_or((0, 65535), |p| (u32::from(p.from), u32::from(p.to)));
        let mut next = Vec::with_capacity(free.len() + 1);
        for &(lo, hi) in &free {
            if hi < a || lo > b {
                next.push((lo, hi));
                continue;
            }
            let (s, e) = (lo.max(a), hi.min(b));
            out.push((s, e, i, r));
            if lo < s {
                next.push((lo, s - 1));
            }
            if e < hi {
                next.push((e + 1, hi));
            }
        }
        free = next;
    }
    out.sort_by_key(|x| x.0);
    out
}

/// The prefixes (value, prefix length over 16 bits) covering `lo..=hi`.
fn port_prefixes(mut lo: u32, hi: u32) -> Vec<(u16, u32)> {
    let mut v = Vec::new();
    while lo <= hi {
        let mut size = 1u32;
        while size < 65536 && lo.is_multiple_of(size * 2) && lo + size * 2 - 1 <= hi {
            size *= 2;
        }
        v.push((lo as u16, 16 - size.trailing_zeros()));
        lo += size;
    }
    v
}

/// Compiles one direction's ordered rules for the attachment `ifindex`.
///
/// Every distinct rule CIDR (plus 0.0.0.0/0) becomes a *region* in
/// FW_CIDRS. Prefixes are either nested or disjoint, so for an address
/// whose longest match is region P, the rules whose CIDR matches the
/// address are exactly those whose CIDR contains P: the region's rules are
/// fixed. For each region the first-match decision is resolved here, per
/// protocol: ICMP and other protocols get one verdict in the region entry,
/// TCP and UDP get disjoint port intervals, each expanded into prefixes in
/// FW_PORTS. Ports nobody claims are absent and mean "default".
pub fn compile(ifindex: u32, dir: u8, set: &RuleSet) -> Result<Compiled, CompileError> {
    if set.rules.len() > fw::MAX_RULES {
        return Err(CompileError::TooManyRules {
            count: set.rules.len(),
            max: fw::MAX_RULES,
        });
    }
    let mut out = Compiled::default();
    if set.rules.is_empty() {
        return Ok(out);
    }
    let rules: Vec<(usize, Ipv4Net, &Rule)> = set
        .rules
        .iter()
        .enumerate()
        .filter(|(_, r)| !matches!(r.cidr, Some(IpNet::V6(_))))
        .map(|(i, r)| (i, r.v4_net(), r))
        .collect();
    let mut nets: Vec<Ipv4Net> = rules.iter().map(|(_, n, _)| *n).collect();
    nets.push(Ipv4Net::default());
    nets.sort();
    nets.dedup();
    for (region, p) in nets.iter().enumerate() {
        let applicable: Vec<(usize, &Rule)> = rules
            .iter()
            .filter(|(_, n, _)| n.contains(p))
            .map(|(i, _, r)| (*i, *r))
            .collect();
        let first = |proto: u8| {
            applicable
                .iter()
                .find(|(_, r)| r.matches_proto(proto) && r.ports.is_none())
                .map(|(i, r)| (*i, *r))
        };
        let value = FwRegion {
            region: region as u16,
            _pad: 0,
            icmp: verdict(first(1)),
            // 0: a protocol no rule names (anything but TCP/UDP/ICMP).
            other: verdict(first(0)),
        };
        out.cidrs.push((
            KEY_FIXED_BITS + u32::from(p.prefix_len()),
            FwCidrKey {
                ifindex,
                dir,
                family: FAMILY_V4,
                _pad: [0; 2],
                addr: [u32::from_ne_bytes(p.network().octets()), 0, 0, 0],
            },
            value,
        ));
        for proto in [6u8, 17] {
            let claimed = resolve_ports(
                applicable
                    .iter()
                    .copied()
                    .filter(|(_, r)| r.matches_proto(proto)),
            );
            for (lo, hi, i, r) in claimed {
                for (port, bits) in port_prefixes(lo, hi) {
                    out.ports.push((
                        KEY_FIXED_BITS + bits,
                        FwPortKey {
                            ifindex,
                            dir,
                            proto,
                            region: region as u16,
                            port: port.to_be(),
                            _pad: 0,
                        },
                        verdict(Some((i, r))),
                    ));
                }
            }
            if out.ports.len() > MAX_COMPILED_ENTRIES {
                return Err(CompileError::TooManyEntries {
                    count: out.ports.len(),
                    max: MAX_COMPILED_ENTRIES,
                });
            }
        }
    }
    Ok(out)
}

/// The attachment's configuration entry.
fn attach_value(spec: &FirewallSpec) -> Result<FwAttach, DatapathError> {
    let mac = crate::netlink::parse_mac(&spec.mac)
        .map_err(|_| DatapathError::Link(format!("firewall: invalid MAC {:?}", spec.mac)))?;
    Ok(FwAttach {
        mac,
        ingress_policy: spec.ingress_policy.code(),
        ingress_default: spec.ingress.default.code(),
        egress_default: spec.egress.default.code(),
        flags: if spec.bypass { fw::FLAG_BYPASS } else { 0 },
        _pad: [0; 2],
        bridge_ifindex: spec.bridge_ifindex,
        ingress_rules: spec.ingress.rules.len() as u16,
        egress_rules: spec.egress.rules.len() as u16,
        ifname: ifname_bytes(&spec.ifname),
    })
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
    /// the programs fail closed until it exists).
    pub fn apply(&mut self, spec: &FirewallSpec) -> Result<(), DatapathError> {
        let value = attach_value(spec)?;
        if let Ok(old) = self.attach.get(&spec.ifindex, 0) {
            if old != value || self.owned_by_other(spec.ifindex, &spec.ifname) {
                // Another rule set on this ifindex (a repeated ADD with
                // other rules, or a stale entry): start from nothing.
                self.purge_rules(spec.ifindex)?;
            }
        }
        for (dir, set) in [
            (fw::DIR_INGRESS, &spec.ingress),
            (fw::DIR_EGRESS, &spec.egress),
        ] {
            let c = compile(spec.ifindex, dir, set).map_err(|e| {
                DatapathError::Link(format!("firewall rules of {}: {e}", spec.ifname))
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
    /// attachment's counters and tracked connections. Entries of the
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
        self.flush_connections(spec.ifindex)?;
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

    /// Every tracked connection and fragment verdict of the attachment.
    fn flush_connections(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        let ct: Vec<FwCtKey> = self
            .ct
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.ifindex == ifindex)
            .collect();
        for k in ct {
            ignore_missing(map_names::FW_CT, self.ct.remove(&k))?;
        }
        let frags: Vec<FwFragKey> = self
            .frags
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.ifindex == ifindex)
            .collect();
        for k in frags {
            ignore_missing(map_names::FW_FRAGS, self.frags.remove(&k))?;
        }
        Ok(())
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
        if self.attach.get(&spec.ifindex, 0).ok() != Some(value) {
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
        for k in self.ct.keys().filter_map(Result::ok) {
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
                "connections": n(self.ct.keys()),
                "fragments": n(self.frags.keys()),
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
    use std::net::Ipv4Addr;

    use super::*;

    fn rule(
        action: Action,
        cidr: Option<&str>,
        protocol: RuleProtocol,
        ports: Option<(u16, u16)>,
    ) -> Rule {
        Rule {
            action,
            cidr: cidr.map(|c| c.parse().unwrap()),
            protocol,
            ports: ports.map(|(from, to)| PortRange { from, to }),
        }
    }

    /// Looks a connection up the way the kernel does: longest CIDR match,
    /// then longest port prefix match.
    fn lookup(c: &Compiled, dir: u8, proto: u8, remote: Ipv4Addr, dport: u16) -> Option<(u16, u8)> {
        let addr = u32::from(remote);
        let region = c
            .cidrs
            .iter()
            .filter(|(_, k, _)| k.dir == dir)
            .filter(|(b, k, _)| {
                let bits = b - KEY_FIXED_BITS;
                let net = u32::from_be(k.addr[0]);
                bits == 0 || (addr >> (32 - bits)) == (net >> (32 - bits))
            })
            .max_by_key(|(b, _, _)| *b)
            .map(|(_, _, v)| *v)?;
        let v = match proto {
            6 | 17 => c
                .ports
                .iter()
                .filter(|(b, d, _)| {
                    d.dir == dir && d.proto == proto && d.region == region.region && {
                        let bits = b - KEY_FIXED_BITS;
                        let p = u16::from_be(d.port);
                        bits == 0 || (dport >> (16 - bits)) == (p >> (16 - bits))
                    }
                })
                .max_by_key(|(b, _, _)| *b)
                .map(|(_, _, v)| *v)
                .unwrap_or(verdict(None)),
            1 => region.icmp,
            _ => region.other,
        };
        (v.action != fw::ACTION_NONE).then_some((v.rule, v.action))
    }

    /// The reference semantics: the first rule that matches.
    fn first_match(rules: &[Rule], proto: u8, remote: Ipv4Addr, dport: u16) -> Option<(u16, u8)> {
        rules.iter().enumerate().find_map(|(i, r)| {
            let in_net = r.v4_net().contains(&remote);
            let in_ports = match (proto, r.ports) {
                (6 | 17, Some(p)) => (p.from..=p.to).contains(&dport),
                (_, Some(_)) => false,
                (_, None) => true,
            };
            (in_net && r.matches_proto(proto) && in_ports).then_some((i as u16, r.action.code()))
        })
    }

    #[test]
    fn prefixes_cover_ranges_exactly() {
        assert_eq!(port_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(port_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(port_prefixes(1024, 2047), vec![(1024, 6)]);
        for (lo, hi) in [
            (1, 65535),
            (1000, 2000),
            (8000, 8100),
            (65535, 65535),
            (3, 17),
        ] {
            let p = port_prefixes(lo, hi);
            let mut covered: Vec<u32> = p
                .iter()
                .flat_map(|(v, bits)| {
                    let size = 1u32 << (16 - bits);
                    u32::from(*v)..u32::from(*v) + size
                })
                .collect();
            covered.sort();
            assert_eq!(covered, (lo..=hi).collect::<Vec<_>>(), "{lo}-{hi}");
            assert!(p.len() <= 30);
        }
    }

    #[test]
    fn compiled_tries_agree_with_first_match() {
        let rules = vec![
            rule(
                Action::Deny,
                Some("10.1.2.0/24"),
                RuleProtocol::Tcp,
                Some((8000, 8100)),
            ),
            rule(
                Action::Allow,
                Some("10.1.0.0/16"),
                RuleProtocol::Tcp,
                Some((7000, 9000)),
            ),
            rule(Action::Allow, Some("10.0.0.0/8"), RuleProtocol::Udp, None),
            rule(Action::Deny, None, RuleProtocol::Icmp, None),
            rule(Action::Allow, Some("10.1.2.3/32"), RuleProtocol::Any, None),
            rule(
                Action::Deny,
                Some("192.168.0.0/16"),
                RuleProtocol::Any,
                Some((1, 1023)),
            ),
            rule(
                Action::Allow,
                Some("0.0.0.0/0"),
                RuleProtocol::Tcp,
                Some((443, 443)),
            ),
        ];
        let set = RuleSet {
            default: Action::Deny,
            rules: rules.clone(),
        };
        let c = compile(7, fw::DIR_INGRESS, &set).unwrap();
        let addrs = [
            "10.1.2.3",
            "10.1.2.4",
            "10.1.9.9",
            "10.9.9.9",
            "192.168.1.1",
            "8.8.8.8",
        ];
        let ports = [
            0u16, 1, 80, 443, 1023, 1024, 6999, 7000, 7999, 8000, 8050, 8100, 8101, 9000, 9001,
            65535,
        ];
        for a in addrs {
            let a: Ipv4Addr = a.parse().unwrap();
            for proto in [1u8, 6, 17, 47] {
                for &p in &ports {
                    assert_eq!(
                        lookup(&c, fw::DIR_INGRESS, proto, a, p),
                        first_match(&rules, proto, a, p),
                        "{a} proto {proto} port {p}"
                    );
                }
            }
        }
        // Keys are per attachment and direction.
        assert!(c
            .cidrs
            .iter()
            .all(|(_, k, _)| k.ifindex == 7 && k.dir == fw::DIR_INGRESS));
    }

    /// Random rule sets (nested and overlapping CIDRs, port ranges, every
    /// protocol) against random connections: the tries always give the
    /// first match.
    #[test]
    fn random_rule_sets_agree_with_first_match() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move |n: u32| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % u64::from(n)) as u32
        };
        let protos = [
            RuleProtocol::Any,
            RuleProtocol::Tcp,
            RuleProtocol::Udp,
            RuleProtocol::Icmp,
        ];
        for _ in 0..40 {
            let rules: Vec<Rule> = (0..rnd(40))
                .map(|_| {
                    let protocol = protos[rnd(4) as usize];
                    let len = [0, 8, 16, 24, 28, 32][rnd(6) as usize];
                    let addr = Ipv4Addr::new(10, rnd(3) as u8, rnd(3) as u8, rnd(8) as u8);
                    let cidr = (rnd(5) != 0).then(|| format!("{addr}/{len}"));
                    let ports = (protocol != RuleProtocol::Icmp && rnd(3) != 0).then(|| {
                        let a = rnd(40) as u16 + 1;
                        (a, a + rnd(20) as u16)
                    });
                    let action = if rnd(2) == 0 {
                        Action::Allow
                    } else {
                        Action::Deny
                    };
                    rule(action, cidr.as_deref(), protocol, ports)
                })
                .collect();
            let set = RuleSet {
                default: Action::Allow,
                rules: rules.clone(),
            };
            let c = compile(1, fw::DIR_EGRESS, &set).unwrap();
            for _ in 0..300 {
                let a = Ipv4Addr::new(10, rnd(3) as u8, rnd(3) as u8, rnd(8) as u8);
                let proto = [1u8, 6, 17, 47][rnd(4) as usize];
                let port = rnd(64) as u16;
                assert_eq!(
                    lookup(&c, fw::DIR_EGRESS, proto, a, port),
                    first_match(&rules, proto, a, port),
                    "{a} proto {proto} port {port} rules {rules:?}"
                );
            }
        }
    }

    #[test]
    fn no_rules_compile_to_nothing_and_caps_hold() {
        assert_eq!(
            compile(1, fw::DIR_EGRESS, &RuleSet::default()).unwrap(),
            Compiled::default()
        );
        let many = RuleSet {
            default: Action::Allow,
            rules: vec![
                rule(Action::Deny, None, RuleProtocol::Tcp, Some((1, 1)));
                fw::MAX_RULES + 1
            ],
        };
        assert!(matches!(
            compile(1, fw::DIR_EGRESS, &many),
            Err(CompileError::TooManyRules { .. })
        ));
    }

    #[test]
    fn a_thousand_rules_compile_small() {
        let rules: Vec<Rule> = (0..1000u32)
            .map(|i| {
                let a = Ipv4Addr::from(0x0a00_0000 + i * 256);
                rule(
                    Action::Deny,
                    Some(&format!("{a}/24")),
                    RuleProtocol::Tcp,
                    Some((9000, 9000)),
                )
            })
            .collect();
        let set = RuleSet {
            default: Action::Allow,
            rules,
        };
        let c = compile(3, fw::DIR_EGRESS, &set).unwrap();
        assert_eq!(c.cidrs.len(), 1001);
        assert_eq!(c.ports.len(), 1000);
    }

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
                rules: vec![rule(
                    Action::Allow,
                    Some("10.0.0.0/8"),
                    RuleProtocol::Tcp,
                    Some((80, 81)),
                )],
            },
            egress: RuleSet::default(),
        };
        let text = serde_json::to_string(&spec).unwrap();
        assert!(text.contains("\"ingressPolicy\":\"same-bridge\""), "{text}");
        assert_eq!(serde_json::from_str::<FirewallSpec>(&text).unwrap(), spec);
        assert_eq!(attach_value(&spec).unwrap().mac, [2, 0, 0, 0, 0, 1]);
    }
}
