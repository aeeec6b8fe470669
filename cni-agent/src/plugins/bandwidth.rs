//! ebpf-bandwidth: the reference bandwidth plugin's interface
//! (`ingressRate`/`ingressBurst`/`egressRate`/`egressBurst` in bits/s and
//! bits, at the top level or through the `bandwidth` capability), enforced
//! by the agent's eBPF token buckets on the pod's host-side veth instead of
//! tbf + ifb. An ADD writes one bucket per limited direction and attaches
//! the policing program through tcx, so the veth's qdiscs, and any other
//! program or clsact filter on it, are left alone (the reference fails with
//! "file exists" when someone else owns the ingress qdisc).
use serde::Deserialize;

use crate::{
    netlink::{NetNs, Netlink, NetlinkError},
    plugins::{
        chained::{Chained, ChainedPlugin},
        datapath::DatapathConf,
    },
    spec::{CmdArgs, CniError, CniResult, NetConf},
    state::record::{Entry, Owner, VethHook},
};

/// ebpf-bandwidth, the binary's plugin.
pub type BandwidthPlugin = ChainedPlugin<Bandwidth>;

pub struct Bandwidth;

/// What went wrong, mapped once to CNI codes below.
#[derive(Debug, thiserror::Error)]
pub enum BandwidthError {
    /// A rate/burst pair the reference refuses (same reasons, plus the
    /// field's name).
    #[error("{field}: {reason}")]
    InvalidLimit { field: String, reason: &'static str },
    #[error("field `{0}` is not supported by ebpf-bandwidth (it shapes all of the pod's traffic)")]
    Unsupported(&'static str),
    #[error("no interfaces provided in prevResult")]
    NoInterfaces,
    #[error("CNI_NETNS is required to find the host side of {0}")]
    NoNetns(String),
    #[error("container interface {ifname} has no veth peer")]
    NoVethPeer { ifname: String },
    #[error("veth peer with index {0} is not in host ns")]
    PeerNotHere(u32),
    #[error(
        "no veth peer of container interface found in host ns (host side {0} is not in prevResult)"
    )]
    PeerNotInResult(String),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

impl From<BandwidthError> for CniError {
    fn from(e: BandwidthError) -> Self {
        match e {
            BandwidthError::Netlink(n) => n.into(),
            BandwidthError::NoNetns(_) => CniError::invalid_env(e.to_string()),
            BandwidthError::InvalidLimit { .. } | BandwidthError::Unsupported(_) => {
                CniError::invalid_config(e.to_string())
            }
            BandwidthError::NoInterfaces
            | BandwidthError::NoVethPeer { .. }
            | BandwidthError::PeerNotHere(_)
            | BandwidthError::PeerNotInResult(_) => CniError::internal(e.to_string()),
        }
    }
}

/// The four limits as they appear in the config (top level or
/// `runtimeConfig.bandwidth`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawLimits {
    ingress_rate: Option<u64>,
    ingress_burst: Option<u64>,
    egress_rate: Option<u64>,
    egress_burst: Option<u64>,
    #[serde(default)]
    unshaped_subnets: Option<Vec<String>>,
    #[serde(default)]
    shaped_subnets: Option<Vec<String>>,
}

impl RawLimits {
    fn any_limit(&self) -> bool {
        self.ingress_rate.is_some()
            || self.ingress_burst.is_some()
            || self.egress_rate.is_some()
            || self.egress_burst.is_some()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRuntimeConfig {
    bandwidth: Option<RawLimits>,
}

/// The whole config. The top-level limits are spelled out rather than a
/// flattened [`RawLimits`], so that a bad value is reported with its field.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawOptions {
    ingress_rate: Option<u64>,
    ingress_burst: Option<u64>,
    egress_rate: Option<u64>,
    egress_burst: Option<u64>,
    #[serde(default)]
    unshaped_subnets: Option<Vec<String>>,
    #[serde(default)]
    shaped_subnets: Option<Vec<String>>,
    #[serde(default)]
    runtime_config: Option<RawRuntimeConfig>,
}

impl RawOptions {
    fn top(&self) -> RawLimits {
        RawLimits {
            ingress_rate: self.ingress_rate,
            ingress_burst: self.ingress_burst,
            egress_rate: self.egress_rate,
            egress_burst: self.egress_burst,
            unshaped_subnets: self.unshaped_subnets.clone(),
            shaped_subnets: self.shaped_subnets.clone(),
        }
    }
}

/// One validated direction: a non-zero rate in bits/s and the burst in
/// bits (0: the default depth).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub rate_bps: u64,
    pub burst_bits: u64,
}

