//! ebpf-bandwidth's token buckets (in `veth_to_pod`, `veth_from_pod`;
//! cni-ebpf/src/rate.rs) on crafted packets, through BPF_PROG_TEST_RUN,
//! with buckets written by the agent's own entry code (so the depth is the
//! one README documents: max(burst, 400 ms at the rate, 128 KiB)). Pinned:
//! a full bucket lets exactly its depth (plus the packet that overdraws it)
//! through at once, then drops every packet, small ones too, with the
//! verdict TC_ACT_SHOT; the counters `cni-agent status` shows move with
//! it; each direction and veth has its own bucket, and one without passes
//! everything; an emptied bucket refills at the rate, drops costing
//! nothing, and never lets more than depth + rate × time through.
//!
//! The bucket runs on bpf_ktime. The exact counts are taken at 8 bit/s (a
//! byte a second comes back): the first packet past a burst would need
//! over 900 seconds of refill to pass, so the counts hold however slowly
//! the test runs; the refill test asserts only bounds that hold as well. Each test runs in a
//! private network namespace (the veths are there) with a private bpffs;
//! nothing is attached.
use std::time::{Duration, Instant};

use aya::{
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf,
};
use cni_agent::{
    datapath::{
        entries::EntryMaps,
        pins::{load_pinned, read_stats, MapSizes, PinLayout},
        rate::{depth_bytes, RateMap, RateStatus},
        uplink::program,
    },
    state::record::{Entry, VethHook},
};
use cni_ebpf_common::prog_names::{VETH_FROM_POD, VETH_TO_POD};
use cni_tests::{
    bpffs::BpfFs,
    packet::{frame, udp, UDP},
    prelude::*,
};

/// TC_ACT_UNSPEC (tcx "next": the packet goes on), as test_run reports it.
const PASS: u32 = u32::MAX;
const SHOT: u32 = 2;
/// The length of the test's packets, as TC counts it (the whole frame).
const LEN: u64 = 1000;

/// A UDP frame of `len` bytes in all.
fn packet(len: u64) -> Vec<u8> {
    let payload = vec![0x5a; len as usize - 14 - 20 - 8];
    let f = frame(
        std::net::Ipv4Addr::new(198, 18, 0, 1),
        std::net::Ipv4Addr::new(10, 77, 9, 2),
        UDP,
        udp(4000, 5000, &payload),
    );
    assert_eq!(f.len() as u64, len);
    f
}

struct Datapath {
    ebpf: Ebpf,
    layout: PinLayout,
}

impl Datapath {
    /// The verdict of program `name` on a packet of `len` bytes crossing
    /// the veth `ifname`.
    fn run(&mut self, name: &str, ifname: &str, len: u64) -> u32 {
        let ifindex = nix::net::if_::if_nametoindex(ifname).expect("ifindex");
        // struct __sk_buff up to and including `ifindex` (offset 40).
        let mut ctx = [0u8; 44];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let f = packet(len);
        let prog: &mut SchedClassifier = program(&mut self.ebpf, name).expect("program");
        prog.test_run(TestRunOptions {
            data_in: Some(&f),
            ctx_in: Some(&ctx),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("test_run {name}: {e}"))
        .return_value
    }

    /// Writes a bucket as the agent does for an ebpf-bandwidth ADD.
    fn limit(&self, ifname: &str, hook: VethHook, rate_bps: u64, burst_bits: u64) {
        EntryMaps::open(&self.layout)
            .expect("entry maps")
            .apply(&Entry::RateLimit {
                ifname: ifname.into(),
                hook,
                rate_bps,
                burst_bits,
            })
            .expect("rate entry");
    }

    /// The bucket of `ifname` in `direction` as `cni-agent status` shows it.
    fn status(&self, ifname: &str, direction: &str) -> RateStatus {
        RateMap::open(&self.layout)
            .expect("RATE_BUCKETS")
            .list()
            .into_iter()
            .find(|b| b.ifname == ifname && b.direction == direction)
            .unwrap_or_else(|| panic!("no {direction} bucket for {ifname}"))
    }

    fn rate_dropped(&self) -> u64 {
        read_stats(&self.layout)
            .expect("stats")
            .into_iter()
            .find(|(k, _)| *k == "rateLimitDropped")
            .expect("rateLimitDropped")
            .1
    }

    /// Sends packets of LEN bytes through `name` until the first is
    /// dropped (at most `max`): how many passed.
    fn drain(&mut self, name: &str, ifname: &str, max: u64) -> u64 {
        for sent in 0..max {
            match self.run(name, ifname, LEN) {
                PASS => {}
                SHOT => return sent,
                v => panic!("{name}: verdict {v}"),
            }
        }
        panic!("{name}: {max} packets of {LEN} bytes all passed");
    }
}

/// Runs `f` on freshly loaded rate programs in a namespace of its own with
/// two veth pairs, vh0/vp0 and vh1/vp1 (vh* are the host ends).
fn with_datapath(tag: &str, f: impl FnOnce(&mut Datapath) + Send + 'static) {
    require_e2e!();
    let ns = NetNs::new(tag);
    for i in 0..2 {
        let (h, p) = (format!("vh{i}"), format!("vp{i}"));
        ns.ip(&["link", "add", &h, "type", "veth", "peer", "name", &p]);
        ns.ip(&["link", "set", &h, "up"]);
    }
    let dir = TempDir::new(tag);
    let bpffs = BpfFs::mount(&dir.path().join("bpf"));
    let root = bpffs.path().join("root");
    let path = ns.path().to_path_buf();
    // test_run looks the ifindex up, and the agent's entry code finds the
    // veths by name, in the namespace of this thread.
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let layout = PinLayout::new(root);
        let mut ebpf = load_pinned(&layout, MapSizes::default()).expect("load the object");
        for name in [VETH_TO_POD, VETH_FROM_POD] {
            let p: &mut SchedClassifier = program(&mut ebpf, name).expect("program");
            p.load()
                .unwrap_or_else(|e| panic!("verifier rejects {name}: {e}"));
        }
        f(&mut Datapath { ebpf, layout });
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e));
    drop(bpffs);
}

