//! Address ranges and range sets, with the same semantics as the reference
//! host-local plugin (`backend/allocator/range.go`, `range_set.go`).
//!
//! A [`Range`] is one `{subnet, rangeStart, rangeEnd, gateway}` entry, always
//! held in canonical form (defaults filled in, validated). A [`RangeSet`] is
//! the list of ranges one IP is allocated from; each range set of a config
//! yields exactly one address per ADD.
//!
//! Addresses are handled as `u128` internally so IPv4 and IPv6 share one code
//! path for arithmetic and comparison.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Why a single range is invalid. The config layer prefixes the message with
/// the path of the offending field, so these messages name only the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// A /31, /32, /127 or /128 has no room for a gateway plus an address.
    #[error("network {0} too small to allocate from")]
    TooSmall(IpNet),
    /// Same check and wording as the reference: it rejects host bits rather
    /// than silently masking them, because a typo there usually means the
    /// operator meant a different network.
    #[error(
        "network has host bits set. For a subnet mask of length {prefix} the network address is {network}"
    )]
    HostBits { prefix: u8, network: IpAddr },
    /// `::ffff:a.b.c.d/n`: the reference canonicalises the address to IPv4 but
    /// keeps an IPv6 mask and fails; we say why.
    #[error("IPv4-mapped IPv6 subnet {0} is not supported (IP and mask version mismatch)")]
    MappedSubnet(IpNet),
    #[error("{ip} not in network {subnet}")]
    NotInNetwork { ip: IpAddr, subnet: IpNet },
    #[error("rangeStart {start} is after rangeEnd {end}")]
    StartAfterEnd { start: IpAddr, end: IpAddr },
    /// The reference accepts any gateway; a gateway of the other family can
    /// only produce a result the interface plugin rejects later, so we fail
    /// early with a clear message.
    #[error("gateway {gateway} is not of the same address family as subnet {subnet}")]
    GatewayFamily { gateway: IpAddr, subnet: IpNet },
}

/// Why a range set is invalid (wording of the reference).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeSetError {
    #[error("empty range set")]
    Empty,
    #[error("mixed address families")]
    MixedFamilies,
    #[error("subnets {0} and {1} overlap")]
    Overlap(String, String),
}

/// One canonical range: every field is set and consistent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    /// The network, host bits zero.
    pub subnet: IpNet,
    /// First allocatable address, inclusive.
    pub range_start: IpAddr,
    /// Last allocatable address, inclusive.
    pub range_end: IpAddr,
    /// Returned as the gateway of addresses from this range and never handed
    /// out itself.
    pub gateway: IpAddr,
}

impl Range {
    /// Validates a range and fills in the defaults the reference uses:
    /// gateway = network+1, rangeStart = network+1, rangeEnd = broadcast-1
    /// (IPv4) or the last address (IPv6). IPv4-mapped IPv6 addresses given for
    /// an IPv4 subnet are canonicalised to IPv4, as the reference does.
    pub fn new(
        subnet: IpNet,
        range_start: Option<IpAddr>,
        range_end: Option<IpAddr>,
        gateway: Option<IpAddr>,
    ) -> Result<Range, RangeError> {
        if let IpNet::V6(v6) = subnet {
            if v6.addr().to_ipv4_mapped().is_some() {
                return Err(RangeError::MappedSubnet(subnet));
            }
        }
        if subnet.prefix_len() > subnet.max_prefix_len() - 2 {
            return Err(RangeError::TooSmall(subnet));
        }
        if subnet.addr() != subnet.network() {
            return Err(RangeError::HostBits {
                prefix: subnet.prefix_len(),
                network: subnet.network(),
            });
        }
        let first = next_ip(subnet.network());
        let gateway = match gateway.map(|g| g.to_canonical()) {
            None => first,
            Some(g) if g.is_ipv4() != subnet.addr().is_ipv4() => {
                return Err(RangeError::GatewayFamily { gateway: g, subnet })
            }
            Some(g) => g,
        };
        let in_subnet = |ip: IpAddr| {
            let ip = ip.to_canonical();
            if subnet.contains(&ip) {
                Ok(ip)
            } else {
                Err(RangeError::NotInNetwork { ip, subnet })
            }
        };
        let range_start = match range_start {
            Some(ip) => in_subnet(ip)?,
            None => first,
        };
        let range_end = match range_end {
            Some(ip) => in_subnet(ip)?,
            None => last_ip(subnet),
        };
        if to_u128(range_start) > to_u128(range_end) {
            return Err(RangeError::StartAfterEnd {
                start: range_start,
                end: range_end,
            });
        }
        Ok(Range {
            subnet,
            range_start,
            range_end,
            gateway,
        })
    }