/// The validated options of one invocation.
#[derive(Clone, Debug)]
pub struct BandwidthConfig {
    /// Into the pod (`ingressRate`/`ingressBurst`).
    pub ingress: Option<Limit>,
    /// Out of the pod (`egressRate`/`egressBurst`).
    pub egress: Option<Limit>,
    pub datapath: DatapathConf,
}

/// The smallest burst read as "not set": runtimes fill the burst of a pod
/// whose bandwidth annotations only give a rate with a sentinel — 2^32−1
/// bits from containerd 1.6/1.7 (go-cni), 2^31−1 from kubelet's old
/// dockershim and runtimes modelled on it — or leave it 0.
pub const UNSET_BURST_BITS: u64 = i32::MAX as u64;

/// The reference's rules for one rate/burst pair, read the way a runtime
/// means them: a burst without a rate is refused, a burst beyond tbf's
/// 32-bit byte counter (4 GB) too; a rate without a burst (0, absent, or
/// [`UNSET_BURST_BITS`] and above, which no pod asks for on purpose) gets
/// the bucket's default depth (see `datapath/rate.rs`) instead of half a
/// gigabyte at line rate. `where_` is the prefix of the fields' names
/// ("ingress", "runtimeConfig.bandwidth.egress").
fn limit(
    where_: &str,
    rate: Option<u64>,
    burst: Option<u64>,
) -> Result<Option<Limit>, BandwidthError> {
    let (rate, burst) = (rate.unwrap_or(0), burst.unwrap_or(0));
    let invalid = |field: &str, reason| BandwidthError::InvalidLimit {
        field: format!("{where_}{field}"),
        reason,
    };
    match (rate, burst) {
        (0, 0) => Ok(None),
        (0, _) => Err(invalid("Rate", "if burst is set, rate must also be set")),
        (_, b) if b / 8 >= u64::from(u32::MAX) => {
            Err(invalid("Burst", "burst cannot be more than 4GB"))
        }
        (rate_bps, b) if b == 0 || b >= UNSET_BURST_BITS => {
            log::info!("{where_}Burst {b}: not set, the bucket gets its default depth");
            Ok(Some(Limit {
                rate_bps,
                burst_bits: 0,
            }))
        }
        (rate_bps, burst_bits) => Ok(Some(Limit {
            rate_bps,
            burst_bits,
        })),
    }
}

impl BandwidthConfig {
    pub fn from_conf(conf: &NetConf) -> Result<Self, CniError> {
        let raw: RawOptions = conf.plugin_options()?;
        // As in the reference, limits given at the top level win as a whole
        // over the capability's.
        let top = raw.top();
        let (limits, prefix) = if top.any_limit() {
            (top, "")
        } else {
            match raw.runtime_config.and_then(|r| r.bandwidth) {
                Some(b) => (b, "runtimeConfig.bandwidth."),
                None => (RawLimits::default(), ""),
            }
        };
        for (field, v) in [
            ("unshapedSubnets", &limits.unshaped_subnets),
            ("shapedSubnets", &limits.shaped_subnets),
        ] {
            if v.as_ref().is_some_and(|v| !v.is_empty()) {
                return Err(BandwidthError::Unsupported(field).into());
            }
        }
        let ingress = limit(
            &format!("{prefix}ingress"),
            limits.ingress_rate,
            limits.ingress_burst,
        )?;
        let egress = limit(
            &format!("{prefix}egress"),
            limits.egress_rate,
            limits.egress_burst,
        )?;
        Ok(Self {
            ingress,
            egress,
            datapath: conf.plugin_options()?,
        })
    }

    fn is_unlimited(&self) -> bool {
        self.ingress.is_none() && self.egress.is_none()
    }

    /// The entries for the host veth `host`: per limited direction, the
    /// bucket first (so the program never runs without its limit), then
    /// the program.
    pub fn entries(&self, host: &str) -> Vec<Entry> {
        let mut out = Vec::new();
        for (limit, hook) in [
            (self.ingress, VethHook::ToPod),
            (self.egress, VethHook::FromPod),
        ] {
            let Some(l) = limit else { continue };
            out.push(Entry::RateLimit {
                ifname: host.to_string(),
                hook,
                rate_bps: l.rate_bps,
                burst_bits: l.burst_bits,
            });
            out.push(Entry::VethProgram {
                ifname: host.to_string(),
                program: hook.program().to_string(),
                hook,
                owner: Owner::Bandwidth,
            });
        }
        out
    }
}

