//! The IPv6 masquerade programs (`snat6_egress`, `snat6_ingress`) on
//! crafted packets, through BPF_PROG_TEST_RUN: every translated packet is
//! checked byte for byte, and its transport checksum is recomputed here from
//! scratch (pseudo-header with the 128-bit addresses included, for ICMPv6
//! too) — the end-to-end tests only show that real receivers accept them.
//! Cases a real peer rarely produces are covered too: a UDP datagram whose
//! translated checksum comes out as zero (must be sent as 0xffff), packets
//! with extension headers, multicast and pod-subnet destinations, IPv4.
//!
//! Runs in a private network namespace (the uplink is a veth there, its
//! ifindex handed to the programs in the test context) with a private
//! bpffs; nothing is attached anywhere.
use std::net::{IpAddr, Ipv6Addr};

use aya::{
    maps::{HashMap, MapData},
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf,
};
use cni_agent::datapath::{
    entries::{ip_key, masq_policy},
    pins::{load_pinned, MapSizes, PinLayout},
    uplink::program,
};
use cni_ebpf_common::{map_names, prog_names, CtKey, IpKey, MasqPolicy, NatEntry, UplinkConfig};
use cni_tests::{
    bpffs::BpfFs,
    packet::{
        echo, first_difference, fold, frame, ipv6_at, ipv6_fragments, l4_sum, l4_valid, raw_frame,
        reassemble6, tcp, u16_at, udp, ICMPV6, TCP, UDP,
    },
    prelude::*,
};

/// TC_ACT_UNSPEC (tcx "next"), as test_run reports it.
const NEXT: u32 = u32::MAX;
/// Offsets in a frame: Ethernet, then the IPv6 header.
const SRC: usize = 14 + 8;
const DST: usize = 14 + 24;
const L4: usize = 14 + 40;
const PORT_MIN: u16 = 61000;
const PORT_MAX: u16 = 61001;
const TC_ACT_SHOT: u32 = 2;

fn pod() -> Ipv6Addr {
    "fd00:77:9::2".parse().unwrap()
}
/// Other masqueraded pods of the same subnet: fd00:77:9::<n>.
fn pod_n(n: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x77, 9, 0, 0, 0, 0, n)
}
fn uplink() -> Ipv6Addr {
    "fd00:198:18:9::1".parse().unwrap()
}
fn remote() -> Ipv6Addr {
    "2001:db8:5::7".parse().unwrap()
}
fn router() -> Ipv6Addr {
    "fd00:198:18:9::fe".parse().unwrap()
}

/// The loaded IPv6 programs and the maps the test programs.
struct Datapath {
    ebpf: Ebpf,
    ifindex: u32,
}

impl Datapath {
    fn prog(&mut self, name: &str) -> &mut SchedClassifier {
        program(&mut self.ebpf, name).expect("program in the object")
    }

    /// Runs `name` on `frame`: (return value, frame out).
    fn run(&mut self, name: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        // struct __sk_buff up to and including `ifindex` (offset 40): the
        // packet comes in on the uplink.
        let mut ctx = [0u8; 44];
        ctx[40..44].copy_from_slice(&self.ifindex.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let r = self
            .prog(name)
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("test_run {name}: {e}"));
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    fn map<K: aya::Pod, V: aya::Pod>(&mut self, name: &str) -> HashMap<&mut MapData, K, V> {
        HashMap::try_from(self.ebpf.map_mut(name).expect("map in the object"))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn orig_binding(&mut self, key: &CtKey) -> Option<NatEntry> {
        let m: HashMap<&mut MapData, CtKey, NatEntry> = self.map(map_names::SNAT_ORIG);
        m.get(key, 0).ok()
    }
}

fn words(a: Ipv6Addr) -> [u32; 4] {
    cni_agent::datapath::entries::addr_words(IpAddr::V6(a)).0
}

fn key(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, proto: u8) -> CtKey {
    CtKey {
        src: words(src),
        dst: words(dst),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto,
        family: cni_ebpf_common::FAMILY_V6,
        _pad: [0; 2],
    }
}

#[test]
fn snat6_programs_translate_crafted_packets_with_valid_checksums() {
    require_e2e!();
    let ns = NetNs::new("nat6run");
    ns.ip(&["link", "add", "up0", "type", "veth", "peer", "name", "up1"]);
    ns.ip(&["link", "set", "up0", "up"]);
    let dir = TempDir::new("nat6run");
    let bpffs = BpfFs::mount(&dir.path().join("bpf"));
    let root = bpffs.path().join("root");
    // Everything that needs the namespace (test_run looks the ifindex up,
    // the socket lookups run there) happens on a thread inside it.
    let path = ns.path().to_path_buf();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        run_cases(root);
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e));
    drop(bpffs);
}

