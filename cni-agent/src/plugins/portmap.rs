//! ebpf-portmap: the reference portmap's interface (capability
//! `portMappings`, options `snat`), with the translation done by the
//! agent's eBPF programs: uplink DNAT (TC or XDP), reply translation on the
//! uplink's egress, hairpin on the bridge, node-local clients at the socket
//! layer. An ADD writes map entries; it never creates a rule or a chain.
use std::net::IpAddr;

use serde::Deserialize;

use crate::{
    netlink::Netlink,
    plugins::{
        chained::{Chained, ChainedPlugin},
        datapath::DatapathConf,
    },
    spec::{CmdArgs, CniError, CniResult, NetConf},
    state::record::{Entry, Owner, Protocol},
};

/// ebpf-portmap, the binary's plugin.
pub type PortmapPlugin = ChainedPlugin<Portmap>;

pub struct Portmap;

/// One `portMappings` element as runtimes send it.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMapping {
    host_port: Option<i64>,
    container_port: Option<i64>,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default, rename = "hostIP")]
    host_ip: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRuntimeConfig {
    #[serde(default)]
    port_mappings: Vec<RawMapping>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawOptions {
    snat: Option<bool>,
    masq_all: Option<bool>,
    #[serde(default, rename = "conditionsV4")]
    conditions_v4: Option<Vec<String>>,
    #[serde(default, rename = "conditionsV6")]
    conditions_v6: Option<Vec<String>>,
    #[serde(default)]
    runtime_config: Option<RawRuntimeConfig>,
}

/// A validated mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
    pub host_ip: Option<IpAddr>,
}

/// The validated options of one invocation.
#[derive(Clone, Debug)]
pub struct PortmapConfig {
    pub snat: bool,
    pub mappings: Vec<Mapping>,
    pub datapath: DatapathConf,
}

fn invalid(msg: String) -> CniError {
    CniError::invalid_config(msg)
}

fn port(v: Option<i64>, field: &str) -> Result<u16, CniError> {
    match v {
        Some(p) if (1..=65535).contains(&p) => Ok(p as u16),
        Some(p) => Err(invalid(format!(
            "{field}: invalid port number {p} (must be 1-65535)"
        ))),
        None => Err(invalid(format!("{field}: missing"))),
    }
}

impl PortmapConfig {
    pub fn from_conf(conf: &NetConf) -> Result<Self, CniError> {
        let raw: RawOptions = conf.plugin_options()?;
        if raw.masq_all == Some(true) {
            return Err(invalid(
                "field `masqAll` is not supported by ebpf-portmap: hostPort clients keep their address"
                    .into(),
            ));
        }
        for (field, c) in [
            ("conditionsV4", &raw.conditions_v4),
            ("conditionsV6", &raw.conditions_v6),
        ] {
            if c.as_ref().is_some_and(|c| !c.is_empty()) {
                return Err(invalid(format!(
                    "field `{field}` (iptables match conditions) is not supported by ebpf-portmap"
                )));
            }
        }
        let mut mappings = Vec::new();
        for (i, m) in raw
            .runtime_config
            .unwrap_or_default()
            .port_mappings
            .into_iter()
            .enumerate()
        {
            let at = format!("runtimeConfig.portMappings[{i}]");
            let protocol = match m
                .protocol
                .as_deref()
                .map(str::to_ascii_lowercase)
                .as_deref()
            {
                None | Some("") | Some("tcp") => Protocol::Tcp,
                Some("udp") => Protocol::Udp,
                Some("sctp") => {
                    return Err(invalid(format!(
                        "{at}.protocol: sctp is not supported by the eBPF datapath"
                    )))
                }
                Some(other) => {
                    return Err(invalid(format!(
                        "{at}.protocol: unknown protocol {other:?} (tcp or udp)"
                    )))
                }
            };
            let host_ip =
                match m.host_ip.as_deref() {
                    None | Some("") => None,
                    Some(text) => Some(text.parse::<IpAddr>().map_err(|_| {
                        invalid(format!("{at}.hostIP: invalid IP address {text:?}"))
                    })?),
                };
            let host_ip = host_ip.filter(|ip| !ip.is_unspecified());
            mappings.push(Mapping {
                host_port: port(m.host_port, &format!("{at}.hostPort"))?,
                container_port: port(m.container_port, &format!("{at}.containerPort"))?,
                protocol,
                host_ip,
            });
        }
        Ok(Self {
            snat: raw.snat.unwrap_or(true),
            mappings,
            datapath: conf.plugin_options()?,
        })
    }