    /// Whether `ip` lies within `[rangeStart, rangeEnd]` of this range (the
    /// gateway counts as contained, as in the reference).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        same_family(ip, self.range_start)
            && self.subnet.contains(&ip)
            && to_u128(ip) >= to_u128(self.range_start)
            && to_u128(ip) <= to_u128(self.range_end)
    }

    /// Whether two ranges share an address (the reference's test: either end
    /// of one inside the other).
    pub fn overlaps(&self, other: &Range) -> bool {
        same_family(self.range_start, other.range_start)
            && (self.contains(other.range_start)
                || self.contains(other.range_end)
                || other.contains(self.range_start)
                || other.contains(self.range_end))
    }

    /// Addresses the iterator never hands out: the gateway (as the reference)
    /// plus the network address and the IPv4 broadcast, which only come into
    /// reach when rangeStart/rangeEnd are set explicitly to the subnet's
    /// edges; the reference would hand those out, breaking the pod.
    pub fn is_reserved_address(&self, ip: IpAddr) -> bool {
        ip == self.gateway
            || ip == self.subnet.network()
            || (ip.is_ipv4() && ip == self.subnet.broadcast())
    }

    /// The number of addresses this range can hand out.
    pub fn capacity(&self) -> u128 {
        let span = (to_u128(self.range_end) - to_u128(self.range_start)).saturating_add(1);
        let mut special = vec![self.gateway, self.subnet.network()];
        if self.subnet.addr().is_ipv4() {
            special.push(self.subnet.broadcast());
        }
        special.sort();
        special.dedup();
        let skipped = special.into_iter().filter(|ip| self.contains(*ip)).count();
        span.saturating_sub(skipped as u128)
    }
}

impl fmt::Display for Range {
    /// `start-end`, the form the reference uses in its error messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.range_start, self.range_end)
    }
}

/// The ranges one address is allocated from, in config order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeSet(pub Vec<Range>);

impl RangeSet {
    /// Checks the set as the reference does: non-empty, one family, no two
    /// ranges overlapping. The ranges themselves are already canonical.
    pub fn new(ranges: Vec<Range>) -> Result<RangeSet, RangeSetError> {
        let Some(first) = ranges.first() else {
            return Err(RangeSetError::Empty);
        };
        if ranges
            .iter()
            .any(|r| !same_family(r.range_start, first.range_start))
        {
            return Err(RangeSetError::MixedFamilies);
        }
        for (i, a) in ranges.iter().enumerate() {
            for b in &ranges[i + 1..] {
                if a.overlaps(b) {
                    return Err(RangeSetError::Overlap(a.to_string(), b.to_string()));
                }
            }
        }
        Ok(RangeSet(ranges))
    }

    pub fn ranges(&self) -> &[Range] {
        &self.0
    }

    /// Whether every range of this set is IPv4.
    pub fn is_ipv4(&self) -> bool {
        self.0.first().is_some_and(|r| r.range_start.is_ipv4())
    }

    /// The range holding `ip`, if any.
    pub fn range_for(&self, ip: IpAddr) -> Option<&Range> {
        self.0.iter().find(|r| r.contains(ip))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.range_for(ip).is_some()
    }

    /// Whether any range of this set overlaps any range of `other`.
    pub fn overlaps(&self, other: &RangeSet) -> bool {
        self.0.iter().any(|a| other.0.iter().any(|b| a.overlaps(b)))
    }

    /// The number of addresses the whole set can hand out.
    pub fn capacity(&self) -> u128 {
        self.0
            .iter()
            .fold(0u128, |acc, r| acc.saturating_add(r.capacity()))
    }
}

