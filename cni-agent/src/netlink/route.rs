//! Routes: list, add (the way the reference plugins add them), delete.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::{StreamExt, TryStreamExt};
use ipnet::IpNet;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST,
};

use super::{Netlink, NetlinkError};

/// A route read from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination; the default route is 0.0.0.0/0 or ::/0.
    pub dst: IpNet,
    pub gateway: Option<IpAddr>,
    /// Output interface index.
    pub oif: Option<u32>,
    pub table: u32,
    pub priority: Option<u32>,
    pub protocol: RouteProtocol,
    pub scope: RouteScope,
    pub kind: RouteType,
}

impl Route {
    /// In the main routing table (where the plugins put their routes).
    pub fn is_main_table(&self) -> bool {
        self.table == u32::from(RouteHeader::RT_TABLE_MAIN)
    }

    fn from_message(msg: RouteMessage) -> Option<Self> {
        let unspecified = match msg.header.address_family {
            AddressFamily::Inet => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            _ => return None,
        };
        let mut dst = unspecified;
        let mut route = Route {
            dst: IpNet::new(unspecified, 0).ok()?,
            gateway: None,
            oif: None,
            table: u32::from(msg.header.table),
            priority: None,
            protocol: msg.header.protocol,
            scope: msg.header.scope,
            kind: msg.header.kind,
        };
        for attr in msg.attributes {
            match attr {
                RouteAttribute::Destination(addr) => dst = route_ip(addr)?,
                RouteAttribute::Gateway(addr) => route.gateway = route_ip(addr),
                RouteAttribute::Oif(index) => route.oif = Some(index),
                RouteAttribute::Table(table) => route.table = table,
                RouteAttribute::Priority(priority) => route.priority = Some(priority),
                _ => {}
            }
        }
        route.dst = IpNet::new(dst, msg.header.destination_prefix_length).ok()?;
        Some(route)
    }
}

/// A route to add: `dst [via gateway] [dev oif]`, in the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub dst: IpNet,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
}

fn route_ip(addr: RouteAddress) -> Option<IpAddr> {
    match addr {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    }
}

fn family_of(ip: &IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

/// Builds RTM_NEWROUTE/DELROUTE content. `dst` is sent even for a default
/// route (prefix length 0), which the kernel accepts and treats the same.
fn route_message(
    dst: IpNet,
    gateway: Option<IpAddr>,
    oif: Option<u32>,
    scope: RouteScope,
    protocol: RouteProtocol,
) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = family_of(&dst.addr());
    msg.header.destination_prefix_length = dst.prefix_len();
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    msg.header.protocol = protocol;
    msg.header.scope = scope;
    msg.header.kind = RouteType::Unicast;
    msg.attributes
        .push(RouteAttribute::Destination(dst.network().into()));
    if let Some(gw) = gateway {
        msg.attributes.push(RouteAttribute::Gateway(gw.into()));
    }
    if let Some(oif) = oif {
        msg.attributes.push(RouteAttribute::Oif(oif));
    }
    msg
}

impl Netlink {
    /// Routes of one family (IPv4, or IPv6 when `ipv6`), in every table;
    /// filter with [`Route::is_main_table`].
    pub fn routes(&self, ipv6: bool) -> Result<Vec<Route>, NetlinkError> {
        let mut query = RouteMessage::default();
        query.header.address_family = if ipv6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        let request = self.handle().route().get(query).execute();
        let msgs: Vec<RouteMessage> = self
            .block_on(request.try_collect())
            .map_err(NetlinkError::request("list routes"))?;
        Ok(msgs.into_iter().filter_map(Route::from_message).collect())
    }

    /// Adds a route like the reference plugins do (vishvananda/netlink's
    /// `RouteAddEcmp`): protocol "boot", scope universe, main table, and
    /// `NLM_F_CREATE` without `NLM_F_EXCL`, so a second route to the same
    /// destination via another gateway is appended rather than refused.
    /// An identical route still fails with EEXIST.
    pub fn add_route(&self, spec: &RouteSpec) -> Result<(), NetlinkError> {
        let msg = route_message(
            spec.dst,
            spec.gateway,
            spec.oif,
            RouteScope::Universe,
            RouteProtocol::Boot,
        );
        let op = match spec.gateway {
            Some(gw) => format!("add route {} via {gw}", spec.dst),
            None => format!("add route {}", spec.dst),
        };
        self.route_request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
            op,
        )
    }

    /// Deletes the route matching `dst`, and `gateway`/`oif` when given, of
    /// any scope and protocol, from the main table.
    pub fn delete_route(&self, spec: &RouteSpec) -> Result<(), NetlinkError> {
        let msg = route_message(
            spec.dst,
            spec.gateway,
            spec.oif,
            RouteScope::NoWhere,
            RouteProtocol::Unspec,
        );
        self.route_request(
            RouteNetlinkMessage::DelRoute(msg),
            NLM_F_REQUEST | NLM_F_ACK,
            format!("delete route {}", spec.dst),
        )
    }

    fn route_request(
        &self,
        msg: RouteNetlinkMessage,
        flags: u16,
        op: String,
    ) -> Result<(), NetlinkError> {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = flags;
        let mut handle = self.handle().clone();
        self.block_on(async move {
            let mut response = handle.request(req)?;
            while let Some(reply) = response.next().await {
                if let NetlinkPayload::Error(err) = reply.payload {
                    return Err(rtnetlink::Error::NetlinkError(err));
                }
            }
            Ok(())
        })
        .map_err(NetlinkError::request(op))
    }
}
