//! The host-local IPAM configuration, read from the network config exactly as
//! the reference host-local plugin reads it (`backend/allocator/config.go`):
//!
//! - `ipam.ranges`: a list of range sets, each a list of
//!   `{subnet, rangeStart, rangeEnd, gateway}`;
//! - the legacy single range `ipam.subnet` / `rangeStart` / `rangeEnd` /
//!   `gateway`, which becomes the first range set;
//! - `runtimeConfig.ipRanges` (capability `ipRanges`), prepended before both;
//! - `ipam.routes`, `ipam.dataDir`, `ipam.resolvConf`;
//! - requested addresses from CNI_ARGS `IP=`, then `args.cni.ips`, then
//!   `runtimeConfig.ips`, in that order.
//!
//! The JSON is walked by hand rather than through serde derive so every error
//! names the exact field (`ipam.ranges[1][0].rangeEnd: ...`), which is what an
//! operator debugging a conflist needs.

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde_json::{Map, Value};

use super::range::{Range, RangeError, RangeSet, RangeSetError};

/// Where the reference keeps its stores when `dataDir` is not set.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";

/// Why the configuration (or CNI_ARGS) cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("IPAM config missing 'ipam' key")]
    MissingIpam,
    #[error("{path}: expected {expected}")]
    Type {
        path: String,
        expected: &'static str,
    },
    #[error("{path}: missing (required)")]
    Missing { path: String },
    #[error("{path}: invalid IP address {value:?}")]
    InvalidIp { path: String, value: String },
    #[error("{path}: invalid CIDR {value:?}")]
    InvalidCidr { path: String, value: String },
    #[error("{path}: {source}")]
    Range { path: String, source: RangeError },
    #[error("{path}: {source}")]
    RangeSet { path: String, source: RangeSetError },
    #[error("ipam.ranges: no IP ranges specified")]
    NoRanges,
    #[error("range set {first} ({first_path}) overlaps with range set {second} ({second_path})")]
    RangeSetsOverlap {
        first: usize,
        first_path: String,
        second: usize,
        second_path: String,
    },
    #[error("CNI version {0} does not support more than 1 address per family")]
    TooManyPerFamily(String),
    /// The network name becomes a directory under dataDir; a name that is
    /// not a single path component could escape it.
    #[error("name: network name {0:?} cannot be used as a directory name")]
    InvalidName(String),
    /// CNI_ARGS holds a key host-local does not know and `IgnoreUnknown` is
    /// not set: the reference fails the same way (libcni `types.LoadArgs`).
    #[error("ARGS: unknown args {0:?}")]
    UnknownArgs(Vec<String>),
    #[error("ARGS: error parsing value of pair \"{key}={value}\": {reason}")]
    InvalidArg {
        key: String,
        value: String,
        reason: String,
    },
}

impl ConfigError {
    /// True for errors in CNI_ARGS (the environment) rather than the config.
    pub fn is_environment(&self) -> bool {
        matches!(
            self,
            ConfigError::UnknownArgs(_) | ConfigError::InvalidArg { .. }
        )
    }
}

/// A static route handed back in the result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConf {
    pub dst: IpNet,
    pub gw: Option<IpAddr>,
}

/// The parts of the network config host-local reads. Built by the plugin
/// from the spec layer's `NetConf` and `CmdArgs`, kept separate so the IPAM
/// code does not depend on them.
#[derive(Debug, Clone, Copy)]
pub struct ConfigInput<'a> {
    /// Network name: the store directory under dataDir.
    pub name: &'a str,
    pub cni_version: &'a str,
    /// The `ipam` object, `None` when the key is absent.
    pub ipam: Option<&'a Value>,
    /// `runtimeConfig`, `Null` or `{}` when absent.
    pub runtime_config: &'a Value,
    /// Top-level `args`, `Null` when absent.
    pub args: &'a Value,
    /// CNI_ARGS as key/value pairs.
    pub cni_args: &'a [(String, String)],
}

/// The validated host-local configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpamConfig {
    pub name: String,
    pub cni_version: String,
    /// Range sets in allocation order; the index is the `N` of
    /// `last_reserved_ip.N`, as in the reference.
    pub ranges: Vec<RangeSet>,
    pub routes: Vec<RouteConf>,
    pub data_dir: PathBuf,
    pub resolv_conf: Option<PathBuf>,
    /// Addresses the runtime asked for, canonical (IPv4-mapped become IPv4),
    /// in request order.
    pub requested_ips: Vec<IpAddr>,
}

