//! Links: look-up, bridges, veth pairs, and the per-link knobs the plugins set
//! (MTU, up, promiscuous mode, MAC, bridge master, bridge-port hairpin mode).

use std::os::fd::{AsRawFd, BorrowedFd};

use futures::TryStreamExt;
use netlink_packet_route::link::{
    AfSpecInet, AfSpecInet6, AfSpecUnspec, InetDevConf, InfoBridgePort, InfoData, InfoKind,
    InfoPortData, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage, State,
};
use rtnetlink::{LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec};

use super::{Netlink, NetlinkError};

/// What the plugins need to know about a link, decoded from RTM_NEWLINK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND`: "bridge", "veth", ... (`None` for e.g. loopback).
    pub kind: Option<String>,
    /// Hardware address bytes (empty when the link has none).
    pub mac: Vec<u8>,
    pub mtu: u32,
    /// Index of the master (bridge) device, if enslaved.
    pub master: Option<u32>,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// Operational state is UP (carrier and, for bridge ports, forwarding).
    pub oper_up: bool,
    /// Promiscuous mode requested by user space (not the bridge's own count).
    pub promisc: bool,
    /// Bridge-port hairpin mode, when the link is a bridge port.
    pub hairpin: Option<bool>,
    /// `IFLA_LINK`: for a veth, the peer's index in the peer's namespace.
    pub peer_index: Option<u32>,
    pub tx_queue_len: Option<u32>,
    /// `net.ipv6.conf.<link>.accept_ra`, from the link's IPv6 settings
    /// (`None` when the link has no IPv6, e.g. IPv6 disabled).
    pub ipv6_accept_ra: Option<i32>,
}

impl Link {
    /// The MAC as the CNI result prints it ("aa:bb:cc:dd:ee:ff").
    pub fn mac_string(&self) -> String {
        format_mac(&self.mac)
    }

    pub fn is_bridge(&self) -> bool {
        self.kind.as_deref() == Some("bridge")
    }

    pub fn is_veth(&self) -> bool {
        self.kind.as_deref() == Some("veth")
    }

