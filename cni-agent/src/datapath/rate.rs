//! ebpf-bandwidth's token buckets: one RATE_BUCKETS entry per pod veth and
//! direction, which the host veth programs police
//! (see cni-ebpf/src/rate.rs for the algorithm).
//!
//! # Bucket depth
//! The reference plugin builds a tbf: `burst` is its bucket and a queue of
//! 25 ms at the rate sits in front of it, so the queue sets TCP's ACK clock.
//! A policer has no queue. On a pod's sub-millisecond path even TCP's
//! smallest window is far above most rates, so a flow can only average
//! down to the rate through the pauses of its loss recovery, and the
//! longest of those is the retransmission timeout (200 ms minimum on
//! Linux). A bucket shallower than that pause overflows while the flow
//! waits, and the tokens lost there are goodput lost for good: with the
//! reference's 25 ms, a 100 Mbit/s limit measured 14 Mbit/s of TCP.
//! So the depth is
//! `max(burst, rate × 400 ms, 128 KiB)`: two minimum RTOs of tokens (a
//! pause stretched by a busy CPU still loses nothing), and room for two
//! 64 KiB GSO aggregates at very low rates. The long-run rate is exact
//! whatever the depth; the floor only lets a flow catch up after a pause.
//! A configured burst above the floor is honoured exactly: that many bytes
//! pass at line rate before the rate holds.
use aya::maps::{HashMap, MapData, MapError};
use cni_ebpf_common::{map_names, rate_dir, RateBucket, RateKey};
use serde::Serialize;

use super::{
    entries::link_index,
    links::ifindex_exists,
    loader::DatapathError,
    pins::{open_pinned, PinLayout},
};
use crate::state::record::VethHook;

/// Two minimum TCP retransmission timeouts of tokens (see above).
pub const FLOOR_LATENCY_NS: u64 = 400_000_000;
/// Room for two 64 KiB GSO aggregates.
pub const FLOOR_BYTES: u64 = 128 * 1024;
/// Depths are capped so that `now + depth` never wraps in the kernel.
const MAX_DEPTH_NS: u64 = 1 << 62;
const NS_PER_SEC: u128 = 1_000_000_000;

/// The bucket depth in bytes for a configured rate and burst (see the
/// module documentation).
pub fn depth_bytes(rate_bps: u64, burst_bits: u64) -> u64 {
    let floor_latency =
        (u128::from(rate_bps) * u128::from(FLOOR_LATENCY_NS) / NS_PER_SEC / 8) as u64;
    (burst_bits / 8).max(floor_latency).max(FLOOR_BYTES)
}

/// The depth as the time the rate takes to earn it.
fn depth_ns(rate_bps: u64, burst_bits: u64) -> u64 {
    if rate_bps == 0 {
        return 0;
    }
    let ns = u128::from(depth_bytes(rate_bps, burst_bits)) * 8 * NS_PER_SEC / u128::from(rate_bps);
    u64::try_from(ns).unwrap_or(u64::MAX).min(MAX_DEPTH_NS)
}

fn direction(hook: VethHook) -> u8 {
    match hook {
        VethHook::ToPod => rate_dir::TO_POD,
        VethHook::FromPod => rate_dir::FROM_POD,
    }
}

fn name_bytes(ifname: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    let n = ifname.len().min(15);
    out[..n].copy_from_slice(&ifname.as_bytes()[..n]);
    out
}

/// A full bucket with the configuration an entry implies.
fn fresh_bucket(ifname: &str, rate_bps: u64, burst_bits: u64) -> RateBucket {
    RateBucket {
        rate_bps,
        depth_ns: depth_ns(rate_bps, burst_bits),
        ifname: name_bytes(ifname),
        ..RateBucket::default()
    }
}

fn map_err(source: MapError) -> DatapathError {
    DatapathError::Map {
        name: map_names::RATE_BUCKETS,
        source,
    }
}

fn is_missing(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// One bucket as `cni-agent status` shows it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateStatus {
    pub ifindex: u32,
    pub ifname: String,
    /// "to-pod" (ingressRate) or "from-pod" (egressRate).
    pub direction: &'static str,
    pub rate_bps: u64,
    pub depth_bytes: u64,
    pub passed_packets: u64,
    pub passed_bytes: u64,
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
}

/// RATE_BUCKETS, opened from its pin.
pub struct RateMap {
    map: HashMap<MapData, RateKey, RateBucket>,
}

impl RateMap {
    pub fn open(layout: &PinLayout) -> Result<Self, DatapathError> {
        let data = open_pinned(layout, map_names::RATE_BUCKETS)?;
        let map = HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(map_err)?;
        Ok(Self { map })
    }

    fn key(ifindex: u32, hook: VethHook) -> RateKey {
        RateKey {
            ifindex,
            direction: direction(hook),
            _pad: [0; 3],
        }
    }