impl IpamConfig {
    /// Reads and validates the configuration.
    pub fn parse(input: &ConfigInput<'_>) -> Result<IpamConfig, ConfigError> {
        let ipam = match input.ipam {
            None | Some(Value::Null) => return Err(ConfigError::MissingIpam),
            Some(v) => as_object(v, "ipam")?,
        };
        validate_name(input.name)?;

        let requested_ips = requested_ips(input)?;

        // Collect range sets in the reference's order: runtimeConfig.ipRanges,
        // then the legacy single range, then ipam.ranges.
        let mut labelled: Vec<(String, RangeSet)> = Vec::new();
        let runtime = optional_object(input.runtime_config, "runtimeConfig")?;
        if let Some(v) = runtime.and_then(|rt| non_null(rt, "ipRanges")) {
            labelled.extend(parse_range_sets(v, "runtimeConfig.ipRanges")?);
        }
        if let Some(subnet) = opt_string(ipam, "subnet", "ipam.subnet")? {
            let range = parse_range_fields(ipam, subnet, "ipam.")?;
            let set = RangeSet::new(vec![range]).map_err(|source| ConfigError::RangeSet {
                path: "ipam".into(),
                source,
            })?;
            labelled.push(("ipam.subnet".into(), set));
        }
        if let Some(v) = non_null(ipam, "ranges") {
            labelled.extend(parse_range_sets(v, "ipam.ranges")?);
        }
        if labelled.is_empty() {
            return Err(ConfigError::NoRanges);
        }

        let v4 = labelled.iter().filter(|(_, s)| s.is_ipv4()).count();
        let v6 = labelled.len() - v4;
        if (v4 > 1 || v6 > 1) && !version_at_least(input.cni_version, (0, 3, 0)) {
            return Err(ConfigError::TooManyPerFamily(input.cni_version.to_string()));
        }
        for (i, (a_path, a)) in labelled.iter().enumerate() {
            for (j, (b_path, b)) in labelled.iter().enumerate().skip(i + 1) {
                if a.overlaps(b) {
                    return Err(ConfigError::RangeSetsOverlap {
                        first: i,
                        first_path: format!("{a_path}: {a}"),
                        second: j,
                        second_path: format!("{b_path}: {b}"),
                    });
                }
            }
        }

        let routes = match non_null(ipam, "routes") {
            Some(v) => parse_routes(v)?,
            None => Vec::new(),
        };
        let (_, data_dir) = store_location(input)?;
        let resolv_conf = opt_string(ipam, "resolvConf", "ipam.resolvConf")?.map(PathBuf::from);

        Ok(IpamConfig {
            name: input.name.to_string(),
            cni_version: input.cni_version.to_string(),
            ranges: labelled.into_iter().map(|(_, s)| s).collect(),
            routes,
            data_dir,
            resolv_conf,
            requested_ips,
        })
    }
}

/// Where the store of this network lives: only `name` and `ipam.dataDir`.
/// DEL and GC need nothing else, so they keep working (releasing addresses)
/// when the ranges of a config were edited into something invalid.
pub fn store_location(input: &ConfigInput<'_>) -> Result<(String, PathBuf), ConfigError> {
    let ipam = match input.ipam {
        None | Some(Value::Null) => return Err(ConfigError::MissingIpam),
        Some(v) => as_object(v, "ipam")?,
    };
    validate_name(input.name)?;
    let data_dir = opt_string(ipam, "dataDir", "ipam.dataDir")?
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    Ok((input.name.to_string(), data_dir))
}

/// The network name is joined under dataDir: it must be one normal path
/// component (the CNI spec's name grammar guarantees that; we still check,
/// since the spec layer may be lenient and this is a filesystem path).
fn validate_name(name: &str) -> Result<(), ConfigError> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(ConfigError::InvalidName(name.to_string()));
    }
    Ok(())
}

