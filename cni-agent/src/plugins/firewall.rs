//! ebpf-firewall: the reference `firewall` plugin's role — container traffic
//! passes on a node whose netfilter FORWARD policy is DROP — without a
//! single iptables or nft rule, plus isolation, anti-spoofing and stateful
//! per-attachment rules, all enforced by the agent's eBPF programs on the
//! pod's host veth (see cni-ebpf `policy.rs`, `spoof.rs`, `forward.rs`).
//! Chain it after ebpf-bridge (and ebpf-portmap, if used).
//!
//! # Configuration
//! The reference's keys, so a conflist ports by renaming `type`:
//! - `backend`: `iptables`, `firewalld` or `ebpf` (all mean the eBPF
//!   datapath here; anything else is refused);
//! - `iptablesAdminChainName`, `firewalldZone`: accepted and ignored (there
//!   are no chains or zones; operator rules go into `firewallRules`, which
//!   take precedence over the runtime's);
//! - `ingressPolicy`: `open` (default), `same-bridge` (only pods on the same
//!   bridge may open connections to the pod), `isolated` (no other pod may).
//!
//! Our own keys:
//! - `bypassNetfilter` (default `true`): the pod's routed traffic is
//!   forwarded by eBPF (FIB lookup + bpf_redirect_neigh) past the node's IP
//!   forward path, so it passes whatever the FORWARD chain says, without a
//!   rule. It then also skips netfilter NAT (PREROUTING/POSTROUTING): on a
//!   node where an iptables-based service proxy must see pod traffic, set it
//!   to `false` and let FORWARD accept the pods instead.
//! - `firewallRules`: the operator's rules (same shape as the capability's).
//!
//! # Capability `firewallRules` (runtimeConfig.firewallRules)
//! A runtime that declares `"capabilities": {"firewallRules": true}` passes
//! per-pod rules in `runtimeConfig.firewallRules`:
//! ```json
//! {
//!   "ingress": {"default": "deny", "rules": [
//!     {"action": "allow", "protocol": "tcp", "ports": "8000-8100", "cidr": "198.18.0.0/15"},
//!     {"action": "allow", "protocol": "icmp"}
//!   ]},
//!   "egress": {"default": "allow", "rules": [
//!     {"action": "deny", "protocol": "udp", "ports": 53, "cidr": "10.0.0.0/8"}
//!   ]}
//! }
//! ```
//! - `ingress` = connections to the pod (the CIDR matches their source),
//!   `egress` = connections from the pod (the CIDR matches the destination);
//! - a rule: `action` `allow`|`deny` (required), `cidr` (IPv4 or IPv6
//!   CIDR or address; default any address of either family), `protocol`
//!   `tcp`|`udp`|`icmp`|`any` (default `any`; `icmp` is ICMPv6 for IPv6,
//!   `icmpv6` is accepted as its alias), `ports`: a port or `"from-to"` range of the destination port
//!   (TCP/UDP only; a rule with ports never matches other protocols),
//!   `comment` (free text);
//! - `default`: `allow` (default) or `deny`, for connections no rule
//!   matches; the runtime's default replaces the config's;
//! - rules are first-match, the config's before the runtime's; at most
//!   4096 per direction in all;
//! - stateful: rules judge a connection's first packet; its replies (and
//!   related ICMP errors) then pass both ways, while an unsolicited packet
//!   the other way is a new connection of the other direction.
//!
//! Rules see packets as they reach or leave the pod: hostPort traffic is
//! matched on the containerPort and the client's address, and traffic
//! from the node itself (e.g. probes) is subject to the ingress rules too.
//! `ingressPolicy` counts as "a pod" a firewalled pod (its source address
//! is anti-spoofed) or anything routed in from a bridge that hosts them.
//!
//! IPv6 gets all of it: rules with IPv6 CIDRs, `ingressPolicy`,
//! connection tracking, related ICMPv6 errors and forwarding past the
//! stack (ip6tables FORWARD DROP). Neighbour discovery always passes the
//! rules; anti-spoofing checks sources (link-local ones excepted) and what
//! neighbour advertisements claim (see cni-ebpf `spoof.rs`).
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::Value;

