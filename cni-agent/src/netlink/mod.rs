//! Kernel network configuration through rtnetlink: namespaces, links, addresses, routes, sysctls.
//!
//! The plugins are short-lived synchronous processes, so the rtnetlink (async)
//! plumbing is hidden behind [`Netlink`], a blocking handle that owns a tokio
//! current-thread runtime and one netlink socket. The socket belongs to the
//! network namespace of the thread that called [`Netlink::connect`]; to work in
//! a container namespace, connect from inside [`NetNs::run`]. Async callers
//! (the agent) can use [`Netlink::handle`] or the lower-level `rtnetlink` API.
//!
//! Every failure is a [`NetlinkError`], mapped once to a CNI error code below.

mod addr;
pub mod iface;
mod link;
mod netns;
mod route;
pub mod sysctl;
pub mod veth;

use std::future::Future;
use std::io;
use std::path::PathBuf;

use crate::spec::error::{CniError, ErrorCode};

pub use addr::Address;
pub use link::{format_mac, parse_mac, BridgeSpec, Link, LinkCounters, VethSpec};
pub use netns::{NetNs, NetNsTask};
pub use route::{Route, RouteSpec};

/// Everything that can go wrong while configuring the kernel.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("network namespace {path:?} does not exist")]
    NetnsNotFound { path: PathBuf },
    #[error("{path:?} is not a network namespace: {reason}")]
    NotANetns { path: PathBuf, reason: String },
    #[error("cannot open network namespace {path:?}: {source}")]
    NetnsOpen { path: PathBuf, source: io::Error },
    #[error("cannot enter network namespace {path:?}: {source}")]
    Setns { path: PathBuf, source: nix::Error },
    #[error("worker thread for network namespace {path:?} failed: {reason}")]
    Thread { path: PathBuf, reason: String },
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("link {0:?} not found")]
    LinkNotFound(String),
    #[error("{name:?} already exists but is not a bridge (kind {kind})")]
    NotABridge { name: String, kind: String },
    #[error("link {0:?} already exists")]
    LinkExists(String),
    #[error("invalid MAC address {0:?}")]
    InvalidMac(String),
    #[error("{op}: {}", describe(source))]
    Request {
        op: String,
        source: rtnetlink::Error,
    },
    #[error("sysctl {key}: {source}")]
    Sysctl { key: String, source: io::Error },
    #[error("invalid sysctl key {0:?}")]
    InvalidSysctlKey(String),
}

