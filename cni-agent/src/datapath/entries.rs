//! Applying and revoking the datapath entries a record lists. The agent
//! applies them on ADD; both the agent and a plugin whose agent is down
//! revoke them on DEL, through the pinned maps, so a DEL never waits for the
//! agent.
use std::net::IpAddr;

use aya::{
    maps::{HashMap, MapData, MapError},
    programs::SchedClassifier,
};
use cni_ebpf_common::{
    hostport_flags, map_names, prog_names, BridgeInfo, HostPortKey, HostPortTarget, IpKey,
    MasqPolicy, FAMILY_V4, FAMILY_V6,
};
use ipnet::IpNet;

use super::{
    links::{
        ensure_tc, ifindex_exists, link_pin, pinned_ifindexes, remove_links, unpin_link, Placement,
    },
    loader::{DatapathError, Hook},
    pins::{open_pinned, PinLayout},
    rate::RateMap,
};
use crate::{
    netlink::Netlink,
    state::record::{Entry, Protocol, VethHook},
};

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

/// Runs `f` with a netlink handle of the current network namespace, on a
/// thread of its own: the blocking handle runs its own runtime, which must
/// not nest inside the agent's.
pub fn with_netlink<T: Send>(
    f: impl FnOnce(&Netlink) -> Result<T, crate::netlink::NetlinkError> + Send,
) -> Result<T, crate::netlink::NetlinkError> {
    std::thread::scope(|s| {
        s.spawn(|| f(&Netlink::connect()?))
            .join()
            .unwrap_or_else(|_| {
                Err(crate::netlink::NetlinkError::LinkNotFound(
                    "(netlink thread panicked)".into(),
                ))
            })
    })
}

/// The ifindex of a link of the calling thread's namespace (the node's).
///
/// One `SIOCGIFINDEX` ioctl: an ADD or DEL asks this for every veth entry
/// it handles, under the state lock, and a netlink round trip on a
/// thread with its own runtime and socket cost far more for one number.
pub fn link_index(ifname: &str) -> Result<u32, DatapathError> {
    nix::net::if_::if_nametoindex(ifname).map_err(|_| DatapathError::LinkLookup {
        ifname: ifname.to_string(),
        source: crate::netlink::NetlinkError::LinkNotFound(ifname.to_string()),
    })
}

fn veth_hook(h: VethHook) -> Hook {
    match h {
        VethHook::FromPod => Hook::Ingress,
        VethHook::ToPod => Hook::Egress,
    }
}

fn hostport_key(
    host_ip: Option<IpAddr>,
    host_port: u16,
    protocol: Protocol,
    v6: bool,
) -> HostPortKey {
    let (addr, family) = match host_ip {
        Some(ip) => addr_words(ip),
        None => ([0; 4], if v6 { FAMILY_V6 } else { FAMILY_V4 }),
    };
    HostPortKey {
        addr,
        port: host_port.to_be(),
        proto: protocol.number(),
        family,
    }
}

fn hostport_target(pod_ip: IpAddr, container_port: u16, snat: bool) -> HostPortTarget {
    let (addr, family) = addr_words(pod_ip);
    HostPortTarget {
        addr,
        port: container_port.to_be(),
        flags: if snat { hostport_flags::SNAT } else { 0 },
        family,
    }
}

/// The maps that hold per-attachment entries, opened from their pins.
pub struct EntryMaps {
    layout: PinLayout,
    masq: HashMap<MapData, IpKey, MasqPolicy>,
    hostports: HashMap<MapData, HostPortKey, HostPortTarget>,
    bridges: HashMap<MapData, u32, BridgeInfo>,
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// A pinned hash map, typed.
pub(crate) fn hash<K: aya::Pod, V: aya::Pod>(
    layout: &PinLayout,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, DatapathError> {
    let data = open_pinned(layout, name)?;
    HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(map_err(name))
}

fn ignore_missing(name: &'static str, r: Result<(), MapError>) -> Result<(), DatapathError> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(source) => Err(DatapathError::Map { name, source }),
    }
}

impl EntryMaps {
    pub fn open(layout: &PinLayout) -> Result<Self, DatapathError> {
        Ok(Self {
            layout: layout.clone(),
            masq: hash(layout, map_names::MASQ_SOURCES)?,
            hostports: hash(layout, map_names::HOSTPORTS)?,
            bridges: hash(layout, map_names::BRIDGES)?,
        })
    }