/// Requested IPs in the reference's order: CNI_ARGS `IP`, `args.cni.ips`,
/// `runtimeConfig.ips`.
fn requested_ips(input: &ConfigInput<'_>) -> Result<Vec<IpAddr>, ConfigError> {
    let mut ips = Vec::new();
    if let Some(ip) = cni_args_ip(input.cni_args)? {
        ips.push(ip);
    }
    let args_ips = optional_object(input.args, "args")?
        .and_then(|a| non_null(a, "cni"))
        .map(|cni| as_object(cni, "args.cni"))
        .transpose()?
        .and_then(|cni| non_null(cni, "ips"));
    if let Some(list) = args_ips {
        ips.extend(parse_ip_list(list, "args.cni.ips")?);
    }
    let runtime_ips =
        optional_object(input.runtime_config, "runtimeConfig")?.and_then(|rt| non_null(rt, "ips"));
    if let Some(list) = runtime_ips {
        ips.extend(parse_ip_list(list, "runtimeConfig.ips")?);
    }
    Ok(ips)
}

/// CNI_ARGS as libcni's `LoadArgs` reads them into host-local's
/// `IPAMEnvArgs`: known keys `IgnoreUnknown` and `IP` (case-sensitive), any
/// other key is an error unless `IgnoreUnknown` is true.
fn cni_args_ip(pairs: &[(String, String)]) -> Result<Option<IpAddr>, ConfigError> {
    let mut ignore_unknown = false;
    for (key, value) in pairs {
        if key == "IgnoreUnknown" {
            ignore_unknown = match value.to_ascii_lowercase().as_str() {
                "1" | "true" => true,
                "0" | "false" => false,
                _ => {
                    return Err(ConfigError::InvalidArg {
                        key: key.clone(),
                        value: value.clone(),
                        reason: format!("boolean unmarshal error: invalid input {value}"),
                    })
                }
            };
        }
    }
    let mut ip = None;
    let mut unknown = Vec::new();
    for (key, value) in pairs {
        match key.as_str() {
            "IgnoreUnknown" => {}
            "IP" => {
                if value.is_empty() {
                    continue;
                }
                ip = Some(
                    parse_ip_or_cidr(value).ok_or_else(|| ConfigError::InvalidArg {
                        key: key.clone(),
                        value: value.clone(),
                        reason: format!("invalid IP address {value}"),
                    })?,
                );
            }
            _ => unknown.push(format!("{key}={value}")),
        }
    }
    if !unknown.is_empty() && !ignore_unknown {
        return Err(ConfigError::UnknownArgs(unknown));
    }
    Ok(ip)
}

/// `a.b.c.d` or `a.b.c.d/n` (the reference's `ip.IP` accepts both); the
/// prefix is dropped, the address canonicalised.
fn parse_ip_or_cidr(s: &str) -> Option<IpAddr> {
    if s.contains('/') {
        s.parse::<IpNet>().ok().map(|n| n.addr().to_canonical())
    } else {
        s.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
    }
}

fn parse_ip_list(v: &Value, path: &str) -> Result<Vec<IpAddr>, ConfigError> {
    let list = as_array(v, path)?;
    list.iter()
        .enumerate()
        .map(|(i, item)| {
            let item_path = format!("{path}[{i}]");
            let s = as_str(item, &item_path)?;
            parse_ip_or_cidr(s).ok_or(ConfigError::InvalidIp {
                path: item_path,
                value: s.to_string(),
            })
        })
        .collect()
}