    fn from_message(msg: LinkMessage) -> Self {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            kind: None,
            mac: Vec::new(),
            mtu: 0,
            master: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            oper_up: false,
            promisc: msg.header.flags.contains(LinkFlags::Promisc),
            hairpin: None,
            peer_index: None,
            tx_queue_len: None,
            ipv6_accept_ra: None,
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => link.name = name,
                LinkAttribute::Address(mac) => link.mac = mac,
                LinkAttribute::Mtu(mtu) => link.mtu = mtu,
                LinkAttribute::Controller(master) if master != 0 => link.master = Some(master),
                LinkAttribute::OperState(state) => link.oper_up = state == State::Up,
                LinkAttribute::Link(peer) if peer != 0 => link.peer_index = Some(peer),
                LinkAttribute::TxQueueLen(len) => link.tx_queue_len = Some(len),
                LinkAttribute::AfSpecUnspec(specs) => {
                    for spec in specs {
                        if let AfSpecUnspec::Inet6(inet6) = spec {
                            for attr in inet6 {
                                if let AfSpecInet6::DevConf(conf) = attr {
                                    link.ipv6_accept_ra = Some(conf.accept_ra);
                                }
                            }
                        }
                    }
                }
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(kind) => link.kind = Some(kind.to_string()),
                            LinkInfo::PortData(InfoPortData::BridgePort(port)) => {
                                link.hairpin = port.iter().find_map(|p| match p {
                                    InfoBridgePort::HairpinMode(on) => Some(*on),
                                    _ => None,
                                });
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

/// A bridge to create if missing (see [`Netlink::ensure_bridge`]).
#[derive(Debug, Clone, Default)]
pub struct BridgeSpec {
    pub name: String,
    /// MTU for a newly created bridge (an existing bridge keeps its own).
    pub mtu: Option<u32>,
    pub promisc: bool,
    pub vlan_filtering: bool,
}

/// A veth pair. The local end is created in the namespace of the connection;
/// the peer directly in `peer_netns` (no rename or move afterwards, so the
/// container never sees a temporary name).
#[derive(Debug, Clone)]
pub struct VethSpec<'a> {
    pub name: String,
    pub peer_name: String,
    pub peer_netns: Option<BorrowedFd<'a>>,
    pub peer_mac: Option<[u8; 6]>,
    /// Applied to both ends.
    pub mtu: Option<u32>,
    /// Applied to both ends.
    pub tx_queue_len: Option<u32>,
}

/// Formats hardware address bytes as lower-case colon-separated hex.
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses a 48-bit MAC written with ':' or '-' separators (as Go's
/// net.ParseMAC accepts for EUI-48).
pub fn parse_mac(text: &str) -> Result<[u8; 6], NetlinkError> {
    let invalid = || NetlinkError::InvalidMac(text.to_string());
    let sep = if text.contains('-') { '-' } else { ':' };
    let mut mac = [0u8; 6];
    let mut parts = text.split(sep);
    for byte in mac.iter_mut() {
        let part = parts.next().ok_or_else(invalid)?;
        if part.len() != 2 {
            return Err(invalid());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
    }
    if parts.next().is_some() {
        return Err(invalid());
    }
    Ok(mac)
}

impl Netlink {
    /// Looks a link up by name; `None` if there is no such link.
    pub fn find_link(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let mut request = self.handle().link().get().match_name(name).execute();
        match self.block_on(request.try_next()) {
            Ok(msg) => Ok(msg.map(Link::from_message)),
            Err(err) => not_found_as_none(err, format!("look up link {name:?}")),
        }
    }

    /// Looks a link up by name; a missing link is an error.
    pub fn link_by_name(&self, name: &str) -> Result<Link, NetlinkError> {
        self.find_link(name)?
            .ok_or_else(|| NetlinkError::LinkNotFound(name.to_string()))
    }

    /// Looks a link up by index; `None` if there is no such link.
    pub fn link_by_index(&self, index: u32) -> Result<Option<Link>, NetlinkError> {
        let mut request = self.handle().link().get().match_index(index).execute();
        match self.block_on(request.try_next()) {
            Ok(msg) => Ok(msg.map(Link::from_message)),
            Err(err) => not_found_as_none(err, format!("look up link #{index}")),
        }
    }

    /// All links of the namespace.
    pub fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        let request = self.handle().link().get().execute();
        let msgs: Vec<LinkMessage> = self
            .block_on(request.try_collect())
            .map_err(NetlinkError::request("list links"))?;
        Ok(msgs.into_iter().map(Link::from_message).collect())
    }

    /// Creates the bridge if it does not exist yet, applies promiscuous mode
    /// when asked, and returns it. An existing link of that name is reused
    /// only if it is a bridge. The bridge is *not* brought up, so the caller
    /// can set sysctls (accept_ra) first, as the reference does.
    ///
    /// The bridge exists on every ADD but the first, so it is looked up
    /// first: one request instead of a refused create and two look-ups.
    pub fn ensure_bridge(&self, spec: &BridgeSpec) -> Result<Link, NetlinkError> {
        let link = match self.find_link(&spec.name)? {
            Some(link) => link,
            None => {
                let mut builder = LinkMessageBuilder::<LinkBridge>::new(&spec.name);
                if let Some(mtu) = spec.mtu {
                    builder = builder.mtu(mtu);
                }
                if spec.vlan_filtering {
                    builder = builder.vlan_filtering(true);
                }
                let created = self.block_on(self.handle().link().add(builder.build()).execute());
                match created {
                    Ok(()) => {}
                    // Created concurrently by another ADD: use that one.
                    Err(err) if errno_of(&err) == Some(libc::EEXIST) => {}
                    Err(err) => {
                        return Err(
                            NetlinkError::request(format!("add bridge {:?}", spec.name))(err),
                        )
                    }
                }
                self.link_by_name(&spec.name)?
            }
        };
        if !link.is_bridge() {
            return Err(NetlinkError::NotABridge {
                name: spec.name.clone(),
                kind: link.kind.unwrap_or_else(|| "none".into()),
            });
        }
        if spec.promisc && !link.promisc {
            self.set_promisc(link.index, true)?;
            return self.link_by_name(&spec.name);
        }
        Ok(link)
    }

    /// Creates a veth pair (see [`VethSpec`]). Fails with errno EEXIST if
    /// either name is taken in its namespace.
    pub fn create_veth(&self, spec: &VethSpec<'_>) -> Result<(), NetlinkError> {
        let mut peer = LinkUnspec::new_with_name(&spec.peer_name);
        if let Some(mtu) = spec.mtu {
            peer = peer.mtu(mtu);
        }
        if let Some(len) = spec.tx_queue_len {
            peer = peer.txqueuelen(len);
        }
        if let Some(mac) = spec.peer_mac {
            peer = peer.address(mac.to_vec());
        }
        if let Some(fd) = spec.peer_netns {
            peer = peer.setns_by_fd(fd.as_raw_fd());
        }
        let mut builder = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
            .name(spec.name.clone())
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())));
        if let Some(mtu) = spec.mtu {
            builder = builder.mtu(mtu);
        }
        if let Some(len) = spec.tx_queue_len {
            builder = builder.txqueuelen(len);
        }
        self.block_on(self.handle().link().add(builder.build()).execute())
            .map_err(NetlinkError::request(format!(
                "create veth pair {:?}/{:?}",
                spec.name, spec.peer_name
            )))
    }

