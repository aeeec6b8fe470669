//! An interface's addresses, routes and sysctls, as the bridge plugin sets
//! them: the IPAM result applied in the container (the reference's
//! `ipam.ConfigureIface`) and the gateway address on the bridge.
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::veth::Backoff;
use super::{sysctl, Link, NetNs, Netlink, NetlinkError, RouteSpec};
use crate::spec::{CniError, CniResult};

/// Sysctls that only tune behaviour: failures are ignored, as the reference
/// does (e.g. IPv6 disabled on the node, so the ipv6 keys do not exist).
pub(crate) fn best_effort_sysctl(key: &str, value: &str) {
    if let Err(e) = sysctl::write(key, value) {
        log::debug!("ignoring: {e}");
    }
}

/// Waits (up to `timeout`) until no address of the link is tentative, so
/// IPv6 routes via the gateway can be added. Polls the link's own addresses
/// (a kernel-filtered dump) every few milliseconds, so the wait ends soon
/// after DAD does.
pub(crate) fn settle_addresses(nl: &Netlink, index: u32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut pause = Backoff::new();
    loop {
        match nl.addresses(Some(index)) {
            Ok(addrs) if addrs.iter().any(|a| a.is_unsettled()) => {}
            _ => return,
        }
        if Instant::now() >= deadline {
            log::warn!("link #{index} still has tentative addresses after {timeout:?}");
            return;
        }
        pause.sleep();
    }
}

/// The container interface's IPv6 sysctls, set before its addresses as the
/// reference does (DAD off unless `enabledad`). Runs on a thread inside the
/// container namespace. (`arp_notify`, the reference's other one, is set
/// through netlink: see [`Netlink::set_arp_notify`].)
pub(crate) fn container_ipv6_sysctls(ifname: &str, enable_dad: bool) {
    if enable_dad {
        best_effort_sysctl(&format!("net/ipv6/conf/{ifname}/enhanced_dad"), "1");
        best_effort_sysctl(&format!("net/ipv6/conf/{ifname}/accept_dad"), "1");
    } else {
        best_effort_sysctl(&format!("net/ipv6/conf/{ifname}/accept_dad"), "0");
    }
}

/// Applies the IPAM result inside the container namespace, like the reference
/// `ipam.ConfigureIface`: addresses, link up, then routes (a route without
/// its own gateway goes via the first gateway of its family). The
/// interface's sysctls ([`container_ipv6_sysctls`], `arp_notify`) must
/// already be set.
pub(crate) fn configure_container(
    cont: &Netlink,
    netns: &NetNs,
    link: &Link,
    result: &CniResult,
) -> Result<(), CniError> {
    let ifname = link.name.as_str();
    let mut v4gw = None;
    let mut v6gw = None;
    let mut ipv6_enabled = false;
    for ip in &result.ips {
        let Some(idx) = ip.interface else { continue };
        if result.interfaces.get(idx).map(|i| i.name.as_str()) != Some(ifname) {
            return Err(CniError::internal(format!(
                "failed to add IP addr {} to {ifname:?}: invalid interface index",
                ip.address
            )));
        }
        if ip.address.addr().is_ipv6() && !ipv6_enabled {
            enable_ipv6(netns, ifname)?;
            ipv6_enabled = true;
        }
        cont.add_address(link.index, ip.address).map_err(|e| {
            CniError::from(e).context(format!(
                "failed to add IP addr {} to {ifname:?}",
                ip.address
            ))
        })?;
        match ip.gateway {
            Some(gw @ IpAddr::V4(_)) if v4gw.is_none() => v4gw = Some(gw),
            Some(gw @ IpAddr::V6(_)) if v6gw.is_none() => v6gw = Some(gw),
            _ => {}
        }
    }
    cont.set_up(link.index)
        .map_err(|e| CniError::from(e).context(format!("failed to set {ifname:?} UP")))?;
    if v6gw.is_some() {
        settle_addresses(cont, link.index, Duration::from_secs(10));
    }
    for route in &result.routes {
        let gw = route.gw.or(if route.dst.addr().is_ipv4() {
            v4gw
        } else {
            v6gw
        });
        let spec = RouteSpec {
            dst: route.dst.trunc(),
            gateway: gw,
            oif: Some(link.index),
        };
        cont.add_route(&spec).map_err(|e| {
            let via = gw.map(|g| g.to_string()).unwrap_or_else(|| "<nil>".into());
            CniError::from(e).context(format!(
                "failed to add route '{} via {via} dev {ifname}'",
                route.dst
            ))
        })?;
    }
    Ok(())
}

/// IPv6 addresses need `disable_ipv6=0` on the interface and on lo.
pub(crate) fn enable_ipv6(netns: &NetNs, ifname: &str) -> Result<(), CniError> {
    let ifname = ifname.to_string();
    netns
        .run(move || {
            for iface in ["lo", ifname.as_str()] {
                let key = format!("net/ipv6/conf/{iface}/disable_ipv6");
                match sysctl::read(&key) {
                    Ok(v) if v == "0" => {}
                    Ok(_) => sysctl::write(&key, "0")?,
                    Err(e) => log::warn!("{e}"),
                }
            }
            Ok::<(), NetlinkError>(())
        })?
        .map_err(|e| CniError::from(e).context("failed to enable IPv6"))
}

/// Puts the gateway address on the bridge. An identical address is fine; a
/// different IPv4 address (or an overlapping IPv6 one) is replaced with
/// `forceAddress`, an error otherwise. The bridge MAC is then pinned to the
/// one it had before this ADD's port joined, so it no longer follows ports.
pub(crate) fn ensure_bridge_addr(
    host: &Netlink,
    br: &Link,
    gw: IpNet,
    force: bool,
) -> Result<(), CniError> {
    let addrs = host
        .addresses(Some(br.index))
        .map_err(|e| CniError::from(e).context("could not get list of IP addresses"))?;
    let ipv6 = gw.addr().is_ipv6();
    for a in addrs.iter().filter(|a| a.addr.addr().is_ipv6() == ipv6) {
        if a.addr == gw {
            return Ok(());
        }
        let conflicts = !ipv6 || a.addr.contains(&gw.addr()) || gw.contains(&a.addr.addr());
        if !conflicts {
            continue;
        }
        if !force {
            return Err(CniError::internal(format!(
                "{:?} already has an IP address different from {gw}",
                br.name
            )));
        }
        host.delete_address(br.index, a.addr).map_err(|e| {
            CniError::from(e).context(format!("could not remove IP address from {:?}", br.name))
        })?;
    }
    match host.add_address(br.index, gw) {
        Ok(()) => {}
        Err(e) if e.errno() == Some(libc::EEXIST) => {}
        Err(e) => {
            return Err(
                CniError::from(e).context(format!("could not add IP address to {:?}", br.name))
            )
        }
    }
    // A bridge whose last port left has an all-zero MAC until a port joins;
    // the reference then fails here ("invalid argument"). Pin the MAC it has
    // now (adopted from this ADD's port) instead.
    let mac = if br.mac.iter().all(|&b| b == 0) {
        host.link_by_name(&br.name)?.mac
    } else {
        br.mac.clone()
    };
    if mac.iter().all(|&b| b == 0) {
        return Ok(());
    }
    host.set_mac(br.index, &mac)
        .map_err(|e| CniError::from(e).context("could not set bridge's mac"))
}