use crate::{
    firewall::{
        compile, Action, FirewallSpec, IngressPolicy, PortRange, Rule, RuleProtocol, RuleSet,
    },
    netlink::{format_mac, NetNs, Netlink},
    plugins::{
        chained::{Chained, ChainedPlugin},
        datapath::DatapathConf,
    },
    spec::{
        decode::{get, keys_match},
        CmdArgs, CniError, CniResult, NetConf,
    },
    state::record::{Entry, Owner, VethHook},
};
use cni_ebpf_common::fw;

/// ebpf-firewall, the binary's plugin.
pub type FirewallPlugin = ChainedPlugin<Firewall>;

pub struct Firewall;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRuntimeConfig {
    #[serde(default)]
    firewall_rules: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawOptions {
    backend: Option<String>,
    ingress_policy: Option<String>,
    bypass_netfilter: Option<bool>,
    #[serde(default)]
    firewall_rules: Option<Value>,
    #[serde(default)]
    runtime_config: Option<RawRuntimeConfig>,
}

/// The validated options of one invocation.
#[derive(Clone, Debug)]
pub struct FirewallConfig {
    pub ingress_policy: IngressPolicy,
    pub bypass: bool,
    pub ingress: RuleSet,
    pub egress: RuleSet,
    pub datapath: DatapathConf,
}

fn invalid(msg: String) -> CniError {
    CniError::invalid_config(msg)
}

/// One direction of a `firewallRules` object, validated: its default (if
/// given) and its rules.
fn parse_direction(v: &Value, at: &str) -> Result<(Option<Action>, Vec<Rule>), CniError> {
    let obj = v.as_object().ok_or_else(|| {
        invalid(format!(
            "{at}: expected an object with `default` and `rules`"
        ))
    })?;
    for k in obj.keys() {
        if !["default", "rules"].iter().any(|f| keys_match(f, k)) {
            return Err(invalid(format!(
                "{at}.{k}: unknown field (expected `default` or `rules`)"
            )));
        }
    }
    let default = match get(obj, "default") {
        None | Some(Value::Null) => None,
        Some(d) => Some(parse_action(d, &format!("{at}.default"))?),
    };
    let rules = match get(obj, "rules") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, r)| parse_rule(r, &format!("{at}.rules[{i}]")))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(invalid(format!("{at}.rules: expected an array"))),
    };
    Ok((default, rules))
}

fn parse_action(v: &Value, at: &str) -> Result<Action, CniError> {
    match v.as_str().map(str::to_ascii_lowercase).as_deref() {
        Some("allow") => Ok(Action::Allow),
        Some("deny") => Ok(Action::Deny),
        _ => Err(invalid(format!("{at}: unknown action {v} (allow or deny)"))),
    }
}

fn parse_rule(v: &Value, at: &str) -> Result<Rule, CniError> {
    let obj = v
        .as_object()
        .ok_or_else(|| invalid(format!("{at}: expected an object")))?;
    for k in obj.keys() {
        if !["action", "cidr", "protocol", "ports", "comment"]
            .iter()
            .any(|f| keys_match(f, k))
        {
            return Err(invalid(format!(
                "{at}.{k}: unknown field (expected action, cidr, protocol, ports, comment)"
            )));
        }
    }
    let action = match get(obj, "action") {
        None | Some(Value::Null) => return Err(invalid(format!("{at}.action: missing"))),
        Some(a) => parse_action(a, &format!("{at}.action"))?,
    };
    let cidr = match get(obj, "cidr") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(parse_cidr(s, &format!("{at}.cidr"))?),
        Some(other) => return Err(invalid(format!("{at}.cidr: invalid CIDR {other}"))),
    };
    let protocol = match get(obj, "protocol") {
        None | Some(Value::Null) => RuleProtocol::Any,
        Some(p) => match p.as_str().map(str::to_ascii_lowercase).as_deref() {
            Some("any") | Some("all") | Some("") => RuleProtocol::Any,
            Some("tcp") => RuleProtocol::Tcp,
            Some("udp") => RuleProtocol::Udp,
            // ICMP of the packet's family: ICMPv6 for IPv6.
            Some("icmp") | Some("icmpv6") | Some("ipv6-icmp") => RuleProtocol::Icmp,
            _ => {
                return Err(invalid(format!(
                    "{at}.protocol: unknown protocol {p} (tcp, udp, icmp, icmpv6 or any)"
                )))
            }
        },
    };
    let ports = match get(obj, "ports") {
        None | Some(Value::Null) => None,
        Some(p) => Some(parse_ports(p, &format!("{at}.ports"))?),
    };
    if ports.is_some() && protocol == RuleProtocol::Icmp {
        return Err(invalid(format!("{at}.ports: ICMP has no ports")));
    }
    Ok(Rule {
        action,
        cidr,
        protocol,
        ports,
    })
}