    /// The datapath entries for `prev`: as the reference maps every family
    /// the pod has, one hostPort per mapping and pod address family (the
    /// pod's first IPv4 and first IPv6 address); a mapping with a hostIP
    /// only in the hostIP's family. Plus the bridge hook when the pod sits
    /// on a bridge of this node.
    fn entries(&self, prev: &CniResult) -> Result<Vec<Entry>, CniError> {
        let sandboxed: Vec<usize> = prev
            .interfaces
            .iter()
            .enumerate()
            .filter(|(_, i)| i.sandbox.as_deref().is_some_and(|s| !s.is_empty()))
            .map(|(n, _)| n)
            .collect();
        let pod_ips: Vec<IpAddr> = prev
            .ips
            .iter()
            .filter(|ip| {
                ip.interface
                    .is_none_or(|i| sandboxed.is_empty() || sandboxed.contains(&i))
            })
            .map(|ip| ip.address.addr())
            .collect();
        let pod_v4 = pod_ips.iter().copied().find(IpAddr::is_ipv4);
        let pod_v6 = pod_ips.iter().copied().find(IpAddr::is_ipv6);
        if pod_v4.is_none() && pod_v6.is_none() {
            return Err(invalid(
                "prevResult has no IP address of the container to map ports to".into(),
            ));
        }
        let mut entries = Vec::new();
        for (i, m) in self.mappings.iter().enumerate() {
            let targets = match m.host_ip {
                None => vec![pod_v4, pod_v6],
                // A hostIP of one family maps that family only; a pod
                // without an address of it cannot be reached there, which
                // is refused rather than silently mapping nothing.
                Some(h) => {
                    let pod = if h.is_ipv4() { pod_v4 } else { pod_v6 };
                    if pod.is_none() {
                        return Err(invalid(format!(
                            "runtimeConfig.portMappings[{i}].hostIP: {h} is {}, and the pod has no {} address to map it to",
                            if h.is_ipv4() { "IPv4" } else { "IPv6" },
                            if h.is_ipv4() { "IPv4" } else { "IPv6" },
                        )));
                    }
                    vec![pod]
                }
            };
            entries.extend(targets.into_iter().flatten().map(|pod_ip| Entry::HostPort {
                host_ip: m.host_ip,
                host_port: m.host_port,
                protocol: m.protocol,
                pod_ip,
                container_port: m.container_port,
                snat: self.snat,
            }));
        }
        if let Some(bridge) = host_bridge(prev)? {
            entries.push(Entry::BridgeHook { bridge });
        }
        Ok(entries)
    }
}

/// The bridge of the pod, if the previous plugin put it on one: the first
/// host-side interface of prevResult that is a bridge here.
fn host_bridge(prev: &CniResult) -> Result<Option<String>, CniError> {
    let host_side: Vec<&str> = prev
        .interfaces
        .iter()
        .filter(|i| i.sandbox.as_deref().is_none_or(str::is_empty))
        .map(|i| i.name.as_str())
        .collect();
    if host_side.is_empty() {
        return Ok(None);
    }
    let nl = Netlink::connect()?;
    for name in host_side {
        if nl.find_link(name)?.is_some_and(|l| l.is_bridge()) {
            return Ok(Some(name.to_string()));
        }
    }
    Ok(None)
}

impl Chained for Portmap {
    type Config = PortmapConfig;
    const OWNER: Owner = Owner::Portmap;
    const CONTEXT: &'static str = "portMappings";
    const ABOUT: &'static str = "ebpf-portmap: hostPort mappings in eBPF (CNI spec 0.1.0 - 1.1.0)";

    fn config(conf: &NetConf) -> Result<PortmapConfig, CniError> {
        PortmapConfig::from_conf(conf)
    }