    pub fn set_up(&self, index: u32) -> Result<(), NetlinkError> {
        self.set_link(LinkUnspec::new_with_index(index).up(), index, "set up")
    }

    pub fn set_down(&self, index: u32) -> Result<(), NetlinkError> {
        self.set_link(LinkUnspec::new_with_index(index).down(), index, "set down")
    }

    pub fn set_mtu(&self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        self.set_link(
            LinkUnspec::new_with_index(index).mtu(mtu),
            index,
            "set MTU of",
        )
    }

    pub fn set_promisc(&self, index: u32, on: bool) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).promiscuous(on);
        self.set_link(msg, index, "set promiscuous mode of")
    }

    /// Sets the hardware address. Setting a bridge's MAC (even to its current
    /// value) pins it: otherwise the bridge adopts the lowest port MAC and
    /// changes as ports come and go.
    pub fn set_mac(&self, index: u32, mac: &[u8]) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).address(mac.to_vec());
        self.set_link(msg, index, "set MAC of")
    }

    /// Turns on `net.ipv4.conf.<link>.arp_notify` (gratuitous ARP when the
    /// link comes up or its address changes) through netlink
    /// (`IFLA_AF_SPEC`/`AF_INET`/`IFLA_INET_CONF`), which sets the same
    /// per-interface value as the /proc/sys file does. It spares a path
    /// lookup under /proc/sys/net/ipv4, whose cost grows with the number of
    /// network namespaces that ever looked there (their entries share one
    /// dcache hash chain), i.e. with the number of pods on the node.
    pub fn set_arp_notify(&self, index: u32) -> Result<(), NetlinkError> {
        let mut conf = InetDevConf::default();
        conf.arp_notify = 1;
        let mut msg = LinkUnspec::new_with_index(index).build();
        msg.attributes
            .push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet(vec![
                AfSpecInet::DevConfRequest(conf),
            ])]));
        self.block_on(self.handle().link().set(msg).execute())
            .map_err(NetlinkError::request(format!(
                "set arp_notify of link #{index}"
            )))
    }

    /// Enslaves the link to `master` (a bridge).
    pub fn set_master(&self, index: u32, master: u32) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).controller(master);
        self.set_link(msg, index, "set master of")
    }

    /// Brings the link up and enslaves it to `master`, in one request
    /// instead of [`Netlink::set_up`] and [`Netlink::set_master`] (the
    /// kernel's `do_setlink` applies the flags, then the master).
    pub fn set_master_up(&self, index: u32, master: u32) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).controller(master).up();
        self.set_link(msg, index, "set master of")
    }

    /// Sets the bridge-port hairpin mode (IFLA_BRPORT_MODE), i.e. whether the
    /// bridge may send a frame back out of the port it came in on.
    pub fn set_hairpin(&self, index: u32, on: bool) -> Result<(), NetlinkError> {
        let msg = LinkBridgePort::new(index).hairpin(on).build();
        self.block_on(self.handle().link().set_port(msg).execute())
            .map_err(NetlinkError::request(format!(
                "set hairpin mode of link #{index}"
            )))
    }

    /// Deletes a link (for a veth, both ends).
    pub fn delete_link(&self, index: u32) -> Result<(), NetlinkError> {
        self.block_on(self.handle().link().del(index).execute())
            .map_err(NetlinkError::request(format!("delete link #{index}")))
    }

    /// Deletes a link by name; `Ok(false)` if it did not exist.
    pub fn delete_link_by_name(&self, name: &str) -> Result<bool, NetlinkError> {
        let Some(link) = self.find_link(name)? else {
            return Ok(false);
        };
        match self.delete_link(link.index) {
            Ok(()) => Ok(true),
            Err(err) if err.errno() == Some(libc::ENODEV) => Ok(false),
            Err(err) => Err(err),
        }
    }

    fn set_link(
        &self,
        builder: LinkMessageBuilder<LinkUnspec>,
        index: u32,
        what: &str,
    ) -> Result<(), NetlinkError> {
        self.block_on(self.handle().link().set(builder.build()).execute())
            .map_err(NetlinkError::request(format!("{what} link #{index}")))
    }
}