fn parse_cidr(s: &str, at: &str) -> Result<IpNet, CniError> {
    let net = match s.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => match s.parse::<IpAddr>() {
            Ok(ip) => IpNet::from(ip),
            Err(_) => return Err(invalid(format!("{at}: invalid CIDR {s:?}"))),
        },
    };
    Ok(net.trunc())
}

fn parse_port(text: &str, at: &str) -> Result<u16, CniError> {
    match text.trim().parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        _ => Err(invalid(format!(
            "{at}: invalid port {text:?} (must be 1-65535)"
        ))),
    }
}

fn parse_ports(v: &Value, at: &str) -> Result<PortRange, CniError> {
    let (from, to) = match v {
        Value::Number(n) => {
            let p = parse_port(&n.to_string(), at)?;
            (p, p)
        }
        Value::String(s) => match s.split_once('-') {
            Some((a, b)) => (parse_port(a, at)?, parse_port(b, at)?),
            None => {
                let p = parse_port(s, at)?;
                (p, p)
            }
        },
        other => return Err(invalid(format!("{at}: invalid port range {other}"))),
    };
    if from > to {
        return Err(invalid(format!(
            "{at}: port range {from}-{to} is reversed (the first port must not exceed the second)"
        )));
    }
    Ok(PortRange { from, to })
}

/// Both directions of one `firewallRules` object.
type Parsed = [(Option<Action>, Vec<Rule>); 2];

fn parse_rules(v: Option<&Value>, at: &str) -> Result<Parsed, CniError> {
    let mut out: Parsed = [(None, Vec::new()), (None, Vec::new())];
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(out);
    };
    let obj = v.as_object().ok_or_else(|| {
        invalid(format!(
            "{at}: expected an object with `ingress` and `egress`"
        ))
    })?;
    for (k, d) in obj {
        let i = match k {
            k if keys_match("ingress", k) => 0,
            k if keys_match("egress", k) => 1,
            _ => {
                return Err(invalid(format!(
                    "{at}.{k}: unknown field (expected ingress or egress)"
                )))
            }
        };
        out[i] = parse_direction(d, &format!("{at}.{k}"))?;
    }
    Ok(out)
}

impl FirewallConfig {
    pub fn from_conf(conf: &NetConf) -> Result<Self, CniError> {
        let raw: RawOptions = conf.plugin_options()?;
        match raw.backend.as_deref() {
            None | Some("") | Some("iptables") | Some("firewalld") | Some("ebpf") => {}
            Some(other) => {
                return Err(invalid(format!(
                    "backend: unknown firewall backend {other:?} (iptables, firewalld or ebpf; all are served by the eBPF datapath)"
                )))
            }
        }
        let ingress_policy = match raw.ingress_policy.as_deref() {
            None | Some("") | Some("open") => IngressPolicy::Open,
            Some("same-bridge") => IngressPolicy::SameBridge,
            Some("isolated") => IngressPolicy::Isolated,
            Some(other) => {
                return Err(invalid(format!(
                "ingressPolicy: unknown ingress policy {other:?} (open, same-bridge or isolated)"
            )))
            }
        };
        let from_conf = parse_rules(raw.firewall_rules.as_ref(), "firewallRules")?;
        let runtime = raw.runtime_config.unwrap_or_default();
        let from_runtime = parse_rules(
            runtime.firewall_rules.as_ref(),
            "runtimeConfig.firewallRules",
        )?;
        let [(ci_def, ci), (ce_def, ce)] = from_conf;
        let [(ri_def, ri), (re_def, re)] = from_runtime;
        let merge = |name: &str,
                     cdef: Option<Action>,
                     c: Vec<Rule>,
                     rdef: Option<Action>,
                     r: Vec<Rule>| {
            let (nc, nr) = (c.len(), r.len());
            let set = RuleSet {
                default: rdef.or(cdef).unwrap_or(Action::Allow),
                rules: c.into_iter().chain(r).collect(),
            };
            if set.rules.len() > fw::MAX_RULES {
                return Err(invalid(format!(
                    "firewallRules.{name}.rules: {} rules ({nc} from the config, {nr} from runtimeConfig) exceed the limit of {} per direction",
                    set.rules.len(),
                    fw::MAX_RULES
                )));
            }
            // The agent compiles the same way; refuse here what it would.
            compile(0, 0, &set).map_err(|e| invalid(format!("firewallRules.{name}: {e}")))?;
            Ok(set)
        };
        Ok(Self {
            ingress_policy,
            bypass: raw.bypass_netfilter.unwrap_or(true),
            ingress: merge("ingress", ci_def, ci, ri_def, ri)?,
            egress: merge("egress", ce_def, ce, re_def, re)?,
            datapath: conf.plugin_options()?,
        })
    }