/// The host side of the container interface, as the reference finds it:
/// the veth peer of `args.ifname` (its IFLA_LINK, read inside the pod's
/// namespace) must be a host-side interface of prevResult.
fn host_veth(prev: &CniResult, args: &CmdArgs) -> Result<String, BandwidthError> {
    if prev.interfaces.is_empty() {
        return Err(BandwidthError::NoInterfaces);
    }
    let netns = args
        .netns
        .as_ref()
        .ok_or_else(|| BandwidthError::NoNetns(args.ifname.clone()))?;
    let ns = NetNs::open(netns)?;
    let pod_nl = Netlink::connect_in(&ns)?;
    let peer = pod_nl
        .find_link(&args.ifname)?
        .filter(|l| l.is_veth())
        .and_then(|l| l.peer_index)
        .ok_or_else(|| BandwidthError::NoVethPeer {
            ifname: args.ifname.clone(),
        })?;
    let host = Netlink::connect()?
        .link_by_index(peer)?
        .filter(|l| l.is_veth())
        .ok_or(BandwidthError::PeerNotHere(peer))?;
    prev.interfaces
        .iter()
        .find(|i| i.sandbox.as_deref().is_none_or(str::is_empty) && i.name == host.name)
        .map(|i| i.name.clone())
        .ok_or(BandwidthError::PeerNotInResult(host.name))
}

impl Chained for Bandwidth {
    type Config = BandwidthConfig;
    const OWNER: Owner = Owner::Bandwidth;
    const CONTEXT: &'static str = "bandwidth";
    const ABOUT: &'static str = "ebpf-bandwidth: pod rate limits in eBPF (CNI spec 0.1.0 - 1.1.0)";

    fn config(conf: &NetConf) -> Result<BandwidthConfig, CniError> {
        BandwidthConfig::from_conf(conf)
    }

    fn datapath(cfg: &BandwidthConfig) -> &DatapathConf {
        &cfg.datapath
    }

    fn idle(cfg: &BandwidthConfig) -> bool {
        cfg.is_unlimited()
    }

    fn entries(
        cfg: &BandwidthConfig,
        args: &CmdArgs,
        prev: &CniResult,
    ) -> Result<Option<Vec<Entry>>, CniError> {
        let host = host_veth(prev, args)?;
        Ok(Some(cfg.entries(&host)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: &str) -> NetConf {
        NetConf::parse(
            format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"ebpf-bandwidth"{extra}}}"#)
                .as_bytes(),
        )
        .unwrap()
    }

    fn err(extra: &str) -> CniError {
        BandwidthConfig::from_conf(&conf(extra)).unwrap_err()
    }

    #[test]
    fn limits_from_top_level_or_capability_top_level_winning() {
        let c = BandwidthConfig::from_conf(&conf(
            r#","ingressRate":1000000,"ingressBurst":8000,"runtimeConfig":{"bandwidth":{"egressRate":5,"egressBurst":5}}"#,
        ))
        .unwrap();
        assert_eq!(
            c.ingress,
            Some(Limit {
                rate_bps: 1_000_000,
                burst_bits: 8000
            })
        );
        assert_eq!(c.egress, None, "the top level wins as a whole");

        let c = BandwidthConfig::from_conf(&conf(
            r#","runtimeConfig":{"bandwidth":{"egressRate":5000,"egressBurst":6000}}"#,
        ))
        .unwrap();
        assert_eq!(c.ingress, None);
        assert_eq!(
            c.egress,
            Some(Limit {
                rate_bps: 5000,
                burst_bits: 6000
            })
        );

        // An explicit zero at the top level still wins: no limit at all.
        let c = BandwidthConfig::from_conf(&conf(
            r#","ingressRate":0,"runtimeConfig":{"bandwidth":{"ingressRate":1,"ingressBurst":1}}"#,
        ))
        .unwrap();
        assert!(c.is_unlimited());
        assert!(BandwidthConfig::from_conf(&conf(""))
            .unwrap()
            .is_unlimited());
    }