pub(super) fn errno_of(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => Some(-msg.raw_code()),
        _ => None,
    }
}

fn not_found_as_none<T>(err: rtnetlink::Error, op: String) -> Result<Option<T>, NetlinkError> {
    if errno_of(&err) == Some(libc::ENODEV) {
        Ok(None)
    } else {
        Err(NetlinkError::request(op)(err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trip() {
        let mac = parse_mac("0A:1b:2c:3d:4e:5F").unwrap();
        assert_eq!(mac, [0x0a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f]);
        assert_eq!(format_mac(&mac), "0a:1b:2c:3d:4e:5f");
        assert_eq!(parse_mac("0a-1b-2c-3d-4e-5f").unwrap(), mac);
    }

    #[test]
    fn bad_macs_are_rejected() {
        for bad in [
            "",
            "0a:1b:2c:3d:4e",
            "0a:1b:2c:3d:4e:5f:60",
            "0a:1b:2c:3d:4e:zz",
            "0a1b2c3d4e5f",
            "a:1b:2c:3d:4e:5f",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad:?} accepted");
        }
    }
}

/// A link's traffic counters (`IFLA_STATS64`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkCounters {
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
}

impl Netlink {
    /// Every link's counters by name, in one dump (the agent's /metrics
    /// reads the host veths' from it).
    pub fn link_counters(
        &self,
    ) -> Result<std::collections::BTreeMap<String, LinkCounters>, NetlinkError> {
        let request = self.handle().link().get().execute();
        let msgs: Vec<LinkMessage> = self
            .block_on(request.try_collect())
            .map_err(NetlinkError::request("list links"))?;
        let mut out = std::collections::BTreeMap::new();
        for msg in msgs {
            let mut name = None;
            let mut counters = None;
            for attr in msg.attributes {
                match attr {
                    LinkAttribute::IfName(n) => name = Some(n),
                    LinkAttribute::Stats64(s) => {
                        counters = Some(LinkCounters {
                            rx_packets: s.rx_packets,
                            tx_packets: s.tx_packets,
                            rx_bytes: s.rx_bytes,
                            tx_bytes: s.tx_bytes,
                            rx_dropped: s.rx_dropped,
                            tx_dropped: s.tx_dropped,
                        })
                    }
                    _ => {}
                }
            }
            if let (Some(n), Some(c)) = (name, counters) {
                out.insert(n, c);
            }
        }
        Ok(out)
    }
}