impl NetlinkError {
    /// The kernel's errno for a failed netlink request (positive, e.g.
    /// `libc::EEXIST`), so callers can treat "exists"/"no such device" as the
    /// idempotent outcomes they often are.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Request {
                source: rtnetlink::Error::NetlinkError(msg),
                ..
            } => Some(-msg.raw_code()),
            Self::Sysctl { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// Builds the error for a failed request, naming the operation.
    pub(crate) fn request(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Self {
        let op = op.into();
        move |source| Self::Request { op, source }
    }
}

/// Kernel errors as `strerror` text instead of rtnetlink's debug dump.
fn describe(err: &rtnetlink::Error) -> String {
    match err {
        rtnetlink::Error::NetlinkError(msg) => {
            io::Error::from_raw_os_error(-msg.raw_code()).to_string()
        }
        other => other.to_string(),
    }
}

impl From<NetlinkError> for CniError {
    fn from(err: NetlinkError) -> Self {
        let code = match &err {
            // The runtime asked about a namespace that is gone: the container is
            // unknown (spec: no cleanup needed by the runtime).
            NetlinkError::NetnsNotFound { .. } => ErrorCode::UnknownContainer,
            NetlinkError::NotANetns { .. } => ErrorCode::InvalidEnvironment,
            NetlinkError::InvalidMac(_) => ErrorCode::InvalidNetworkConfig,
            NetlinkError::NetnsOpen { .. } | NetlinkError::Sysctl { .. } => ErrorCode::Io,
            _ if matches!(err.errno(), Some(libc::EBUSY) | Some(libc::EAGAIN)) => {
                ErrorCode::TryAgainLater
            }
            _ => ErrorCode::Internal,
        };
        let msg = match &err {
            NetlinkError::NetnsNotFound { .. } | NetlinkError::NotANetns { .. } => {
                format!("CNI_NETNS: {err}")
            }
            _ => err.to_string(),
        };
        CniError::new(code, msg)
    }
}

/// A blocking rtnetlink connection bound to one network namespace.
///
/// Owns a current-thread tokio runtime: requests are driven by `block_on`, so
/// it must not be used from inside another tokio runtime (use
/// [`Netlink::handle`] there).
pub struct Netlink {
    runtime: tokio::runtime::Runtime,
    handle: rtnetlink::Handle,
}

impl Netlink {
    /// Opens a netlink socket in the calling thread's network namespace.
    ///
    /// The socket asks for strict checking of dump requests
    /// (`NETLINK_GET_STRICT_CHK`, Linux 4.20+), so that the filters a dump
    /// request carries (e.g. the interface index of an address dump) are
    /// applied by the kernel: without it every dump returns the whole
    /// namespace, which on a node with a thousand pods is a thousand veths'
    /// worth of messages per call. On older kernels the option is refused
    /// and the callers' own filtering still gives the same answer.
    pub fn connect() -> Result<Self, NetlinkError> {
        use rtnetlink::sys::AsyncSocket;

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(NetlinkError::Socket)?;
        let handle = runtime.block_on(async {
            let (mut connection, handle, _) =
                rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
            if let Err(e) = connection
                .socket_mut()
                .socket_mut()
                .set_netlink_get_strict_chk(true)
            {
                log::debug!("netlink strict checking unavailable: {e}");
            }
            tokio::spawn(connection);
            Ok::<_, NetlinkError>(handle)
        })?;
        Ok(Self { runtime, handle })
    }

    /// Opens a netlink socket inside `ns` (see [`NetNs::run`]).
    pub fn connect_in(ns: &NetNs) -> Result<Self, NetlinkError> {
        ns.run(Self::connect)?
    }

    /// The underlying rtnetlink handle, for requests this module does not wrap.
    pub fn handle(&self) -> &rtnetlink::Handle {
        &self.handle
    }

    /// Drives `fut` (typically built from [`Netlink::handle`]) to completion.
    pub fn block_on<F: Future>(&self, fut: F) -> F::Output {
        self.runtime.block_on(fut)
    }
}

/// Exercises the module against the real kernel, inside two private network
/// namespaces created with unshare(2): they are never mounted, so they vanish
/// with the test and nothing outside them is touched. Needs root.
#[cfg(test)]
mod kernel_tests {
    use super::*;
    use std::net::IpAddr;

    fn private_netns() -> Option<NetNs> {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
            NetNs::current().ok()
        })
        .join()
        .ok()
        .flatten()
    }

    #[test]
    fn bridge_veth_addresses_routes_sysctls() {
        let (Some(node), Some(pod)) = (private_netns(), private_netns()) else {
            eprintln!("skipped: cannot create network namespaces (not root?)");
            return;
        };
        let host = Netlink::connect_in(&node).unwrap();
        let cont = Netlink::connect_in(&pod).unwrap();

        let br = host
            .ensure_bridge(&BridgeSpec {
                name: "br0".into(),
                mtu: Some(1400),
                promisc: true,
                vlan_filtering: false,
            })
            .unwrap();
        assert!(br.is_bridge() && br.promisc && !br.up);
        assert_eq!(br.mtu, 1400);
        // Existing bridge is reused as is.
        let again = host
            .ensure_bridge(&BridgeSpec {
                name: "br0".into(),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(again.index, br.index);
        host.set_up(br.index).unwrap();

        let mac = parse_mac("02:00:00:00:00:42").unwrap();
        host.create_veth(&VethSpec {
            name: "vethtest0".into(),
            peer_name: "eth0".into(),
            peer_netns: Some(std::os::fd::AsFd::as_fd(&pod)),
            peer_mac: Some(mac),
            mtu: Some(1400),
            tx_queue_len: Some(0),
        })
        .unwrap();
        let veth = host.link_by_name("vethtest0").unwrap();
        assert!(veth.is_veth());
        assert_eq!((veth.mtu, veth.tx_queue_len), (1400, Some(0)));
        assert!(
            host.find_link("eth0").unwrap().is_none(),
            "peer must not be in the node"
        );
        host.set_up(veth.index).unwrap();
        host.set_master(veth.index, br.index).unwrap();
        host.set_hairpin(veth.index, true).unwrap();
        let veth = host.link_by_name("vethtest0").unwrap();
        assert_eq!((veth.master, veth.hairpin), (Some(br.index), Some(true)));

        let eth0 = cont.link_by_name("eth0").unwrap();
        assert_eq!(eth0.mac, mac.to_vec());
        assert_eq!(
            (eth0.peer_index, veth.peer_index),
            (Some(veth.index), Some(eth0.index))
        );

        // A non-bridge link of the bridge's name is refused.
        let err = host
            .ensure_bridge(&BridgeSpec {
                name: "vethtest0".into(),
                ..Default::default()
            })
            .unwrap_err();
        assert!(matches!(err, NetlinkError::NotABridge { .. }), "{err}");

        // Addresses and routes in the pod.
        let addr: ipnet::IpNet = "10.1.0.2/24".parse().unwrap();
        cont.add_address(eth0.index, addr).unwrap();
        assert_eq!(
            cont.add_address(eth0.index, addr).unwrap_err().errno(),
            Some(libc::EEXIST)
        );
        cont.set_up(eth0.index).unwrap();
        assert!(cont
            .addresses(Some(eth0.index))
            .unwrap()
            .iter()
            .any(|a| a.addr == addr));
        let gw: IpAddr = "10.1.0.1".parse().unwrap();
        let default = RouteSpec {
            dst: "0.0.0.0/0".parse().unwrap(),
            gateway: Some(gw),
            oif: Some(eth0.index),
        };
        cont.add_route(&default).unwrap();
        let routes = cont.routes(false).unwrap();
        let r = routes
            .iter()
            .find(|r| r.dst.prefix_len() == 0 && r.is_main_table())
            .unwrap();
        assert_eq!((r.gateway, r.oif), (Some(gw), Some(eth0.index)));
        cont.delete_route(&default).unwrap();
        assert!(!cont
            .routes(false)
            .unwrap()
            .iter()
            .any(|r| r.dst.prefix_len() == 0));
        cont.delete_address(eth0.index, addr).unwrap();
        assert!(!cont
            .addresses(Some(eth0.index))
            .unwrap()
            .iter()
            .any(|a| a.addr == addr));

        // Sysctls follow the thread's namespace.
        pod.run(|| sysctl::write("net/ipv4/conf/eth0/arp_notify", "1"))
            .unwrap()
            .unwrap();
        let in_pod = pod
            .run(|| sysctl::read("net/ipv4/conf/eth0/arp_notify"))
            .unwrap()
            .unwrap();
        assert_eq!(in_pod, "1");
        let in_node = node
            .run(|| sysctl::read("net/ipv4/conf/eth0/arp_notify"))
            .unwrap();
        assert!(
            in_node.is_err(),
            "eth0 must not exist in the node namespace"
        );

        // The netlink way to the same per-interface settings.
        let arp_notify = || {
            pod.run(|| sysctl::read("net/ipv4/conf/eth0/arp_notify"))
                .unwrap()
                .unwrap()
        };
        pod.run(|| sysctl::write("net/ipv4/conf/eth0/arp_notify", "0"))
            .unwrap()
            .unwrap();
        assert_eq!(arp_notify(), "0");
        cont.set_arp_notify(eth0.index).unwrap();
        assert_eq!(arp_notify(), "1");
        if node
            .run(|| sysctl::write("net/ipv6/conf/br0/accept_ra", "2"))
            .unwrap()
            .is_ok()
        {
            assert_eq!(host.link_by_name("br0").unwrap().ipv6_accept_ra, Some(2));
            node.run(|| sysctl::write("net/ipv6/conf/br0/accept_ra", "0"))
                .unwrap()
                .unwrap();
            assert_eq!(host.link_by_name("br0").unwrap().ipv6_accept_ra, Some(0));
        }

        // Address dumps of one link (filtered by the kernel) and of all.
        let all = cont.addresses(None).unwrap();
        let one = cont.addresses(Some(eth0.index)).unwrap();
        assert!(one.iter().all(|a| a.index == eth0.index));
        assert_eq!(
            one,
            all.iter()
                .filter(|a| a.index == eth0.index)
                .cloned()
                .collect::<Vec<_>>()
        );

        // Deleting either end removes the pair; a second delete is a no-op.
        assert!(host.delete_link_by_name("vethtest0").unwrap());
        assert!(!host.delete_link_by_name("vethtest0").unwrap());
        assert!(cont.find_link("eth0").unwrap().is_none());
    }
}