    /// Writes one entry (overwriting: re-applying a record is idempotent).
    /// Links are the plugins' business and are skipped.
    pub fn apply(&mut self, entry: &Entry) -> Result<(), DatapathError> {
        match entry {
            Entry::Link { .. } => Ok(()),
            Entry::MasqSource { ip, subnet } => self
                .masq
                .insert(ip_key(*ip), masq_policy(*subnet), 0)
                .map_err(map_err(map_names::MASQ_SOURCES)),
            Entry::HostPort {
                host_ip,
                host_port,
                protocol,
                pod_ip,
                container_port,
                snat,
            } => self
                .hostports
                .insert(
                    hostport_key(*host_ip, *host_port, *protocol, pod_ip.is_ipv6()),
                    hostport_target(*pod_ip, *container_port, *snat),
                    0,
                )
                .map_err(map_err(map_names::HOSTPORTS)),
            Entry::BridgeHook { bridge } => self.hook_bridge(bridge),
            Entry::Firewall(spec) => super::policy::PolicyMaps::open(&self.layout)?.apply(spec),
            Entry::FirewallForward { bridge } => super::policy::hook_forward(&self.layout, bridge),
            Entry::RateLimit {
                ifname,
                hook,
                rate_bps,
                burst_bits,
            } => RateMap::open(&self.layout)?.apply(ifname, *hook, *rate_bps, *burst_bits),
            Entry::VethProgram {
                ifname,
                program,
                hook,
                ..
            } => {
                let index = link_index(ifname)?;
                let mut prog = SchedClassifier::from_pin(self.layout.progs_dir().join(program))
                    .map_err(|source| DatapathError::Program {
                        name: program.clone(),
                        source,
                    })?;
                ensure_tc(
                    &mut prog,
                    &self.layout,
                    program,
                    veth_hook(*hook),
                    (ifname, index),
                    Placement::First,
                )?;
                Ok(())
            }
        }
    }

    /// Attaches the bridge programs (IPv4 and IPv6) to `bridge` (once) and
    /// records the bridge's addresses for hairpin masquerading: its IPv4
    /// one, and its first IPv6 one that is not link-local (the pods'
    /// gateway, which they can answer).
    fn hook_bridge(&mut self, bridge: &str) -> Result<(), DatapathError> {
        let (index, addr, addr6) = with_netlink(|nl| {
            let link = nl.link_by_name(bridge)?;
            let addrs = nl.addresses(Some(link.index))?;
            let addr = addrs
                .iter()
                .find_map(|a| match a.addr.addr() {
                    IpAddr::V4(v4) => Some(u32::from_ne_bytes(v4.octets())),
                    IpAddr::V6(_) => None,
                })
                .unwrap_or(0);
            let addr6 = addrs.iter().find_map(|a| match a.addr.addr() {
                IpAddr::V6(v6) if !v6.is_unicast_link_local() && !v6.is_loopback() => Some(v6),
                _ => None,
            });
            Ok((link.index, addr, addr6))
        })
        .map_err(|source| DatapathError::LinkLookup {
            ifname: bridge.to_string(),
            source,
        })?;
        // The bridge addresses are node addresses: hostPorts must answer on
        // them now, not at the agent's next address scan.
        let mut node: HashMap<MapData, IpKey, u32> = hash(&self.layout, map_names::NODE_ADDRS)?;
        if addr != 0 {
            let k = ip_key(IpAddr::from(addr.to_ne_bytes()));
            node.insert(k, 1, 0)
                .map_err(map_err(map_names::NODE_ADDRS))?;
        }
        if let Some(v6) = addr6 {
            node.insert(ip_key(IpAddr::V6(v6)), 1, 0)
                .map_err(map_err(map_names::NODE_ADDRS))?;
            let mut bridges6: HashMap<MapData, u32, [u32; 4]> =
                hash(&self.layout, map_names::BRIDGES6)?;
            bridges6
                .insert(index, addr_words(IpAddr::V6(v6)).0, 0)
                .map_err(map_err(map_names::BRIDGES6))?;
        }
        self.bridges
            .insert(
                index,
                BridgeInfo {
                    addr_v4: addr,
                    _pad: 0,
                },
                0,
            )
            .map_err(map_err(map_names::BRIDGES))?;
        for prog_name in [prog_names::BRIDGE_FROM_PODS, prog_names::BRIDGE6_FROM_PODS] {
            let mut prog = SchedClassifier::from_pin(self.layout.progs_dir().join(prog_name))
                .map_err(|source| DatapathError::Program {
                    name: prog_name.to_string(),
                    source,
                })?;
            ensure_tc(
                &mut prog,
                &self.layout,
                prog_name,
                Hook::Ingress,
                (bridge, index),
                Placement::Last,
            )?;
        }
        Ok(())
    }