/// The cases, on a thread inside the test namespace, with the pins under
/// `root`.
fn run_cases(root: std::path::PathBuf) {
    let ifindex = nix::net::if_::if_nametoindex("up0").expect("ifindex of up0");
    let layout = PinLayout::new(root);
    let mut ebpf = load_pinned(&layout, MapSizes::default()).expect("load the object");
    for name in [prog_names::SNAT6_EGRESS, prog_names::SNAT6_INGRESS] {
        let p: &mut SchedClassifier = program(&mut ebpf, name).expect("program");
        p.load()
            .unwrap_or_else(|e| panic!("verifier rejects {name}: {e}"));
        // The verifier's budget is 1M instructions per program: the header
        // walk and the fragment handling must leave room (shown, not
        // asserted: the count varies with the kernel).
        if let Some(n) = p.info().ok().and_then(|i| i.verified_instruction_count()) {
            eprintln!("{name}: verified in {n} instructions");
        }
    }
    let mut dp = Datapath { ebpf, ifindex };
    configure(&mut dp);
    let (eg, ing) = (prog_names::SNAT6_EGRESS, prog_names::SNAT6_INGRESS);

    // TCP SYN out: source address translated, free port kept, checksum
    // (pseudo-header) right; both halves of the binding written.
    let syn = frame(pod(), remote(), TCP, tcp(40000, 80, 0x02));
    let (rc, out) = dp.run(eg, &syn);
    assert_eq!(rc, NEXT);
    assert_eq!(ipv6_at(&out, SRC), uplink(), "source translated");
    assert_eq!(ipv6_at(&out, DST), remote());
    assert_eq!(u16_at(&out, L4), 40000, "free source port kept");
    assert!(
        l4_valid(uplink(), remote(), TCP, &out[L4..]),
        "TCP checksum"
    );
    let b = dp
        .orig_binding(&key(pod(), remote(), 40000, 80, TCP))
        .expect("original half");
    assert_eq!((b.addr, b.port), (words(uplink()), 40000u16.to_be()));

    // Its SYN-ACK in: back to the pod, checksum right.
    let synack = frame(remote(), uplink(), TCP, tcp(80, 40000, 0x12));
    let (rc, out) = dp.run(ing, &synack);
    assert_eq!(rc, NEXT);
    assert_eq!(ipv6_at(&out, DST), pod(), "destination translated back");
    assert_eq!(u16_at(&out, L4 + 2), 40000);
    assert!(
        l4_valid(remote(), pod(), TCP, &out[L4..]),
        "TCP checksum in"
    );

    // An ACK without a binding (a reply of a connection the remote opened)
    // leaves untouched: only a SYN opens one.
    let ack = frame(pod(), remote(), TCP, tcp(40001, 81, 0x10));
    assert_eq!(dp.run(eg, &ack), (NEXT, ack.clone()));

    // ICMPv6 echo: the identifier comes from the range, and ICMPv6's
    // checksum covers the pseudo-header (unlike ICMPv4's).
    let req = frame(pod(), remote(), ICMPV6, echo(128, 0x1234, 1));
    let (rc, out) = dp.run(eg, &req);
    assert_eq!(rc, NEXT);
    assert_eq!(ipv6_at(&out, SRC), uplink());
    let id = u16_at(&out, L4 + 4);
    assert!(
        (PORT_MIN..=PORT_MAX).contains(&id),
        "echo id {id} from the range"
    );
    assert!(
        l4_valid(uplink(), remote(), ICMPV6, &out[L4..]),
        "ICMPv6 checksum (pseudo-header and identifier)"
    );
    let translated_req = out;
    let reply = frame(remote(), uplink(), ICMPV6, echo(129, id, 1));
    let (rc, out) = dp.run(ing, &reply);
    assert_eq!(rc, NEXT);
    assert_eq!(ipv6_at(&out, DST), pod());
    assert_eq!(u16_at(&out, L4 + 4), 0x1234, "the pod's identifier back");
    assert!(l4_valid(remote(), pod(), ICMPV6, &out[L4..]));

    // Packet Too Big from a router, quoting the translated echo request:
    // outer destination, quoted source and identifier go back to the
    // pod's; the ICMPv6 checksum (pseudo-header + whole message) stays right.
    let mut ptb = vec![2, 0, 0, 0];
    ptb.extend_from_slice(&1280u32.to_be_bytes());
    ptb.extend_from_slice(&translated_req[14..]);
    let ptb = frame(router(), uplink(), ICMPV6, ptb);
    let (rc, out) = dp.run(ing, &ptb);
    assert_eq!(rc, NEXT);
    assert_eq!(ipv6_at(&out, DST), pod(), "outer destination");
    let inner = L4 + 8;
    assert_eq!(ipv6_at(&out, inner + 8), pod(), "quoted source");
    assert_eq!(ipv6_at(&out, inner + 24), remote(), "quoted destination");
    assert_eq!(u16_at(&out, inner + 40 + 4), 0x1234, "quoted identifier");
    assert!(
        l4_valid(router(), pod(), ICMPV6, &out[L4..]),
        "Packet Too Big checksum"
    );
    // The same about the TCP flow (its quoted port was kept).
    let mut ptb = vec![2, 0, 0, 0];
    ptb.extend_from_slice(&1280u32.to_be_bytes());
    ptb.extend_from_slice(&dp.run(eg, &syn).1[14..]);
    let (rc, out) = dp.run(ing, &frame(router(), uplink(), ICMPV6, ptb));
    assert_eq!(rc, NEXT);
    assert_eq!(
        (ipv6_at(&out, DST), ipv6_at(&out, inner + 8)),
        (pod(), pod())
    );
    assert!(l4_valid(router(), pod(), ICMPV6, &out[L4..]));

    // UDP whose translated checksum comes out as 0: IPv6 forbids a zero
    // UDP checksum, so it must be written as 0xffff (the same value in
    // one's complement). The payload's last word is chosen to get there.
    let mut payload = b"zero-s\0\0".to_vec();
    let mut probe = udp(5000, 53, &payload);
    let s = l4_sum(uplink(), remote(), UDP, &probe);
    let w = !fold(s);
    let n = payload.len();
    payload[n - 2..].copy_from_slice(&w.to_be_bytes());
    probe = udp(5000, 53, &payload);
    assert_eq!(
        !fold(l4_sum(uplink(), remote(), UDP, &probe)),
        0,
        "crafted to translate to checksum 0"
    );
    let dgram = frame(pod(), remote(), UDP, udp(5000, 53, &payload));
    assert_ne!(u16_at(&dgram, L4 + 6), 0);
    let (rc, out) = dp.run(eg, &dgram);
    assert_eq!(rc, NEXT);
    assert_eq!(ipv6_at(&out, SRC), uplink());
    assert_eq!(u16_at(&out, L4), 5000, "free UDP port kept");
    assert_eq!(
        u16_at(&out, L4 + 6),
        0xffff,
        "a zero UDP checksum is sent as 0xffff"
    );
    assert!(l4_valid(uplink(), remote(), UDP, &out[L4..]));
    // An ordinary datagram's reply in.
    let back = frame(remote(), uplink(), UDP, udp(53, 5000, b"answer"));
    let (rc, out) = dp.run(ing, &back);
    assert_eq!(rc, NEXT);
    assert_eq!(ipv6_at(&out, DST), pod());
    assert!(
        l4_valid(remote(), pod(), UDP, &out[L4..]),
        "UDP checksum in"
    );

    // Port choice when the pod's own port is taken: three more pods open
    // the same tuple (source port 40000 to remote:80), which the first
    // pod's binding holds. Two get the two ports of the range; the third
    // finds none and is dropped (counted); once one of the two resets its
    // connection, the third takes that closed connection's port over.
    let syn_from = |p: Ipv6Addr| frame(p, remote(), TCP, tcp(40000, 80, 0x02));
    let (rc, a) = dp.run(eg, &syn_from(pod_n(3)));
    assert_eq!(rc, NEXT);
    let port_a = u16_at(&a, L4);
    let (rc, b) = dp.run(eg, &syn_from(pod_n(4)));
    assert_eq!(rc, NEXT);
    let port_b = u16_at(&b, L4);
    let mut range = [port_a, port_b];
    range.sort();
    assert_eq!(range, [PORT_MIN, PORT_MAX], "the range's two ports");
    assert!(l4_valid(uplink(), remote(), TCP, &a[L4..]));
    assert!(l4_valid(uplink(), remote(), TCP, &b[L4..]));
    let no_port = get_stat(&layout, "snatNoPort");
    let (rc, _) = dp.run(eg, &syn_from(pod_n(5)));
    assert_eq!(rc, TC_ACT_SHOT, "no free port: dropped");
    assert_eq!(get_stat(&layout, "snatNoPort"), no_port + 1, "and counted");
    let rst = frame(pod_n(3), remote(), TCP, tcp(40000, 80, 0x14));
    let (rc, out) = dp.run(eg, &rst);
    assert_eq!(
        (rc, u16_at(&out, L4)),
        (NEXT, port_a),
        "the RST leaves translated"
    );
    let reused = get_stat(&layout, "snatPortReused");
    let (rc, c) = dp.run(eg, &syn_from(pod_n(5)));
    assert_eq!(rc, NEXT);
    assert_eq!(
        u16_at(&c, L4),
        port_a,
        "the closed connection's port is taken over"
    );
    assert_eq!(get_stat(&layout, "snatPortReused"), reused + 1);
    assert!(
        dp.orig_binding(&key(pod_n(3), remote(), 40000, 80, TCP))
            .is_none(),
        "the closed binding's original half is gone"
    );
    let back = frame(remote(), uplink(), TCP, tcp(80, port_a, 0x12));
    let (rc, out) = dp.run(ing, &back);
    assert_eq!(
        (rc, ipv6_at(&out, DST)),
        (NEXT, pod_n(5)),
        "replies go to the new owner"
    );

    // A UDP datagram larger than the path MTU, fragmented by the pod: the
    // first fragment (UDP header behind the Fragment header) gets the
    // uplink's address and the pseudo-header change in its checksum, the
    // later ones (no UDP header) the same address. Each translated
    // fragment must be exactly the fragment the uplink would have sent
    // (checksum computed here over the reassembled datagram), and its
    // 3,000-byte reply likewise back to the pod.
    let (first_seen, later_seen) = (
        get_stat(&layout, "fragFirstRemembered"),
        get_stat(&layout, "fragTranslated"),
    );
    let big: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let chunk = 1232;
    let id = 0x1234_5678;
    let request = udp(5300, 5353, &big);
    let frags = ipv6_fragments(pod(), remote(), UDP, id, request.clone(), chunk);
    let want = ipv6_fragments(uplink(), remote(), UDP, id, request.clone(), chunk);
    assert_eq!(frags.len(), 3);
    let mut outs = Vec::new();
    for (i, (f, w)) in frags.iter().zip(&want).enumerate() {
        let (rc, out) = dp.run(eg, f);
        assert_eq!(rc, NEXT);
        assert!(
            out == *w,
            "request fragment {i}: {}",
            first_difference(&out, w)
        );
        outs.push(out);
    }
    let dgram = reassemble6(&outs);
    assert_eq!(u16_at(&dgram, 0), 5300, "free UDP port kept");
    assert!(
        l4_valid(uplink(), remote(), UDP, &dgram),
        "UDP checksum of the translated datagram"
    );
    // A later fragment whose id differs only in its upper 16 bits belongs
    // to another datagram: the whole 32-bit id is the key.
    let stray = ipv6_fragments(pod(), remote(), UDP, 0xabcd_5678, request, chunk);
    assert_eq!(
        dp.run(eg, &stray[1]),
        (NEXT, stray[1].clone()),
        "a later fragment of an unknown datagram: untouched"
    );
    let answer: Vec<u8> = big.iter().map(|b| !b).collect();
    let reply = udp(5353, 5300, &answer);
    let frags = ipv6_fragments(remote(), uplink(), UDP, 0x8765_4321, reply.clone(), chunk);
    let want = ipv6_fragments(remote(), pod(), UDP, 0x8765_4321, reply, chunk);
    let mut outs = Vec::new();
    for (i, (f, w)) in frags.iter().zip(&want).enumerate() {
        let (rc, out) = dp.run(ing, f);
        assert_eq!(rc, NEXT);
        assert!(
            out == *w,
            "reply fragment {i}: {}",
            first_difference(&out, w)
        );
        outs.push(out);
    }
    assert!(
        l4_valid(remote(), pod(), UDP, &reassemble6(&outs)),
        "UDP checksum of the reply datagram"
    );
    assert_eq!(
        get_stat(&layout, "fragFirstRemembered") - first_seen,
        2,
        "one first fragment remembered per direction"
    );
    assert_eq!(
        get_stat(&layout, "fragTranslated") - later_seen,
        4,
        "two later fragments translated per direction"
    );

    // Left alone: multicast, the pod's own subnet, an extension header
    // (hop-by-hop options before TCP), IPv4.
    for (what, f) in [
        (
            "multicast",
            frame(pod(), "ff0e::1".parse().unwrap(), UDP, udp(5001, 53, b"m")),
        ),
        (
            "pod subnet",
            frame(
                pod(),
                "fd00:77:9::3".parse().unwrap(),
                UDP,
                udp(5002, 53, b"s"),
            ),
        ),
        ("extension header", {
            let mut l4 = vec![TCP, 0, 1, 4, 0, 0, 0, 0];
            l4.extend_from_slice(&tcp(40002, 80, 0x02));
            raw_frame(pod(), remote(), 0, &l4)
        }),
        ("IPv4", {
            let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
            f.extend_from_slice(&[0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, TCP, 0, 0]);
            f.extend_from_slice(&[10, 77, 9, 2, 198, 18, 9, 2]);
            f.extend_from_slice(&tcp(40003, 80, 0x02));
            f
        }),
    ] {
        assert_eq!(dp.run(eg, &f), (NEXT, f.clone()), "{what}: untouched");
    }
    let get = |n: &str| get_stat(&layout, n);
    eprintln!(
        "snatV6Translated {}, snatV6RepliesTranslated {}, snatIcmpErrorsTranslated {}",
        get("snatV6Translated"),
        get("snatV6RepliesTranslated"),
        get("snatIcmpErrorsTranslated")
    );
    assert_eq!(get("snatIcmpErrorsTranslated"), 2);
}

fn configure(dp: &mut Datapath) {
    let ifindex = dp.ifindex;
    let mut uplinks: HashMap<&mut MapData, u32, UplinkConfig> = dp.map(map_names::UPLINKS);
    uplinks
        .insert(
            ifindex,
            UplinkConfig {
                addr_v4: 0,
                addr_v6: words(uplink()),
                port_min: PORT_MIN,
                port_max: PORT_MAX,
            },
            0,
        )
        .expect("UPLINKS");
    let mut masq: HashMap<&mut MapData, IpKey, MasqPolicy> = dp.map(map_names::MASQ_SOURCES);
    for p in [pod(), pod_n(3), pod_n(4), pod_n(5)] {
        masq.insert(
            ip_key(IpAddr::V6(p)),
            masq_policy("fd00:77:9::/64".parse().unwrap()),
            0,
        )
        .expect("MASQ_SOURCES");
    }
}

/// One datapath counter, summed over CPUs.
fn get_stat(layout: &PinLayout, name: &str) -> u64 {
    cni_agent::datapath::pins::read_stats(layout)
        .expect("stats")
        .into_iter()
        .find(|(k, _)| *k == name)
        .map_or(0, |(_, v)| v)
}
