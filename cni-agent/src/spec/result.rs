//! The ADD result, in every layout the spec has had.
//!
//! Internally a result is always the 1.x shape ([`CniResult`]); the wire
//! layouts of 0.1.0/0.2.0 (`ip4`/`ip6`) and 0.3.x/0.4.0 (`ips` with
//! `"version"`) exist only in [`CniResult::from_json`] and
//! [`CniResult::to_json`], so plugins never deal with version differences.
//! Conversion follows libcni's rules (down to 0.2.0 keeps the first IPv4 and
//! the first IPv6 address; up from 0.2.0 yields IPs without an interface
//! index) and empty fields are omitted like Go's `omitempty`.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::decode::{self, DecodeError};
use super::error::{CniError, ErrorCode};
use super::version::{CniVersion, ResultFormat};

/// An ADD result in its version-independent (1.x) form.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CniResult {
    /// The version the result was parsed from or created for; informational,
    /// since [`CniResult::to_json`] takes the version to emit.
    pub cni_version: String,
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Dns,
}

/// An interface created by a plugin. `mtu`, `socket_path` and `pci_id`
/// appeared in 1.1.0 and are dropped when emitting 0.x results.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "nonempty"
    )]
    pub mac: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "nonzero"
    )]
    pub mtu: Option<u32>,
    /// The netns path for container-side interfaces; absent for host-side.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "nonempty"
    )]
    pub sandbox: Option<String>,
    #[serde(
        default,
        rename = "socketPath",
        skip_serializing_if = "Option::is_none",
        deserialize_with = "nonempty"
    )]
    pub socket_path: Option<String>,
    #[serde(
        default,
        rename = "pciID",
        skip_serializing_if = "Option::is_none",
        deserialize_with = "nonempty"
    )]
    pub pci_id: Option<String>,
}

/// An assigned address. `address` keeps its host bits (`10.1.0.5/24`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    pub address: IpNet,
    pub gateway: Option<IpAddr>,
    /// Index into [`CniResult::interfaces`].
    pub interface: Option<usize>,
}

/// A route. The extra attributes (`mtu` … `scope`) came with 1.1.0 and are
/// emitted for 1.x results only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "nonzero"
    )]
    pub mtu: Option<u32>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "nonzero"
    )]
    pub advmss: Option<u32>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "nonzero"
    )]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u32>,
}

impl Route {
    /// A plain `dst via gw` route.
    pub fn new(dst: IpNet, gw: Option<IpAddr>) -> Route {
        Route {
            dst,
            gw,
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        }
    }

    /// Only `dst`/`gw`: what 0.x layouts can express.
    fn basic(&self) -> Route {
        Route::new(self.dst, self.gw)
    }
}

/// DNS settings, shared by configuration and results.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "nonempty"
    )]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_none()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

/// `""` (or `null`) reads as `None`, so a round trip through Go-produced JSON
/// is stable.
fn nonempty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.filter(|s| !s.is_empty()))
}

/// `0` (or `null`) reads as `None`, mirroring `omitempty` on Go ints.
fn nonzero<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    Ok(Option::<u32>::deserialize(d)?.filter(|v| *v != 0))
}

// ---- wire layouts -------------------------------------------------------

/// 0.3.x/0.4.0 and 1.x (`version` present only in 0.x).
#[derive(Serialize, Deserialize)]
struct WireCurrent {
    #[serde(rename = "cniVersion", default)]
    cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ips: Vec<WireIp>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    routes: Vec<Route>,
    #[serde(default)]
    dns: Dns,
}

#[derive(Serialize, Deserialize)]
struct WireIp {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    interface: Option<usize>,
    address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gateway: Option<IpAddr>,
}

/// 0.1.0/0.2.0.
#[derive(Serialize, Deserialize)]
struct Wire020 {
    #[serde(rename = "cniVersion", default)]
    cni_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ip4: Option<Ip020>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ip6: Option<Ip020>,
    #[serde(default)]
    dns: Dns,
}

#[derive(Serialize, Deserialize)]
struct Ip020 {
    ip: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    routes: Vec<Route020>,
}

#[derive(Serialize, Deserialize)]
struct Route020 {
    dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gw: Option<IpAddr>,
}

fn decode_err(e: serde_json::Error) -> CniError {
    CniError::new(
        ErrorCode::Decode,
        format!("failed to parse CNI result: {e}"),
    )
}

