//! The IPv4 masquerade programs (`snat_egress`, `snat_ingress`,
//! cni-ebpf/src/nat.rs and frag.rs) on crafted packets, through
//! BPF_PROG_TEST_RUN. Every translated frame is compared byte for byte with
//! the frame it should have become, built here with its IPv4 header and
//! transport checksums computed from scratch — the programs update them
//! incrementally, and the end-to-end tests (masquerade.rs, fragments.rs)
//! only show that one real receiver accepted what it got. Pinned here, as
//! README's "Masquerade translates what pods originate" states it: ports
//! kept when free and taken from the range when not (another binding, a
//! node socket, a hostPort), replies translated back, inbound connections'
//! replies left alone, UDP with and without a checksum, ICMP echo ids and
//! ICMP errors (outer and quoted headers, the quoted transport checksum
//! included, as netfilter updates it), excluded
//! destinations, IPv4 fragments, a header with options, port exhaustion
//! and the takeover of closed connections' ports, and a binding's half
//! lost to LRU eviction.
//!
//! Each test runs in a private network namespace (the uplink is a veth
//! there, its ifindex handed to the programs in the test context; the node
//! sockets the programs look up live there) with a private bpffs; nothing
//! is attached anywhere and no packet leaves the test.
use std::net::{IpAddr, Ipv4Addr};

use aya::{
    maps::{HashMap, MapData},
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf,
};
use cni_agent::{
    datapath::{
        entries::{addr_words, EntryMaps},
        pins::{load_pinned, read_stats, MapSizes, PinLayout},
        uplink::{program, UplinkMap},
    },
    state::record::{Entry, Protocol},
};
use cni_ebpf_common::{map_names, prog_names, CtKey, NatEntry, FAMILY_V4};
use cni_tests::{
    bpffs::BpfFs,
    packet::{
        assert_ipv4_frame, echo, fold, frame, ipv4_at, ipv4_fragments, ipv4_frame,
        ipv4_header_valid, l4_sum, l4_valid, raw_frame, reassemble, tcp, u16_at, udp, ETH, ICMP,
        TCP, UDP,
    },
    prelude::*,
};

/// TC_ACT_UNSPEC (tcx "next"), as test_run reports it.
const NEXT: u32 = u32::MAX;
const SHOT: u32 = 2;
const SYN: u8 = 0x02;
const FIN: u8 = 0x01;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;
/// Offsets in a frame (Ethernet, IPv4 without options).
const SRC: usize = ETH + 12;
const DST: usize = ETH + 16;
const L4: usize = ETH + 20;
/// The masquerade port range of most tests.
const RANGE: (u16, u16) = (61000, 61009);

const fn pod(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 9, n)
}
const POD: Ipv4Addr = pod(2);
const UPLINK: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 1);
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 19, 5, 7);
const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 254);

/// The loaded masquerade programs, in the test's namespace.
struct Datapath {
    ebpf: Ebpf,
    layout: PinLayout,
    /// The uplink (up0); up1 is an interface that is not one.
    ifindex: u32,
    other_ifindex: u32,
}