    /// The datapath entries of the attachment described by `prev`.
    fn entries(&self, args: &CmdArgs, prev: &CniResult) -> Result<Vec<Entry>, CniError> {
        let pod = find_pod(args, prev)?;
        let spec = FirewallSpec {
            ifname: pod.veth.clone(),
            ifindex: pod.veth_index,
            bridge: pod.bridge.clone(),
            bridge_ifindex: pod.bridge_index,
            mac: pod.mac,
            ips: pod.ips,
            ingress_policy: self.ingress_policy,
            bypass: self.bypass,
            ingress: self.ingress.clone(),
            egress: self.egress.clone(),
        };
        let mut entries = vec![
            Entry::Firewall(Box::new(spec)),
            Entry::VethProgram {
                ifname: pod.veth.clone(),
                program: VethHook::FromPod.program().to_string(),
                hook: VethHook::FromPod,
                owner: Owner::Firewall,
            },
            Entry::VethProgram {
                ifname: pod.veth,
                program: VethHook::ToPod.program().to_string(),
                hook: VethHook::ToPod,
                owner: Owner::Firewall,
            },
        ];
        if self.bypass {
            entries.push(Entry::FirewallForward { bridge: pod.bridge });
        }
        Ok(entries)
    }
}

/// The pod as the previous plugins left it.
struct Pod {
    veth: String,
    veth_index: u32,
    bridge: String,
    bridge_index: u32,
    mac: String,
    ips: Vec<IpAddr>,
}

/// Finds the container interface (its MAC and addresses) in prevResult,
/// and the host end of its veth and the bridge in the node namespace.
fn find_pod(args: &CmdArgs, prev: &CniResult) -> Result<Pod, CniError> {
    let sandboxed =
        |i: &&crate::spec::Interface| i.sandbox.as_deref().is_some_and(|s| !s.is_empty());
    let container = prev
        .interfaces
        .iter()
        .position(|i| sandboxed(&i) && i.name == args.ifname)
        .or_else(|| prev.interfaces.iter().position(|i| sandboxed(&i)));
    let ips: Vec<IpAddr> = prev
        .ips
        .iter()
        .filter(|ip| match (ip.interface, container) {
            (Some(i), Some(c)) => i == c,
            _ => true,
        })
        .map(|ip| ip.address.addr())
        .collect();
    if ips.is_empty() {
        return Err(CniError::invalid_config(
            "prevResult has no address of the container: ebpf-firewall must be chained after ebpf-bridge".to_string(),
        ));
    }
    let nl = Netlink::connect()?;
    let mut bridge = None;
    let mut veths = Vec::new();
    for i in prev.interfaces.iter().filter(|i| !sandboxed(i)) {
        if let Some(link) = nl.find_link(&i.name)? {
            if link.is_bridge() {
                bridge.get_or_insert(link);
            } else if link.is_veth() {
                veths.push(link);
            }
        }
    }
    let bridge = bridge.ok_or_else(|| {
        CniError::invalid_config(
            "prevResult names no bridge of this node: ebpf-firewall must be chained after ebpf-bridge".to_string(),
        )
    })?;
    let veth = veths
        .into_iter()
        .find(|v| v.master == Some(bridge.index))
        .ok_or_else(|| {
            CniError::invalid_config(format!(
                "prevResult names no host veth on bridge {}: ebpf-firewall must be chained after ebpf-bridge",
                bridge.name
            ))
        })?;
    let mac = match container
        .and_then(|c| prev.interfaces[c].mac.clone())
        .filter(|m| !m.is_empty())
    {
        Some(m) => m,
        None => container_mac(args)?,
    };
    crate::netlink::parse_mac(&mac).map_err(|_| {
        CniError::invalid_config(format!("prevResult: invalid container MAC {mac:?}"))
    })?;
    Ok(Pod {
        veth: veth.name,
        veth_index: veth.index,
        bridge: bridge.name,
        bridge_index: bridge.index,
        mac,
        ips,
    })
}