    /// Writes a full bucket for the veth `ifname` (replacing one that is
    /// there: its counters restart).
    pub fn apply(
        &mut self,
        ifname: &str,
        hook: VethHook,
        rate_bps: u64,
        burst_bits: u64,
    ) -> Result<(), DatapathError> {
        let index = link_index(ifname)?;
        self.map
            .insert(
                Self::key(index, hook),
                fresh_bucket(ifname, rate_bps, burst_bits),
                0,
            )
            .map_err(map_err)
    }

    /// Removes the bucket of `ifname`. A bucket is only ever removed if it
    /// carries that name; when the veth is gone (its ifindex may already
    /// belong to another device), its leftover buckets are found by name
    /// among those whose device no longer exists.
    pub fn revoke(&mut self, ifname: &str, hook: VethHook) -> Result<(), DatapathError> {
        let name = name_bytes(ifname);
        let keys: Vec<RateKey> = match link_index(ifname) {
            Ok(index) => vec![Self::key(index, hook)],
            Err(_) => self
                .map
                .iter()
                .filter_map(Result::ok)
                .filter(|(k, v)| {
                    k.direction == direction(hook) && v.ifname == name && !ifindex_exists(k.ifindex)
                })
                .map(|(k, _)| k)
                .collect(),
        };
        for key in keys {
            match self.map.get(&key, 0) {
                Ok(v) if v.ifname == name => {}
                Ok(_) => continue,
                Err(e) if is_missing(&e) => continue,
                Err(e) => return Err(map_err(e)),
            }
            match self.map.remove(&key) {
                Ok(()) => {}
                Err(e) if is_missing(&e) => {}
                Err(e) => return Err(map_err(e)),
            }
        }
        Ok(())
    }

    /// Whether the veth's bucket is there with the configuration implied by
    /// the entry.
    pub fn is_applied(&self, ifname: &str, hook: VethHook, rate_bps: u64, burst_bits: u64) -> bool {
        let Ok(index) = link_index(ifname) else {
            return false;
        };
        let want = fresh_bucket(ifname, rate_bps, burst_bits);
        self.map.get(&Self::key(index, hook), 0).is_ok_and(|v| {
            v.rate_bps == want.rate_bps && v.depth_ns == want.depth_ns && v.ifname == want.ifname
        })
    }

    /// Every bucket with its counters.
    pub fn list(&self) -> Vec<RateStatus> {
        let mut out: Vec<RateStatus> = self
            .map
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| RateStatus {
                ifindex: k.ifindex,
                ifname: String::from_utf8_lossy(&v.ifname)
                    .trim_end_matches('\0')
                    .to_string(),
                direction: if k.direction == rate_dir::TO_POD {
                    "to-pod"
                } else {
                    "from-pod"
                },
                rate_bps: v.rate_bps,
                depth_bytes: (u128::from(v.depth_ns) * u128::from(v.rate_bps) / NS_PER_SEC / 8)
                    as u64,
                passed_packets: v.passed_packets,
                passed_bytes: v.passed_bytes,
                dropped_packets: v.dropped_packets,
                dropped_bytes: v.dropped_bytes,
            })
            .collect();
        out.sort_by(|a, b| (a.ifindex, a.direction).cmp(&(b.ifindex, b.direction)));
        out
    }
}

/// The buckets for `cni-agent status` (empty when the map cannot be read:
/// status reports what it can).
pub fn status_json(layout: &PinLayout) -> serde_json::Value {
    RateMap::open(layout)
        .map(|m| serde_json::to_value(m.list()).unwrap_or_default())
        .unwrap_or_else(|_| serde_json::json!([]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_has_a_floor_and_honours_larger_bursts() {
        // 1 Mbit/s, tiny burst: the 128 KiB floor (400 ms is 50 kB).
        assert_eq!(depth_bytes(1_000_000, 8000), FLOOR_BYTES);
        // 10 Mbit/s: 400 ms at the rate.
        assert_eq!(depth_bytes(10_000_000, 8000), 500_000);
        // 1 Gbit/s: 400 ms at the rate (50 MB).
        assert_eq!(depth_bytes(1_000_000_000, 8000), 50_000_000);
        // A burst above both is taken as is.
        assert_eq!(depth_bytes(10_000_000, 80_000_000), 10_000_000);
    }

    #[test]
    fn depth_time_does_not_overflow() {
        // The largest burst the config accepts at the smallest rate.
        let ns = depth_ns(1, (u64::from(u32::MAX) - 1) * 8);
        assert_eq!(ns, MAX_DEPTH_NS);
        // 1 Gbit/s: the floor is 400 ms.
        assert_eq!(depth_ns(1_000_000_000, 0), 400_000_000);
        assert_eq!(depth_ns(0, 8000), 0);
    }

    #[test]
    fn names_are_nul_padded() {
        assert_eq!(&name_bytes("veth1234")[..9], b"veth1234\0");
        assert_eq!(name_bytes("a-very-long-interface-name")[15], 0);
    }
}