/// Packets of LEN bytes a full bucket of `depth` bytes passes at once:
/// the packet that starts at or below the depth passes (it may overdraw
/// by its own size).
fn burst_packets(depth: u64) -> u64 {
    depth / LEN + 1
}

#[test]
fn a_full_bucket_passes_its_depth_then_drops() {
    with_datapath("ratecount", |dp| {
        // 8 bit/s: one byte a second comes back while the test runs.
        // to-pod: no burst, so the 128 KiB floor; from-pod: a 300 kB
        // burst, honoured exactly.
        let rate = 8;
        dp.limit("vh0", VethHook::ToPod, rate, 0);
        dp.limit("vh0", VethHook::FromPod, rate, 300_000 * 8);
        let (to_depth, from_depth) = (depth_bytes(rate, 0), depth_bytes(rate, 300_000 * 8));
        assert_eq!((to_depth, from_depth), (128 * 1024, 300_000));

        let passed = dp.drain(VETH_TO_POD, "vh0", 10_000);
        assert_eq!(
            passed,
            burst_packets(to_depth),
            "to-pod: packets passed at once"
        );
        for i in 0..9 {
            assert_eq!(
                dp.run(VETH_TO_POD, "vh0", LEN),
                SHOT,
                "to-pod: packet {i} after the burst"
            );
        }
        assert_eq!(
            dp.run(VETH_TO_POD, "vh0", 64),
            SHOT,
            "a small packet is dropped too"
        );
        let s = dp.status("vh0", "to-pod");
        assert_eq!(
            (
                s.passed_packets,
                s.passed_bytes,
                s.dropped_packets,
                s.dropped_bytes
            ),
            (passed, passed * LEN, 11, 10 * LEN + 64),
            "to-pod counters"
        );
        assert_eq!(s.depth_bytes, to_depth);
        assert_eq!(dp.rate_dropped(), 11, "rateLimitDropped");

        // The other direction has its own bucket, untouched so far.
        let passed = dp.drain(VETH_FROM_POD, "vh0", 10_000);
        assert_eq!(
            passed,
            burst_packets(from_depth),
            "from-pod: packets passed at once"
        );
        let s = dp.status("vh0", "from-pod");
        assert_eq!(
            (s.passed_packets, s.dropped_packets),
            (passed, 1),
            "from-pod counters"
        );
        assert_eq!(dp.rate_dropped(), 12);

        // A veth without a limit is not limited, in either direction.
        for name in [VETH_TO_POD, VETH_FROM_POD] {
            for _ in 0..200 {
                assert_eq!(
                    dp.run(name, "vh1", LEN),
                    PASS,
                    "{name} on a veth without a bucket"
                );
            }
        }
        assert_eq!(dp.rate_dropped(), 12);
    });
}

#[test]
fn an_empty_bucket_refills_at_the_rate() {
    with_datapath("raterefill", |dp| {
        // 80 kbit/s: a packet of LEN bytes is earned in 100 ms.
        let rate = 80_000;
        dp.limit("vh0", VethHook::FromPod, rate, 0);
        let depth = depth_bytes(rate, 0);
        // Upper bound on what may pass in `t`: the depth, the packet that
        // overdraws it, and what the rate earns (rounded up).
        let most = |t: Duration| burst_packets(depth) + t.as_millis() as u64 / 100 + 1;

        let start = Instant::now();
        let burst = dp.drain(VETH_FROM_POD, "vh0", 10_000);
        assert!(
            (burst_packets(depth)..=most(start.elapsed())).contains(&burst),
            "burst of {burst} packets"
        );
        // Packets sent every 10 ms are dropped until a packet's worth has
        // come back (100 ms); a dropped packet costs nothing, or none of
        // them would ever pass.
        let mut dropped = 0u64;
        wait_until(
            "the bucket to refill",
            Duration::from_secs(10),
            || match dp.run(VETH_FROM_POD, "vh0", LEN) {
                PASS => Some(()),
                _ => {
                    dropped += 1;
                    None
                }
            },
        );
        let s = dp.status("vh0", "from-pod");
        assert!(
            s.passed_packets <= most(start.elapsed()),
            "{} packets passed in {:?}: more than the rate allows",
            s.passed_packets,
            start.elapsed()
        );
        assert_eq!(s.passed_packets, burst + 1);
        assert_eq!(s.dropped_packets, dropped + 1);
    });
}
