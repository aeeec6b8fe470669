//! The embedded eBPF object loads, and its TC program attaches through tcx to
//! a veth in a private network namespace, next to a foreign tcx program, and
//! sees real packets.
use std::{
    fs::File,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use aya::{
    maps::HashMap,
    programs::{SchedClassifier, TcAttachType},
};
use cni_agent::datapath::loader::{attach_tcx, load_object, Hook};
use cni_ebpf_common::{map_names, prog_names, TrafficCounters};
use nix::sched::{setns, CloneFlags};

/// A network namespace deleted on drop, even when the test panics.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "dl{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        sh(&["ip", "netns", "add", &name]);
        Netns(name)
    }
    fn exec(&self, args: &[&str]) -> std::process::Output {
        let mut full = vec!["ip", "netns", "exec", &self.0];
        full.extend_from_slice(args);
        Command::new(full[0])
            .args(&full[1..])
            .output()
            .expect("spawn ip netns exec")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn sh(args: &[&str]) {
    let st = Command::new(args[0])
        .args(&args[1..])
        .status()
        .expect("spawn");
    assert!(st.success(), "{args:?} failed");
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn tc_program_attaches_via_tcx_and_counts_packets() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    // Two namespaces joined by a veth: the client pings from `peer`, the
    // program sits on vb's ingress in `ns`.
    let ns = Netns::new("tcx");
    let peer = Netns::new("peer");
    let peer_cmd = format!("ip link add name va type veth peer name vb netns {}", ns.0);
    for (target, cmd) in [
        (&peer, peer_cmd.as_str()),
        (&peer, "ip addr add 198.18.7.1/30 dev va"),
        (&peer, "ip link set va up"),
        (&ns, "ip addr add 198.18.7.2/30 dev vb"),
        (&ns, "ip link set vb up"),
    ] {
        let args: Vec<&str> = cmd.split(' ').collect();
        let out = target.exec(&args);
        assert!(out.status.success(), "{cmd}: {out:?}");
    }

    // A clsact qdisc of someone else on the same device must not get in the
    // way (the reference bandwidth plugin trips over exactly this).
    let out = ns.exec(&["tc", "qdisc", "add", "dev", "vb", "clsact"]);
    assert!(out.status.success(), "clsact: {out:?}");

    let path = format!("/run/netns/{}", ns.0);
    let peer_name = peer.0.clone();
    let handle = std::thread::spawn(move || {
        let f = File::open(&path).expect("open netns");
        setns(&f, CloneFlags::CLONE_NEWNET).expect("setns");
        // A foreign tcx program already on the hook (a second, independent
        // load of the object, with its own maps): ours attaches after it and
        // both keep seeing every packet.
        let mut foreign = load_object().expect("load the foreign copy");
        attach_tcx(&mut foreign, prog_names::TC_COUNT, "vb", Hook::Ingress)
            .expect("foreign attach");
        let mut ebpf = load_object().expect("load the embedded object");
        attach_tcx(&mut ebpf, prog_names::TC_COUNT, "vb", Hook::Ingress).expect("tcx attach");
        let ifindex = nix::net::if_::if_nametoindex("vb").expect("ifindex of b");

        let ping = Command::new("ip")
            .args([
                "netns",
                "exec",
                &peer_name,
                "ping",
                "-c",
                "3",
                "-i",
                "0.2",
                "-W",
                "1",
                "198.18.7.2",
            ])
            .output()
            .expect("ping");
        assert!(ping.status.success(), "ping through the program: {ping:?}");

        for (who, obj) in [("ours", &ebpf), ("foreign", &foreign)] {
            let counters: HashMap<_, u32, TrafficCounters> =
                HashMap::try_from(obj.map(map_names::IF_COUNTERS).expect("map in object"))
                    .expect("map type");
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let c = counters.get(&ifindex, 0).unwrap_or_default();
                if c.packets >= 3 {
                    // 3 echo requests of 84 bytes each at least.
                    assert!(c.bytes >= 3 * 84, "{who}: bytes counted: {c:?}");
                    break;
                }
                assert!(Instant::now() < deadline, "{who}: counter stayed at {c:?}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // The kernel lists both programs on the tcx ingress hook of vb.
        let (_, progs) =
            SchedClassifier::query_tcx("vb", TcAttachType::Ingress).expect("query tcx");
        let names: Vec<String> = progs
            .iter()
            .map(|p| p.name_as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(
            names,
            ["tc_count", "tc_count"],
            "tcx programs on vb ingress"
        );
    });
    handle.join().expect("test thread");
}
