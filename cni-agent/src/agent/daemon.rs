//! `cni-agent run`: load the datapath once, keep the uplinks attached,
//! expire NAT bindings, and serve the plugins.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use aya::{programs::cgroup_sock_addr::CgroupSockAddr, Ebpf};
use cni_ebpf_common::prog_names;

use super::{health::Health, ops::Paths, server};
use crate::{
    datapath::{
        conntrack::{NatTable, Timeouts},
        links::{
            ensure_cgroup, ifindex_exists, load_and_pin_programs, pinned_ifindexes, remove_links,
            take_over,
        },
        loader::{DatapathError, Hook},
        node::NodeAddrMap,
        pins::{load_pinned, MapSizes, PinLayout},
        policy::PolicyMaps,
        uplink::{attach_uplink, program, HostPortMode, UplinkMap, UPLINK_PROGRAMS},
    },
    netlink::Netlink,
};

/// Everything `cni-agent run` is configured with.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub socket: PathBuf,
    pub paths: Paths,
    /// Uplinks by name; empty = the interfaces of the default routes.
    pub uplinks: Vec<String>,
    /// Source ports handed out by the masquerade (inclusive). The default
    /// sits above Linux's ephemeral range (32768-60999) so node sockets and
    /// translated flows never compete for a port.
    pub nat_ports: (u16, u16),
    pub sizes: MapSizes,
    pub timeouts: Timeouts,
    /// Where hostPort DNAT runs on the uplinks.
    pub hostport_mode: HostPortMode,
    /// cgroup (v2 directory) whose processes reach hostPorts through the
    /// socket hooks; `None`: the cgroup v2 root. Either way only sockets of
    /// the agent's network namespace are rewritten.
    pub cgroup: Option<PathBuf>,
    /// How often uplinks are rescanned and bindings expired.
    pub interval: Duration,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None`: not.
    pub metrics: Option<std::net::SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("netlink: {0}")]
    Netlink(#[from] crate::netlink::NetlinkError),
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("{0}: exiting so that the supervisor restarts the agent")]
    WorkerStopped(String),
}

/// An uplink as discovered: name, index, its IPv4 address and its IPv6
/// address (see [`uplink_v6`]); at least one of the two.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Uplink {
    name: String,
    index: u32,
    addr: Option<Ipv4Addr>,
    addr6: Option<Ipv6Addr>,
}

/// Whether an IPv6 address can be a masquerade source: not link-local
/// (fe80::/10, which cannot leave the link), loopback, unspecified or
/// multicast. Unique local addresses (fc00::/7) are global in scope and
/// allowed, as the kernel's source address selection allows them.
fn is_global_v6(a: &Ipv6Addr) -> bool {
    !(a.is_loopback()
        || a.is_unspecified()
        || a.is_multicast()
        || a.segments()[0] & 0xffc0 == 0xfe80)
}

/// The IPv6 address masqueraded traffic leaves `index` with: a global one
/// that has finished duplicate address detection (a tentative address
/// cannot receive the replies yet; the next scan picks it up once
/// settled), preferring one that is neither deprecated nor a temporary
/// privacy address (those rotate, and bindings would outlive them).
fn uplink_v6(addrs: &[crate::netlink::Address], index: u32) -> Option<Ipv6Addr> {
    use netlink_packet_route::address::AddressFlags;
    addrs
        .iter()
        .filter(|a| a.index == index && !a.is_unsettled())
        .filter_map(|a| match a.addr.addr() {
            IpAddr::V6(v6) if is_global_v6(&v6) => Some((a, v6)),
            _ => None,
        })
        .min_by_key(|(a, _)| {
            (
                a.flags.contains(AddressFlags::Deprecated),
                // IFA_F_SECONDARY is IFA_F_TEMPORARY for IPv6.
                a.flags.contains(AddressFlags::Secondary),
            )
        })
        .map(|(_, v6)| v6)
}

/// What the kernel says now: the uplinks to serve (the configured names, or
/// the interfaces carrying a default route — IPv4 or IPv6 — in the main
/// table, skipping those with neither an IPv4 nor a usable IPv6 address)
/// and every address of the node.
///
/// Links are looked up by name or index, never listed: this runs every
/// second, and a list of the node's links grows by a host veth per pod
/// (about 1.4 KB each in the dump).
fn discover(nl: &Netlink, names: &[String]) -> Result<(Vec<Uplink>, Vec<IpAddr>), AgentError> {
    let links: Vec<(u32, String)> = if names.is_empty() {
        let mut routes = nl.routes(false)?;
        routes.extend(nl.routes(true)?);
        let mut v: Vec<u32> = routes
            .into_iter()
            .filter(|r| r.is_main_table() && r.dst.prefix_len() == 0)
            .filter_map(|r| r.oif)
            .collect();
        v.sort_unstable();
        v.dedup();
        let mut links = Vec::new();
        for index in v {
            if let Some(l) = nl.link_by_index(index)? {
                links.push((l.index, l.name));
            }
        }
        links
    } else {
        let mut links = Vec::new();
        for name in names {
            if let Some(l) = nl.find_link(name)? {
                links.push((l.index, l.name));
            }
        }
        links
    };
    let addrs = nl.addresses(None)?;
    let uplinks = links
        .into_iter()
        .filter_map(|(index, name)| {
            let addr = addrs.iter().find_map(|a| match a.addr.addr() {
                IpAddr::V4(v4) if a.index == index => Some(v4),
                _ => None,
            });
            let addr6 = uplink_v6(&addrs, index);
            if addr.is_none() && addr6.is_none() {
                return None;
            }
            Some(Uplink {
                name,
                index,
                addr,
                addr6,
            })
        })
        .collect();
    Ok((uplinks, addrs.into_iter().map(|a| a.addr.addr()).collect()))
}

/// Keeps programs attached to the current uplinks, UPLINKS and NODE_ADDRS
/// in step with the kernel, and drops links of bridges that are gone.
struct Manager {
    ebpf: Ebpf,
    layout: PinLayout,
    uplink_map: UplinkMap,
    node_addrs: NodeAddrMap,
    ports: (u16, u16),
    mode: HostPortMode,
    names: Vec<String>,
    /// ifindex -> uplink, as last applied by this process.
    current: BTreeMap<u32, Uplink>,
}

impl Manager {
    fn sync(&mut self, nl: &Netlink) -> Result<(), AgentError> {
        let (found, addrs) = discover(nl, &self.names)?;
        self.node_addrs.sync(&addrs)?;
        for up in &found {
            if self.current.get(&up.index) == Some(up) {
                continue;
            }
            self.uplink_map
                .set(up.index, up.addr, up.addr6, self.ports)?;
            let attached =
                attach_uplink(&mut self.ebpf, &self.layout, self.mode, &up.name, up.index)?;
            let show = |a: Option<String>| a.unwrap_or_else(|| "-".into());
            log::info!(
                "uplink {} (ifindex {}, {}, {}): {}",
                up.name,
                up.index,
                show(up.addr.map(|a| a.to_string())),
                show(up.addr6.map(|a| a.to_string())),
                if attached.is_empty() {
                    "programs already attached".to_string()
                } else {
                    format!("attached {}", attached.join(", "))
                }
            );
            self.current.insert(up.index, up.clone());
        }
        // Uplinks that went away (or pins of a previous run that are not
        // uplinks any more).
        let keep: Vec<u32> = found.iter().map(|u| u.index).collect();
        let mut uplink_progs: Vec<&str> = UPLINK_PROGRAMS.iter().map(|(n, _)| *n).collect();
        uplink_progs.push(prog_names::HOSTPORT_XDP);
        for index in pinned_ifindexes(&self.layout, &uplink_progs) {
            if !keep.contains(&index) {
                remove_links(&self.layout, &index.to_string(), &uplink_progs);
                self.uplink_map.remove(index);
                self.current.remove(&index);
                log::info!("uplink ifindex {index} gone: programs detached");
            }
        }
        for (index, _, _) in self.uplink_map.list() {
            if !keep.contains(&index) {
                self.uplink_map.remove(index);
            }
        }
        // Links of devices that are gone (a bridge deleted, a pod's veth
        // gone with its netns): the kernel destroyed them, drop the pins.
        for index in pinned_ifindexes(&self.layout, &[]) {
            if !ifindex_exists(index) {
                remove_links(&self.layout, &index.to_string(), &[]);
                log::info!("ifindex {index} gone: its links unpinned");
            }
        }
        Ok(())
    }
}

/// Attaches the socket hooks for node-local hostPort clients.
fn attach_cgroup(
    ebpf: &mut Ebpf,
    layout: &PinLayout,
    cgroup: &std::path::Path,
) -> Result<(), DatapathError> {
    for (name, hook) in [
        (prog_names::HOSTPORT_CONNECT4, Hook::Connect4),
        (prog_names::HOSTPORT_SENDMSG4, Hook::Sendmsg4),
        (prog_names::HOSTPORT_RECVMSG4, Hook::Recvmsg4),
        (prog_names::HOSTPORT_GETPEERNAME4, Hook::Getpeername4),
        (prog_names::HOSTPORT_CONNECT6, Hook::Connect6),
        (prog_names::HOSTPORT_SENDMSG6, Hook::Sendmsg6),
        (prog_names::HOSTPORT_RECVMSG6, Hook::Recvmsg6),
        (prog_names::HOSTPORT_GETPEERNAME6, Hook::Getpeername6),
    ] {
        let prog: &mut CgroupSockAddr = program(ebpf, name)?;
        if ensure_cgroup(prog, layout, name, hook, cgroup)? {
            log::info!("cgroup {}: {name} attached", cgroup.display());
        }
    }
    Ok(())
}

/// Paces the NAT sweeper. The agent reads the tables with one syscall per
/// key and one per value (aya has no batch reads), so a sweep of a node
/// that opens thousands of connections a second walks tens of thousands of
/// bindings, and its CPU grows with the table, taken from the pods if it
/// ran every scan interval. The next sweep waits until the last one is at most
/// `1 / SWEEP_DUTY` of the time since, never longer than `SWEEP_MAX_GAP`.
/// A small table sweeps in microseconds and keeps the scan interval; the
/// datapath takes over closed bindings' ports itself, so a later sweep
/// costs memory, never a connection.
#[derive(Default)]
struct Sweep {
    next: Option<Instant>,
}

/// The sweeper's share of one CPU is at most 1 / SWEEP_DUTY.
const SWEEP_DUTY: u32 = 20;
/// A binding outlives its timeout by at most this much (plus one sweep).
const SWEEP_MAX_GAP: Duration = Duration::from_secs(30);

impl Sweep {
    fn run(&mut self, interval: Duration, sweep: impl FnOnce()) {
        let start = Instant::now();
        if self.next.is_some_and(|next| start < next) {
            return;
        }
        sweep();
        let took = start.elapsed();
        let gap = (took * SWEEP_DUTY).clamp(interval, SWEEP_MAX_GAP.max(interval));
        if gap > interval {
            log::debug!(
                "NAT sweep took {} ms; next in {} s",
                took.as_millis(),
                gap.as_secs()
            );
        }
        self.next = Some(start + gap);
    }
}

/// Logs masquerade packets dropped for want of a free source port: the
/// datapath only counts them (`cni-agent status` shows the counter), the
/// agent says so once per scan interval when the count grew.
#[derive(Default)]
struct PortExhaustion {
    seen: Option<u64>,
}

impl PortExhaustion {
    fn report(&mut self, layout: &PinLayout) {
        let Ok(stats) = crate::datapath::pins::read_stats(layout) else {
            return;
        };
        let name = cni_ebpf_common::stat::NAMES
            .iter()
            .find(|(i, _)| *i == cni_ebpf_common::stat::SNAT_NO_PORT)
            .map(|(_, n)| *n);
        let Some(now) = stats
            .iter()
            .find(|(n, _)| Some(*n) == name)
            .map(|(_, v)| *v)
        else {
            return;
        };
        if let Some(before) = self.seen.filter(|b| now > *b) {
            log::warn!(
                "masquerade: {} packets dropped since the last check: no free source port \
                 (widen --nat-ports, or fewer connections to the same remote endpoint)",
                now - before
            );
        }
        self.seen = Some(now);
    }
}

/// Runs the agent until SIGINT/SIGTERM. The datapath stays attached after
/// exit (pinned); only the socket goes.
pub fn run(cfg: AgentConfig) -> Result<(), AgentError> {
    let layout = cfg.paths.layout();
    let mut ebpf = load_pinned(&layout, cfg.sizes)?;
    // Owns the log ring buffer's fd: it must outlive the program loads
    // below, and is drained by the worker thread into our log.
    let mut ebpf_log = match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(l) => Some(l),
        Err(e) => {
            log::warn!("eBPF log messages unavailable: {e}");
            None
        }
    };
    load_and_pin_programs(&mut ebpf, &layout)?;
    let taken = take_over(&ebpf, &layout);
    log::info!(
        "datapath loaded, maps pinned under {}; {taken} pinned links now run this build's programs",
        layout.maps_dir().display()
    );
    // The socket hooks: at the cgroup v2 root unless told otherwise, acting
    // only on sockets of this namespace.
    let cookie = crate::datapath::cgroup::claim_netns(&layout)?;
    let cgroup = match &cfg.cgroup {
        Some(cg) => cg.clone(),
        None => crate::datapath::cgroup::cgroup2_root(&cfg.paths.state_dir.join("cgroupv2"))?,
    };
    attach_cgroup(&mut ebpf, &layout, &cgroup)?;
    log::info!(
        "node-local hostPort clients: socket hooks on cgroup {} for netns cookie {cookie}",
        cgroup.display()
    );
    let stop = Arc::new(AtomicBool::new(false));

    let nl = Netlink::connect()?;
    let mut mgr = Manager {
        ebpf,
        uplink_map: UplinkMap::open(&layout)?,
        node_addrs: NodeAddrMap::open(&layout)?,
        layout: layout.clone(),
        ports: cfg.nat_ports,
        mode: cfg.hostport_mode,
        names: cfg.uplinks.clone(),
        current: BTreeMap::new(),
    };
    mgr.sync(&nl)?;
    if mgr.current.is_empty() {
        log::warn!(
            "no uplink found yet (no default route through an interface with an address); will keep looking"
        );
    }
    drop(nl);

    let health = Health::new(cfg.interval);
    health.beat();
    let worker = {
        let stop = stop.clone();
        let interval = cfg.interval;
        let timeouts = cfg.timeouts;
        let health = health.clone();
        thread::Builder::new()
            .name("datapath".into())
            .spawn(move || {
                // Marks the worker stopped however this thread ends.
                let _alive = health.worker_guard();
                let nl = match Netlink::connect() {
                    Ok(nl) => nl,
                    Err(e) => {
                        log::error!("netlink: {e}");
                        return;
                    }
                };
                let mut nat = NatTable::open(&layout).ok();
                let mut policy = PolicyMaps::open(&layout).ok();
                let mut no_port = PortExhaustion::default();
                let mut sweep = Sweep::default();
                while !stop.load(Ordering::Relaxed) {
                    // Woken early by `unpark` when the agent stops.
                    thread::park_timeout(interval);
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Some(l) = ebpf_log.as_mut() {
                        l.flush();
                    }
                    if let Err(e) = mgr.sync(&nl) {
                        log::warn!("uplink scan: {e}");
                    }
                    no_port.report(&layout);
                    sweep.run(interval, || {
                        if let Some(nat) = nat.as_mut() {
                            match nat.expire(&timeouts) {
                                Ok(0) => {}
                                Ok(n) => log::debug!("expired {n} NAT bindings"),
                                Err(e) => log::warn!("NAT expiry: {e}"),
                            }
                        }
                        if let Some(policy) = policy.as_mut() {
                            match policy.sweep() {
                                Ok(0) => {}
                                Ok(n) => log::debug!("swept {n} connections of removed firewalls"),
                                Err(e) => log::warn!("firewall connection sweep: {e}"),
                            }
                        }
                    });
                    crate::crash::panic_point("datapath-worker");
                    health.beat();
                }
                // Dropping `mgr` closes our fds; the pinned links stay.
            })
            .map_err(AgentError::Runtime)?
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    let res = rt.block_on(async {
        if let Some(addr) = cfg.metrics {
            tokio::spawn(super::http::run(addr, cfg.paths.clone(), health.clone()));
        }
        server::serve(cfg.socket.clone(), cfg.paths.clone(), health).await
    });
    stop.store(true, Ordering::Relaxed);
    worker.thread().unpark();
    let _ = worker.join();
    log::info!("agent stopped; datapath left attached");
    res
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::address::AddressFlags;

    use super::*;
    use crate::netlink::Address;

    fn addr(index: u32, a: &str, flags: AddressFlags) -> Address {
        Address {
            index,
            addr: a.parse().expect("test address"),
            flags,
        }
    }

    #[test]
    fn uplink_v6_takes_a_settled_global_address() {
        let none = AddressFlags::empty();
        let addrs = vec![
            addr(2, "fe80::1/64", none),
            addr(2, "2001:db8::9/64", AddressFlags::Tentative),
            addr(2, "2001:db8::8/64", AddressFlags::Dadfailed),
            addr(3, "2001:db8:3::1/64", none),
            addr(2, "198.18.0.1/24", none),
        ];
        assert_eq!(uplink_v6(&addrs, 2), None, "link-local or unsettled only");
        let mut addrs = addrs;
        addrs.push(addr(2, "fd00:198:18::1/64", none));
        assert_eq!(
            uplink_v6(&addrs, 2),
            Some("fd00:198:18::1".parse().unwrap()),
            "a unique local address is global in scope"
        );
        assert_eq!(uplink_v6(&addrs, 3), Some("2001:db8:3::1".parse().unwrap()));
    }

    #[test]
    fn uplink_v6_prefers_stable_addresses() {
        let addrs = vec![
            addr(2, "2001:db8::1/64", AddressFlags::Deprecated),
            addr(2, "2001:db8::2/64", AddressFlags::Secondary),
            addr(2, "2001:db8::3/64", AddressFlags::Permanent),
            addr(2, "2001:db8::4/64", AddressFlags::empty()),
        ];
        assert_eq!(
            uplink_v6(&addrs, 2),
            Some("2001:db8::3".parse().unwrap()),
            "neither deprecated nor temporary, first such"
        );
        assert_eq!(
            uplink_v6(&addrs[..2], 2),
            Some("2001:db8::2".parse().unwrap()),
            "a temporary address before a deprecated one"
        );
    }
}