impl Datapath {
    /// Runs `name` on `frame` as if it crossed interface `ifindex`:
    /// (return value, frame out).
    fn run_on(&mut self, ifindex: u32, name: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        // struct __sk_buff up to and including `ifindex` (offset 40).
        let mut ctx = [0u8; 44];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let prog: &mut SchedClassifier = program(&mut self.ebpf, name).expect("program");
        let r = prog
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

    /// A packet leaving through the uplink.
    fn egress(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run_on(self.ifindex, prog_names::SNAT_EGRESS, frame)
    }

    /// A packet arriving on the uplink.
    fn ingress(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run_on(self.ifindex, prog_names::SNAT_INGRESS, frame)
    }

    /// `frame` out through the uplink must pass (tcx next) as `want`.
    fn egress_as(&mut self, frame: &[u8], want: &[u8], what: &str) {
        let (rc, out) = self.egress(frame);
        assert_eq!(rc, NEXT, "{what}: verdict");
        assert_ipv4_frame(&out, want, what);
    }

    /// `frame` in on the uplink must pass as `want`.
    fn ingress_as(&mut self, frame: &[u8], want: &[u8], what: &str) {
        let (rc, out) = self.ingress(frame);
        assert_eq!(rc, NEXT, "{what}: verdict");
        assert_ipv4_frame(&out, want, what);
    }

    fn stat(&self, name: &str) -> u64 {
        read_stats(&self.layout)
            .expect("stats")
            .into_iter()
            .find(|(k, _)| *k == name)
            .unwrap_or_else(|| panic!("no counter {name}"))
            .1
    }

    fn snat_orig(&mut self) -> HashMap<&mut MapData, CtKey, NatEntry> {
        HashMap::try_from(self.ebpf.map_mut(map_names::SNAT_ORIG).expect("SNAT_ORIG"))
            .expect("SNAT_ORIG")
    }
}

/// Runs `f` on a freshly loaded datapath in a namespace of its own, with
/// the uplink's address UPLINK and masquerade port range `range`, and
/// pods 10.77.9.2-9 masqueraded (10.77.9.0/24 excluded), as the agent
/// writes them.
fn with_datapath(tag: &str, range: (u16, u16), f: impl FnOnce(&mut Datapath) + Send + 'static) {
    require_e2e!();
    let ns = NetNs::new(tag);
    ns.ip(&["link", "add", "up0", "type", "veth", "peer", "name", "up1"]);
    ns.ip(&["link", "set", "up0", "up"]);
    let dir = TempDir::new(tag);
    let bpffs = BpfFs::mount(&dir.path().join("bpf"));
    let root = bpffs.path().join("root");
    // Everything that needs the namespace (test_run looks the ifindex up,
    // the socket lookups run there) happens on a thread inside it.
    let path = ns.path().to_path_buf();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let index = |n| nix::net::if_::if_nametoindex(n).expect("ifindex");
        let layout = PinLayout::new(root);
        let mut ebpf = load_pinned(&layout, MapSizes::default()).expect("load the object");
        for name in [prog_names::SNAT_EGRESS, prog_names::SNAT_INGRESS] {
            let p: &mut SchedClassifier = program(&mut ebpf, name).expect("program");
            p.load()
                .unwrap_or_else(|e| panic!("verifier rejects {name}: {e}"));
        }
        let ifindex = index("up0");
        UplinkMap::open(&layout)
            .expect("UPLINKS")
            .set(ifindex, Some(UPLINK), None, range)
            .expect("uplink");
        let mut entries = EntryMaps::open(&layout).expect("entry maps");
        for n in 2..=9 {
            entries
                .apply(&Entry::MasqSource {
                    ip: pod(n).into(),
                    subnet: "10.77.9.0/24".parse().unwrap(),
                })
                .expect("masquerade entry");
        }
        let mut dp = Datapath {
            ebpf,
            layout,
            ifindex,
            other_ifindex: index("up1"),
        };
        f(&mut dp);
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e));
    drop(bpffs);
}

fn in_range(port: u16, range: (u16, u16)) -> bool {
    (range.0..=range.1).contains(&port)
}

fn v4_key(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, proto: u8) -> CtKey {
    CtKey {
        src: addr_words(IpAddr::V4(src)).0,
        dst: addr_words(IpAddr::V4(dst)).0,
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto,
        family: FAMILY_V4,
        _pad: [0; 2],
    }
}

/// `f` (IPv4, no options) with four bytes of options (NOP, NOP, NOP, end)
/// in its IPv4 header: IHL, total length and header checksum follow.
fn with_ip_options(f: &[u8]) -> Vec<u8> {
    let mut out = f[..L4].to_vec();
    out.extend_from_slice(&[1, 1, 1, 0]);
    out.extend_from_slice(&f[L4..]);
    out[ETH] = 0x46;
    let len = u16_at(&out, ETH + 2) + 4;
    out[ETH + 2..ETH + 4].copy_from_slice(&len.to_be_bytes());
    out[ETH + 10..ETH + 12].copy_from_slice(&[0, 0]);
    let c = !fold(cni_tests::packet::sum16(&out[ETH..ETH + 24]));
    out[ETH + 10..ETH + 12].copy_from_slice(&c.to_be_bytes());
    out
}

