//! Allocation of one address from one range set, the reference's
//! `IPAllocator` (`backend/allocator/allocator.go`): a requested address is
//! reserved if free; otherwise addresses are tried round-robin from the one
//! after the set's last reservation, so a crash-looping pod does not get the
//! same address back until the whole set has been cycled through.

use std::net::IpAddr;

use ipnet::IpNet;

use super::range::{RangeIter, RangeSet};
use super::store::{Store, StoreError};

/// Why an address could not be allocated (wording of the reference).
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    #[error("{ip} not in range set {set}")]
    NotInRangeSet { ip: IpAddr, set: String },
    #[error("requested ip {0} is subnet's gateway")]
    RequestedGateway(IpAddr),
    /// The reference would hand these out; a pod on a network or broadcast
    /// address is unreachable, so we refuse.
    #[error("requested ip {ip} is the network or broadcast address of {subnet}")]
    RequestedReserved { ip: IpAddr, subnet: IpNet },
    #[error("requested IP address {ip} is not available in range set {set}")]
    RequestedUnavailable { ip: IpAddr, set: String },
    /// The spec forbids a second ADD for the same attachment; the reference
    /// refuses it with this error and so do we.
    #[error("{ip} has been allocated to {id}, duplicate allocation is not allowed")]
    Duplicate { ip: IpAddr, id: String },
    #[error("no IP addresses available in range set: {set}")]
    Exhausted { set: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An allocated address with its prefix and gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    /// The address with the prefix length of its subnet.
    pub address: IpNet,
    pub gateway: IpAddr,
}

/// Allocates from range set number `range_id` (its index in the config,
/// which names its `last_reserved_ip.N` cursor) of a locked store.
#[derive(Debug)]
pub struct Allocator<'a> {
    set: &'a RangeSet,
    store: &'a Store,
    range_id: usize,
}

impl<'a> Allocator<'a> {
    pub fn new(set: &'a RangeSet, store: &'a Store, range_id: usize) -> Allocator<'a> {
        Allocator {
            set,
            store,
            range_id,
        }
    }

    /// Allocates an address for (id, ifname): `requested` if given (it must
    /// lie in this set and be free), else the next free one round-robin.
    pub fn get(
        &self,
        id: &str,
        ifname: &str,
        requested: Option<IpAddr>,
    ) -> Result<Allocation, AllocError> {
        if let Some(ip) = requested {
            return self.get_requested(id, ifname, ip.to_canonical());
        }
        let held = self.store.get_by_id(id, ifname)?;
        self.get_next(id, ifname, &held)
    }

    /// [`Allocator::get`] without a requested address, given what
    /// [`Store::get_by_id`] returned for (id, ifname): an ADD over several
    /// range sets reads the store once instead of once per set (range sets
    /// do not overlap, so what this ADD reserved in one set never counts
    /// as a duplicate in another, as with the reference's per-set look-up).
    pub fn get_next(
        &self,
        id: &str,
        ifname: &str,
        held: &[IpAddr],
    ) -> Result<Allocation, AllocError> {
        for &ip in held {
            if self.set.contains(ip) {
                return Err(AllocError::Duplicate {
                    ip,
                    id: id.to_string(),
                });
            }
        }

        let last = self.store.last_reserved_ip(self.range_id);
        for (ip, range) in RangeIter::new(self.set, last) {
            if self.store.reserve(id, ifname, ip, self.range_id)? {
                return Ok(Allocation {
                    address: with_prefix(ip, range.subnet.prefix_len()),
                    gateway: range.gateway,
                });
            }
        }
        Err(AllocError::Exhausted {
            set: self.set.to_string(),
        })
    }

    fn get_requested(&self, id: &str, ifname: &str, ip: IpAddr) -> Result<Allocation, AllocError> {
        let range = self
            .set
            .range_for(ip)
            .ok_or_else(|| AllocError::NotInRangeSet {
                ip,
                set: self.set.to_string(),
            })?;
        if ip == range.gateway {
            return Err(AllocError::RequestedGateway(ip));
        }
        if range.is_reserved_address(ip) {
            return Err(AllocError::RequestedReserved {
                ip,
                subnet: range.subnet,
            });
        }
        if !self.store.reserve(id, ifname, ip, self.range_id)? {
            return Err(AllocError::RequestedUnavailable {
                ip,
                set: self.set.to_string(),
            });
        }
        Ok(Allocation {
            address: with_prefix(ip, range.subnet.prefix_len()),
            gateway: range.gateway,
        })
    }
}

