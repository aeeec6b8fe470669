//! ebpf-bridge: a Linux bridge on the node, one veth pair per attachment, IPAM
//! delegated to the plugin named in `ipam.type` — the behaviour and kernel
//! state of the reference `bridge` plugin (containernetworking/plugins v1.1.1),
//! with the same configuration keys, so a conflist ports by renaming `type`.
//!
//! Differences from the reference, all deliberate:
//! - nothing is changed when the container interface name is already taken
//!   (the reference creates or modifies the bridge first);
//! - a failed ADD removes the veth pair it created and releases the IPAM
//!   reservation (the reference leaves the veth behind if IPAM fails);
//! - `ipMasq` is accepted but served by the eBPF datapath, never iptables;
//! - `vlan`/`vlanTrunk` and `macspoofchk` are refused with code 7 rather than
//!   half-implemented;
//! - DEL also succeeds when CNI_NETNS exists but is no longer a namespace (a
//!   leftover bind-mount target), since there is nothing left to delete there;
//! - a gateway address on a bridge whose ports all left (its MAC is then all
//!   zeros) works, where the reference fails to "set bridge's mac".

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::Value;

use crate::netlink::iface::{
    best_effort_sysctl, configure_container, container_ipv6_sysctls, ensure_bridge_addr,
};
use crate::netlink::veth::{delete_link_then, random_veth_name, wait_port_up};
use crate::netlink::{
    format_mac, parse_mac, sysctl, BridgeSpec, Link, NetNs, Netlink, NetlinkError, VethSpec,
};
use crate::plugins::datapath::DatapathConf;
use crate::spec::delegate;
use crate::spec::{CmdArgs, CniError, CniResult, Interface, NetConf, Plugin, Route};
use crate::state::record::{AttachmentKey, Entry, Owner};

/// The plugin behind the `ebpf-bridge` binary.
pub struct BridgePlugin;

const DEFAULT_BRIDGE: &str = "cni0";
/// Index of the container interface in the result's `interfaces`
/// (bridge, host veth, container veth), which every `ips[].interface` names.
const CONTAINER_IF_INDEX: usize = 2;

/// The configuration keys as they appear in the document. Every field is an
/// `Option` so that JSON `null` means "default", as with Go's decoder.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawOptions {
    bridge: Option<String>,
    is_gateway: Option<bool>,
    is_default_gateway: Option<bool>,
    force_address: Option<bool>,
    ip_masq: Option<bool>,
    mtu: Option<u32>,
    hairpin_mode: Option<bool>,
    promisc_mode: Option<bool>,
    vlan: Option<i64>,
    vlan_trunk: Option<Value>,
    #[serde(rename = "macspoofchk")]
    mac_spoof_chk: Option<bool>,
    #[serde(rename = "enabledad")]
    enable_dad: Option<bool>,
    args: Option<RawArgs>,
    runtime_config: Option<RawRuntimeConfig>,
}

#[derive(Debug, Default, Deserialize)]
struct RawArgs {
    cni: Option<RawMacHolder>,
}

#[derive(Debug, Default, Deserialize)]
struct RawMacHolder {
    mac: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawRuntimeConfig {
    mac: Option<String>,
}

/// The validated options of one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeConfig {
    pub bridge: String,
    /// Gateway address on the bridge; implied by `is_default_gateway`.
    pub is_gateway: bool,
    pub is_default_gateway: bool,
    /// Replace a different address already on the bridge instead of failing.
    pub force_address: bool,
    /// Masquerade pod traffic leaving the node. Recorded here; the SNAT itself
    /// is the eBPF datapath's job (no iptables rules are ever created).
    pub ip_masq: bool,
    /// MTU of the bridge (when created) and of both veth ends.
    pub mtu: Option<u32>,
    pub hairpin_mode: bool,
    pub promisc_mode: bool,
    /// Keep IPv6 duplicate address detection on the container interface.
    pub enable_dad: bool,
    /// Container interface MAC: runtimeConfig.mac, else args.cni.mac, else
    /// CNI_ARGS `MAC=` (the reference's precedence).
    pub mac: Option<[u8; 6]>,
    /// Where the agent, the records and the pinned maps are.
    pub datapath: DatapathConf,
}