    #[test]
    fn bad_limits_name_the_field_with_the_reference_reason() {
        for (extra, field, reason) in [
            (
                r#","egressBurst":100"#,
                "egressRate",
                "if burst is set, rate must also be set",
            ),
            (
                r#","egressRate":100,"egressBurst":34359738360"#,
                "egressBurst",
                "burst cannot be more than 4GB",
            ),
            (
                r#","runtimeConfig":{"bandwidth":{"ingressBurst":100}}"#,
                "runtimeConfig.bandwidth.ingressRate",
                "if burst is set",
            ),
            (
                r#","egressRate":-1,"egressBurst":10"#,
                "egressRate",
                "expected u64",
            ),
            (r#","egressRate":1.5,"egressBurst":10"#, "egressRate", ""),
            (
                r#","ingressRate":"1M","ingressBurst":10"#,
                "ingressRate",
                "",
            ),
            (
                r#","shapedSubnets":["10.0.0.0/8"],"ingressRate":1,"ingressBurst":1"#,
                "shapedSubnets",
                "",
            ),
        ] {
            let e = err(extra);
            assert_eq!(e.code, 7, "{extra}: {e:?}");
            assert!(
                e.msg.contains(field),
                "{extra}: {} should name {field}",
                e.msg
            );
            assert!(
                e.msg.contains(reason),
                "{extra}: {} should say {reason}",
                e.msg
            );
        }
        // The largest burst the reference accepts.
        assert!(BandwidthConfig::from_conf(&conf(
            r#","egressRate":100,"egressBurst":34359738359"#
        ))
        .is_ok());
    }

    #[test]
    fn runtime_payloads_give_working_limits() {
        // containerd 1.6/1.7 (go-cni), a pod with both bandwidth annotations
        // at 10M and no burst: Go field names and the 2^32-1 sentinel.
        let c = BandwidthConfig::from_conf(&conf(
            r#","runtimeConfig":{"bandwidth":{"IngressRate":10000000,"IngressBurst":4294967295,"EgressRate":10000000,"EgressBurst":4294967295}}"#,
        ))
        .unwrap();
        let default_depth = Limit {
            rate_bps: 10_000_000,
            burst_bits: 0,
        };
        assert_eq!(
            (c.ingress, c.egress),
            (Some(default_depth), Some(default_depth))
        );
        // CRI-O and podman: camelCase, burst 0 or absent.
        let c = BandwidthConfig::from_conf(&conf(
            r#","runtimeConfig":{"bandwidth":{"ingressRate":10000000,"ingressBurst":0,"egressRate":10000000}}"#,
        ))
        .unwrap();
        assert_eq!(
            (c.ingress, c.egress),
            (Some(default_depth), Some(default_depth))
        );
        // dockershim's sentinel.
        let c = BandwidthConfig::from_conf(&conf(
            r#","runtimeConfig":{"bandwidth":{"ingressRate":10000000,"ingressBurst":2147483647}}"#,
        ))
        .unwrap();
        assert_eq!(c.ingress, Some(default_depth));
        // A burst a pod really asked for is kept.
        let c = BandwidthConfig::from_conf(&conf(
            r#","runtimeConfig":{"bandwidth":{"egressRate":10000000,"egressBurst":80000000}}"#,
        ))
        .unwrap();
        assert_eq!(c.egress.map(|l| l.burst_bits), Some(80_000_000));
    }

    #[test]
    fn entries_put_the_bucket_before_the_program() {
        let c = BandwidthConfig::from_conf(&conf(
            r#","ingressRate":10,"ingressBurst":20,"egressRate":30,"egressBurst":40"#,
        ))
        .unwrap();
        let e = c.entries("veth0");
        assert_eq!(e.len(), 4);
        assert_eq!(
            e[0],
            Entry::RateLimit {
                ifname: "veth0".into(),
                hook: VethHook::ToPod,
                rate_bps: 10,
                burst_bits: 20
            }
        );
        assert!(
            matches!(&e[1], Entry::VethProgram { program, hook: VethHook::ToPod, owner: Owner::Bandwidth, .. } if program == "veth_to_pod")
        );
        assert!(
            matches!(&e[3], Entry::VethProgram { program, hook: VethHook::FromPod, .. } if program == "veth_from_pod")
        );
        assert!(e.iter().all(|e| e.owner() == Owner::Bandwidth));
    }
}