fn parse_range_sets(v: &Value, path: &str) -> Result<Vec<(String, RangeSet)>, ConfigError> {
    let sets = as_array(v, path)?;
    sets.iter()
        .enumerate()
        .map(|(i, set)| {
            let set_path = format!("{path}[{i}]");
            let ranges = as_array(set, &set_path)?
                .iter()
                .enumerate()
                .map(|(j, range)| {
                    let range_path = format!("{set_path}[{j}]");
                    let obj = as_object(range, &range_path)?;
                    let subnet_path = format!("{range_path}.subnet");
                    let subnet = opt_string(obj, "subnet", &subnet_path)?
                        .ok_or(ConfigError::Missing { path: subnet_path })?;
                    parse_range_fields(obj, subnet, &format!("{range_path}."))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let set = RangeSet::new(ranges).map_err(|source| ConfigError::RangeSet {
                path: set_path.clone(),
                source,
            })?;
            Ok((set_path, set))
        })
        .collect()
}

/// One range from the object holding `subnet`/`rangeStart`/`rangeEnd`/
/// `gateway`; `prefix` is the path of that object plus a dot.
fn parse_range_fields(
    obj: &Map<String, Value>,
    subnet: &str,
    prefix: &str,
) -> Result<Range, ConfigError> {
    let subnet_path = format!("{prefix}subnet");
    let subnet: IpNet = subnet.parse().map_err(|_| ConfigError::InvalidCidr {
        path: subnet_path.clone(),
        value: subnet.to_string(),
    })?;
    let ip_field = |key: &str| -> Result<Option<IpAddr>, ConfigError> {
        let path = format!("{prefix}{key}");
        match opt_string(obj, key, &path)? {
            None => Ok(None),
            Some(s) => s
                .parse::<IpAddr>()
                .map(Some)
                .map_err(|_| ConfigError::InvalidIp {
                    path,
                    value: s.to_string(),
                }),
        }
    };
    let start = ip_field("rangeStart")?;
    let end = ip_field("rangeEnd")?;
    let gateway = ip_field("gateway")?;
    Range::new(subnet, start, end, gateway).map_err(|source| {
        // Name the field the problem is in.
        let field = match &source {
            RangeError::NotInNetwork { ip, .. } if Some(*ip) == start.map(|s| s.to_canonical()) => {
                "rangeStart"
            }
            RangeError::NotInNetwork { .. } => "rangeEnd",
            RangeError::GatewayFamily { .. } => "gateway",
            RangeError::StartAfterEnd { .. } => "rangeStart",
            _ => "subnet",
        };
        ConfigError::Range {
            path: format!("{prefix}{field}"),
            source,
        }
    })
}

fn parse_routes(v: &Value) -> Result<Vec<RouteConf>, ConfigError> {
    as_array(v, "ipam.routes")?
        .iter()
        .enumerate()
        .map(|(i, route)| {
            let path = format!("ipam.routes[{i}]");
            let obj = as_object(route, &path)?;
            let dst_path = format!("{path}.dst");
            let dst_str = opt_string(obj, "dst", &dst_path)?.ok_or(ConfigError::Missing {
                path: dst_path.clone(),
            })?;
            let dst = dst_str
                .parse::<IpNet>()
                .map_err(|_| ConfigError::InvalidCidr {
                    path: dst_path,
                    value: dst_str.to_string(),
                })?;
            let gw_path = format!("{path}.gw");
            let gw = match opt_string(obj, "gw", &gw_path)? {
                None => None,
                Some(s) => Some(s.parse::<IpAddr>().map_err(|_| ConfigError::InvalidIp {
                    path: gw_path,
                    value: s.to_string(),
                })?),
            };
            Ok(RouteConf { dst, gw })
        })
        .collect()
}

/// Whether `version` (`x.y.z`) is at least `min`; unparsable versions are
/// treated as older, as the reference does.
fn version_at_least(version: &str, min: (u64, u64, u64)) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u64>().ok());
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(Some(a)), Some(Some(b)), Some(Some(c)), None) => (a, b, c) >= min,
        _ => false,
    }
}

fn non_null<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    crate::spec::decode::get(obj, key).filter(|v| !v.is_null())
}

fn as_object<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, ConfigError> {
    v.as_object().ok_or(ConfigError::Type {
        path: path.to_string(),
        expected: "an object",
    })
}

fn optional_object<'a>(
    v: &'a Value,
    path: &str,
) -> Result<Option<&'a Map<String, Value>>, ConfigError> {
    if v.is_null() {
        Ok(None)
    } else {
        as_object(v, path).map(Some)
    }
}

fn as_array<'a>(v: &'a Value, path: &str) -> Result<&'a Vec<Value>, ConfigError> {
    v.as_array().ok_or(ConfigError::Type {
        path: path.to_string(),
        expected: "a list",
    })
}

fn as_str<'a>(v: &'a Value, path: &str) -> Result<&'a str, ConfigError> {
    v.as_str().ok_or(ConfigError::Type {
        path: path.to_string(),
        expected: "a string",
    })
}