impl BridgeConfig {
    /// Reads and validates the options; `cni_args_mac` is CNI_ARGS' `MAC`.
    pub fn from_conf(conf: &NetConf, cni_args_mac: Option<&str>) -> Result<Self, CniError> {
        let raw: RawOptions = conf.plugin_options()?;
        let bridge = raw.bridge.unwrap_or_else(|| DEFAULT_BRIDGE.to_string());
        if let Err(why) = check_ifname(&bridge) {
            return Err(CniError::invalid_config(format!(
                "invalid field `bridge`: {bridge:?} {why}"
            )));
        }
        if raw.vlan.is_some_and(|v| v != 0) {
            return Err(CniError::invalid_config(
                "field `vlan` is not supported by ebpf-bridge (VLAN-tagged ports are not implemented)",
            ));
        }
        if raw.vlan_trunk.as_ref().is_some_and(|v| !is_empty_json(v)) {
            return Err(CniError::invalid_config(
                "field `vlanTrunk` is not supported by ebpf-bridge (VLAN-tagged ports are not implemented)",
            ));
        }
        if raw.mac_spoof_chk == Some(true) {
            return Err(CniError::invalid_config(
                "field `macspoofchk` is not supported by ebpf-bridge yet",
            ));
        }
        let hairpin_mode = raw.hairpin_mode.unwrap_or(false);
        let promisc_mode = raw.promisc_mode.unwrap_or(false);
        if hairpin_mode && promisc_mode {
            return Err(CniError::invalid_config(
                "cannot set hairpin mode and promiscuous mode at the same time \
                 (fields `hairpinMode` and `promiscMode`)",
            ));
        }
        let is_default_gateway = raw.is_default_gateway.unwrap_or(false);

        let runtime_mac = raw
            .runtime_config
            .and_then(|r| r.mac)
            .filter(|m| !m.is_empty());
        let args_mac = raw
            .args
            .and_then(|a| a.cni)
            .and_then(|c| c.mac)
            .filter(|m| !m.is_empty());
        let env_mac = cni_args_mac.filter(|m| !m.is_empty()).map(str::to_string);
        let mac = match (runtime_mac, args_mac, env_mac) {
            (Some(m), _, _) => Some(parse_mac_field(&m, "runtimeConfig.mac")?),
            (None, Some(m), _) => Some(parse_mac_field(&m, "args.cni.mac")?),
            (None, None, Some(m)) => Some(parse_mac_field(&m, "CNI_ARGS MAC")?),
            (None, None, None) => None,
        };

        Ok(Self {
            bridge,
            is_gateway: raw.is_gateway.unwrap_or(false) || is_default_gateway,
            is_default_gateway,
            force_address: raw.force_address.unwrap_or(false),
            ip_masq: raw.ip_masq.unwrap_or(false),
            mtu: raw.mtu.filter(|&m| m != 0),
            hairpin_mode,
            promisc_mode,
            enable_dad: raw.enable_dad.unwrap_or(false),
            mac,
            datapath: conf.plugin_options()?,
        })
    }
}

fn parse_mac_field(text: &str, source: &str) -> Result<[u8; 6], CniError> {
    parse_mac(text)
        .map_err(|_| CniError::invalid_config(format!("invalid MAC address {text:?} in {source}")))
}

fn is_empty_json(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// The kernel's rule for interface names.
fn check_ifname(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("is empty");
    }
    if name.len() > 15 {
        return Err("is longer than 15 bytes");
    }
    if name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
    {
        return Err("is not a valid interface name");
    }
    Ok(())
}

fn netns_path(args: &CmdArgs) -> Result<&std::path::Path, CniError> {
    args.netns
        .as_deref()
        .ok_or_else(|| CniError::invalid_env("required env variable CNI_NETNS is missing"))
}

/// Gateway addresses to put on the bridge, per family (with the subnet's
/// prefix length), as the reference computes them.
#[derive(Debug, Default)]
struct Gateways {
    v4: Vec<IpNet>,
    v6: Vec<IpNet>,
}

/// First address of the subnet after the network address (10.1.2.0/24 -> .1).
fn default_gateway_of(addr: &IpNet) -> IpAddr {
    match addr.network() {
        IpAddr::V4(net) => IpAddr::V4(Ipv4Addr::from(u32::from(net).wrapping_add(1))),
        IpAddr::V6(net) => IpAddr::V6(Ipv6Addr::from(u128::from(net).wrapping_add(1))),
    }
}

fn default_route_dst(ipv6: bool) -> IpNet {
    if ipv6 {
        IpNet::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0).unwrap_or_default()
    } else {
        IpNet::default()
    }
}