/// A TCP segment with data (odd length: the checksum's last word is padded).
fn tcp_data(sport: u16, dport: u16) -> Vec<u8> {
    let mut t = tcp(sport, dport, ACK | 0x08);
    t.extend_from_slice(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n!");
    t
}

#[test]
fn tcp_connection_keeps_its_free_port_and_replies_come_back() {
    with_datapath("nattcp", RANGE, |dp| {
        let kept = dp.stat("snatPortKept");
        dp.egress_as(
            &frame(POD, REMOTE, TCP, tcp(40000, 80, SYN)),
            &frame(UPLINK, REMOTE, TCP, tcp(40000, 80, SYN)),
            "SYN: uplink address, own port kept",
        );
        assert_eq!(dp.stat("snatPortKept"), kept + 1);
        dp.ingress_as(
            &frame(REMOTE, UPLINK, TCP, tcp(80, 40000, SYN | ACK)),
            &frame(REMOTE, POD, TCP, tcp(80, 40000, SYN | ACK)),
            "SYN-ACK: back to the pod",
        );
        dp.egress_as(
            &frame(POD, REMOTE, TCP, tcp_data(40000, 80)),
            &frame(UPLINK, REMOTE, TCP, tcp_data(40000, 80)),
            "data segment",
        );
        dp.ingress_as(
            &frame(REMOTE, UPLINK, TCP, tcp_data(80, 40000)),
            &frame(REMOTE, POD, TCP, tcp_data(80, 40000)),
            "data segment in",
        );
        // A header with options: the transport header sits further on.
        dp.egress_as(
            &with_ip_options(&frame(POD, REMOTE, TCP, tcp(40000, 80, ACK))),
            &with_ip_options(&frame(UPLINK, REMOTE, TCP, tcp(40000, 80, ACK))),
            "IPv4 header with options",
        );
    });
}

#[test]
fn a_taken_port_is_replaced_by_one_of_the_range() {
    with_datapath("nattaken", RANGE, |dp| {
        // Another pod's binding holds (uplink, 40000, remote, 80).
        dp.egress(&frame(POD, REMOTE, TCP, tcp(40000, 80, SYN)));
        let (rc, out) = dp.egress(&frame(pod(3), REMOTE, TCP, tcp(40000, 80, SYN)));
        assert_eq!(rc, NEXT);
        let p = u16_at(&out, L4);
        assert!(in_range(p, RANGE), "port {p} from the range");
        assert_ipv4_frame(
            &out,
            &frame(UPLINK, REMOTE, TCP, tcp(p, 80, SYN)),
            "second pod's SYN",
        );
        dp.ingress_as(
            &frame(REMOTE, UPLINK, TCP, tcp(80, p, SYN | ACK)),
            &frame(REMOTE, pod(3), TCP, tcp(80, 40000, SYN | ACK)),
            "the range port's reply to the second pod",
        );
        dp.ingress_as(
            &frame(REMOTE, UPLINK, TCP, tcp(80, 40000, SYN | ACK)),
            &frame(REMOTE, POD, TCP, tcp(80, 40000, SYN | ACK)),
            "the kept port's reply to the first pod",
        );

        // A socket of the node would receive the replies: a TCP listener,
        // a bound UDP socket (any address), and a hostPort on the uplink's
        // address.
        let _listener = std::net::TcpListener::bind("0.0.0.0:40010").expect("listener");
        let _udp = std::net::UdpSocket::bind("0.0.0.0:40011").expect("UDP socket");
        EntryMaps::open(&dp.layout)
            .expect("entry maps")
            .apply(&Entry::HostPort {
                host_ip: Some(UPLINK.into()),
                host_port: 40012,
                protocol: Protocol::Tcp,
                pod_ip: pod(9).into(),
                container_port: 8080,
                snat: false,
            })
            .expect("hostPort entry");
        for (what, proto, sport, l4) in [
            ("TCP listener", TCP, 40010, tcp(40010, 80, SYN)),
            ("UDP socket", UDP, 40011, udp(40011, 53, b"q")),
            ("hostPort", TCP, 40012, tcp(40012, 80, SYN)),
        ] {
            let in_use = dp.stat("snatPortInUse");
            let (rc, out) = dp.egress(&frame(POD, REMOTE, proto, l4.clone()));
            assert_eq!(rc, NEXT, "{what}");
            let p = u16_at(&out, L4);
            assert!(
                in_range(p, RANGE),
                "{what}: port {p} from the range, not {sport}"
            );
            let mut want = l4;
            want[0..2].copy_from_slice(&p.to_be_bytes());
            assert_ipv4_frame(&out, &frame(UPLINK, REMOTE, proto, want), what);
            assert_eq!(dp.stat("snatPortInUse"), in_use + 1, "{what}: counted");
        }

        // The node's own connection picking the tuple the first pod holds
        // is moved to a range port, and its replies come back to it.
        let node_flows = dp.stat("snatNodeFlows");
        let (rc, out) = dp.egress(&frame(UPLINK, REMOTE, TCP, tcp(40000, 80, SYN)));
        assert_eq!(rc, NEXT);
        let p = u16_at(&out, L4);
        assert!(in_range(p, RANGE), "node flow: port {p} from the range");
        assert_ipv4_frame(
            &out,
            &frame(UPLINK, REMOTE, TCP, tcp(p, 80, SYN)),
            "node SYN",
        );
        assert_eq!(dp.stat("snatNodeFlows"), node_flows + 1);
        dp.ingress_as(
            &frame(REMOTE, UPLINK, TCP, tcp(80, p, SYN | ACK)),
            &frame(REMOTE, UPLINK, TCP, tcp(80, 40000, SYN | ACK)),
            "node flow's reply back to the node's port",
        );
        dp.ingress_as(
            &frame(REMOTE, UPLINK, TCP, tcp(80, 40000, ACK)),
            &frame(REMOTE, POD, TCP, tcp(80, 40000, ACK)),
            "the pod keeps its own",
        );
    });
}

#[test]
fn replies_of_inbound_connections_keep_the_pods_address() {
    with_datapath("natinbound", RANGE, |dp| {
        // TCP: a remote connected to the pod (routed in, or through a
        // hostPort); the pod's SYN-ACK, ACKs and FIN have no binding.
        for (what, flags) in [("SYN-ACK", SYN | ACK), ("ACK", ACK), ("FIN", ACK | FIN)] {
            let f = frame(POD, REMOTE, TCP, tcp(80, 50000, flags));
            assert_eq!(dp.egress(&f), (NEXT, f.clone()), "TCP {what}: untouched");
        }
        // UDP: a remote's datagram to the pod's own address passes the
        // uplink untouched, and so do the pod's answers.
        let q = frame(REMOTE, POD, UDP, udp(5353, 53, b"query"));
        assert_eq!(dp.ingress(&q), (NEXT, q.clone()), "inbound datagram");
        for i in 0..2 {
            let a = frame(POD, REMOTE, UDP, udp(53, 5353, b"answer"));
            assert_eq!(dp.egress(&a), (NEXT, a.clone()), "answer {i}: untouched");
        }
        // The same pod port to another remote port is the pod's own flow.
        dp.egress_as(
            &frame(POD, REMOTE, UDP, udp(53, 5354, b"own")),
            &frame(UPLINK, REMOTE, UDP, udp(53, 5354, b"own")),
            "the pod's own flow",
        );
    });
}

#[test]
fn udp_with_and_without_a_checksum() {
    with_datapath("natudp", RANGE, |dp| {
        let odd = b"seventeen bytes!!";
        dp.egress_as(
            &frame(POD, REMOTE, UDP, udp(5000, 53, odd)),
            &frame(UPLINK, REMOTE, UDP, udp(5000, 53, odd)),
            "UDP out",
        );
        dp.ingress_as(
            &frame(REMOTE, UPLINK, UDP, udp(53, 5000, b"reply")),
            &frame(REMOTE, POD, UDP, udp(53, 5000, b"reply")),
            "UDP reply",
        );
        // Checksum 0 means "none" in IPv4: it stays 0 both ways.
        let none = |s, d, sp, dp_| raw_frame(s, d, UDP, &udp(sp, dp_, b"no checksum"));
        dp.egress_as(
            &none(POD, REMOTE, 5001, 53),
            &none(UPLINK, REMOTE, 5001, 53),
            "UDP without a checksum out",
        );
        dp.ingress_as(
            &none(REMOTE, UPLINK, 53, 5001),
            &none(REMOTE, POD, 53, 5001),
            "UDP without a checksum in",
        );
        // A datagram whose translated checksum computes to 0 must be sent
        // as 0xffff (0 would say "none"). The payload's last word gets it
        // there.
        let mut payload = b"zero-s\0\0".to_vec();
        let probe = udp(5002, 53, &payload);
        let w = !fold(l4_sum(UPLINK, REMOTE, UDP, &probe));
        payload[6..].copy_from_slice(&w.to_be_bytes());
        let want = frame(UPLINK, REMOTE, UDP, udp(5002, 53, &payload));
        assert_eq!(u16_at(&want, L4 + 6), 0xffff, "crafted to translate to 0");
        let sent = frame(POD, REMOTE, UDP, udp(5002, 53, &payload));
        assert_ne!(u16_at(&sent, L4 + 6), 0);
        dp.egress_as(&sent, &want, "a zero checksum is sent as 0xffff");
    });
}

/// An ICMP error of `ty`/`code` (rest of header `rest`) quoting `quoted`
/// (an IPv4 packet without Ethernet), from `src` to `dst`.
fn icmp_error(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ty: u8,
    code: u8,
    rest: [u8; 4],
    quoted: &[u8],
) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(quoted);
    frame(src, dst, ICMP, m)
}

