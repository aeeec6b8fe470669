//! The uplinks: which programs every uplink gets, and the UPLINKS map.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::{
    maps::{HashMap, MapData},
    programs::{SchedClassifier, Xdp},
    Ebpf,
};
use cni_ebpf_common::{map_names, prog_names, UplinkConfig, FAMILY_V6};

use super::{
    entries::{addr_words, words_addr},
    links::{ensure_tc, ensure_xdp, Placement},
    loader::{DatapathError, Hook},
    pins::{open_pinned, PinLayout},
};

/// The TC programs of an uplink, in hook order: on egress the hostPort
/// reply translation must see the packet before the masquerade does; on
/// ingress the firewall's forwarding sees packets after both translations.
/// The IPv6 masquerade and hostPorts have programs of their own (each
/// family's program passes the other family's packets on at once), so
/// neither family's verification budget limits the other's.
pub const UPLINK_PROGRAMS: [(&str, Hook); 9] = [
    (prog_names::HOSTPORT6_EGRESS, Hook::Egress),
    (prog_names::HOSTPORT_EGRESS, Hook::Egress),
    (prog_names::SNAT_EGRESS, Hook::Egress),
    (prog_names::SNAT6_EGRESS, Hook::Egress),
    (prog_names::SNAT_INGRESS, Hook::Ingress),
    (prog_names::SNAT6_INGRESS, Hook::Ingress),
    (prog_names::HOSTPORT_INGRESS, Hook::Ingress),
    (prog_names::HOSTPORT6_INGRESS, Hook::Ingress),
    (prog_names::FW_UPLINK_INGRESS, Hook::Ingress),
];

/// Where a program of [`UPLINK_PROGRAMS`] goes in its hook's list. The
/// IPv6 hostPort reply translation must run before the IPv6 masquerade (a
/// UDP reply would otherwise get a masquerade binding of its own): it goes
/// first, so it also precedes the masquerade of an uplink whose other
/// programs an older agent attached and pinned (an upgrade appends new
/// programs). Only IPv6 hostPort replies are touched by it, so running
/// ahead of the IPv4 programs changes nothing for them.
fn placement(name: &str) -> Placement {
    if name == prog_names::HOSTPORT6_EGRESS {
        Placement::First
    } else {
        Placement::Last
    }
}

/// Where hostPort DNAT runs on the uplink's ingress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HostPortMode {
    /// TC ingress only.
    Tc,
    /// XDP first (native where the driver has it, generic otherwise), with
    /// the TC program behind it for what XDP passes on.
    Xdp,
}

/// Attaches (or finds attached) every uplink program on `ifname`. Returns
/// the programs newly attached.
pub fn attach_uplink(
    ebpf: &mut Ebpf,
    layout: &PinLayout,
    mode: HostPortMode,
    ifname: &str,
    ifindex: u32,
) -> Result<Vec<&'static str>, DatapathError> {
    let mut attached = Vec::new();
    for (name, hook) in UPLINK_PROGRAMS {
        let prog: &mut SchedClassifier = program(ebpf, name)?;
        if ensure_tc(prog, layout, name, hook, (ifname, ifindex), placement(name))? {
            attached.push(name);
        }
    }
    if mode == HostPortMode::Xdp {
        let name = prog_names::HOSTPORT_XDP;
        let prog: &mut Xdp = program(ebpf, name)?;
        if ensure_xdp(prog, layout, name, ifname, ifindex)? {
            attached.push(name);
        }
    }
    Ok(attached)
}

/// The loaded program `name` of `ebpf`, as its concrete type.
pub fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| DatapathError::MissingProgram(name.to_string()))?
        .try_into()
        .map_err(|source| DatapathError::Program {
            name: name.to_string(),
            source,
        })
}

/// The UPLINKS map, opened from its pin.
pub struct UplinkMap(HashMap<MapData, u32, UplinkConfig>);

impl UplinkMap {
    pub fn open(layout: &PinLayout) -> Result<Self, DatapathError> {
        let data = open_pinned(layout, map_names::UPLINKS)?;
        HashMap::try_from(aya::maps::Map::HashMap(data))
            .map(Self)
            .map_err(|source| DatapathError::Map {
                name: map_names::UPLINKS,
                source,
            })
    }

    /// Writes an uplink's addresses (either may be missing: a v4-only or
    /// v6-only uplink; the other family's program leaves its packets alone).
    pub fn set(
        &mut self,
        ifindex: u32,
        addr: Option<Ipv4Addr>,
        addr_v6: Option<Ipv6Addr>,
        ports: (u16, u16),
    ) -> Result<(), DatapathError> {
        let cfg = UplinkConfig {
            addr_v4: addr.map_or(0, |a| u32::from_ne_bytes(a.octets())),
            addr_v6: addr_v6.map_or([0; 4], |a| addr_words(IpAddr::V6(a)).0),
            port_min: ports.0,
            port_max: ports.1,
        };
        if self.0.get(&ifindex, 0).ok() == Some(cfg) {
            return Ok(());
        }
        self.0
            .insert(ifindex, cfg, 0)
            .map_err(|source| DatapathError::Map {
                name: map_names::UPLINKS,
                source,
            })
    }

    pub fn remove(&mut self, ifindex: u32) {
        let _ = self.0.remove(&ifindex);
    }

    /// Every configured uplink: ifindex, its addresses (IPv4 and IPv6,
    /// where it has them) and its masquerade port range.
    pub fn configs(&self) -> Vec<(u32, Vec<IpAddr>, u16, u16)> {
        self.0
            .iter()
            .filter_map(Result::ok)
            .map(|(i, c)| {
                let (v4, v6) = addresses(&c);
                let addrs = v4
                    .map(IpAddr::V4)
                    .into_iter()
                    .chain(v6.map(IpAddr::V6))
                    .collect();
                (i, addrs, c.port_min, c.port_max)
            })
            .collect()
    }

    /// Every configured uplink: ifindex and its IPv4 and IPv6 addresses.
    pub fn list(&self) -> Vec<(u32, Option<Ipv4Addr>, Option<Ipv6Addr>)> {
        self.0
            .iter()
            .filter_map(Result::ok)
            .map(|(i, c)| {
                let (v4, v6) = addresses(&c);
                (i, v4, v6)
            })
            .collect()
    }
}

/// An uplink's addresses, where it has them (an all-zero one is absent).
fn addresses(c: &UplinkConfig) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
    let v4 = (c.addr_v4 != 0).then(|| Ipv4Addr::from(c.addr_v4.to_ne_bytes()));
    let v6 = match words_addr(c.addr_v6, FAMILY_V6) {
        IpAddr::V6(a) if !a.is_unspecified() => Some(a),
        _ => None,
    };
    (v4, v6)
}