/// Points every IP at the container interface, fills in missing gateways
/// (first host of the subnet) when the bridge is a gateway, adds one default
/// route per family unless IPAM already gave one, and returns the bridge
/// addresses to configure.
fn calc_gateways(result: &mut CniResult, conf: &BridgeConfig) -> Gateways {
    let mut gws = Gateways::default();
    let mut default_route_found = [false, false];
    for ip in &mut result.ips {
        let ipv6 = ip.address.addr().is_ipv6();
        ip.interface = Some(CONTAINER_IF_INDEX);
        if ip.gateway.is_none() && conf.is_gateway {
            ip.gateway = Some(default_gateway_of(&ip.address));
        }
        let family = usize::from(ipv6);
        if conf.is_default_gateway && !default_route_found[family] {
            let dst = default_route_dst(ipv6);
            default_route_found[family] =
                result.routes.iter().any(|r| r.gw.is_some() && r.dst == dst);
            if !default_route_found[family] {
                result.routes.push(Route::new(dst, ip.gateway));
                default_route_found[family] = true;
            }
        }
        if conf.is_gateway {
            if let Some(gw) = ip.gateway {
                if let Ok(net) = IpNet::new(gw, ip.address.prefix_len()) {
                    if ipv6 {
                        gws.v6.push(net);
                    } else {
                        gws.v4.push(net);
                    }
                }
            }
        }
    }
    gws
}

/// The bridge: created if missing, promiscuous if asked, our own routes
/// (accept_ra off), up.
fn setup_bridge(host: &Netlink, conf: &BridgeConfig) -> Result<Link, CniError> {
    let spec = BridgeSpec {
        name: conf.bridge.clone(),
        mtu: conf.mtu,
        promisc: conf.promisc_mode,
        vlan_filtering: false,
    };
    let fail = |e: NetlinkError| {
        CniError::from(e).context(format!("failed to create bridge {:?}", conf.bridge))
    };
    let br = host.ensure_bridge(&spec).map_err(fail)?;
    // Already 0 on every ADD but the first: the link message says so, and
    // a /proc/sys/net/ipv6 look-up costs more the more pods there are.
    if br.ipv6_accept_ra != Some(0) {
        best_effort_sysctl(&format!("net/ipv6/conf/{}/accept_ra", br.name), "0");
    }
    if !br.up {
        host.set_up(br.index).map_err(fail)?;
    }
    Ok(br)
}

/// Creates the veth pair — host end "vethXXXXXXXX" here, container end
/// `ifname` directly in the container namespace — brings the host end up,
/// enslaves it to the bridge and sets its hairpin mode. On failure after
/// creation the pair is deleted again.
///
/// The host end's name is recorded for the attachment before the pair is
/// created, so a crash right after creation leaves a record DEL and GC use.
fn setup_veth(
    host: &Netlink,
    netns: &NetNs,
    br: &Link,
    key: &AttachmentKey,
    conf: &BridgeConfig,
) -> Result<Link, CniError> {
    let ifname = key.ifname.as_str();
    let mut created = None;
    for _ in 0..10 {
        // A name already taken makes the create fail with EEXIST (handled
        // below), so it is not looked up first.
        let name = random_veth_name()?;
        let entry = Entry::Link { name: name.clone() };
        conf.datapath.record(key, entry.clone())?;
        crate::crash::point("bridge-after-record");
        let spec = VethSpec {
            name: name.clone(),
            peer_name: ifname.to_string(),
            peer_netns: Some(std::os::fd::AsFd::as_fd(netns)),
            peer_mac: conf.mac,
            mtu: conf.mtu,
            // The reference creates both ends with txqueuelen 0 (a Go struct
            // literal's zero value); match the kernel state it leaves.
            tx_queue_len: Some(0),
        };
        let outcome = host.create_veth(&spec);
        crate::crash::point("bridge-after-veth");
        if outcome.is_err() {
            // Not created (or not ours): the name must not stay recorded.
            conf.datapath.forget(key, &entry)?;
        }
        match outcome {
            Ok(()) => {
                created = Some(name);
                break;
            }
            // Either our random name or `ifname` exists: retry only for ours.
            Err(e) if e.errno() == Some(libc::EEXIST) && host.find_link(&name)?.is_some() => {
                continue
            }
            Err(e) if e.errno() == Some(libc::EEXIST) => {
                return Err(CniError::internal(format!(
                    "container veth name provided ({ifname}) already exists"
                )))
            }
            Err(e) => return Err(CniError::from(e).context("failed to make veth pair")),
        }
    }
    let Some(name) = created else {
        return Err(CniError::internal("failed to find a unique veth name"));
    };
    // The reference's order: up, accept_ra, master, hairpin mode. Up and
    // master go in one request; a new bridge port starts with hairpin mode
    // off, so only "on" needs a request. Enslaving changes neither the MAC
    // nor the index, so the link as read after creation stays valid.
    let configure = || -> Result<Link, NetlinkError> {
        let mut veth = host.link_by_name(&name)?;
        host.set_master_up(veth.index, br.index)?;
        best_effort_sysctl(&format!("net/ipv6/conf/{name}/accept_ra"), "0");
        if conf.hairpin_mode {
            host.set_hairpin(veth.index, true)?;
        }
        veth.up = true;
        veth.master = Some(br.index);
        veth.hairpin = Some(conf.hairpin_mode);
        Ok(veth)
    };
    configure().map_err(|e| {
        let _ = host.delete_link_by_name(&name);
        CniError::from(e).context(format!(
            "failed to connect {name:?} to bridge {:?}",
            br.name
        ))
    })
}