#[test]
fn icmp_echo_and_errors_about_translated_packets() {
    with_datapath("naticmp", RANGE, |dp| {
        // Echo: the identifier always comes from the range.
        let (rc, req) = dp.egress(&frame(POD, REMOTE, ICMP, echo(8, 0x1234, 1)));
        assert_eq!(rc, NEXT);
        let id = u16_at(&req, L4 + 4);
        assert!(in_range(id, RANGE), "echo id {id} from the range");
        assert_ipv4_frame(
            &req,
            &frame(UPLINK, REMOTE, ICMP, echo(8, id, 1)),
            "echo request",
        );
        dp.ingress_as(
            &frame(REMOTE, UPLINK, ICMP, echo(0, id, 1)),
            &frame(REMOTE, POD, ICMP, echo(0, 0x1234, 1)),
            "echo reply: the pod's id back",
        );

        // Port unreachable from the remote, quoting the whole translated
        // datagram: outer destination, quoted source address and port back
        // to the pod's, every checksum right (the quoted UDP checksum
        // verifiable over the quote).
        let orig = frame(POD, REMOTE, UDP, udp(5000, 53, b"lookup"));
        let (_, sent) = dp.egress(&orig);
        assert_eq!(ipv4_at(&sent, SRC), UPLINK);
        let unreach = icmp_error(REMOTE, UPLINK, 3, 3, [0; 4], &sent[ETH..]);
        let (rc, out) = dp.ingress(&unreach);
        assert_eq!(rc, NEXT);
        assert!(
            ipv4_header_valid(&out[L4 + 8..]),
            "quoted IPv4 header checksum"
        );
        assert!(
            l4_valid(POD, REMOTE, UDP, &out[L4 + 8 + 20..]),
            "quoted UDP checksum"
        );
        assert_ipv4_frame(
            &out,
            &icmp_error(REMOTE, POD, 3, 3, [0; 4], &orig[ETH..]),
            "port unreachable",
        );

        // Fragmentation needed from a router, quoting a translated TCP
        // segment's header and first 8 bytes (PMTU discovery). The segment
        // got a port of the range (another pod holds its own), so the
        // quoted port changes too.
        dp.egress(&frame(pod(3), REMOTE, TCP, tcp(40000, 443, SYN)));
        let orig = frame(POD, REMOTE, TCP, tcp(40000, 443, SYN));
        let (_, sent) = dp.egress(&orig);
        assert_eq!(ipv4_at(&sent, SRC), UPLINK);
        assert!(in_range(u16_at(&sent, L4), RANGE), "a port of the range");
        let mtu = [0, 0, 0x05, 0x78];
        dp.ingress_as(
            &icmp_error(ROUTER, UPLINK, 3, 4, mtu, &sent[ETH..L4 + 8]),
            &icmp_error(ROUTER, POD, 3, 4, mtu, &orig[ETH..L4 + 8]),
            "fragmentation needed",
        );

        // Time exceeded quoting the translated echo request: the quoted id
        // goes back to the pod's, and the quoted echo checksum with it.
        let orig = frame(POD, REMOTE, ICMP, echo(8, 0x1234, 1));
        dp.ingress_as(
            &icmp_error(ROUTER, UPLINK, 11, 0, [0; 4], &req[ETH..L4 + 8]),
            &icmp_error(ROUTER, POD, 11, 0, [0; 4], &orig[ETH..L4 + 8]),
            "time exceeded",
        );
        assert_eq!(dp.stat("snatIcmpErrorsTranslated"), 3);

        // An error about a packet no binding knows is left alone.
        let stray = frame(UPLINK, REMOTE, TCP, tcp(33333, 443, SYN));
        let e = icmp_error(ROUTER, UPLINK, 3, 4, mtu, &stray[ETH..L4 + 8]);
        assert_eq!(
            dp.ingress(&e),
            (NEXT, e.clone()),
            "unknown flow's error: untouched"
        );
    });
}

