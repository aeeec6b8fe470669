//! The firewall's rule compiler: one direction's ordered first-match
//! rules into the two LPM tries the datapath reads (FW_CIDRS, FW_PORTS;
//! cni-ebpf `policy.rs`), so the cost per new connection does not depend on
//! the number of rules. Compilation is deterministic: revoking an
//! attachment recompiles its recorded rules and removes exactly the keys
//! they produce, so the record (which lists the rules) determines every map
//! entry.
use std::net::IpAddr;

use cni_ebpf_common::{fw, FwCidrKey, FwPortKey, FwRegion, FwVerdict, FAMILY_V4, FAMILY_V6};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::model::{Rule, RuleSet};

/// Why a rule set cannot be compiled.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("{count} rules, more than the limit of {max} per direction")]
    TooManyRules { count: usize, max: usize },
    #[error("the rules compile to {count} datapath entries, more than the limit of {max} per direction (use fewer port ranges or fewer nested CIDRs)")]
    TooManyEntries { count: usize, max: usize },
}

/// Compiled entries of one direction are capped so that one attachment
/// cannot fill the shared tries.
pub const MAX_COMPILED_ENTRIES: usize = 65536;

/// Bits of the trie keys that are always matched (ifindex, dir, ...).
pub(crate) const KEY_FIXED_BITS: u32 = 64;

/// The map entries one direction of one attachment compiles to: (LPM
/// prefix length, key data, value).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub cidrs: Vec<(u32, FwCidrKey, FwRegion)>,
    pub ports: Vec<(u32, FwPortKey, FwVerdict)>,
}

fn verdict(rule: Option<(usize, &Rule)>) -> FwVerdict {
    match rule {
        Some((i, r)) => FwVerdict {
            rule: i as u16,
            action: r.action.code(),
            _pad: 0,
        },
        None => FwVerdict {
            rule: fw::RULE_DEFAULT,
            action: fw::ACTION_NONE,
            _pad: 0,
        },
    }
}

/// First-match resolution of port ranges: the disjoint intervals of
/// 0..=65535 that some rule claims, each with the first rule that does.
fn resolve_ports<'a>(
    rules: impl Iterator<Item = (usize, &'a Rule)>,
) -> Vec<(u32, u32, usize, &'a Rule)> {
    let mut free: Vec<(u32, u32)> = vec![(0, 65535)];
    let mut out = Vec::new();
    for (i, r) in rules {
        if free.is_empty() {
            break;
        }
        let (a, b) = r
            .ports
            .map_or((0, 65535), |p| (u32::from(p.from), u32::from(p.to)));
        let mut next = Vec::with_capacity(free.len() + 1);
        for &(lo, hi) in &free {
            if hi < a || lo > b {
                next.push((lo, hi));
                continue;
            }
            let (s, e) = (lo.max(a), hi.min(b));
            out.push((s, e, i, r));
            if lo < s {
                next.push((lo, s - 1));
            }
            if e < hi {
                next.push((e + 1, hi));
            }
        }
        free = next;
    }
    out.sort_by_key(|x| x.0);
    out
}

/// The prefixes (value, prefix length over 16 bits) covering `lo..=hi`.
fn port_prefixes(mut lo: u32, hi: u32) -> Vec<(u16, u32)> {
    let mut v = Vec::new();
    while lo <= hi {
        let mut size = 1u32;
        while size < 65536 && lo.is_multiple_of(size * 2) && lo + size * 2 - 1 <= hi {
            size *= 2;
        }
        v.push((lo as u16, 16 - size.trailing_zeros()));
        lo += size;
    }
    v
}

/// Compiles one direction's ordered rules for the attachment `ifindex`.
///
/// Every distinct rule CIDR (plus 0.0.0.0/0) becomes a *region* in
/// FW_CIDRS. Prefixes are either nested or disjoint, so for an address
/// whose longest match is region P, the rules whose CIDR matches the
/// address are exactly those whose CIDR contains P: the region's rules are
/// fixed. For each region the first-match decision is resolved here, per
/// protocol: ICMP and other protocols get one verdict in the region entry,
/// TCP and UDP get disjoint port intervals, each expanded into prefixes in
/// FW_PORTS. Ports nobody claims are absent and mean "default".
pub fn compile(ifindex: u32, dir: u8, set: &RuleSet) -> Result<Compiled, CompileError> {
    if set.rules.len() > fw::MAX_RULES {
        return Err(CompileError::TooManyRules {
            count: set.rules.len(),
            max: fw::MAX_RULES,
        });
    }
    let mut out = Compiled::default();
    if set.rules.is_empty() {
        return Ok(out);
    }
    // Regions of both families share one numbering (FW_PORTS keys carry
    // the region, not the family). A family no rule applies to gets no
    // region: its lookups miss and the default applies, as it would.
    let mut region = 0u16;
    for v6 in [false, true] {
        let rules: Vec<(usize, IpNet, &Rule)> = set
            .rules
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.net_of_family(v6).map(|n| (i, n, r)))
            .collect();
        if rules.is_empty() {
            continue;
        }
        let mut nets: Vec<IpNet> = rules.iter().map(|(_, n, _)| *n).collect();
        nets.push(if v6 {
            IpNet::V6(Ipv6Net::default())
        } else {
            IpNet::V4(Ipv4Net::default())
        });
        nets.sort();
        nets.dedup();
        for p in &nets {
            compile_region(ifindex, dir, region, p, &rules, &mut out)?;
            region += 1;
        }
    }
    Ok(out)
}