/// One ADD in progress once the veth pair exists: what it needs to finish,
/// and what it must undo if it cannot.
struct Attachment<'a> {
    key: AttachmentKey,
    args: &'a CmdArgs,
    conf: &'a NetConf,
    opts: &'a BridgeConfig,
    host: &'a Netlink,
    cont: &'a Netlink,
    netns: &'a NetNs,
    br: Link,
    host_veth: Link,
    ipam_allocated: bool,
}

impl Attachment<'_> {
    /// IPAM, container addresses and routes, bridge gateway address; the
    /// result as the reference shapes it.
    fn complete(&mut self) -> Result<CniResult, CniError> {
        let (args, conf, opts, host, cont) =
            (self.args, self.conf, self.opts, self.host, self.cont);
        let cont_link = cont.link_by_name(&args.ifname).map_err(|e| {
            CniError::from(e).context(format!("failed to lookup {:?}", args.ifname))
        })?;
        let mut result = CniResult {
            cni_version: conf.cni_version.clone(),
            interfaces: vec![
                Interface {
                    name: self.br.name.clone(),
                    mac: Some(self.br.mac_string()),
                    ..Default::default()
                },
                Interface {
                    name: self.host_veth.name.clone(),
                    mac: Some(self.host_veth.mac_string()),
                    ..Default::default()
                },
                Interface {
                    name: cont_link.name.clone(),
                    mac: Some(cont_link.mac_string()),
                    sandbox: Some(self.netns.path().to_string_lossy().into_owned()),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };

        if let Some(ipam) = &conf.ipam {
            // The container interface's sysctls are set while the IPAM
            // plugin runs (the IPv6 ones on a thread in its namespace):
            // neither depends on the other, and if IPAM fails the interface
            // is deleted anyway. Like the sysctls, arp_notify is best effort.
            let (ipam_result, sysctls) = std::thread::scope(|scope| {
                let ifname = cont_link.name.as_str();
                let sysctls = self.netns.spawn_scoped(scope, move || {
                    container_ipv6_sysctls(ifname, opts.enable_dad)
                });
                let ipam_result = delegate::delegate_add(&ipam.ipam_type, &args.stdin, args);
                if let Err(e) = cont.set_arp_notify(cont_link.index) {
                    log::debug!("ignoring: {e}");
                }
                (ipam_result, sysctls.and_then(|task| task.join()))
            });
            let ipam_result = ipam_result?;
            self.ipam_allocated = true;
            // Not entering the namespace is an error, as it would be for
            // the addresses; the reservation is released by the rollback.
            sysctls?;
            crate::crash::point("bridge-after-ipam");
            result.ips = ipam_result.ips;
            result.routes = ipam_result.routes;
            result.dns = ipam_result.dns;
            if result.ips.is_empty() {
                return Err(CniError::internal("IPAM plugin returned missing IP config"));
            }
            let gws = calc_gateways(&mut result, opts);
            configure_container(cont, self.netns, &cont_link, &result)?;
            self.host_veth = wait_port_up(host, &self.host_veth.name)?;
            if opts.is_gateway {
                for (family_gws, forward_key) in [
                    (&gws.v4, "net/ipv4/ip_forward"),
                    (&gws.v6, "net/ipv6/conf/all/forwarding"),
                ] {
                    for gw in family_gws {
                        ensure_bridge_addr(host, &self.br, *gw, opts.force_address)
                            .map_err(|e| e.context("failed to set bridge addr"))?;
                    }
                    if !family_gws.is_empty() {
                        sysctl::ensure(forward_key, "1").map_err(|e| {
                            CniError::from(e).context("failed to enable forwarding")
                        })?;
                    }
                }
            }
            if opts.ip_masq {
                // Served by the eBPF SNAT on the uplink, keyed by this
                // attachment; never by iptables. Needs the agent: if it is
                // down this fails with code 11 and the ADD is rolled back.
                opts.datapath
                    .add(self.key.clone(), masq_entries(&result))
                    .map_err(|e| e.context("ipMasq"))?;
                crate::crash::point("bridge-after-masq");
            }
        } else {
            cont.set_up(cont_link.index).map_err(|e| {
                CniError::from(e).context(format!("failed to set {:?} up", args.ifname))
            })?;
            self.host_veth = wait_port_up(host, &self.host_veth.name)?;
        }

        // The bridge MAC may have changed when the port joined or the address
        // was set; report the final ones (the host veth as read once its port
        // was up, as the reference does).
        result.interfaces[0].mac = Some(host.link_by_name(&self.br.name)?.mac_string());
        result.interfaces[1].mac = Some(self.host_veth.mac_string());

        // Configured DNS wins; otherwise whatever IPAM returned.
        if let Some(dns) = conf.dns.as_ref().filter(|d| !d.is_empty()) {
            result.dns = dns.clone();
        }
        Ok(result)
    }

    /// Nothing half-done: drop the pair (both ends), the reservation, the
    /// datapath entries and the record.
    fn roll_back(&self) {
        if let Err(e) = self.host.delete_link_by_name(&self.host_veth.name) {
            log::warn!("cleanup after failed ADD: {e}");
        }
        if self.ipam_allocated {
            if let Some(ipam) = &self.conf.ipam {
                if let Err(e) = delegate::delegate_del(&ipam.ipam_type, &self.args.stdin, self.args)
                {
                    log::warn!("cleanup after failed ADD: IPAM DEL: {e}");
                }
            }
        }
        if let Err(e) = self.opts.datapath.del(&self.key, Owner::Bridge) {
            log::warn!("cleanup after failed ADD: {e}");
        }
    }
}

impl Plugin for BridgePlugin {
    fn add(&self, args: &CmdArgs, conf: &NetConf) -> Result<CniResult, CniError> {
        let opts = BridgeConfig::from_conf(conf, args.arg("MAC"))?;
        let netns = NetNs::open(netns_path(args)?)?;
        let host = Netlink::connect()?;
        let cont = Netlink::connect_in(&netns)?;

        // Refuse before touching anything if the name is taken in the pod.
        if cont.find_link(&args.ifname)?.is_some() {
            return Err(CniError::internal(format!(
                "container veth name provided ({}) already exists",
                args.ifname
            )));
        }

        let key = DatapathConf::key(&conf.name, args);
        let br = setup_bridge(&host, &opts)?;
        let host_veth = match setup_veth(&host, &netns, &br, &key, &opts) {
            Ok(v) => v,
            Err(e) => {
                // Drops a record that setup_veth may have created empty.
                let _ = opts.datapath.del(&key, Owner::Bridge);
                return Err(e);
            }
        };
        let mut attachment = Attachment {
            key,
            args,
            conf,
            opts: &opts,
            host: &host,
            cont: &cont,
            netns: &netns,
            br,
            host_veth,
            ipam_allocated: false,
        };
        let outcome = attachment.complete();
        if outcome.is_err() {
            attachment.roll_back();
        }
        outcome
    }

    fn del(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        // Only the path keys are read: bridge options that ADD would refuse
        // must not keep an attachment from going.
        let datapath = DatapathConf::from_conf(conf)?;
        let key = DatapathConf::key(&conf.name, args);
        // IPAM, then whatever the attachment's record lists (the host veth
        // if it survived, datapath entries), then the record itself. Each
        // step runs even if the one before failed; the first error is
        // reported (and the runtime's retry finds less to do).
        let ipam_del = || {
            let ipam = match &conf.ipam {
                Some(ipam) => delegate::delegate_del(&ipam.ipam_type, &args.stdin, args),
                None => Ok(()),
            };
            let entries = datapath.del(&key, Owner::Bridge);
            ipam.and(entries)
        };
        let Some(path) = args.netns.as_deref() else {
            return ipam_del();
        };
        let netns = match NetNs::open(path) {
            Ok(ns) => ns,
            // The namespace is gone (or only its mount point is left): so is
            // the interface. Release the address and succeed.
            Err(NetlinkError::NetnsNotFound { .. }) | Err(NetlinkError::NotANetns { .. }) => {
                return ipam_del();
            }
            Err(e) => return Err(e.into()),
        };
        let cont = Netlink::connect_in(&netns)?;
        let link = cont.find_link(&args.ifname).map_err(|e| {
            CniError::from(e).context(format!("failed to delete {:?}", args.ifname))
        })?;
        match link {
            Some(link) => delete_link_then(&netns, &cont, &link, ipam_del),
            None => ipam_del(),
        }
    }

    fn check(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        let opts = BridgeConfig::from_conf(conf, args.arg("MAC"))?;
        let path = netns_path(args)?;
        let netns = NetNs::open(path)?;
        if let Some(ipam) = &conf.ipam {
            delegate::delegate_check(&ipam.ipam_type, &args.stdin, args)?;
        }
        let Some(prev) = conf.prev_result()? else {
            return Err(CniError::internal("Required prevResult missing"));
        };
        let sandbox = path.to_string_lossy();
        let host = Netlink::connect()?;
        let cont = Netlink::connect_in(&netns)?;

        // The bridge.
        let br_if = prev
            .interfaces
            .iter()
            .find(|i| i.name == opts.bridge)
            .ok_or_else(|| {
                CniError::internal(format!(
                    "CNI created bridge {} in host namespace was not found in prevResult",
                    opts.bridge
                ))
            })?;
        if br_if.sandbox.is_some() {
            return Err(CniError::internal(format!(
                "Interface {} should not be in sandbox",
                br_if.name
            )));
        }
        let br = host.find_link(&opts.bridge)?.ok_or_else(|| {
            CniError::internal(format!(
                "CNI created bridge {} in host namespace was not found",
                opts.bridge
            ))
        })?;
        if !br.is_bridge() {
            return Err(CniError::internal(format!(
                "Interface {} does not have link type of bridge",
                br.name
            )));
        }
        check_mac(br_if, &br, "Bridge interface")?;
        if br.promisc != opts.promisc_mode {
            return Err(CniError::internal(format!(
                "Bridge interface {} configured Promisc Mode {} doesn't match current state: {}",
                br.name, opts.promisc_mode, br.promisc
            )));
        }

        // The container interface.
        let cont_if = prev
            .interfaces
            .iter()
            .find(|i| i.name == args.ifname && i.sandbox.as_deref() == Some(&*sandbox))
            .ok_or_else(|| {
                CniError::internal(format!(
                    "CNI created interface {} in sandbox {sandbox} not found in prevResult",
                    args.ifname
                ))
            })?;
        let cont_link = cont.find_link(&args.ifname)?.ok_or_else(|| {
            CniError::internal(format!(
                "CNI created interface in container {} not found",
                args.ifname
            ))
        })?;
        if !cont_link.is_veth() {
            return Err(CniError::internal(format!(
                "Error: Container interface {} not of type veth",
                cont_link.name
            )));
        }
        check_mac(cont_if, &cont_link, "Container interface")?;

        // The host end: a veth whose peer is the container interface and
        // whose master is the bridge.
        let mut veth_found = None;
        for intf in prev
            .interfaces
            .iter()
            .filter(|i| i.name != br.name && i.name != cont_if.name)
        {
            let link = host.find_link(&intf.name)?.ok_or_else(|| {
                CniError::internal(format!("Interface name {} not found", intf.name))
            })?;
            if !link.is_veth()
                || link.peer_index != Some(cont_link.index)
                || cont_link.peer_index != Some(link.index)
            {
                continue;
            }
            if link.master != Some(br.index) {
                return Err(CniError::internal(format!(
                    "CNI veth {} is not attached to bridge {}",
                    link.name, br.name
                )));
            }
            check_mac(intf, &link, "Interface")?;
            veth_found = Some(link.name.clone());
            break;
        }
        let Some(host_veth) = veth_found else {
            return Err(CniError::internal(format!(
                "CNI veth created for bridge {} was not found",
                opts.bridge
            )));
        };

        // Addresses and routes in the container.
        let addrs = cont.addresses(Some(cont_link.index))?;
        let routes: Vec<_> = [false, true]
            .into_iter()
            .map(|v6| cont.routes(v6))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .flatten()
            .filter(|r| r.is_main_table())
            .collect();
        for ip in &prev.ips {
            if !addrs.iter().any(|a| a.addr == ip.address) {
                return Err(CniError::internal(format!(
                    "Failed to match addr {} on interface {}",
                    ip.address, args.ifname
                )));
            }
            if !routes.iter().any(|r| r.dst == ip.address.trunc()) {
                return Err(CniError::internal(format!(
                    "Failed to find route to {} for interface {}",
                    ip.address.trunc(),
                    args.ifname
                )));
            }
        }
        for route in &prev.routes {
            // A route listed without a gateway was installed via the IP's
            // gateway, so only the destination can be required then.
            let present = routes.iter().any(|r| {
                r.dst == route.dst.trunc() && (route.gw.is_none() || r.gateway == route.gw)
            });
            if !present {
                let via = route.gw.map(|g| format!(" via {g}")).unwrap_or_default();
                return Err(CniError::internal(format!(
                    "Expected Route {}{via} not found in routing table",
                    route.dst
                )));
            }
        }

        // The record, and the datapath entries it implies.
        let mut expected = vec![Entry::Link { name: host_veth }];
        if opts.ip_masq {
            expected.extend(masq_entries(&prev));
        }
        opts.datapath
            .check(DatapathConf::key(&conf.name, args), expected)
    }

    fn status(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        let opts = BridgeConfig::from_conf(conf, args.arg("MAC"))?;
        opts.datapath.status()?;
        match &conf.ipam {
            Some(ipam) => delegate::delegate_status(&ipam.ipam_type, &args.stdin, args),
            None => Ok(()),
        }
    }

    fn gc(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        let opts = BridgeConfig::from_conf(conf, args.arg("MAC"))?;
        opts.datapath.gc(conf)?;
        match &conf.ipam {
            Some(ipam) => delegate::delegate_gc(&ipam.ipam_type, &args.stdin, args),
            None => Ok(()),
        }
    }

    fn about(&self) -> &'static str {
        "ebpf-bridge: bridge + veth CNI plugin (eBPF datapath) supporting CNI spec 0.1.0 - 1.1.0"
    }
}