#[test]
fn excluded_destinations_and_other_traffic_are_untouched() {
    with_datapath("natexcl", RANGE, |dp| {
        let v6 = frame(
            "fd00:77:9::2".parse::<std::net::Ipv6Addr>().unwrap(),
            "2001:db8::1".parse().unwrap(),
            UDP,
            udp(5000, 53, b"v6"),
        );
        for (what, f) in [
            ("pod subnet", frame(POD, pod(3), TCP, tcp(40000, 80, SYN))),
            (
                "multicast",
                frame(
                    POD,
                    Ipv4Addr::new(224, 0, 0, 251),
                    UDP,
                    udp(5353, 5353, b"m"),
                ),
            ),
            (
                "not masqueraded source",
                frame(
                    Ipv4Addr::new(10, 77, 8, 2),
                    REMOTE,
                    TCP,
                    tcp(40000, 80, SYN),
                ),
            ),
            (
                "pod's ICMP error",
                icmp_error(POD, REMOTE, 3, 3, [0; 4], &[0x45; 28]),
            ),
            ("IPv6", v6),
        ] {
            assert_eq!(dp.egress(&f), (NEXT, f.clone()), "{what}: untouched");
        }
        let other = dp.other_ifindex;
        let f = frame(POD, REMOTE, TCP, tcp(40000, 80, SYN));
        assert_eq!(
            dp.run_on(other, prog_names::SNAT_EGRESS, &f),
            (NEXT, f.clone()),
            "not an uplink: untouched"
        );
        let f = frame(REMOTE, UPLINK, TCP, tcp(50000, 22, SYN));
        assert_eq!(
            dp.ingress(&f),
            (NEXT, f.clone()),
            "unbound port in: untouched"
        );
        assert_eq!(dp.stat("snatTranslated"), 0);
    });
}