    /// Removes one entry; an entry that is already gone is not an error.
    pub fn revoke(&mut self, entry: &Entry) -> Result<(), DatapathError> {
        match entry {
            Entry::Link { .. } | Entry::BridgeHook { .. } => Ok(()),
            Entry::Firewall(spec) => super::policy::PolicyMaps::open(&self.layout)?.revoke(spec),
            Entry::FirewallForward { .. } => Ok(()),
            Entry::RateLimit { ifname, hook, .. } => {
                RateMap::open(&self.layout)?.revoke(ifname, *hook)
            }
            Entry::VethProgram {
                ifname,
                program,
                hook,
                ..
            } => {
                // A veth that is gone took its link with it, but the pin
                // still holds the defunct link: drop this program's pins
                // whose device is gone (a GC, or a DEL after the netns).
                match link_index(ifname) {
                    Ok(index) => {
                        unpin_link(&self.layout, &index.to_string(), program, veth_hook(*hook))
                    }
                    Err(_) => {
                        for index in pinned_ifindexes(&self.layout, &[program.as_str()]) {
                            if !ifindex_exists(index) {
                                remove_links(&self.layout, &index.to_string(), &[program.as_str()]);
                            }
                        }
                    }
                }
                Ok(())
            }
            Entry::MasqSource { ip, .. } => {
                ignore_missing(map_names::MASQ_SOURCES, self.masq.remove(&ip_key(*ip)))
            }
            Entry::HostPort {
                host_ip,
                host_port,
                protocol,
                pod_ip,
                container_port,
                snat,
            } => {
                let key = hostport_key(*host_ip, *host_port, *protocol, pod_ip.is_ipv6());
                // Only if it is still ours: never another attachment's.
                if self.hostports.get(&key, 0).ok()
                    == Some(hostport_target(*pod_ip, *container_port, *snat))
                {
                    ignore_missing(map_names::HOSTPORTS, self.hostports.remove(&key))?;
                }
                Ok(())
            }
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
            Entry::HostPort {
                host_ip,
                host_port,
                protocol,
                pod_ip,
                container_port,
                snat,
            } => self
                .hostports
                .get(
                    &hostport_key(*host_ip, *host_port, *protocol, pod_ip.is_ipv6()),
                    0,
                )
                .map(|v| v == hostport_target(*pod_ip, *container_port, *snat))
                .unwrap_or(false),
            Entry::BridgeHook { .. } => self.bridges.keys().any(|k| k.is_ok()),
            Entry::Firewall(spec) => {
                super::policy::PolicyMaps::open(&self.layout).is_ok_and(|m| m.is_applied(spec))
            }
            Entry::FirewallForward { bridge } => {
                super::policy::forward_hooked(&self.layout, bridge)
            }
            Entry::RateLimit {
                ifname,
                hook,
                rate_bps,
                burst_bits,
            } => RateMap::open(&self.layout)
                .is_ok_and(|m| m.is_applied(ifname, *hook, *rate_bps, *burst_bits)),
            Entry::VethProgram {
                ifname,
                program,
                hook,
                ..
            } => link_index(ifname)
                .map(|i| link_pin(&self.layout, &i.to_string(), program, veth_hook(*hook)).exists())
                .unwrap_or(false),
        }
    }

    /// Whether a hostPort entry's (address, port, protocol) is already
    /// mapped in the datapath: its own key, the any-address key, and — for
    /// an any-address entry — the key of each node address.
    pub fn hostport_taken(&self, entry: &Entry) -> Result<bool, DatapathError> {
        let Entry::HostPort {
            host_ip,
            host_port,
            protocol,
            pod_ip,
            ..
        } = entry
        else {
            return Ok(false);
        };
        let v6 = pod_ip.is_ipv6();
        let mut keys = vec![
            hostport_key(*host_ip, *host_port, *protocol, v6),
            hostport_key(None, *host_port, *protocol, v6),
        ];
        if host_ip.is_none() {
            let node: HashMap<MapData, IpKey, u32> = hash(&self.layout, map_names::NODE_ADDRS)?;
            // The node addresses of the entry's family: an IPv4 hostIP
            // mapping never conflicts with an IPv6 one.
            let family = if v6 { FAMILY_V6 } else { FAMILY_V4 };
            for k in node.keys().filter_map(Result::ok) {
                if k.family != family {
                    continue;
                }
                let ip = words_addr(k.addr, k.family);
                keys.push(hostport_key(Some(ip), *host_port, *protocol, v6));
            }
        }
        Ok(keys.iter().any(|k| self.hostports.get(k, 0).is_ok()))
    }

    /// Number of masquerade sources (occupancy reporting).
    pub fn masq_len(&self) -> usize {
        self.masq.keys().filter(|k| k.is_ok()).count()
    }

    /// Number of hostPort mappings (occupancy reporting).
    pub fn hostports_len(&self) -> usize {
        self.hostports.keys().filter(|k| k.is_ok()).count()
    }
}
