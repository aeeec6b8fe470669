//! The embedded eBPF object loads with its maps pinned in a private bpffs,
//! and a TC program attaches through a pinned tcx link to a veth in a private
//! network namespace — next to a foreign clsact qdisc and a foreign tcx
//! program — and sees real packets.
use std::{fs::File, time::Duration};

use aya::{
    maps::HashMap,
    programs::{SchedClassifier, TcAttachType},
};
use cni_agent::datapath::{
    links::{ensure_tc, Placement},
    loader::Hook,
    pins::{load_pinned, MapSizes, PinLayout},
    uplink::program,
};
use cni_ebpf_common::{map_names, prog_names, TrafficCounters};
use cni_tests::{bpffs::BpfFs, prelude::*};
use nix::sched::{setns, CloneFlags};

#[test]
fn tc_program_attaches_via_tcx_and_counts_packets() {
    require_e2e!();
    let ns = NetNs::new("tcx");
    let peer = NetNs::new("peer");
    let dir = TempDir::new("tcx");
    let bpffs = BpfFs::mount(&dir.path().join("bpf"));
    // Two namespaces joined by a veth: the client pings from `peer`, the
    // program sits on vb's ingress in `ns`.
    peer.ip(&[
        "link",
        "add",
        "name",
        "va",
        "type",
        "veth",
        "peer",
        "name",
        "vb",
        "netns",
        ns.name(),
    ]);
    peer.ip(&["addr", "add", "198.18.7.1/30", "dev", "va"]);
    peer.ip(&["link", "set", "va", "up"]);
    ns.ip(&["addr", "add", "198.18.7.2/30", "dev", "vb"]);
    ns.ip(&["link", "set", "vb", "up"]);
    // Someone else's clsact qdisc on the same device must not get in the
    // way (the reference bandwidth plugin trips over exactly this).
    let out = ns.run("tc", &["qdisc", "add", "dev", "vb", "clsact"]);
    assert!(out.status.success(), "clsact: {out:?}");

    let path = ns.path().to_path_buf();
    let root = bpffs.path().to_path_buf();
    let peer_name = peer.name().to_string();
    std::thread::spawn(move || {
        let f = File::open(&path).expect("open netns");
        setns(&f, CloneFlags::CLONE_NEWNET).expect("setns");
        let ifindex = nix::net::if_::if_nametoindex("vb").expect("ifindex of vb");

        // A foreign tcx program already on the hook (a second, independent
        // load with its own bpffs root and maps); ours attaches after it and
        // both keep seeing every packet.
        let foreign_layout = PinLayout::new(root.join("foreign"));
        let mut foreign =
            load_pinned(&foreign_layout, MapSizes::default()).expect("load foreign copy");
        let prog: &mut SchedClassifier =
            program(&mut foreign, prog_names::TC_COUNT).expect("program");
        prog.load().expect("verifier accepts tc_count");
        ensure_tc(
            prog,
            &foreign_layout,
            prog_names::TC_COUNT,
            Hook::Ingress,
            ("vb", ifindex),
            Placement::Last,
        )
        .expect("foreign attach");
        let layout = PinLayout::new(root.join("ours"));
        let mut ours = load_pinned(&layout, MapSizes::default()).expect("load the embedded object");
        let prog: &mut SchedClassifier = program(&mut ours, prog_names::TC_COUNT).expect("program");
        prog.load().expect("verifier accepts tc_count");
        let created = ensure_tc(
            prog,
            &layout,
            prog_names::TC_COUNT,
            Hook::Ingress,
            ("vb", ifindex),
            Placement::Last,
        )
        .expect("tcx attach");
        assert!(created, "a new link is created and pinned");
        assert!(
            layout.maps_dir().join(map_names::SNAT_ORIG).exists(),
            "maps pinned"
        );

        let ping = std::process::Command::new("ip")
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
        assert!(ping.status.success(), "ping through the programs: {ping:?}");

        for (who, obj) in [("ours", &ours), ("foreign", &foreign)] {
            let counters: HashMap<_, u32, TrafficCounters> =
                HashMap::try_from(obj.map(map_names::IF_COUNTERS).expect("map in object"))
                    .expect("map type");
            let c = wait_until(
                &format!("{who} counts 3 pings"),
                Duration::from_secs(5),
                || counters.get(&ifindex, 0).ok().filter(|c| c.packets >= 3),
            );
            // 3 echo requests of 84 bytes each at least.
            assert!(c.bytes >= 3 * 84, "{who}: bytes counted: {c:?}");
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

        // The link is pinned: it outlives the loader that created it.
        drop(ours);
        let (_, progs) =
            SchedClassifier::query_tcx("vb", TcAttachType::Ingress).expect("query tcx");
        assert_eq!(progs.len(), 2, "pinned link survives the loader");
    })
    .join()
    .expect("test thread");
}