#[test]
fn fragments_get_their_first_fragments_translation() {
    with_datapath("natfrag", RANGE, |dp| {
        let payload: Vec<u8> = (0..2000u32).map(|i| (i * 7 % 251) as u8).collect();
        let first = dp.stat("fragFirstRemembered");
        let later = dp.stat("fragTranslated");
        // A UDP datagram out in three fragments, and one back.
        let each = |dp: &mut Datapath,
                    ins: Vec<Vec<u8>>,
                    wants: Vec<Vec<u8>>,
                    out_dir: bool,
                    what: &str| {
            let mut outs = Vec::new();
            for (i, (f, want)) in ins.iter().zip(&wants).enumerate() {
                let (rc, out) = if out_dir { dp.egress(f) } else { dp.ingress(f) };
                assert_eq!(rc, NEXT, "{what}: fragment {i}");
                assert_ipv4_frame(&out, want, &format!("{what}: fragment {i}"));
                outs.push(out);
            }
            let d = reassemble(&outs);
            let (s, t) = (ipv4_at(&outs[0], SRC), ipv4_at(&outs[0], DST));
            assert!(
                l4_valid(s, t, outs[0][ETH + 9], &d),
                "{what}: reassembled checksum"
            );
        };
        let dgram = |sp, dp_| udp(sp, dp_, &payload);
        each(
            dp,
            ipv4_fragments(POD, REMOTE, UDP, 0x4242, dgram(6000, 7000), 800),
            ipv4_fragments(UPLINK, REMOTE, UDP, 0x4242, dgram(6000, 7000), 800),
            true,
            "UDP out",
        );
        each(
            dp,
            ipv4_fragments(REMOTE, UPLINK, UDP, 0x4343, dgram(7000, 6000), 800),
            ipv4_fragments(REMOTE, POD, UDP, 0x4343, dgram(7000, 6000), 800),
            false,
            "UDP in",
        );
        // A 2 kB ping: the first fragment's id is translated, the
        // reassembled message's checksum covers it.
        let ping = |ty, id| {
            let mut e = echo(ty, id, 9);
            e.extend_from_slice(&payload);
            e
        };
        let frags = ipv4_fragments(POD, REMOTE, ICMP, 0x4444, ping(8, 0x0077), 1480);
        let (rc, out) = dp.egress(&frags[0]);
        assert_eq!(rc, NEXT);
        let id = u16_at(&out, L4 + 4);
        assert!(in_range(id, RANGE), "echo id {id}");
        let want = ipv4_fragments(UPLINK, REMOTE, ICMP, 0x4444, ping(8, id), 1480);
        assert_ipv4_frame(&out, &want[0], "ping out: first fragment");
        let (rc, out2) = dp.egress(&frags[1]);
        assert_eq!(rc, NEXT);
        assert_ipv4_frame(&out2, &want[1], "ping out: second fragment");
        assert!(l4_valid(UPLINK, REMOTE, ICMP, &reassemble(&[out, out2])));
        each(
            dp,
            ipv4_fragments(REMOTE, UPLINK, ICMP, 0x4545, ping(0, id), 1480),
            ipv4_fragments(REMOTE, POD, ICMP, 0x4545, ping(0, 0x0077), 1480),
            false,
            "ping reply",
        );
        assert_eq!(dp.stat("fragFirstRemembered"), first + 4);
        assert_eq!(dp.stat("fragTranslated"), later + 2 + 2 + 1 + 1);

        // A later fragment of a datagram whose first fragment was not
        // translated here (another IP id) passes as it is.
        let stray = ipv4_frame(POD, REMOTE, UDP, 0x4646, 100, &payload[..800]);
        assert_eq!(
            dp.egress(&stray),
            (NEXT, stray.clone()),
            "unknown datagram's fragment"
        );
    });
}