/// A string field; absent, null and "" all mean "not set" (Go's decoding of
/// an empty `net.IP`/string).
fn opt_string<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<&'a str>, ConfigError> {
    match non_null(obj, key) {
        None => Ok(None),
        Some(v) => as_str(v, path).map(|s| (!s.is_empty()).then_some(s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Parses `ipam` with optional runtimeConfig/args/CNI_ARGS.
    fn parse_full(
        version: &str,
        ipam: Value,
        runtime: Value,
        top_args: Value,
        cni_args: &[(&str, &str)],
    ) -> Result<IpamConfig, ConfigError> {
        let cni_args = args(cni_args);
        IpamConfig::parse(&ConfigInput {
            name: "net1",
            cni_version: version,
            ipam: Some(&ipam),
            runtime_config: &runtime,
            args: &top_args,
            cni_args: &cni_args,
        })
    }

    fn parse(ipam: Value) -> Result<IpamConfig, ConfigError> {
        parse_full("1.0.0", ipam, json!({}), json!({}), &[])
    }

    fn err(ipam: Value) -> String {
        parse(ipam).unwrap_err().to_string()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn full_config() {
        let cfg = parse(json!({
            "type": "ebpf-host-local",
            "ranges": [
                [{"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.10", "rangeEnd": "10.0.0.20", "gateway": "10.0.0.254"},
                 {"subnet": "10.0.1.0/24"}],
                [{"subnet": "fd00::/64"}]
            ],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "192.168.0.0/16", "gw": "10.0.0.1"}],
            "dataDir": "/tmp/x",
            "resolvConf": "/etc/resolv.conf",
            "unknownKey": true
        }))
        .unwrap();
        assert_eq!(cfg.name, "net1");
        assert_eq!(cfg.ranges.len(), 2);
        assert_eq!(cfg.ranges[0].0.len(), 2);
        assert_eq!(cfg.ranges[0].0[0].gateway, ip("10.0.0.254"));
        assert_eq!(cfg.ranges[0].0[1].gateway, ip("10.0.1.1"));
        assert_eq!(
            cfg.ranges[1].0[0].range_end,
            ip("fd00::ffff:ffff:ffff:ffff")
        );
        assert_eq!(cfg.routes.len(), 2);
        assert_eq!(cfg.routes[1].gw, Some(ip("10.0.0.1")));
        assert_eq!(cfg.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(cfg.resolv_conf, Some(PathBuf::from("/etc/resolv.conf")));
        assert!(cfg.requested_ips.is_empty());
    }

    #[test]
    fn defaults() {
        let cfg =
            parse(json!({"type": "x", "ranges": [[{"subnet": "10.0.0.0/24"}]], "dataDir": ""}))
                .unwrap();
        assert_eq!(cfg.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(cfg.resolv_conf, None);
        assert!(cfg.routes.is_empty());
    }

    /// The capabilities as runtimes write them: go-cni (containerd) has no
    /// JSON tags on IPRanges and fills every field, empty when unset.
    #[test]
    fn runtime_capabilities_in_go_casing() {
        let cfg = parse_full(
            "1.0.0",
            json!({"type": "x", "ranges": [[{"subnet": "10.2.0.0/24"}]]}),
            json!({"ipRanges": [[{"Subnet": "10.3.0.0/24", "RangeStart": "", "RangeEnd": "",
                                  "Gateway": ""}]],
                   "IPs": ["10.3.0.7"]}),
            json!({"CNI": {"IPs": ["10.2.0.9"]}}),
            &[],
        )
        .unwrap();
        assert_eq!(cfg.ranges[0].0[0].range_start, ip("10.3.0.1"));
        assert_eq!(cfg.ranges[0].0[0].gateway, ip("10.3.0.1"));
        assert_eq!(cfg.requested_ips, [ip("10.2.0.9"), ip("10.3.0.7")]);
        let cfg = parse(json!({"Type": "x", "Ranges": [[{"SUBNET": "10.2.0.0/24",
                               "rangestart": "10.2.0.50"}]], "DataDir": "/tmp/y"}))
        .unwrap();
        assert_eq!(cfg.ranges[0].0[0].range_start, ip("10.2.0.50"));
        assert_eq!(cfg.data_dir, PathBuf::from("/tmp/y"));
    }

    #[test]
    fn range_set_order_runtime_legacy_ranges() {
        let cfg = parse_full(
            "1.0.0",
            json!({"type": "x", "subnet": "10.1.0.0/24", "rangeStart": "10.1.0.5",
                   "ranges": [[{"subnet": "10.2.0.0/24"}]]}),
            json!({"ipRanges": [[{"subnet": "10.3.0.0/24"}]]}),
            json!({}),
            &[],
        )
        .unwrap();
        let firsts: Vec<String> = cfg
            .ranges
            .iter()
            .map(|s| s.0[0].range_start.to_string())
            .collect();
        assert_eq!(firsts, ["10.3.0.1", "10.1.0.5", "10.2.0.1"]);
    }

    #[test]
    fn legacy_fields_without_subnet_are_ignored() {
        let cfg = parse(json!({"type": "x", "rangeStart": "10.9.0.1",
                               "ranges": [[{"subnet": "10.2.0.0/24"}]]}))
        .unwrap();
        assert_eq!(cfg.ranges.len(), 1);
    }

    #[test]
    fn requested_ips_in_reference_order() {
        let cfg = parse_full(
            "1.0.0",
            json!({"type": "x", "ranges": [[{"subnet": "10.0.0.0/24"}]]}),
            json!({"ips": ["10.0.0.81/24"]}),
            json!({"cni": {"ips": ["10.0.0.82", "::ffff:10.0.0.83"]}}),
            &[
                ("IgnoreUnknown", "1"),
                ("K8S_POD_NAME", "p"),
                ("IP", "10.0.0.80"),
            ],
        )
        .unwrap();
        assert_eq!(
            cfg.requested_ips,
            [
                ip("10.0.0.80"),
                ip("10.0.0.82"),
                ip("10.0.0.83"),
                ip("10.0.0.81")
            ]
        );
    }

    #[test]
    fn cni_args_errors() {
        let ipam = json!({"type": "x", "ranges": [[{"subnet": "10.0.0.0/24"}]]});
        let e = parse_full(
            "1.0.0",
            ipam.clone(),
            json!({}),
            json!({}),
            &[("FOO", "bar")],
        )
        .unwrap_err();
        assert!(e.is_environment());
        assert_eq!(e.to_string(), r#"ARGS: unknown args ["FOO=bar"]"#);
        let e = parse_full(
            "1.0.0",
            ipam.clone(),
            json!({}),
            json!({}),
            &[("IP", "bogus")],
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"ARGS: error parsing value of pair "IP=bogus": invalid IP address bogus"#
        );
        let e = parse_full(
            "1.0.0",
            ipam.clone(),
            json!({}),
            json!({}),
            &[("IgnoreUnknown", "x")],
        )
        .unwrap_err();
        assert!(e.to_string().contains("IgnoreUnknown=x"));
        // `ip` is not `IP`: the reference's field lookup is case-sensitive.
        assert!(parse_full(
            "1.0.0",
            ipam.clone(),
            json!({}),
            json!({}),
            &[("ip", "10.0.0.5")]
        )
        .is_err());
        let cfg = parse_full(
            "1.0.0",
            ipam,
            json!({}),
            json!({}),
            &[("IgnoreUnknown", "true"), ("IP", "")],
        )
        .unwrap();
        assert!(cfg.requested_ips.is_empty());
    }

    #[test]
    fn every_validation_error_names_its_field() {
        assert_eq!(
            IpamConfig::parse(&ConfigInput {
                name: "n",
                cni_version: "1.0.0",
                ipam: None,
                runtime_config: &Value::Null,
                args: &Value::Null,
                cni_args: &[],
            })
            .unwrap_err(),
            ConfigError::MissingIpam
        );
        let cases: Vec<(Value, &str)> = vec![
            (json!([]), "ipam: expected an object"),
            (json!({"type": "x"}), "ipam.ranges: no IP ranges specified"),
            (json!({"type": "x", "ranges": []}), "ipam.ranges: no IP ranges specified"),
            (json!({"type": "x", "ranges": {}}), "ipam.ranges: expected a list"),
            (json!({"type": "x", "ranges": [{}]}), "ipam.ranges[0]: expected a list"),
            (json!({"type": "x", "ranges": [[]]}), "ipam.ranges[0]: empty range set"),
            (json!({"type": "x", "ranges": [["a"]]}), "ipam.ranges[0][0]: expected an object"),
            (json!({"type": "x", "ranges": [[{}]]}), "ipam.ranges[0][0].subnet: missing (required)"),
            (
                json!({"type": "x", "ranges": [[{"subnet": 5}]]}),
                "ipam.ranges[0][0].subnet: expected a string",
            ),
            (
                json!({"type": "x", "ranges": [[{"subnet": "10.0.0.0/33"}]]}),
                r#"ipam.ranges[0][0].subnet: invalid CIDR "10.0.0.0/33""#,
            ),
            (
                json!({"type": "x", "ranges": [[{"subnet": "10.0.0.0/31"}]]}),
                "ipam.ranges[0][0].subnet: network 10.0.0.0/31 too small to allocate from",
            ),
            (
                json!({"type": "x", "ranges": [[{"subnet": "10.0.0.5/24"}]]}),
                "ipam.ranges[0][0].subnet: network has host bits set. For a subnet mask of length 24 the network address is 10.0.0.0",
            ),
            (
                json!({"type": "x", "ranges": [[{"subnet": "10.0.0.0/24", "rangeStart": "10.1.0.5"}]]}),
                "ipam.ranges[0][0].rangeStart: 10.1.0.5 not in network 10.0.0.0/24",
            ),
            (
                json!({"type": "x", "ranges": [[{"subnet": "10.0.0.0/24"}], [{"subnet": "10.1.0.0/24", "rangeEnd": "10.0.0.5"}]]}),
                "ipam.ranges[1][0].rangeEnd: 10.0.0.5 not in network 10.1.0.0/24",
            ),
            (
                json!({"type": "x", "ranges": [[{"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.9", "rangeEnd": "10.0.0.3"}]]}),
                "ipam.ranges[0][0].rangeStart: rangeStart 10.0.0.9 is after rangeEnd 10.0.0.3",
            ),
            (
                json!({"type": "x", "ranges": [[{"subnet": "10.0.0.0/24", "rangeStart": "bogus"}]]}),
                r#"ipam.ranges[0][0].rangeStart: invalid IP address "bogus""#,
            ),
            (
                json!({"type": "x", "ranges": [[{"subnet": "10.0.0.0/24", "gateway": "bogus"}]]}),
                r#"ipam.ranges[0][0].gateway: invalid IP address "bogus""#,
            ),
            (
                json!({"type": "x", "ranges": [[{"subnet": "10.0.0.0/24", "gateway": "fd00::1"}]]}),
                "ipam.ranges[0][0].gateway: gateway fd00::1 is not of the same address family as subnet 10.0.0.0/24",
            ),
            (
                json!({"type": "x", "ranges": [[{"subnet": "10.0.0.0/24"}, {"subnet": "fd00::/64"}]]}),
                "ipam.ranges[0]: mixed address families",
            ),
            (
                json!({"type": "x", "ranges": [[{"subnet": "10.0.0.0/24"}, {"subnet": "10.0.0.0/25"}]]}),
                "ipam.ranges[0]: subnets 10.0.0.1-10.0.0.254 and 10.0.0.1-10.0.0.126 overlap",
            ),
            (
                json!({"type": "x", "ranges": [[{"subnet": "10.0.0.0/24"}], [{"subnet": "10.0.0.0/25"}]]}),
                "range set 0 (ipam.ranges[0]: 10.0.0.1-10.0.0.254) overlaps with range set 1 (ipam.ranges[1]: 10.0.0.1-10.0.0.126)",
            ),
            (
                json!({"type": "x", "subnet": "10.0.0.0/24", "ranges": [[{"subnet": "10.0.0.0/24"}]]}),
                "range set 0 (ipam.subnet: 10.0.0.1-10.0.0.254) overlaps with range set 1 (ipam.ranges[0]: 10.0.0.1-10.0.0.254)",
            ),
            (
                json!({"type": "x", "subnet": "10.0.0.0/24", "rangeEnd": "10.0.9.1"}),
                "ipam.rangeEnd: 10.0.9.1 not in network 10.0.0.0/24",
            ),
            (
                json!({"type": "x", "subnet": "nope"}),
                r#"ipam.subnet: invalid CIDR "nope""#,
            ),
            (
                json!({"type": "x", "ranges": [[{"subnet": "10.0.0.0/24"}]], "routes": [{"dst": "x"}]}),
                r#"ipam.routes[0].dst: invalid CIDR "x""#,
            ),
            (
                json!({"type": "x", "ranges": [[{"subnet": "10.0.0.0/24"}]], "routes": [{"gw": "10.0.0.1"}]}),
                "ipam.routes[0].dst: missing (required)",
            ),
            (
                json!({"type": "x", "ranges": [[{"subnet": "10.0.0.0/24"}]], "routes": [{"dst": "0.0.0.0/0", "gw": "y"}]}),
                r#"ipam.routes[0].gw: invalid IP address "y""#,
            ),
            (
                json!({"type": "x", "ranges": [[{"subnet": "10.0.0.0/24"}]], "dataDir": 3}),
                "ipam.dataDir: expected a string",
            ),
            (
                json!({"type": "x", "ranges": [[{"subnet": "10.0.0.0/24"}]], "resolvConf": []}),
                "ipam.resolvConf: expected a string",
            ),
        ];
        for (ipam, want) in cases {
            assert_eq!(err(ipam.clone()), want, "for {ipam}");
        }
    }

    #[test]
    fn runtime_and_args_errors_name_their_field() {
        let ipam = json!({"type": "x", "ranges": [[{"subnet": "10.0.0.0/24"}]]});
        let e = |rt: Value, a: Value| {
            parse_full("1.0.0", ipam.clone(), rt, a, &[])
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            e(json!({"ipRanges": [[{"subnet": "10.0.0.0/24"}]]}), json!({})),
            "range set 0 (runtimeConfig.ipRanges[0]: 10.0.0.1-10.0.0.254) overlaps with range set 1 (ipam.ranges[0]: 10.0.0.1-10.0.0.254)"
        );
        assert_eq!(
            e(
                json!({"ipRanges": [[{"subnet": "10.0.0.0/40"}]]}),
                json!({})
            ),
            r#"runtimeConfig.ipRanges[0][0].subnet: invalid CIDR "10.0.0.0/40""#
        );
        assert_eq!(
            e(json!({"ips": ["nope"]}), json!({})),
            r#"runtimeConfig.ips[0]: invalid IP address "nope""#
        );
        assert_eq!(
            e(json!({}), json!({"cni": {"ips": ["10.0.0.1", 7]}})),
            "args.cni.ips[1]: expected a string"
        );
        assert_eq!(
            e(json!({}), json!({"cni": 1})),
            "args.cni: expected an object"
        );
    }

    #[test]
    fn old_versions_allow_one_address_per_family() {
        let two_v4 = json!({"type": "x", "ranges": [[{"subnet": "10.0.0.0/24"}], [{"subnet": "10.1.0.0/24"}]]});
        let e = parse_full("0.2.0", two_v4.clone(), json!({}), json!({}), &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "CNI version 0.2.0 does not support more than 1 address per family"
        );
        assert!(parse_full("0.3.0", two_v4, json!({}), json!({}), &[]).is_ok());
        let dual = json!({"type": "x", "ranges": [[{"subnet": "10.0.0.0/24"}], [{"subnet": "fd00::/64"}]]});
        assert!(parse_full("0.2.0", dual, json!({}), json!({}), &[]).is_ok());
    }

    #[test]
    fn network_name_must_be_one_path_component() {
        for name in ["", ".", "..", "a/b", "../x"] {
            let ipam = json!({"type": "x", "ranges": [[{"subnet": "10.0.0.0/24"}]]});
            let e = IpamConfig::parse(&ConfigInput {
                name,
                cni_version: "1.0.0",
                ipam: Some(&ipam),
                runtime_config: &Value::Null,
                args: &Value::Null,
                cni_args: &[],
            })
            .unwrap_err();
            assert_eq!(e, ConfigError::InvalidName(name.to_string()));
        }
    }

    #[test]
    fn store_location_ignores_ranges() {
        let ipam = json!({"type": "x", "ranges": "broken", "dataDir": "/tmp/d"});
        let loc = store_location(&ConfigInput {
            name: "n",
            cni_version: "1.0.0",
            ipam: Some(&ipam),
            runtime_config: &Value::Null,
            args: &Value::Null,
            cni_args: &[],
        })
        .unwrap();
        assert_eq!(loc, ("n".to_string(), PathBuf::from("/tmp/d")));
    }

    #[test]
    fn version_comparison() {
        assert!(version_at_least("0.3.0", (0, 3, 0)));
        assert!(version_at_least("1.1.0", (0, 3, 0)));
        assert!(!version_at_least("0.2.0", (0, 3, 0)));
        assert!(!version_at_least("", (0, 3, 0)));
        assert!(!version_at_least("1.0", (0, 3, 0)));
    }
}