/// The masquerade entries of a result: each pod address, excluding its own
/// subnet (what the reference's per-pod iptables chain does).
fn masq_entries(result: &CniResult) -> Vec<Entry> {
    result
        .ips
        .iter()
        .map(|ip| Entry::MasqSource {
            ip: ip.address.addr(),
            subnet: ip.address.trunc(),
        })
        .collect()
}

/// A MAC listed in prevResult must be the link's current MAC.
fn check_mac(intf: &Interface, link: &Link, what: &str) -> Result<(), CniError> {
    match &intf.mac {
        Some(mac) if !mac.eq_ignore_ascii_case(&format_mac(&link.mac)) => {
            Err(CniError::internal(format!(
                "{what} {} Mac {mac} doesn't match current Mac {}",
                link.name,
                link.mac_string()
            )))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(json: &str) -> NetConf {
        NetConf::parse(json.as_bytes()).unwrap()
    }

    const BASE: &str = r#""cniVersion":"1.0.0","name":"n","type":"ebpf-bridge""#;

    #[test]
    fn defaults_match_the_reference() {
        let c = BridgeConfig::from_conf(&conf(&format!("{{{BASE}}}")), None).unwrap();
        assert_eq!(
            c,
            BridgeConfig {
                bridge: "cni0".into(),
                is_gateway: false,
                is_default_gateway: false,
                force_address: false,
                ip_masq: false,
                mtu: None,
                hairpin_mode: false,
                promisc_mode: false,
                enable_dad: false,
                mac: None,
                datapath: DatapathConf::default(),
            }
        );
    }

    #[test]
    fn all_options_are_read() {
        let c = BridgeConfig::from_conf(
            &conf(&format!(
                r#"{{{BASE},"bridge":"br-x","isDefaultGateway":true,"forceAddress":true,"ipMasq":true,
                "mtu":1400,"hairpinMode":true,"enabledad":true,"vlan":0}}"#
            )),
            None,
        )
        .unwrap();
        assert_eq!(c.bridge, "br-x");
        assert!(c.is_gateway, "isDefaultGateway implies isGateway");
        assert!(
            c.is_default_gateway && c.force_address && c.ip_masq && c.hairpin_mode && c.enable_dad
        );
        assert_eq!(c.mtu, Some(1400));
    }

    #[test]
    fn nulls_and_zero_mtu_mean_default() {
        let c = BridgeConfig::from_conf(
            &conf(&format!(
                r#"{{{BASE},"bridge":null,"isGateway":null,"mtu":0}}"#
            )),
            None,
        )
        .unwrap();
        assert_eq!(c.bridge, "cni0");
        assert!(!c.is_gateway);
        assert_eq!(c.mtu, None);
    }

    #[test]
    fn mac_precedence() {
        let env = Some("00:00:00:00:00:01");
        let c = BridgeConfig::from_conf(&conf(&format!("{{{BASE}}}")), env).unwrap();
        assert_eq!(c.mac, Some([0, 0, 0, 0, 0, 1]));
        let c = BridgeConfig::from_conf(
            &conf(&format!(
                r#"{{{BASE},"args":{{"cni":{{"mac":"00:00:00:00:00:02"}}}}}}"#
            )),
            env,
        )
        .unwrap();
        assert_eq!(c.mac, Some([0, 0, 0, 0, 0, 2]));
        let c = BridgeConfig::from_conf(
            &conf(&format!(
                r#"{{{BASE},"args":{{"cni":{{"mac":"00:00:00:00:00:02"}}}},"runtimeConfig":{{"mac":"00:00:00:00:00:03"}}}}"#
            )),
            env,
        )
        .unwrap();
        assert_eq!(c.mac, Some([0, 0, 0, 0, 0, 3]));
    }

    fn code_of(json: String, mac: Option<&str>) -> (u32, String) {
        let e = BridgeConfig::from_conf(&conf(&json), mac).unwrap_err();
        (e.code, e.msg)
    }

    #[test]
    fn invalid_options_are_code_7_naming_the_field() {
        for (json, field) in [
            (format!(r#"{{{BASE},"vlan":100}}"#), "vlan"),
            (
                format!(r#"{{{BASE},"vlanTrunk":[{{"id":5}}]}}"#),
                "vlanTrunk",
            ),
            (format!(r#"{{{BASE},"macspoofchk":true}}"#), "macspoofchk"),
            (
                format!(r#"{{{BASE},"hairpinMode":true,"promiscMode":true}}"#),
                "hairpinMode",
            ),
            (format!(r#"{{{BASE},"mtu":-1}}"#), "mtu"),
            (format!(r#"{{{BASE},"isGateway":"yes"}}"#), "isGateway"),
            (
                format!(r#"{{{BASE},"bridge":"this-name-is-too-long"}}"#),
                "bridge",
            ),
            (format!(r#"{{{BASE},"bridge":""}}"#), "bridge"),
            (
                format!(r#"{{{BASE},"runtimeConfig":{{"mac":"zz"}}}}"#),
                "runtimeConfig.mac",
            ),
        ] {
            let (code, msg) = code_of(json.clone(), None);
            assert_eq!(code, 7, "{json}: {msg}");
            assert!(msg.contains(field), "{json}: {msg:?} does not name {field}");
        }
        let (code, msg) = code_of(format!("{{{BASE}}}"), Some("bad"));
        assert_eq!(code, 7);
        assert!(msg.contains("MAC"), "{msg}");
    }

    fn ipc(addr: &str, gw: Option<&str>) -> crate::spec::IpConfig {
        crate::spec::IpConfig {
            address: addr.parse().unwrap(),
            gateway: gw.map(|g| g.parse().unwrap()),
            interface: None,
        }
    }

    fn gateway_conf(default_gw: bool) -> BridgeConfig {
        let mut c = BridgeConfig::from_conf(&conf(&format!("{{{BASE}}}")), None).unwrap();
        c.is_gateway = true;
        c.is_default_gateway = default_gw;
        c
    }

    #[test]
    fn gateways_and_default_routes() {
        let mut r = CniResult {
            ips: vec![
                ipc("10.1.2.7/24", None),
                ipc("fd00::7/64", Some("fd00::fe")),
                ipc("10.9.0.5/16", None),
            ],
            ..Default::default()
        };
        let gws = calc_gateways(&mut r, &gateway_conf(true));
        assert!(r.ips.iter().all(|i| i.interface == Some(2)));
        assert_eq!(r.ips[0].gateway, Some("10.1.2.1".parse().unwrap()));
        assert_eq!(r.ips[1].gateway, Some("fd00::fe".parse().unwrap()));
        assert_eq!(
            gws.v4,
            vec![
                "10.1.2.1/24".parse::<IpNet>().unwrap(),
                "10.9.0.1/16".parse().unwrap()
            ]
        );
        assert_eq!(gws.v6, vec!["fd00::fe/64".parse::<IpNet>().unwrap()]);
        // One default route per family, via the first IP's gateway.
        assert_eq!(
            r.routes,
            vec![
                Route::new(
                    "0.0.0.0/0".parse().unwrap(),
                    Some("10.1.2.1".parse().unwrap())
                ),
                Route::new("::/0".parse().unwrap(), Some("fd00::fe".parse().unwrap())),
            ]
        );
    }

    #[test]
    fn ipam_default_route_is_kept() {
        let mut r = CniResult {
            ips: vec![ipc("10.1.2.7/24", Some("10.1.2.254"))],
            routes: vec![Route::new(
                "0.0.0.0/0".parse().unwrap(),
                Some("10.1.2.254".parse().unwrap()),
            )],
            ..Default::default()
        };
        calc_gateways(&mut r, &gateway_conf(true));
        assert_eq!(r.routes.len(), 1);
    }

    #[test]
    fn no_gateway_without_is_gateway() {
        let mut r = CniResult {
            ips: vec![ipc("10.1.2.7/24", None)],
            ..Default::default()
        };
        let c = BridgeConfig::from_conf(&conf(&format!("{{{BASE}}}")), None).unwrap();
        let gws = calc_gateways(&mut r, &c);
        assert_eq!(r.ips[0].gateway, None);
        assert!(gws.v4.is_empty() && r.routes.is_empty());
    }
}