impl fmt::Display for RangeSet {
    /// `start-end,start-end`, as in the reference's messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// Round-robin iterator over a range set, the reference's `RangeIter`: it
/// starts right after `last` (the last reserved address of this set, when it
/// is still inside the set) or at the first range's start, visits every
/// address of every range once, wrapping from the last range to the first,
/// and skips the gateway (and network/broadcast, see
/// [`Range::is_reserved_address`]).
#[derive(Debug, Clone)]
pub struct RangeIter<'a> {
    set: &'a RangeSet,
    range_idx: usize,
    cur: Option<IpAddr>,
    start: Option<IpAddr>,
    done: bool,
}

impl<'a> RangeIter<'a> {
    pub fn new(set: &'a RangeSet, last: Option<IpAddr>) -> RangeIter<'a> {
        let last = last.map(|ip| ip.to_canonical());
        let resume = last.and_then(|ip| {
            set.0
                .iter()
                .position(|r| r.contains(ip))
                .map(|idx| (idx, ip))
        });
        match resume {
            Some((range_idx, ip)) => RangeIter {
                set,
                range_idx,
                cur: Some(ip),
                start: None,
                done: set.0.is_empty(),
            },
            None => RangeIter {
                set,
                range_idx: 0,
                cur: None,
                start: set.0.first().map(|r| r.range_start),
                done: set.0.is_empty(),
            },
        }
    }
}

impl<'a> Iterator for RangeIter<'a> {
    /// An address and the range it comes from (for its mask and gateway).
    type Item = (IpAddr, &'a Range);

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let ranges = &self.set.0;
        loop {
            let cur = match self.cur {
                // First step of a fresh iteration: rangeStart is inclusive.
                None => {
                    let start = ranges[self.range_idx].range_start;
                    self.start = Some(start);
                    start
                }
                Some(cur) => {
                    let next = if cur == ranges[self.range_idx].range_end {
                        self.range_idx = (self.range_idx + 1) % ranges.len();
                        ranges[self.range_idx].range_start
                    } else {
                        next_ip(cur)
                    };
                    match self.start {
                        None => self.start = Some(next),
                        // Back where we started: the whole set was visited.
                        Some(start) if start == next => {
                            self.done = true;
                            return None;
                        }
                        Some(_) => {}
                    }
                    next
                }
            };
            self.cur = Some(cur);
            let range = &ranges[self.range_idx];
            if !range.is_reserved_address(cur) {
                return Some((cur, range));
            }
        }
    }
}

fn same_family(a: IpAddr, b: IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

/// The address as a number (IPv4 in the low 32 bits).
pub fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The address `n` of the same family as `like` (truncating for IPv4).
fn from_u128(like: IpAddr, n: u128) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(n as u32)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

/// The next address, wrapping at the end of the family's space.
pub fn next_ip(ip: IpAddr) -> IpAddr {
    from_u128(ip, to_u128(ip).wrapping_add(1))
}

/// The default rangeEnd: broadcast-1 for IPv4, the last address for IPv6.
fn last_ip(subnet: IpNet) -> IpAddr {
    let bcast = subnet.broadcast();
    match bcast {
        IpAddr::V4(_) => from_u128(bcast, to_u128(bcast) - 1),
        IpAddr::V6(_) => bcast,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn range(subnet: &str, start: Option<&str>, end: Option<&str>, gw: Option<&str>) -> Range {
        Range::new(net(subnet), start.map(ip), end.map(ip), gw.map(ip)).unwrap()
    }

    fn set(ranges: Vec<Range>) -> RangeSet {
        RangeSet::new(ranges).unwrap()
    }

    fn walk(set: &RangeSet, last: Option<&str>) -> Vec<String> {
        RangeIter::new(set, last.map(ip))
            .map(|(a, _)| a.to_string())
            .collect()
    }

    #[test]
    fn defaults_like_the_reference() {
        let r = range("10.0.0.0/24", None, None, None);
        assert_eq!(r.range_start, ip("10.0.0.1"));
        assert_eq!(r.range_end, ip("10.0.0.254"));
        assert_eq!(r.gateway, ip("10.0.0.1"));
        assert_eq!(r.to_string(), "10.0.0.1-10.0.0.254");
        let r = range("fd00::/120", None, None, None);
        assert_eq!(r.range_start, ip("fd00::1"));
        assert_eq!(r.range_end, ip("fd00::ff"));
        assert_eq!(r.gateway, ip("fd00::1"));
    }

    #[test]
    fn mapped_addresses_are_canonicalised() {
        let r = range(
            "10.0.0.0/24",
            Some("::ffff:10.0.0.10"),
            Some("::ffff:10.0.0.20"),
            Some("::ffff:10.0.0.254"),
        );
        assert_eq!(r.range_start, ip("10.0.0.10"));
        assert_eq!(r.range_end, ip("10.0.0.20"));
        assert_eq!(r.gateway, ip("10.0.0.254"));
        assert!(r.contains(ip("::ffff:10.0.0.15")));
    }

    #[test]
    fn invalid_ranges() {
        let err = |s: &str, start: Option<&str>, end: Option<&str>, gw: Option<&str>| {
            Range::new(net(s), start.map(ip), end.map(ip), gw.map(ip))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("10.0.0.0/31", None, None, None),
            "network 10.0.0.0/31 too small to allocate from"
        );
        assert!(err("10.0.0.0/32", None, None, None).contains("too small"));
        assert!(err("fd00::/127", None, None, None).contains("too small"));
        assert_eq!(
            err("10.0.0.5/24", None, None, None),
            "network has host bits set. For a subnet mask of length 24 the network address is 10.0.0.0"
        );
        assert!(err("::ffff:10.0.0.0/120", None, None, None).contains("IPv4-mapped"));
        assert_eq!(
            err("10.0.0.0/24", Some("10.1.0.5"), None, None),
            "10.1.0.5 not in network 10.0.0.0/24"
        );
        assert_eq!(
            err("10.0.0.0/24", None, Some("fd00::1"), None),
            "fd00::1 not in network 10.0.0.0/24"
        );
        assert_eq!(
            err("10.0.0.0/24", Some("10.0.0.9"), Some("10.0.0.3"), None),
            "rangeStart 10.0.0.9 is after rangeEnd 10.0.0.3"
        );
        assert!(err("10.0.0.0/24", None, None, Some("fd00::1")).contains("address family"));
        // A gateway outside the subnet is accepted, as by the reference.
        assert_eq!(
            range("10.0.0.0/24", None, None, Some("10.1.0.5")).gateway,
            ip("10.1.0.5")
        );
    }

    #[test]
    fn contains_and_overlaps() {
        let a = range("10.0.0.0/24", Some("10.0.0.10"), Some("10.0.0.20"), None);
        assert!(a.contains(ip("10.0.0.10")));
        assert!(a.contains(ip("10.0.0.20")));
        assert!(!a.contains(ip("10.0.0.9")));
        assert!(!a.contains(ip("10.0.0.21")));
        assert!(!a.contains(ip("fd00::10")));
        let b = range("10.0.0.0/24", Some("10.0.0.21"), Some("10.0.0.30"), None);
        assert!(!a.overlaps(&b));
        let c = range("10.0.0.0/24", Some("10.0.0.15"), Some("10.0.0.30"), None);
        assert!(a.overlaps(&c) && c.overlaps(&a));
        let d = range("10.0.0.0/25", None, None, None);
        assert!(d.overlaps(&a));
        let v6 = range("fd00::/64", None, None, None);
        assert!(!v6.overlaps(&a));
    }

    #[test]
    fn range_set_validation() {
        assert_eq!(RangeSet::new(vec![]).unwrap_err(), RangeSetError::Empty);
        assert_eq!(
            RangeSet::new(vec![
                range("10.0.0.0/24", None, None, None),
                range("fd00::/64", None, None, None)
            ])
            .unwrap_err(),
            RangeSetError::MixedFamilies
        );
        assert_eq!(
            RangeSet::new(vec![
                range("10.0.0.0/24", None, None, None),
                range("10.0.0.0/25", None, None, None)
            ])
            .unwrap_err()
            .to_string(),
            "subnets 10.0.0.1-10.0.0.254 and 10.0.0.1-10.0.0.126 overlap"
        );
        let s = set(vec![
            range("10.0.0.0/24", None, None, None),
            range("10.0.1.0/24", None, None, None),
        ]);
        assert_eq!(s.to_string(), "10.0.0.1-10.0.0.254,10.0.1.1-10.0.1.254");
        assert_eq!(s.range_for(ip("10.0.1.7")).unwrap().gateway, ip("10.0.1.1"));
        assert!(s.range_for(ip("10.0.2.7")).is_none());
    }

    #[test]
    fn fresh_iteration_skips_gateway() {
        let s = set(vec![range("10.0.0.0/28", None, None, None)]);
        let all = walk(&s, None);
        assert_eq!(all.len(), 13);
        assert_eq!(all.first().unwrap(), "10.0.0.2");
        assert_eq!(all.last().unwrap(), "10.0.0.14");
        assert_eq!(s.capacity(), 13);
    }

    #[test]
    fn resumes_after_last_reserved_and_wraps() {
        let s = set(vec![range("10.0.0.0/29", None, None, None)]);
        assert_eq!(
            walk(&s, Some("10.0.0.4")),
            ["10.0.0.5", "10.0.0.6", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
        );
        // A last address outside the set restarts from rangeStart.
        assert_eq!(walk(&s, Some("10.9.0.4")).first().unwrap(), "10.0.0.2");
        // The last address of the set: next is the first one.
        assert_eq!(walk(&s, Some("10.0.0.6")).first().unwrap(), "10.0.0.2");
    }

    #[test]
    fn iterates_across_ranges_of_a_set() {
        let s = set(vec![
            range("10.0.0.0/29", None, None, None),
            range("10.0.1.0/29", Some("10.0.1.4"), None, Some("10.0.1.5")),
        ]);
        assert_eq!(
            walk(&s, None),
            ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6", "10.0.1.4", "10.0.1.6"]
        );
        assert_eq!(
            walk(&s, Some("10.0.1.4")),
            ["10.0.1.6", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6", "10.0.1.4"]
        );
        assert_eq!(s.capacity(), 7);
    }

    #[test]
    fn network_and_broadcast_are_never_handed_out() {
        let r = range(
            "10.5.0.0/29",
            Some("10.5.0.0"),
            Some("10.5.0.7"),
            Some("10.5.0.6"),
        );
        let s = set(vec![r]);
        assert_eq!(
            walk(&s, None),
            ["10.5.0.1", "10.5.0.2", "10.5.0.3", "10.5.0.4", "10.5.0.5"]
        );
        assert_eq!(s.capacity(), 5);
        // IPv6 has no broadcast: the last address is usable.
        let s6 = set(vec![range("fd00::/126", Some("fd00::"), None, None)]);
        assert_eq!(walk(&s6, None), ["fd00::2", "fd00::3"]);
        assert_eq!(s6.capacity(), 2);
    }

    #[test]
    fn single_address_ranges() {
        // Only the gateway: nothing to hand out, and no endless loop.
        let s = set(vec![range(
            "10.0.0.0/24",
            Some("10.0.0.1"),
            Some("10.0.0.1"),
            None,
        )]);
        assert!(walk(&s, None).is_empty());
        assert!(walk(&s, Some("10.0.0.1")).is_empty());
        assert_eq!(s.capacity(), 0);
        let s = set(vec![range(
            "10.0.0.0/24",
            Some("10.0.0.9"),
            Some("10.0.0.9"),
            None,
        )]);
        assert_eq!(walk(&s, None), ["10.0.0.9"]);
        assert_eq!(walk(&s, Some("10.0.0.9")), ["10.0.0.9"]);
    }

    #[test]
    fn huge_ipv6_capacity_saturates() {
        let s = set(vec![range("fd00::/64", None, None, None)]);
        assert_eq!(s.capacity(), (1u128 << 64) - 2);
        let mut it = RangeIter::new(&s, Some(ip("fd00::ffff:ffff:ffff:ffff")));
        assert_eq!(it.next().unwrap().0, ip("fd00::2"));
    }
}
