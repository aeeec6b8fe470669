//! loopback: brings the sandbox's `lo` up, as the reference `loopback`
//! plugin does. containerd runs it for every pod sandbox from the same
//! single CNI bin dir as the pod network's plugins, so the suite ships it:
//! a node needs nothing else installed to start a pod.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::{
    netlink::{NetNs, Netlink, NetlinkError},
    spec::{CmdArgs, CniError, CniResult, Interface, IpConfig, NetConf, Plugin},
};

pub struct LoopbackPlugin;

fn netns_path(args: &CmdArgs) -> Result<&std::path::Path, CniError> {
    args.netns
        .as_deref()
        .ok_or_else(|| CniError::invalid_env("required env variable CNI_NETNS is missing"))
}

/// The loopback addresses present on `index`, in the reference's result
/// order (IPv4 first).
fn loopback_addresses(nl: &Netlink, index: u32) -> Result<Vec<IpNet>, NetlinkError> {
    let wanted = [
        IpNet::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8),
        IpNet::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 128),
    ];
    let present = nl.addresses(Some(index))?;
    Ok(wanted
        .into_iter()
        .flatten()
        .filter(|w| present.iter().any(|a| a.addr == *w))
        .collect())
}

impl Plugin for LoopbackPlugin {
    fn add(&self, args: &CmdArgs, conf: &NetConf) -> Result<CniResult, CniError> {
        let version = conf.version()?;
        let prev = conf.prev_result()?;
        let netns = NetNs::open(netns_path(args)?)?;
        let nl = Netlink::connect_in(&netns)?;
        let link = nl.link_by_name(&args.ifname)?;
        nl.set_up(link.index)?;
        // Chained after another plugin, the previous result passes through.
        if let Some(prev) = prev {
            return Ok(prev);
        }
        let mut result = CniResult::new(version);
        result.interfaces.push(Interface {
            name: args.ifname.clone(),
            mac: Some("00:00:00:00:00:00".into()),
            sandbox: Some(netns_path(args)?.display().to_string()),
            ..Interface::default()
        });
        result.ips = loopback_addresses(&nl, link.index)?
            .into_iter()
            .map(|address| IpConfig {
                address,
                gateway: None,
                interface: Some(0),
            })
            .collect();
        Ok(result)
    }

    fn del(&self, args: &CmdArgs, _conf: &NetConf) -> Result<(), CniError> {
        let Some(path) = args.netns.as_deref() else {
            return Ok(());
        };
        let netns = match NetNs::open(path) {
            Ok(ns) => ns,
            // Gone with the sandbox, and its loopback with it.
            Err(NetlinkError::NetnsNotFound { .. }) | Err(NetlinkError::NotANetns { .. }) => {
                return Ok(())
            }
            Err(e) => return Err(e.into()),
        };
        let nl = Netlink::connect_in(&netns)?;
        match nl.find_link(&args.ifname)? {
            Some(link) => Ok(nl.set_down(link.index)?),
            None => Ok(()),
        }
    }

    fn check(&self, args: &CmdArgs, _conf: &NetConf) -> Result<(), CniError> {
        let netns = NetNs::open(netns_path(args)?)?;
        let nl = Netlink::connect_in(&netns)?;
        let link = nl.link_by_name(&args.ifname)?;
        if !link.up {
            return Err(CniError::internal(format!(
                "loopback interface {} is down",
                args.ifname
            )));
        }
        Ok(())
    }

    fn about(&self) -> &'static str {
        "loopback: brings the sandbox's loopback interface up (CNI spec 0.1.0 - 1.1.0)"
    }
}