fn wire_err(e: DecodeError) -> CniError {
    CniError::new(
        ErrorCode::Decode,
        format!("failed to parse CNI result: {e}"),
    )
}

impl CniResult {
    /// An empty result for `version`.
    pub fn new(version: CniVersion) -> CniResult {
        CniResult {
            cni_version: version.as_str().to_string(),
            ..Default::default()
        }
    }

    /// Parses a result of any supported version, telling the layout by its
    /// `cniVersion`. Without one (some runtimes strip it from `prevResult`)
    /// the layout is guessed from the keys: `ip4`/`ip6` means 0.2.0.
    pub fn from_json(v: &Value) -> Result<CniResult, CniError> {
        Self::from_json_with_default(v, None)
    }

    /// Like [`CniResult::from_json`], but a result without `cniVersion` is
    /// read as `default_version` (libcni parses `prevResult` at the config's
    /// version).
    pub fn from_json_with_default(
        v: &Value,
        default_version: Option<&str>,
    ) -> Result<CniResult, CniError> {
        let obj = v.as_object().ok_or_else(|| {
            CniError::new(
                ErrorCode::Decode,
                "failed to parse CNI result: not a JSON object",
            )
        })?;
        let version = match decode::get(obj, "cniVersion") {
            Some(Value::String(s)) if !s.is_empty() => s.parse::<CniVersion>()?,
            Some(Value::String(_)) | Some(Value::Null) | None => match default_version {
                Some(d) => CniVersion::from_config(d)?,
                None if decode::get(obj, "ip4").is_some() || decode::get(obj, "ip6").is_some() => {
                    CniVersion::V0_2_0
                }
                None => CniVersion::LATEST,
            },
            Some(_) => {
                return Err(CniError::new(
                    ErrorCode::Decode,
                    "failed to parse CNI result: cniVersion is not a string",
                ))
            }
        };
        let mut r = match version.result_format() {
            ResultFormat::V020 => {
                let w: Wire020 = decode::from_value(v).map_err(wire_err)?;
                let mut r = CniResult::default();
                for ip in [w.ip4, w.ip6].into_iter().flatten() {
                    r.ips.push(IpConfig {
                        address: ip.ip,
                        gateway: ip.gateway,
                        interface: None,
                    });
                    r.routes
                        .extend(ip.routes.into_iter().map(|rt| Route::new(rt.dst, rt.gw)));
                }
                r.dns = w.dns;
                r
            }
            ResultFormat::V040 | ResultFormat::V100 => {
                let w: WireCurrent = decode::from_value(v).map_err(wire_err)?;
                CniResult {
                    cni_version: String::new(),
                    interfaces: w.interfaces,
                    ips: w
                        .ips
                        .into_iter()
                        .map(|ip| IpConfig {
                            address: ip.address,
                            gateway: ip.gateway,
                            interface: ip.interface,
                        })
                        .collect(),
                    routes: w.routes,
                    dns: w.dns,
                }
            }
        };
        r.cni_version = version.as_str().to_string();
        Ok(r)
    }

    /// Parses raw bytes (e.g. a delegated plugin's stdout).
    pub fn from_slice(bytes: &[u8], default_version: Option<&str>) -> Result<CniResult, CniError> {
        let v: Value = serde_json::from_slice(bytes).map_err(decode_err)?;
        Self::from_json_with_default(&v, default_version)
    }

    /// The result in the layout of `version` (code 1 if unsupported).
    pub fn to_json(&self, version: &str) -> Result<Value, CniError> {
        self.to_json_version(version.parse()?)
    }