    fn datapath(cfg: &PortmapConfig) -> &DatapathConf {
        &cfg.datapath
    }

    fn entries(
        cfg: &PortmapConfig,
        _args: &CmdArgs,
        prev: &CniResult,
    ) -> Result<Option<Vec<Entry>>, CniError> {
        if cfg.mappings.is_empty() {
            return Ok(None);
        }
        cfg.entries(prev).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: &str) -> NetConf {
        NetConf::parse(
            format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"ebpf-portmap"{extra}}}"#)
                .as_bytes(),
        )
        .unwrap()
    }

    fn err(extra: &str) -> CniError {
        PortmapConfig::from_conf(&conf(extra)).unwrap_err()
    }

    #[test]
    fn mappings_are_read_with_reference_defaults() {
        let c = PortmapConfig::from_conf(&conf(
            r#","runtimeConfig":{"portMappings":[
                {"hostPort":8080,"containerPort":80,"protocol":"tcp"},
                {"hostPort":5353,"containerPort":53,"protocol":"UDP","hostIP":"198.18.0.1"},
                {"hostPort":9090,"containerPort":90,"hostIP":"0.0.0.0"}]}"#,
        ))
        .unwrap();
        assert!(c.snat, "snat defaults to true");
        assert_eq!(c.mappings.len(), 3);
        assert_eq!(c.mappings[1].protocol, Protocol::Udp);
        assert_eq!(c.mappings[1].host_ip, Some("198.18.0.1".parse().unwrap()));
        assert_eq!(c.mappings[2].protocol, Protocol::Tcp);
        assert_eq!(c.mappings[2].host_ip, None, "0.0.0.0 means every address");
    }

    #[test]
    fn bad_mappings_name_the_field() {
        for (extra, field) in [
            (
                r#","runtimeConfig":{"portMappings":[{"hostPort":0,"containerPort":80}]}"#,
                "portMappings[0].hostPort",
            ),
            (
                r#","runtimeConfig":{"portMappings":[{"hostPort":70000,"containerPort":80}]}"#,
                "portMappings[0].hostPort",
            ),
            (
                r#","runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":-1}]}"#,
                "portMappings[0].containerPort",
            ),
            (
                r#","runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":80,"protocol":"icmp"}]}"#,
                "portMappings[0].protocol",
            ),
            (
                r#","runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":80,"protocol":"sctp"}]}"#,
                "portMappings[0].protocol",
            ),
            (
                r#","runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":80,"hostIP":"x"}]}"#,
                "portMappings[0].hostIP",
            ),
            (r#","masqAll":true"#, "masqAll"),
            (r#","conditionsV4":["-s","1.2.3.4"]"#, "conditionsV4"),
        ] {
            let e = err(extra);
            assert_eq!(e.code, 7, "{extra}: {e:?}");
            assert!(
                e.msg.contains(field),
                "{extra}: {} should name {field}",
                e.msg
            );
        }
    }

    /// The `portMappings` each runtime writes for a pod with a hostPort.
    #[test]
    fn runtime_payloads_are_read_alike() {
        let expected = vec![Mapping {
            host_port: 18090,
            container_port: 8080,
            protocol: Protocol::Tcp,
            host_ip: None,
        }];
        for (runtime, mapping) in [
            // containerd 1.6/1.7 (go-cni's PortMapping has no JSON tags).
            (
                "containerd",
                r#"{"HostPort":18090,"ContainerPort":8080,"Protocol":"tcp","HostIP":""}"#,
            ),
            // CRI-O (ocicni) and podman 4 (containers/common), camelCase.
            (
                "cri-o",
                r#"{"hostPort":18090,"containerPort":8080,"protocol":"tcp","hostIP":""}"#,
            ),
            (
                "podman",
                r#"{"hostPort":18090,"containerPort":8080,"protocol":"tcp"}"#,
            ),
            // Any other casing Go's decoder accepts.
            (
                "lowercase",
                r#"{"hostport":18090,"containerport":8080,"PROTOCOL":"TCP","hostip":"0.0.0.0"}"#,
            ),
        ] {
            let c = PortmapConfig::from_conf(&conf(&format!(
                r#","runtimeConfig":{{"portMappings":[{mapping}]}}"#
            )))
            .unwrap_or_else(|e| panic!("{runtime}: {e:?}"));
            assert_eq!(c.mappings, expected, "{runtime}");
        }
        // A bad value is named as the runtime spelled it.
        let e = err(r#","runtimeConfig":{"portMappings":[{"HostPort":0,"ContainerPort":80}]}"#);
        assert!(e.msg.contains("portMappings[0].hostPort"), "{}", e.msg);
        let e = err(r#","runtimeConfig":{"portMappings":[{"HostPort":"x","ContainerPort":80}]}"#);
        assert!(e.msg.contains("portMappings[0].HostPort"), "{}", e.msg);
    }

    /// A prevResult with one sandboxed interface holding `ips`.
    fn prev(ips: &[&str]) -> CniResult {
        let ips: Vec<serde_json::Value> = ips
            .iter()
            .map(|a| serde_json::json!({"address": a, "interface": 0}))
            .collect();
        CniResult::from_json(&serde_json::json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/p"}],
            "ips": ips,
        }))
        .unwrap()
    }

    fn mapped(entries: &[Entry]) -> Vec<(Option<IpAddr>, IpAddr)> {
        entries
            .iter()
            .filter_map(|e| match e {
                Entry::HostPort {
                    host_ip, pod_ip, ..
                } => Some((*host_ip, *pod_ip)),
                _ => None,
            })
            .collect()
    }

    /// As the reference: a mapping without hostIP maps every family the
    /// pod has (its first address of each), one with a hostIP only the
    /// hostIP's family.
    #[test]
    fn every_family_of_the_pod_is_mapped() {
        let c = PortmapConfig::from_conf(&conf(
            r#","runtimeConfig":{"portMappings":[
                {"hostPort":8080,"containerPort":80},
                {"hostPort":8081,"containerPort":80,"hostIP":"fd00:198::1"},
                {"hostPort":8082,"containerPort":80,"hostIP":"198.18.0.1"}]}"#,
        ))
        .unwrap();
        let e = c
            .entries(&prev(&["10.1.0.5/24", "fd00:1::5/64", "fd00:1::6/64"]))
            .unwrap();
        let (v4, v6): (IpAddr, IpAddr) =
            ("10.1.0.5".parse().unwrap(), "fd00:1::5".parse().unwrap());
        assert_eq!(
            mapped(&e),
            vec![
                (None, v4),
                (None, v6),
                (Some("fd00:198::1".parse().unwrap()), v6),
                (Some("198.18.0.1".parse().unwrap()), v4),
            ]
        );
        // IPv6-only pod: the any-address mapping is IPv6 only.
        let c = PortmapConfig::from_conf(&conf(
            r#","runtimeConfig":{"portMappings":[{"hostPort":8080,"containerPort":80}]}"#,
        ))
        .unwrap();
        assert_eq!(
            mapped(&c.entries(&prev(&["fd00:1::5/64"])).unwrap()),
            vec![(None, v6)]
        );
    }

    /// A hostIP of a family the pod has no address of is refused (code 7,
    /// naming the key and value), never silently left unmapped.
    #[test]
    fn a_host_ip_of_a_family_the_pod_lacks_is_refused() {
        for (host_ip, pod) in [
            ("fd00:198::1", "10.1.0.5/24"),
            ("198.18.0.1", "fd00:1::5/64"),
        ] {
            let c = PortmapConfig::from_conf(&conf(&format!(
                r#","runtimeConfig":{{"portMappings":[{{"hostPort":8080,"containerPort":80,"hostIP":"{host_ip}"}}]}}"#
            )))
            .unwrap();
            let e = c.entries(&prev(&[pod])).unwrap_err();
            assert_eq!(e.code, 7, "{e:?}");
            assert!(
                e.msg.contains("portMappings[0].hostIP") && e.msg.contains(host_ip),
                "{}",
                e.msg
            );
        }
    }

    #[test]
    fn unknown_options_are_ignored_like_the_reference() {
        let c = PortmapConfig::from_conf(&conf(r#","markMasqBit":13,"externalSetMarkChain":"X""#))
            .unwrap();
        assert!(c.mappings.is_empty());
    }
}
