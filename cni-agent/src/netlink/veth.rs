//! Veth plumbing of the bridge plugin: the host end's name, waiting for the
//! bridge port to come up, and a deletion that lets the rest of a DEL
//! overlap the kernel's grace period.
use std::time::{Duration, Instant};

use super::{Link, NetNs, Netlink, NetlinkError};
use crate::spec::{CniError, ErrorCode};

/// Sleeps of a polling loop: short at first, since what is waited for
/// (a link's operstate, its removal) usually follows within a millisecond,
/// then longer, so a long wait does not spin.
pub(crate) struct Backoff(Duration);

impl Backoff {
    const FIRST: Duration = Duration::from_micros(100);
    const MAX: Duration = Duration::from_millis(10);

    pub(crate) fn new() -> Self {
        Self(Self::FIRST)
    }

    pub(crate) fn sleep(&mut self) {
        std::thread::sleep(self.0);
        self.0 = (self.0 * 2).min(Self::MAX);
    }
}

/// "veth" + 8 random hex digits, like the reference (NetworkManager ignores
/// devices named veth*).
pub(crate) fn random_veth_name() -> Result<String, CniError> {
    use std::io::Read;
    let mut bytes = [0u8; 4];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| {
            CniError::new(
                ErrorCode::Io,
                format!("failed to generate random veth name: {e}"),
            )
        })?;
    Ok(format!(
        "veth{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

/// How long the host veth may take to become operationally up: the sum of
/// the reference's retry schedule (0, 50, 500, 1000, 1000 ms).
const PORT_UP_TIMEOUT: Duration = Duration::from_millis(2550);

/// Waits for the host veth to become operationally up (the bridge port
/// leaves the disabled state). The kernel's link watcher usually gets there
/// within a millisecond of the peer coming up, so this polls closely at
/// first (see [`Backoff`]) rather than sleeping 50 ms after the first miss
/// as the reference does; it gives up after the reference's total wait.
pub(crate) fn wait_port_up(host: &Netlink, name: &str) -> Result<Link, CniError> {
    let deadline = Instant::now() + PORT_UP_TIMEOUT;
    let mut pause = Backoff::new();
    loop {
        let link = host.link_by_name(name)?;
        if link.oper_up {
            return Ok(link);
        }
        if Instant::now() >= deadline {
            let state = if link.up { "down (no carrier)" } else { "down" };
            return Err(CniError::internal(format!(
                "bridge port in error state: {state}"
            )));
        }
        pause.sleep();
    }
}

/// Deletes `link` (in `netns`, reached through `cont`) and then runs `next`,
/// as soon as the link has left the namespace rather than when the deletion
/// request returns.
///
/// Deleting a device is quick up to its removal from the namespace; then
/// the kernel waits for an RCU grace period (`rcu_barrier` in
/// `netdev_run_todo`, after RTNL is released) before acknowledging, which
/// is 10-20 ms of nothing to do. So the request runs on its own thread in
/// the namespace, this thread polls until the link is gone (or the request
/// finished, e.g. with an error), and `next` (IPAM and datapath release)
/// overlaps the grace period. The order the reference keeps is kept: the
/// address is released only once the interface is gone, and not at all if
/// the deletion fails.
pub(crate) fn delete_link_then(
    netns: &NetNs,
    cont: &Netlink,
    link: &Link,
    next: impl FnOnce() -> Result<(), CniError>,
) -> Result<(), CniError> {
    let fail =
        |e: NetlinkError| CniError::from(e).context(format!("failed to delete {:?}", link.name));
    let index = link.index;
    std::thread::scope(|scope| {
        let deletion = netns
            .spawn_scoped(scope, move || {
                match Netlink::connect().and_then(|nl| nl.delete_link(index)) {
                    // Deleted meanwhile by someone else: just as good.
                    Err(e) if e.errno() == Some(libc::ENODEV) => Ok(()),
                    other => other,
                }
            })
            .map_err(fail)?;
        let mut pause = Backoff::new();
        let gone_early = loop {
            if deletion.is_finished() {
                break false;
            }
            match cont.link_by_index(index) {
                Ok(None) => break true,
                Ok(Some(_)) => pause.sleep(),
                // Cannot tell: wait for the request's own answer.
                Err(_) => break false,
            }
        };
        // The rest of the teardown runs whether or not the link went.
        if !gone_early {
            let deleted = deletion.join().and_then(|r| r).map_err(fail);
            return deleted.and(next());
        }
        let outcome = next();
        let deleted = deletion.join().and_then(|r| r).map_err(fail);
        deleted.and(outcome)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_look_like_the_reference() {
        let n = random_veth_name().unwrap();
        assert_eq!(n.len(), 12);
        assert!(n.starts_with("veth") && n[4..].chars().all(|c| c.is_ascii_hexdigit()));
    }
}