    /// Like [`CniResult::to_json`] with an already-parsed version.
    pub fn to_json_version(&self, version: CniVersion) -> Result<Value, CniError> {
        let enc = |r: Result<Value, serde_json::Error>| {
            r.map_err(|e| CniError::internal(format!("failed to encode CNI result: {e}")))
        };
        match version.result_format() {
            ResultFormat::V020 => enc(serde_json::to_value(self.to_020(version)?)),
            ResultFormat::V040 => {
                let w = WireCurrent {
                    cni_version: version.as_str().to_string(),
                    interfaces: self
                        .interfaces
                        .iter()
                        .map(|i| Interface {
                            name: i.name.clone(),
                            mac: i.mac.clone(),
                            sandbox: i.sandbox.clone(),
                            ..Default::default()
                        })
                        .collect(),
                    ips: self
                        .ips
                        .iter()
                        .map(|ip| WireIp {
                            version: Some(
                                if ip.address.addr().is_ipv4() {
                                    "4"
                                } else {
                                    "6"
                                }
                                .to_string(),
                            ),
                            interface: ip.interface,
                            address: ip.address,
                            gateway: ip.gateway,
                        })
                        .collect(),
                    routes: self.routes.iter().map(Route::basic).collect(),
                    dns: self.dns.clone(),
                };
                enc(serde_json::to_value(w))
            }
            ResultFormat::V100 => {
                let w = WireCurrent {
                    cni_version: version.as_str().to_string(),
                    interfaces: self.interfaces.clone(),
                    ips: self
                        .ips
                        .iter()
                        .map(|ip| WireIp {
                            version: None,
                            interface: ip.interface,
                            address: ip.address,
                            gateway: ip.gateway,
                        })
                        .collect(),
                    routes: self.routes.clone(),
                    dns: self.dns.clone(),
                };
                enc(serde_json::to_value(w))
            }
        }
    }