#[test]
fn port_exhaustion_is_counted_and_dropped() {
    let range = (61000, 61001);
    with_datapath("natexh", range, move |dp| {
        let syn = |p| frame(p, REMOTE, TCP, tcp(40000, 80, SYN));
        dp.egress_as(
            &syn(POD),
            &frame(UPLINK, REMOTE, TCP, tcp(40000, 80, SYN)),
            "kept",
        );
        let mut ports = Vec::new();
        for n in [3, 4] {
            let (rc, out) = dp.egress(&syn(pod(n)));
            assert_eq!(rc, NEXT);
            ports.push(u16_at(&out, L4));
        }
        ports.sort();
        assert_eq!(ports, [range.0, range.1], "both ports of the range");
        let no_port = dp.stat("snatNoPort");
        assert_eq!(dp.egress(&syn(pod(5))).0, SHOT, "no port left: dropped");
        assert_eq!(dp.stat("snatNoPort"), no_port + 1, "and counted");
        // Echo ids come from the range too.
        for n in [2, 3] {
            assert_eq!(
                dp.egress(&frame(pod(n), REMOTE, ICMP, echo(8, 7, 1))).0,
                NEXT
            );
        }
        assert_eq!(
            dp.egress(&frame(pod(4), REMOTE, ICMP, echo(8, 7, 1))).0,
            SHOT
        );
        assert_eq!(dp.stat("snatNoPort"), no_port + 2);

        // Once a connection holding a range port is reset, a new one
        // takes that port over (no wait for the agent's expiry).
        let (_, out) = dp.egress(&frame(pod(3), REMOTE, TCP, tcp(40000, 80, RST | ACK)));
        let p = u16_at(&out, L4);
        let (rc, out) = dp.egress(&syn(pod(5)));
        assert_eq!(rc, NEXT);
        assert_ipv4_frame(
            &out,
            &frame(UPLINK, REMOTE, TCP, tcp(p, 80, SYN)),
            "closed port taken over",
        );
        dp.ingress_as(
            &frame(REMOTE, UPLINK, TCP, tcp(80, p, SYN | ACK)),
            &frame(REMOTE, pod(5), TCP, tcp(80, 40000, SYN | ACK)),
            "replies go to the port's new owner",
        );
    });
}