/// `ip/prefix`; the prefix comes from a validated subnet of the same family,
/// so it always fits.
fn with_prefix(ip: IpAddr, prefix: u8) -> IpNet {
    IpNet::new(ip, prefix).unwrap_or_else(|_| IpNet::from(ip))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::range::Range;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn set(subnet: &str) -> RangeSet {
        RangeSet::new(vec![
            Range::new(subnet.parse().unwrap(), None, None, None).unwrap()
        ])
        .unwrap()
    }

    #[test]
    fn round_robin_across_releases() {
        let tmp = tempfile::tempdir().unwrap();
        let s = set("10.0.0.0/29");
        let store = Store::open(tmp.path(), "n").unwrap();
        let alloc = Allocator::new(&s, &store, 0);
        let get = |id: &str| alloc.get(id, "eth0", None).map(|a| a.address.to_string());
        assert_eq!(get("a").unwrap(), "10.0.0.2/29");
        assert_eq!(get("b").unwrap(), "10.0.0.3/29");
        store.release_by_id("a", "eth0").unwrap();
        // .2 is free again, but round-robin continues after .3.
        assert_eq!(get("c").unwrap(), "10.0.0.4/29");
        assert_eq!(get("d").unwrap(), "10.0.0.5/29");
        assert_eq!(get("e").unwrap(), "10.0.0.6/29");
        assert_eq!(get("f").unwrap(), "10.0.0.2/29");
        let e = alloc.get("g", "eth0", None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no IP addresses available in range set: 10.0.0.1-10.0.0.6"
        );
        assert_eq!(
            alloc.get("b", "eth1", None).unwrap_err().to_string(),
            e.to_string()
        );
    }

    #[test]
    fn gateway_is_returned() {
        let tmp = tempfile::tempdir().unwrap();
        let s = set("fd00::/120");
        let store = Store::open(tmp.path(), "n").unwrap();
        let a = Allocator::new(&s, &store, 0)
            .get("a", "eth0", None)
            .unwrap();
        assert_eq!(a.address.to_string(), "fd00::2/120");
        assert_eq!(a.gateway, ip("fd00::1"));
    }

    #[test]
    fn duplicate_add_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let s = set("10.0.0.0/24");
        let store = Store::open(tmp.path(), "n").unwrap();
        let alloc = Allocator::new(&s, &store, 0);
        alloc.get("a", "eth0", None).unwrap();
        assert_eq!(
            alloc.get("a", "eth0", None).unwrap_err().to_string(),
            "10.0.0.2 has been allocated to a, duplicate allocation is not allowed"
        );
        // Another interface of the same container is a different attachment.
        assert_eq!(
            alloc.get("a", "eth1", None).unwrap().address.to_string(),
            "10.0.0.3/24"
        );
    }

    #[test]
    fn requested_addresses() {
        let tmp = tempfile::tempdir().unwrap();
        let s = set("10.0.0.0/24");
        let store = Store::open(tmp.path(), "n").unwrap();
        let alloc = Allocator::new(&s, &store, 0);
        let a = alloc.get("a", "eth0", Some(ip("10.0.0.50"))).unwrap();
        assert_eq!(a.address.to_string(), "10.0.0.50/24");
        assert_eq!(store.last_reserved_ip(0), Some(ip("10.0.0.50")));
        let err = |id: &str, req: &str| {
            alloc
                .get(id, "eth0", Some(ip(req)))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("b", "10.0.0.50"),
            "requested IP address 10.0.0.50 is not available in range set 10.0.0.1-10.0.0.254"
        );
        assert_eq!(
            err("b", "10.0.0.1"),
            "requested ip 10.0.0.1 is subnet's gateway"
        );
        assert_eq!(
            err("b", "10.0.1.1"),
            "10.0.1.1 not in range set 10.0.0.1-10.0.0.254"
        );
        // The next round-robin address follows the requested one.
        assert_eq!(
            alloc.get("c", "eth0", None).unwrap().address.to_string(),
            "10.0.0.51/24"
        );
    }

    #[test]
    fn requested_network_address_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let s = RangeSet::new(vec![Range::new(
            "10.0.0.0/24".parse().unwrap(),
            Some(ip("10.0.0.0")),
            Some(ip("10.0.0.255")),
            None,
        )
        .unwrap()])
        .unwrap();
        let store = Store::open(tmp.path(), "n").unwrap();
        let alloc = Allocator::new(&s, &store, 0);
        for bad in ["10.0.0.0", "10.0.0.255"] {
            assert!(matches!(
                alloc.get("a", "eth0", Some(ip(bad))),
                Err(AllocError::RequestedReserved { .. })
            ));
        }
    }

    /// 32 concurrent allocators on one /28 (13 usable addresses), each with
    /// its own open of the store as separate ADD processes would: no address
    /// is handed out twice and the rest get the exhaustion error.
    #[test]
    fn concurrent_allocations_never_collide() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let threads: Vec<_> = (0..32)
            .map(|i| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    let s = set("10.0.0.0/28");
                    let store = Store::open(&dir, "n").unwrap();
                    Allocator::new(&s, &store, 0)
                        .get(&format!("c{i}"), "eth0", None)
                        .map(|a| a.address.addr())
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let mut ips: Vec<IpAddr> = results
            .iter()
            .filter_map(|r| r.as_ref().ok().copied())
            .collect();
        let failures: Vec<String> = results
            .iter()
            .filter_map(|r| r.as_ref().err().map(ToString::to_string))
            .collect();
        ips.sort();
        let before = ips.len();
        ips.dedup();
        assert_eq!(ips.len(), before, "an address was handed out twice");
        assert_eq!(ips.len(), 13);
        assert_eq!(failures.len(), 19);
        assert!(failures
            .iter()
            .all(|f| f == "no IP addresses available in range set: 10.0.0.1-10.0.0.14"));
        // The store agrees: 13 files, each with its own container.
        let store = Store::open(&dir, "n").unwrap();
        let res = store.reservations().unwrap();
        assert_eq!(res.len(), 13);
        let mut ids: Vec<_> = res.iter().map(|r| r.container_id.clone()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 13);
    }
}