    /// 0.2.0 can hold one IPv4 and one IPv6 address; routes go to the block
    /// of their family (and are dropped if that family has no address), as
    /// libcni converts.
    fn to_020(&self, version: CniVersion) -> Result<Wire020, CniError> {
        let block = |v4: bool| {
            self.ips
                .iter()
                .find(|ip| ip.address.addr().is_ipv4() == v4)
                .map(|ip| Ip020 {
                    ip: ip.address,
                    gateway: ip.gateway,
                    routes: self
                        .routes
                        .iter()
                        .filter(|r| r.dst.addr().is_ipv4() == v4)
                        .map(|r| Route020 {
                            dst: r.dst,
                            gw: r.gw,
                        })
                        .collect(),
                })
        };
        let (ip4, ip6) = (block(true), block(false));
        if ip4.is_none() && ip6.is_none() {
            return Err(CniError::internal(format!(
                "cannot convert result to cniVersion {version}: no valid IP addresses"
            )));
        }
        Ok(Wire020 {
            cni_version: version.as_str().to_string(),
            ip4,
            ip6,
            dns: self.dns.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> CniResult {
        CniResult {
            cni_version: "1.1.0".into(),
            interfaces: vec![
                Interface {
                    name: "cni0".into(),
                    mac: Some("aa:bb:cc:dd:ee:ff".into()),
                    mtu: Some(1500),
                    ..Default::default()
                },
                Interface {
                    name: "eth0".into(),
                    mac: Some("00:11:22:33:44:55".into()),
                    sandbox: Some("/var/run/netns/x".into()),
                    socket_path: Some("/run/s.sock".into()),
                    pci_id: Some("0000:00:01.0".into()),
                    ..Default::default()
                },
            ],
            ips: vec![
                IpConfig {
                    address: "10.1.0.5/24".parse().unwrap(),
                    gateway: Some("10.1.0.1".parse().unwrap()),
                    interface: Some(1),
                },
                IpConfig {
                    address: "10.1.0.6/24".parse().unwrap(),
                    gateway: None,
                    interface: Some(1),
                },
                IpConfig {
                    address: "fd00::5/64".parse().unwrap(),
                    gateway: Some("fd00::1".parse().unwrap()),
                    interface: Some(1),
                },
            ],
            routes: vec![
                Route {
                    mtu: Some(1400),
                    table: Some(100),
                    scope: Some(0),
                    ..Route::new(
                        "0.0.0.0/0".parse().unwrap(),
                        Some("10.1.0.1".parse().unwrap()),
                    )
                },
                Route::new("::/0".parse().unwrap(), None),
            ],
            dns: Dns {
                nameservers: vec!["10.1.0.1".into()],
                domain: Some("cluster.local".into()),
                search: vec!["a.b".into()],
                options: vec!["ndots:5".into()],
            },
        }
    }

    #[test]
    fn emits_1x() {
        let v = sample().to_json("1.1.0").unwrap();
        assert_eq!(
            v,
            json!({
                "cniVersion": "1.1.0",
                "interfaces": [
                    {"name": "cni0", "mac": "aa:bb:cc:dd:ee:ff", "mtu": 1500},
                    {"name": "eth0", "mac": "00:11:22:33:44:55", "sandbox": "/var/run/netns/x",
                     "socketPath": "/run/s.sock", "pciID": "0000:00:01.0"}
                ],
                "ips": [
                    {"interface": 1, "address": "10.1.0.5/24", "gateway": "10.1.0.1"},
                    {"interface": 1, "address": "10.1.0.6/24"},
                    {"interface": 1, "address": "fd00::5/64", "gateway": "fd00::1"}
                ],
                "routes": [
                    {"dst": "0.0.0.0/0", "gw": "10.1.0.1", "mtu": 1400, "table": 100, "scope": 0},
                    {"dst": "::/0"}
                ],
                "dns": {"nameservers": ["10.1.0.1"], "domain": "cluster.local",
                        "search": ["a.b"], "options": ["ndots:5"]}
            })
        );
        let v100 = sample().to_json("1.0.0").unwrap();
        assert_eq!(v100["cniVersion"], "1.0.0");
        assert!(v100["ips"][0].get("version").is_none());
    }

    #[test]
    fn emits_040_family() {
        for ver in ["0.3.0", "0.3.1", "0.4.0"] {
            let v = sample().to_json(ver).unwrap();
            assert_eq!(v["cniVersion"], ver);
            assert_eq!(
                v["ips"][0],
                json!({"version": "4", "interface": 1, "address": "10.1.0.5/24", "gateway": "10.1.0.1"})
            );
            assert_eq!(v["ips"][2]["version"], "6");
            // 1.1-only attributes are dropped.
            assert_eq!(
                v["interfaces"][0],
                json!({"name": "cni0", "mac": "aa:bb:cc:dd:ee:ff"})
            );
            assert!(v["interfaces"][1].get("socketPath").is_none());
            assert_eq!(
                v["routes"][0],
                json!({"dst": "0.0.0.0/0", "gw": "10.1.0.1"})
            );
        }
    }

    #[test]
    fn emits_020_family() {
        for ver in ["0.1.0", "0.2.0"] {
            let v = sample().to_json(ver).unwrap();
            assert_eq!(
                v,
                json!({
                    "cniVersion": ver,
                    "ip4": {"ip": "10.1.0.5/24", "gateway": "10.1.0.1",
                            "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}]},
                    "ip6": {"ip": "fd00::5/64", "gateway": "fd00::1", "routes": [{"dst": "::/0"}]},
                    "dns": {"nameservers": ["10.1.0.1"], "domain": "cluster.local",
                            "search": ["a.b"], "options": ["ndots:5"]}
                })
            );
        }
        // Routes of a family without an address are dropped; empty dns stays `{}`.
        let mut r = sample();
        r.ips.truncate(1);
        r.dns = Dns::default();
        let v = r.to_json("0.2.0").unwrap();
        assert!(v.get("ip6").is_none());
        assert_eq!(v["ip4"]["routes"].as_array().unwrap().len(), 1);
        assert_eq!(v["dns"], json!({}));
    }

    #[test]
    fn to_020_without_ips_fails() {
        let r = CniResult::new(CniVersion::V1_0_0);
        let e = r.to_json("0.2.0").unwrap_err();
        assert_eq!(e.code, 999);
        assert!(e.msg.contains("no valid IP"));
        // Newer layouts are fine with an empty result.
        assert_eq!(
            r.to_json("1.0.0").unwrap(),
            json!({"cniVersion": "1.0.0", "dns": {}})
        );
    }

    #[test]
    fn unsupported_output_version() {
        let e = sample().to_json("0.5.0").unwrap_err();
        assert_eq!(e.code, 1);
    }

    #[test]
    fn round_trips_every_version() {
        let full = sample();
        for ver in CniVersion::ALL {
            let v = full.to_json_version(ver).unwrap();
            let back = CniResult::from_json(&v).unwrap();
            assert_eq!(back.cni_version, ver.as_str());
            match ver.result_format() {
                ResultFormat::V100 => {
                    let mut want = full.clone();
                    want.cni_version = ver.as_str().into();
                    assert_eq!(back, want);
                }
                ResultFormat::V040 => {
                    assert_eq!(back.ips, full.ips);
                    assert_eq!(back.interfaces.len(), 2);
                    assert_eq!(back.interfaces[1].pci_id, None);
                    assert_eq!(back.routes[0], full.routes[0].basic());
                    assert_eq!(back.dns, full.dns);
                }
                ResultFormat::V020 => {
                    // first v4 + first v6, no interface index
                    assert_eq!(back.ips.len(), 2);
                    assert_eq!(back.ips[0].address, full.ips[0].address);
                    assert_eq!(back.ips[0].gateway, full.ips[0].gateway);
                    assert_eq!(back.ips[0].interface, None);
                    assert_eq!(back.ips[1].address, full.ips[2].address);
                    assert!(back.interfaces.is_empty());
                    assert_eq!(back.routes.len(), 2);
                    assert_eq!(back.dns, full.dns);
                }
            }
            // Re-emitting in every other version works from the parsed form.
            for out in CniVersion::ALL {
                back.to_json_version(out).unwrap();
            }
        }
    }

    #[test]
    fn parses_020_input_and_converts_up() {
        let v = json!({
            "cniVersion": "0.2.0",
            "ip4": {"ip": "192.168.1.5/24", "gateway": "192.168.1.1",
                    "routes": [{"dst": "0.0.0.0/0"}, {"dst": "10.0.0.0/8", "gw": "192.168.1.254"}]},
            "dns": {"nameservers": ["8.8.8.8"]}
        });
        let r = CniResult::from_json(&v).unwrap();
        assert_eq!(r.ips.len(), 1);
        assert_eq!(r.routes.len(), 2);
        let up = r.to_json("0.4.0").unwrap();
        assert_eq!(
            up,
            json!({
                "cniVersion": "0.4.0",
                "ips": [{"version": "4", "address": "192.168.1.5/24", "gateway": "192.168.1.1"}],
                "routes": [{"dst": "0.0.0.0/0"}, {"dst": "10.0.0.0/8", "gw": "192.168.1.254"}],
                "dns": {"nameservers": ["8.8.8.8"]}
            })
        );
        assert!(
            CniResult::from_json(&up).unwrap().to_json("1.0.0").unwrap()["ips"][0]
                .get("version")
                .is_none()
        );
    }

    #[test]
    fn parses_040_input() {
        let v = json!({
            "cniVersion": "0.3.1",
            "interfaces": [{"name": "eth0", "mac": "", "sandbox": "/x"}],
            "ips": [{"version": "4", "interface": 0, "address": "10.0.0.2/16"}],
            "dns": {}
        });
        let r = CniResult::from_json(&v).unwrap();
        assert_eq!(r.interfaces[0].mac, None);
        assert_eq!(r.interfaces[0].sandbox.as_deref(), Some("/x"));
        assert_eq!(r.ips[0].interface, Some(0));
        assert!(r.routes.is_empty());
    }

    #[test]
    fn version_guessing_and_defaults() {
        let v = json!({"ip4": {"ip": "10.0.0.2/8"}});
        assert_eq!(CniResult::from_json(&v).unwrap().cni_version, "0.2.0");
        let v = json!({"ips": [{"address": "10.0.0.2/8"}]});
        assert_eq!(CniResult::from_json(&v).unwrap().cni_version, "1.1.0");
        let r = CniResult::from_json_with_default(&v, Some("0.4.0")).unwrap();
        assert_eq!(r.cni_version, "0.4.0");
        let r = CniResult::from_slice(br#"{"cniVersion":"1.0.0","ips":[]}"#, None).unwrap();
        assert_eq!(r.cni_version, "1.0.0");
    }

    #[test]
    fn parse_errors() {
        let e = CniResult::from_json(&json!({"cniVersion": "9.9.9"})).unwrap_err();
        assert_eq!(e.code, 1);
        let e = CniResult::from_json(&json!([1])).unwrap_err();
        assert_eq!(e.code, 6);
        let e = CniResult::from_json(&json!({"cniVersion": 1})).unwrap_err();
        assert_eq!(e.code, 6);
        let e = CniResult::from_json(&json!({"cniVersion": "1.0.0", "ips": [{"address": "nope"}]}))
            .unwrap_err();
        assert_eq!(e.code, 6);
        let e = CniResult::from_slice(b"{", None).unwrap_err();
        assert_eq!(e.code, 6);
    }
}