/// The container interface's MAC, read in its namespace (for a prevResult
/// without one).
fn container_mac(args: &CmdArgs) -> Result<String, CniError> {
    let path = args.netns.as_ref().ok_or_else(|| {
        CniError::invalid_config(
            "prevResult has no container MAC and CNI_NETNS is unset".to_string(),
        )
    })?;
    let ns = NetNs::open(path)?;
    let ifname = args.ifname.clone();
    let link = ns.run(move || Netlink::connect().and_then(|nl| nl.link_by_name(&ifname)))??;
    Ok(format_mac(&link.mac))
}

impl Chained for Firewall {
    type Config = FirewallConfig;
    const OWNER: Owner = Owner::Firewall;
    const CONTEXT: &'static str = "firewall";
    const ABOUT: &'static str =
        "ebpf-firewall: isolation, anti-spoofing and stateful rules in eBPF (CNI spec 0.1.0 - 1.1.0)";

    fn config(conf: &NetConf) -> Result<FirewallConfig, CniError> {
        FirewallConfig::from_conf(conf)
    }

    fn datapath(cfg: &FirewallConfig) -> &DatapathConf {
        &cfg.datapath
    }

    fn entries(
        cfg: &FirewallConfig,
        args: &CmdArgs,
        prev: &CniResult,
    ) -> Result<Option<Vec<Entry>>, CniError> {
        cfg.entries(args, prev).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: &str) -> NetConf {
        NetConf::parse(
            format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"ebpf-firewall"{extra}}}"#)
                .as_bytes(),
        )
        .unwrap()
    }

    fn err(extra: &str) -> CniError {
        FirewallConfig::from_conf(&conf(extra)).unwrap_err()
    }

    #[test]
    fn reference_keys_are_accepted() {
        let c = FirewallConfig::from_conf(&conf(
            r#","backend":"iptables","iptablesAdminChainName":"CNI-ADMIN","ingressPolicy":"same-bridge""#,
        ))
        .unwrap();
        assert_eq!(c.ingress_policy, IngressPolicy::SameBridge);
        assert!(c.bypass);
        assert_eq!(c.ingress, RuleSet::default());
        assert_eq!(c.egress, RuleSet::default());
        let c = FirewallConfig::from_conf(&conf(
            r#","ingressPolicy":"isolated","bypassNetfilter":false"#,
        ))
        .unwrap();
        assert_eq!(c.ingress_policy, IngressPolicy::Isolated);
        assert!(!c.bypass);
    }

    #[test]
    fn config_rules_come_before_runtime_rules() {
        let c = FirewallConfig::from_conf(&conf(
            r#","firewallRules":{"ingress":{"default":"deny","rules":[{"action":"allow","protocol":"tcp","ports":"8000-8100","cidr":"198.18.0.0/15"}]}},
               "runtimeConfig":{"firewallRules":{"ingress":{"rules":[{"action":"deny","protocol":"UDP","ports":53,"cidr":"10.1.2.3"}]},
                                                 "egress":{"default":"deny","rules":[{"action":"allow","protocol":"icmp"}]}}}"#,
        ))
        .unwrap();
        assert_eq!(
            c.ingress.default,
            Action::Deny,
            "config default kept when the runtime sets none"
        );
        assert_eq!(c.ingress.rules.len(), 2);
        assert_eq!(
            c.ingress.rules[0].ports,
            Some(PortRange {
                from: 8000,
                to: 8100
            })
        );
        assert_eq!(c.ingress.rules[1].protocol, RuleProtocol::Udp);
        assert_eq!(
            c.ingress.rules[1].cidr,
            Some("10.1.2.3/32".parse().unwrap())
        );
        assert_eq!(c.egress.default, Action::Deny);
        assert_eq!(c.egress.rules[0].protocol, RuleProtocol::Icmp);
    }

    /// IPv6 CIDRs and addresses are rules like IPv4's (truncated to their
    /// network); `icmpv6` is `icmp`.
    #[test]
    fn ipv6_rules_are_accepted() {
        let c = FirewallConfig::from_conf(&conf(
            r#","runtimeConfig":{"firewallRules":{"egress":{"rules":[
                {"action":"deny","protocol":"tcp","ports":80,"cidr":"fd00:198:18::5/48"},
                {"action":"allow","cidr":"2001:db8::1"},
                {"action":"allow","protocol":"ICMPv6"}]}}}"#,
        ))
        .unwrap();
        let r = &c.egress.rules;
        assert_eq!(r[0].cidr, Some("fd00:198:18::/48".parse().unwrap()));
        assert_eq!(r[1].cidr, Some("2001:db8::1/128".parse().unwrap()));
        assert_eq!(r[2].protocol, RuleProtocol::Icmp);
    }

    #[test]
    fn bad_rules_name_the_field() {
        let rc = |rules: &str| {
            format!(r#","runtimeConfig":{{"firewallRules":{{"ingress":{{"rules":[{rules}]}}}}}}"#)
        };
        for (extra, field) in [
            (
                rc(r#"{"action":"allow","cidr":"10.0.0.0/33"}"#),
                "runtimeConfig.firewallRules.ingress.rules[0].cidr",
            ),
            (rc(r#"{"action":"allow","cidr":"bogus"}"#), "rules[0].cidr"),
            (
                rc(r#"{"action":"allow","cidr":"fd00::/129"}"#),
                "rules[0].cidr",
            ),
            (
                rc(r#"{"action":"allow","ports":"90-80","protocol":"tcp"}"#),
                "rules[0].ports",
            ),
            (rc(r#"{"action":"allow","ports":"0"}"#), "rules[0].ports"),
            (rc(r#"{"action":"allow","ports":70000}"#), "rules[0].ports"),
            (
                rc(r#"{"action":"allow","protocol":"icmp","ports":1}"#),
                "rules[0].ports",
            ),
            (rc(r#"{"action":"reject"}"#), "rules[0].action"),
            (rc(r#"{"cidr":"10.0.0.0/8"}"#), "rules[0].action"),
            (
                rc(r#"{"action":"allow","protocol":"sctp"}"#),
                "rules[0].protocol",
            ),
            (rc(r#"{"action":"allow","port":80}"#), "rules[0].port"),
            (
                r#","firewallRules":{"ingress":{"default":"maybe"}}"#.to_string(),
                "firewallRules.ingress.default",
            ),
            (
                r#","firewallRules":{"inbound":{}}"#.to_string(),
                "firewallRules.inbound",
            ),
            (r#","ingressPolicy":"closed""#.to_string(), "ingressPolicy"),
            (r#","backend":"nftables""#.to_string(), "backend"),
        ] {
            let e = err(&extra);
            assert_eq!(e.code, 7, "{extra}: {e:?}");
            assert!(
                e.msg.contains(field),
                "{extra}: {} should name {field}",
                e.msg
            );
        }
    }

    #[test]
    fn too_many_rules_are_refused() {
        let rules =
            vec![r#"{"action":"deny","protocol":"tcp","ports":1}"#; fw::MAX_RULES + 1].join(",");
        let e = err(&format!(
            r#","firewallRules":{{"egress":{{"rules":[{rules}]}}}}"#
        ));
        assert_eq!(e.code, 7);
        assert!(
            e.msg.contains("firewallRules.egress.rules") && e.msg.contains("4096"),
            "{}",
            e.msg
        );
    }
}