#[test]
fn only_closed_connections_give_their_port_up() {
    let range = (61000, 61001);
    with_datapath("nattakeover", range, move |dp| {
        let seg = |p, flags| frame(p, REMOTE, TCP, tcp(40000, 80, flags));
        dp.egress(&seg(POD, SYN));
        let port = |dp: &mut Datapath, n| {
            let (rc, out) = dp.egress(&seg(pod(n), SYN));
            assert_eq!(rc, NEXT, "pod {n}: SYN");
            u16_at(&out, L4)
        };
        let (p3, p4) = (port(dp, 3), port(dp, 4));
        assert!(in_range(p3, range) && in_range(p4, range) && p3 != p4);

        // Half closed (the pod's FIN only) is still a connection.
        dp.egress(&seg(pod(3), FIN | ACK));
        assert_eq!(dp.egress(&seg(pod(5), SYN)).0, SHOT, "half-closed: kept");
        // FIN both ways: closed, its port goes to the next new connection.
        dp.ingress(&frame(REMOTE, UPLINK, TCP, tcp(80, p3, FIN | ACK)));
        dp.egress_as(
            &seg(pod(5), SYN),
            &frame(UPLINK, REMOTE, TCP, tcp(p3, 80, SYN)),
            "closed both ways: taken over",
        );

        // A pod that reconnects on the tuple of its reset connection
        // keeps its port, and the new connection is live: not taken over.
        dp.egress(&seg(pod(4), RST | ACK));
        dp.egress_as(
            &seg(pod(4), SYN),
            &frame(UPLINK, REMOTE, TCP, tcp(p4, 80, SYN)),
            "reconnect on a reset tuple",
        );
        assert_eq!(
            dp.egress(&seg(pod(6), SYN)).0,
            SHOT,
            "the reconnected port is kept"
        );
        dp.ingress_as(
            &frame(REMOTE, UPLINK, TCP, tcp(80, p4, SYN | ACK)),
            &frame(REMOTE, pod(4), TCP, tcp(80, 40000, SYN | ACK)),
            "its replies still reach it",
        );
    });
}

#[test]
fn a_reply_repairs_an_original_half_lost_to_eviction() {
    with_datapath("natrepair", RANGE, |dp| {
        dp.egress(&frame(POD, REMOTE, TCP, tcp(40000, 80, SYN)));
        let key = v4_key(POD, REMOTE, 40000, 80, TCP);
        dp.snat_orig().remove(&key).expect("original half there");
        let repaired = dp.stat("snatRepaired");
        dp.ingress_as(
            &frame(REMOTE, UPLINK, TCP, tcp(80, 40000, SYN | ACK)),
            &frame(REMOTE, POD, TCP, tcp(80, 40000, SYN | ACK)),
            "reply with the original half gone",
        );
        assert_eq!(dp.stat("snatRepaired"), repaired + 1);
        dp.egress_as(
            &frame(POD, REMOTE, TCP, tcp(40000, 80, ACK)),
            &frame(UPLINK, REMOTE, TCP, tcp(40000, 80, ACK)),
            "the flow goes on translated",
        );
    });
}
