//! The firewall's rule model: what an attachment's record holds for
//! ebpf-firewall ([`FirewallSpec`]) and the validated rules in it, as the
//! plugin builds them from `firewallRules` and `ingressPolicy`. Plain data
//! with no map or kernel dependency, so the state records can hold it
//! without reaching into the datapath.
use std::net::IpAddr;

use cni_ebpf_common::fw;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

/// What a rule (or a direction's default) does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub(crate) fn code(self) -> u8 {
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

    /// The addresses of family `v6` the rule matches: its CIDR if of that
    /// family, all of them if it has none, nothing (None) if its CIDR is of
    /// the other family.
    pub(crate) fn net_of_family(&self, v6: bool) -> Option<IpNet> {
        match (self.cidr, v6) {
            (Some(IpNet::V4(n)), false) => Some(IpNet::V4(n.trunc())),
            (Some(IpNet::V6(n)), true) => Some(IpNet::V6(n.trunc())),
            (Some(_), _) => None,
            (None, false) => Some(IpNet::V4(Ipv4Net::default())),
            (None, true) => Some(IpNet::V6(Ipv6Net::default())),
        }
    }

    pub(crate) fn matches_proto(&self, proto: u8) -> bool {
        match self.protocol {
            RuleProtocol::Any => self.ports.is_none() || proto == 6 || proto == 17,
            RuleProtocol::Tcp => proto == 6,
            RuleProtocol::Udp => proto == 17,
            // ICMP for IPv4, ICMPv6 for IPv6 (the compiler and the
            // datapath use 1 for both).
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
    pub(crate) fn code(self) -> u8 {
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