/// Compiles the region of prefix `p` (number `region`) from the rules of
/// its family.
fn compile_region(
    ifindex: u32,
    dir: u8,
    region: u16,
    p: &IpNet,
    rules: &[(usize, IpNet, &Rule)],
    out: &mut Compiled,
) -> Result<(), CompileError> {
    {
        let applicable: Vec<(usize, &Rule)> = rules
            .iter()
            .filter(|(_, n, _)| n.contains(p))
            .map(|(i, _, r)| (*i, *r))
            .collect();
        let first = |proto: u8| {
            applicable
                .iter()
                .find(|(_, r)| r.matches_proto(proto) && r.ports.is_none())
                .map(|(i, r)| (*i, *r))
        };
        let value = FwRegion {
            region,
            _pad: 0,
            icmp: verdict(first(1)),
            // 0: a protocol no rule names (anything but TCP/UDP/ICMP).
            other: verdict(first(0)),
        };
        let (family, addr) = match p.network() {
            IpAddr::V4(a) => (FAMILY_V4, [u32::from_ne_bytes(a.octets()), 0, 0, 0]),
            IpAddr::V6(a) => {
                let o = a.octets();
                let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                (FAMILY_V6, [w(0), w(4), w(8), w(12)])
            }
        };
        out.cidrs.push((
            KEY_FIXED_BITS + u32::from(p.prefix_len()),
            FwCidrKey {
                ifindex,
                dir,
                family,
                _pad: [0; 2],
                addr,
            },
            value,
        ));
        for proto in [6u8, 17] {
            let claimed = resolve_ports(
                applicable
                    .iter()
                    .copied()
                    .filter(|(_, r)| r.matches_proto(proto)),
            );
            for (lo, hi, i, r) in claimed {
                for (port, bits) in port_prefixes(lo, hi) {
                    out.ports.push((
                        KEY_FIXED_BITS + bits,
                        FwPortKey {
                            ifindex,
                            dir,
                            proto,
                            region,
                            port: port.to_be(),
                            _pad: 0,
                        },
                        verdict(Some((i, r))),
                    ));
                }
            }
            if out.ports.len() > MAX_COMPILED_ENTRIES {
                return Err(CompileError::TooManyEntries {
                    count: out.ports.len(),
                    max: MAX_COMPILED_ENTRIES,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::firewall::model::{Action, PortRange, RuleProtocol};

    fn rule(
        action: Action,
        cidr: Option<&str>,
        protocol: RuleProtocol,
        ports: Option<(u16, u16)>,
    ) -> Rule {
        Rule {
            action,
            cidr: cidr.map(|c| c.parse().unwrap()),
            protocol,
            ports: ports.map(|(from, to)| PortRange { from, to }),
        }
    }

    /// Looks a connection up the way the kernel does: longest CIDR match
    /// (of the address's family), then longest port prefix match.
    fn lookup(c: &Compiled, dir: u8, proto: u8, remote: IpAddr, dport: u16) -> Option<(u16, u8)> {
        let region = c
            .cidrs
            .iter()
            .filter(|(_, k, _)| k.dir == dir)
            .filter(|(b, k, _)| {
                let bits = (b - KEY_FIXED_BITS) as u8;
                let words = k.addr.map(u32::from_be);
                let net: IpNet = match remote {
                    IpAddr::V4(_) if k.family == FAMILY_V4 => {
                        Ipv4Net::new(Ipv4Addr::from(words[0]), bits).unwrap().into()
                    }
                    IpAddr::V6(_) if k.family == FAMILY_V6 => {
                        let a = (u128::from(words[0]) << 96)
                            | (u128::from(words[1]) << 64)
                            | (u128::from(words[2]) << 32)
                            | u128::from(words[3]);
                        Ipv6Net::new(std::net::Ipv6Addr::from(a), bits)
                            .unwrap()
                            .into()
                    }
                    _ => return false,
                };
                net.contains(&remote)
            })
            .max_by_key(|(b, _, _)| *b)
            .map(|(_, _, v)| *v)?;
        let v = match proto {
            6 | 17 => c
                .ports
                .iter()
                .filter(|(b, d, _)| {
                    d.dir == dir && d.proto == proto && d.region == region.region && {
                        let bits = b - KEY_FIXED_BITS;
                        let p = u16::from_be(d.port);
                        bits == 0 || (dport >> (16 - bits)) == (p >> (16 - bits))
                    }
                })
                .max_by_key(|(b, _, _)| *b)
                .map(|(_, _, v)| *v)
                .unwrap_or(verdict(None)),
            1 => region.icmp,
            _ => region.other,
        };
        (v.action != fw::ACTION_NONE).then_some((v.rule, v.action))
    }

    /// The reference semantics: the first rule that matches.
    fn first_match(rules: &[Rule], proto: u8, remote: IpAddr, dport: u16) -> Option<(u16, u8)> {
        rules.iter().enumerate().find_map(|(i, r)| {
            let in_net = r
                .net_of_family(remote.is_ipv6())
                .is_some_and(|n| n.contains(&remote));
            let in_ports = match (proto, r.ports) {
                (6 | 17, Some(p)) => (p.from..=p.to).contains(&dport),
                (_, Some(_)) => false,
                (_, None) => true,
            };
            (in_net && r.matches_proto(proto) && in_ports).then_some((i as u16, r.action.code()))
        })
    }

    #[test]
    fn prefixes_cover_ranges_exactly() {
        assert_eq!(port_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(port_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(port_prefixes(1024, 2047), vec![(1024, 6)]);
        for (lo, hi) in [
            (1, 65535),
            (1000, 2000),
            (8000, 8100),
            (65535, 65535),
            (3, 17),
        ] {
            let p = port_prefixes(lo, hi);
            let mut covered: Vec<u32> = p
                .iter()
                .flat_map(|(v, bits)| {
                    let size = 1u32 << (16 - bits);
                    u32::from(*v)..u32::from(*v) + size
                })
                .collect();
            covered.sort();
            assert_eq!(covered, (lo..=hi).collect::<Vec<_>>(), "{lo}-{hi}");
            assert!(p.len() <= 30);
        }
    }

    #[test]
    fn compiled_tries_agree_with_first_match() {
        let rules = vec![
            rule(
                Action::Deny,
                Some("10.1.2.0/24"),
                RuleProtocol::Tcp,
                Some((8000, 8100)),
            ),
            rule(
                Action::Allow,
                Some("10.1.0.0/16"),
                RuleProtocol::Tcp,
                Some((7000, 9000)),
            ),
            rule(Action::Allow, Some("10.0.0.0/8"), RuleProtocol::Udp, None),
            rule(Action::Deny, None, RuleProtocol::Icmp, None),
            rule(Action::Allow, Some("10.1.2.3/32"), RuleProtocol::Any, None),
            rule(
                Action::Deny,
                Some("192.168.0.0/16"),
                RuleProtocol::Any,
                Some((1, 1023)),
            ),
            rule(
                Action::Allow,
                Some("0.0.0.0/0"),
                RuleProtocol::Tcp,
                Some((443, 443)),
            ),
        ];
        let set = RuleSet {
            default: Action::Deny,
            rules: rules.clone(),
        };
        let c = compile(7, fw::DIR_INGRESS, &set).unwrap();
        let addrs = [
            "10.1.2.3",
            "10.1.2.4",
            "10.1.9.9",
            "10.9.9.9",
            "192.168.1.1",
            "8.8.8.8",
        ];
        let ports = [
            0u16, 1, 80, 443, 1023, 1024, 6999, 7000, 7999, 8000, 8050, 8100, 8101, 9000, 9001,
            65535,
        ];
        for a in addrs {
            let a: IpAddr = a.parse().unwrap();
            for proto in [1u8, 6, 17, 47] {
                for &p in &ports {
                    assert_eq!(
                        lookup(&c, fw::DIR_INGRESS, proto, a, p),
                        first_match(&rules, proto, a, p),
                        "{a} proto {proto} port {p}"
                    );
                }
            }
        }
        // Keys are per attachment and direction.
        assert!(c
            .cidrs
            .iter()
            .all(|(_, k, _)| k.ifindex == 7 && k.dir == fw::DIR_INGRESS));
    }

    /// Random rule sets (nested and overlapping CIDRs, port ranges, every
    /// protocol) against random connections: the tries always give the
    /// first match.
    #[test]
    fn random_rule_sets_agree_with_first_match() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move |n: u32| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % u64::from(n)) as u32
        };
        let protos = [
            RuleProtocol::Any,
            RuleProtocol::Tcp,
            RuleProtocol::Udp,
            RuleProtocol::Icmp,
        ];
        for _ in 0..40 {
            let rules: Vec<Rule> = (0..rnd(40))
                .map(|_| {
                    let protocol = protos[rnd(4) as usize];
                    let len = [0, 8, 16, 24, 28, 32][rnd(6) as usize];
                    let addr = Ipv4Addr::new(10, rnd(3) as u8, rnd(3) as u8, rnd(8) as u8);
                    let cidr = (rnd(5) != 0).then(|| format!("{addr}/{len}"));
                    let ports = (protocol != RuleProtocol::Icmp && rnd(3) != 0).then(|| {
                        let a = rnd(40) as u16 + 1;
                        (a, a + rnd(20) as u16)
                    });
                    let action = if rnd(2) == 0 {
                        Action::Allow
                    } else {
                        Action::Deny
                    };
                    rule(action, cidr.as_deref(), protocol, ports)
                })
                .collect();
            let set = RuleSet {
                default: Action::Allow,
                rules: rules.clone(),
            };
            let c = compile(1, fw::DIR_EGRESS, &set).unwrap();
            for _ in 0..300 {
                let a = IpAddr::V4(Ipv4Addr::new(10, rnd(3) as u8, rnd(3) as u8, rnd(8) as u8));
                let proto = [1u8, 6, 17, 47][rnd(4) as usize];
                let port = rnd(64) as u16;
                assert_eq!(
                    lookup(&c, fw::DIR_EGRESS, proto, a, port),
                    first_match(&rules, proto, a, port),
                    "{a} proto {proto} port {port} rules {rules:?}"
                );
            }
        }
    }

    #[test]
    fn no_rules_compile_to_nothing_and_caps_hold() {
        assert_eq!(
            compile(1, fw::DIR_EGRESS, &RuleSet::default()).unwrap(),
            Compiled::default()
        );
        let many = RuleSet {
            default: Action::Allow,
            rules: vec![
                rule(Action::Deny, None, RuleProtocol::Tcp, Some((1, 1)));
                fw::MAX_RULES + 1
            ],
        };
        assert!(matches!(
            compile(1, fw::DIR_EGRESS, &many),
            Err(CompileError::TooManyRules { .. })
        ));
    }

    #[test]
    fn a_thousand_rules_compile_small() {
        let rules: Vec<Rule> = (0..1000u32)
            .map(|i| {
                let a = Ipv4Addr::from(0x0a00_0000 + i * 256);
                rule(
                    Action::Deny,
                    Some(&format!("{a}/24")),
                    RuleProtocol::Tcp,
                    Some((9000, 9000)),
                )
            })
            .collect();
        let set = RuleSet {
            default: Action::Allow,
            rules,
        };
        let c = compile(3, fw::DIR_EGRESS, &set).unwrap();
        assert_eq!(c.cidrs.len(), 1001);
        assert_eq!(c.ports.len(), 1000);
    }

    /// Rules of both families in one list: each address meets only the
    /// rules of its family and those without a CIDR, in order.
    #[test]
    fn dual_stack_rules_agree_with_first_match() {
        let rules = vec![
            rule(
                Action::Deny,
                Some("fd00:198:18::/48"),
                RuleProtocol::Tcp,
                Some((80, 80)),
            ),
            rule(Action::Allow, Some("10.0.0.0/8"), RuleProtocol::Tcp, None),
            rule(
                Action::Allow,
                Some("fd00:198:18:1::/64"),
                RuleProtocol::Any,
                None,
            ),
            rule(Action::Deny, None, RuleProtocol::Icmp, None),
            rule(
                Action::Allow,
                Some("fd00::/8"),
                RuleProtocol::Udp,
                Some((53, 53)),
            ),
            rule(
                Action::Deny,
                Some("2001:db8::1/128"),
                RuleProtocol::Any,
                None,
            ),
            rule(Action::Allow, None, RuleProtocol::Tcp, Some((443, 443))),
        ];
        let set = RuleSet {
            default: Action::Deny,
            rules: rules.clone(),
        };
        let c = compile(5, fw::DIR_EGRESS, &set).unwrap();
        let addrs = [
            "10.1.2.3",
            "192.0.2.1",
            "fd00:198:18::1",
            "fd00:198:18:1::5",
            "fd00:1::1",
            "2001:db8::1",
            "2001:db8::2",
            "::ffff:10.1.2.3",
        ];
        for a in addrs {
            let a: IpAddr = a.parse().unwrap();
            for proto in [1u8, 6, 17, 47] {
                for p in [53u16, 80, 443, 8080] {
                    assert_eq!(
                        lookup(&c, fw::DIR_EGRESS, proto, a, p),
                        first_match(&rules, proto, a, p),
                        "{a} proto {proto} port {p}"
                    );
                }
            }
        }
        // Regions are numbered across families: no two share a number.
        let mut regions: Vec<u16> = c.cidrs.iter().map(|(_, _, v)| v.region).collect();
        regions.sort();
        regions.dedup();
        assert_eq!(regions.len(), c.cidrs.len());
    }
}
