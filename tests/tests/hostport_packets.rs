//! IPv4 hostPort DNAT (`hostport_ingress`, `hostport_egress` on the
//! uplink, `bridge_from_pods` on the bridge; cni-ebpf/src/hostport.rs) on
//! crafted packets, through BPF_PROG_TEST_RUN, with mappings written by the
//! agent's own entry code. Every translated frame is compared byte for
//! byte with the frame it should have become, checksums computed here from
//! scratch. Pinned: a client's packet to node:hostPort reaches
//! pod:containerPort with its source kept, the pod's replies leave from
//! node:hostPort; TCP and UDP (with and without a checksum); a hostIP
//! mapping answers on that address only, a mapping without one on the
//! node's addresses only; unmapped ports, protocols and addresses pass
//! untouched; every fragment of a datagram is translated; a pod reaching a
//! hostPort of its own node (hairpin) is translated both ways and
//! redirected; ICMP errors about DNATed flows are translated both ways
//! (outer address, quoted address and port, and every checksum — the
//! quoted transport checksum too, as netfilter updates it), and errors
//! about other flows are left alone.
//!
//! Each test runs in a private network namespace (the uplink and bridge are
//! devices there, their ifindexes handed to the programs in the test
//! context) with a private bpffs; nothing is attached.
use std::net::Ipv4Addr;

use aya::{
    maps::{HashMap, MapData},
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf,
};
use cni_agent::{
    datapath::{
        entries::{addr_words, EntryMaps},
        node::NodeAddrMap,
        pins::{load_pinned, read_stats, MapSizes, PinLayout},
        uplink::program,
    },
    state::record::{Entry, Protocol},
};
use cni_ebpf_common::{
    map_names,
    prog_names::{BRIDGE_FROM_PODS, HOSTPORT_EGRESS, HOSTPORT_INGRESS},
    BridgeInfo,
};
use cni_tests::{
    bpffs::BpfFs,
    packet::{
        assert_ipv4_frame, frame, ipv4_at, ipv4_fragments, l4_valid, raw_frame, reassemble, tcp,
        udp, ETH, ICMP, TCP, UDP,
    },
    prelude::*,
};

/// TC_ACT_UNSPEC (tcx "next"), as test_run reports it.
const NEXT: u32 = u32::MAX;
const REDIRECT: u32 = 7;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// The node's address on the uplink.
const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 1);
/// A second address of the node's, only mapped by a hostIP mapping.
const NODE_B: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 2);
/// An address that is not the node's.
const OTHER: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 3);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 19, 8, 9);
/// A router on the client's path.
const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 254);
/// The target pod, and another pod on the same bridge.
const POD: Ipv4Addr = Ipv4Addr::new(10, 77, 7, 5);
const NEIGHBOUR: Ipv4Addr = Ipv4Addr::new(10, 77, 7, 6);
/// The bridge's address (the pods' gateway).
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 77, 7, 1);

struct Datapath {
    ebpf: Ebpf,
    layout: PinLayout,
    uplink: u32,
    bridge: u32,
}

impl Datapath {
    /// Runs `name` on `frame` as if it crossed interface `ifindex`.
    fn run(&mut self, ifindex: u32, name: &str, frame: &[u8]) -> (u32, Vec<u8>) {
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

    fn ingress(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run(self.uplink, HOSTPORT_INGRESS, frame)
    }

    fn egress(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run(self.uplink, HOSTPORT_EGRESS, frame)
    }

    fn bridge_in(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run(self.bridge, BRIDGE_FROM_PODS, frame)
    }

    fn stat(&self, name: &str) -> u64 {
        read_stats(&self.layout)
            .expect("stats")
            .into_iter()
            .find(|(k, _)| *k == name)
            .unwrap_or_else(|| panic!("no counter {name}"))
            .1
    }
}

/// `got` (verdict, frame) must be (`verdict`, `want`).
fn assert_frame(got: (u32, Vec<u8>), verdict: u32, want: &[u8], what: &str) {
    assert_eq!(got.0, verdict, "{what}: verdict");
    assert_ipv4_frame(&got.1, want, what);
}

fn mapping(
    host_ip: Option<Ipv4Addr>,
    host_port: u16,
    protocol: Protocol,
    container_port: u16,
    snat: bool,
) -> Entry {
    Entry::HostPort {
        host_ip: host_ip.map(Into::into),
        host_port,
        protocol,
        pod_ip: POD.into(),
        container_port,
        snat,
    }
}

/// Runs `f` on freshly loaded hostPort programs in a namespace of its own
/// (uplink up0, bridge br0), with the node's address NODE and the
/// mappings 8080/tcp -> POD:80, 5353/udp -> POD:53, 8443/tcp -> POD:443
/// with snat (any node address) and NODE_B:9090/tcp -> POD:90, as the
/// agent writes them.
fn with_datapath(tag: &str, f: impl FnOnce(&mut Datapath) + Send + 'static) {
    require_e2e!();
    let ns = NetNs::new(tag);
    ns.ip(&["link", "add", "up0", "type", "veth", "peer", "name", "up1"]);
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    let dir = TempDir::new(tag);
    let bpffs = BpfFs::mount(&dir.path().join("bpf"));
    let root = bpffs.path().join("root");
    let path = ns.path().to_path_buf();
    // test_run looks the ifindexes up in the namespace of this thread.
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let index = |n| nix::net::if_::if_nametoindex(n).expect("ifindex");
        let layout = PinLayout::new(root);
        let mut ebpf = load_pinned(&layout, MapSizes::default()).expect("load the object");
        for name in [HOSTPORT_INGRESS, HOSTPORT_EGRESS, BRIDGE_FROM_PODS] {
            let p: &mut SchedClassifier = program(&mut ebpf, name).expect("program");
            p.load()
                .unwrap_or_else(|e| panic!("verifier rejects {name}: {e}"));
        }
        NodeAddrMap::open(&layout)
            .expect("NODE_ADDRS")
            .sync(&[NODE.into()])
            .expect("node addresses");
        let mut entries = EntryMaps::open(&layout).expect("entry maps");
        for m in [
            mapping(None, 8080, Protocol::Tcp, 80, false),
            mapping(None, 5353, Protocol::Udp, 53, false),
            mapping(Some(NODE_B), 9090, Protocol::Tcp, 90, false),
            mapping(None, 8443, Protocol::Tcp, 443, true),
        ] {
            entries.apply(&m).expect("hostPort entry");
        }
        // The bridge's address, as the agent records it when it hooks the
        // bridge (that also attaches the program: not wanted here).
        let bridge = index("br0");
        let mut bridges: HashMap<&mut MapData, u32, BridgeInfo> =
            HashMap::try_from(ebpf.map_mut(map_names::BRIDGES).expect("BRIDGES")).expect("BRIDGES");
        let info = BridgeInfo {
            addr_v4: addr_words(GATEWAY.into()).0[0],
            _pad: 0,
        };
        bridges.insert(bridge, info, 0).expect("BRIDGES");
        f(&mut Datapath {
            ebpf,
            layout,
            uplink: index("up0"),
            bridge,
        });
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e));
    drop(bpffs);
}

#[test]
fn a_hostport_reaches_the_pod_and_replies_leave_from_it() {
    with_datapath("hptcp", |dp| {
        let dnat = dp.stat("hostPortDnat");
        let replies = dp.stat("hostPortReplies");
        let syn = dp.ingress(&frame(CLIENT, NODE, TCP, tcp(40000, 8080, SYN)));
        assert_frame(
            syn,
            NEXT,
            &frame(CLIENT, POD, TCP, tcp(40000, 80, SYN)),
            "SYN in: to pod:80, client kept",
        );
        let synack = dp.egress(&frame(POD, CLIENT, TCP, tcp(80, 40000, SYN | ACK)));
        assert_frame(
            synack,
            NEXT,
            &frame(NODE, CLIENT, TCP, tcp(8080, 40000, SYN | ACK)),
            "SYN-ACK out: from node:8080",
        );
        let mut data = tcp(40000, 8080, ACK | 0x08);
        data.extend_from_slice(b"odd-length request");
        let mut want = data.clone();
        want[2..4].copy_from_slice(&80u16.to_be_bytes());
        assert_frame(
            dp.ingress(&frame(CLIENT, NODE, TCP, data)),
            NEXT,
            &frame(CLIENT, POD, TCP, want),
            "data in",
        );
        assert_eq!(dp.stat("hostPortDnat"), dnat + 2);
        assert_eq!(dp.stat("hostPortReplies"), replies + 1);

        // UDP, with a checksum and without one (0 stays 0).
        let q = dp.ingress(&frame(CLIENT, NODE, UDP, udp(5000, 5353, b"query")));
        assert_frame(
            q,
            NEXT,
            &frame(CLIENT, POD, UDP, udp(5000, 53, b"query")),
            "UDP in",
        );
        let a = dp.egress(&frame(POD, CLIENT, UDP, udp(53, 5000, b"answer")));
        assert_frame(
            a,
            NEXT,
            &frame(NODE, CLIENT, UDP, udp(5353, 5000, b"answer")),
            "UDP out",
        );
        let none = |s, d, sp, dp_| raw_frame(s, d, UDP, &udp(sp, dp_, b"no checksum"));
        let q = dp.ingress(&none(CLIENT, NODE, 5001, 5353));
        assert_frame(
            q,
            NEXT,
            &none(CLIENT, POD, 5001, 53),
            "UDP without a checksum in",
        );
        let a = dp.egress(&none(POD, CLIENT, 53, 5001));
        assert_frame(
            a,
            NEXT,
            &none(NODE, CLIENT, 5353, 5001),
            "UDP without a checksum out",
        );
    });
}

#[test]
fn only_mapped_addresses_ports_and_protocols_are_translated() {
    with_datapath("hpmatch", |dp| {
        for (what, f) in [
            (
                "hostIP mapping on another address",
                frame(CLIENT, NODE, TCP, tcp(40002, 9090, SYN)),
            ),
            (
                "any-address mapping on a foreign address",
                frame(CLIENT, OTHER, TCP, tcp(40003, 8080, SYN)),
            ),
            (
                "unmapped port",
                frame(CLIENT, NODE, TCP, tcp(40004, 8081, SYN)),
            ),
            (
                "other protocol",
                frame(CLIENT, NODE, UDP, udp(40005, 8080, b"u")),
            ),
        ] {
            assert_eq!(dp.ingress(&f), (NEXT, f.clone()), "{what}: untouched");
        }
        // A hostIP mapping answers on its address, even one the node's
        // address list does not hold.
        let syn = dp.ingress(&frame(CLIENT, NODE_B, TCP, tcp(40001, 9090, SYN)));
        assert_frame(
            syn,
            NEXT,
            &frame(CLIENT, POD, TCP, tcp(40001, 90, SYN)),
            "hostIP mapping",
        );
        let back = dp.egress(&frame(POD, CLIENT, TCP, tcp(90, 40001, SYN | ACK)));
        assert_frame(
            back,
            NEXT,
            &frame(NODE_B, CLIENT, TCP, tcp(9090, 40001, SYN | ACK)),
            "hostIP reply",
        );
        // The pod's own traffic that is no reply leaves as it is (the
        // masquerade's business).
        let f = frame(POD, CLIENT, TCP, tcp(80, 40009, SYN));
        assert_eq!(
            dp.egress(&f),
            (NEXT, f.clone()),
            "pod's own connection: untouched"
        );
    });
}

#[test]
fn every_fragment_of_a_datagram_is_translated() {
    with_datapath("hpfrag", |dp| {
        let payload: Vec<u8> = (0..2500u32).map(|i| (i * 13 % 251) as u8).collect();
        let first = dp.stat("fragFirstRemembered");
        let later = dp.stat("fragTranslated");
        for (what, ins, wants, out_dir) in [
            (
                "datagram in",
                ipv4_fragments(CLIENT, NODE, UDP, 0x5151, udp(5002, 5353, &payload), 1000),
                ipv4_fragments(CLIENT, POD, UDP, 0x5151, udp(5002, 53, &payload), 1000),
                false,
            ),
            (
                "datagram out",
                ipv4_fragments(POD, CLIENT, UDP, 0x5252, udp(53, 5002, &payload), 1000),
                ipv4_fragments(NODE, CLIENT, UDP, 0x5252, udp(5353, 5002, &payload), 1000),
                true,
            ),
        ] {
            assert_eq!(ins.len(), 3);
            let mut outs = Vec::new();
            for (i, (f, want)) in ins.iter().zip(&wants).enumerate() {
                let got = if out_dir { dp.egress(f) } else { dp.ingress(f) };
                outs.push(got.1.clone());
                assert_frame(got, NEXT, want, &format!("{what}: fragment {i}"));
            }
            let (s, d) = (ipv4_at(&outs[0], ETH + 12), ipv4_at(&outs[0], ETH + 16));
            assert!(
                l4_valid(s, d, UDP, &reassemble(&outs)),
                "{what}: reassembled checksum"
            );
        }
        assert_eq!(dp.stat("fragFirstRemembered"), first + 2);
        assert_eq!(dp.stat("fragTranslated"), later + 4);
    });
}

#[test]
fn a_pod_reaching_a_hostport_of_its_node_is_translated_and_redirected() {
    with_datapath("hphairpin", |dp| {
        let hairpin = dp.stat("hostPortHairpin");
        // With snat (portmap's default) the target pod sees the bridge's
        // address, so its replies come back up through the bridge, where
        // they get node:hostPort back; both ways are redirected onto the
        // bridge, past the host's input routing.
        let syn = dp.bridge_in(&frame(NEIGHBOUR, NODE, TCP, tcp(41000, 8443, SYN)));
        assert_frame(
            syn,
            REDIRECT,
            &frame(GATEWAY, POD, TCP, tcp(41000, 443, SYN)),
            "hairpin SYN: from the bridge's address, the pod's own port",
        );
        let synack = dp.bridge_in(&frame(POD, GATEWAY, TCP, tcp(443, 41000, SYN | ACK)));
        assert_frame(
            synack,
            REDIRECT,
            &frame(NODE, NEIGHBOUR, TCP, tcp(8443, 41000, SYN | ACK)),
            "hairpin reply: from node:8443 to the client pod",
        );
        // Without snat only the destination changes (the target's replies
        // then go to the client directly, as README says).
        let syn = dp.bridge_in(&frame(NEIGHBOUR, NODE, TCP, tcp(41001, 8080, SYN)));
        assert_frame(
            syn,
            REDIRECT,
            &frame(NEIGHBOUR, POD, TCP, tcp(41001, 80, SYN)),
            "hairpin SYN without snat",
        );
        assert_eq!(dp.stat("hostPortHairpin"), hairpin + 3);
        // Pod traffic to elsewhere is not the bridge program's business.
        let f = frame(NEIGHBOUR, CLIENT, TCP, tcp(41001, 8080, SYN));
        assert_eq!(
            dp.bridge_in(&f),
            (NEXT, f.clone()),
            "not a hostPort: untouched"
        );
    });
}

/// An ICMP error of `ty`/`code` (rest of header `rest`) quoting `quoted`
/// (an IPv4 packet without Ethernet), from `src` to `dst`, its checksums
/// computed here.
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

/// "Fragmentation needed" (next-hop MTU 1400) from a router on the
/// client's path, about the pod's reply as it left the node (from
/// node:hostPort), reaches the pod: outer destination, quoted source
/// address and port are the pod's, and the frame equals one built for the
/// pod from scratch — outer and quoted IPv4 header checksums, the quoted
/// TCP checksum (the whole segment is quoted) and the ICMP checksum. With
/// only the 8 bytes of TCP an error must quote, there is no transport
/// checksum to update. Errors about the node's own traffic, or about a
/// flow the mapping does not carry to that client, are left alone.
#[test]
fn an_icmp_error_about_a_reply_reaches_the_pod() {
    with_datapath("hpicmpin", |dp| {
        let before = dp.stat("hostPortIcmpErrorsTranslated");
        let syn = frame(CLIENT, NODE, TCP, tcp(40000, 8080, SYN));
        assert_eq!(dp.ingress(&syn).0, NEXT, "SYN in");
        let mut seg = tcp(80, 40000, ACK);
        seg.extend_from_slice(&[0xa5; 1200]);
        let reply = frame(POD, CLIENT, TCP, seg.clone());
        let (rc, sent) = dp.egress(&reply);
        assert_eq!(rc, NEXT);
        let mut sent_seg = seg;
        sent_seg[0..2].copy_from_slice(&8080u16.to_be_bytes());
        assert_ipv4_frame(
            &sent,
            &frame(NODE, CLIENT, TCP, sent_seg),
            "the reply left from node:8080",
        );
        let mtu = [0, 0, 0x05, 0x78];
        // Routers quote up to 576 bytes: a whole short segment here.
        let whole = &sent[ETH..ETH + 20 + 20 + 100];
        let want_whole = &reply[ETH..ETH + 20 + 20 + 100];
        assert_frame(
            dp.ingress(&icmp_error(ROUTER, NODE, 3, 4, mtu, whole)),
            NEXT,
            &icmp_error(ROUTER, POD, 3, 4, mtu, want_whole),
            "fragmentation needed, quoting the whole TCP header",
        );
        // (The quoted segment is cut short, so its checksum is no longer
        // verifiable over the quote: it must equal the pod's original.)
        assert_frame(
            dp.ingress(&icmp_error(ROUTER, NODE, 3, 4, mtu, &sent[ETH..ETH + 28])),
            NEXT,
            &icmp_error(ROUTER, POD, 3, 4, mtu, &reply[ETH..ETH + 28]),
            "fragmentation needed, quoting 8 bytes of TCP",
        );
        // Time exceeded about a UDP reply, the whole datagram quoted: its
        // checksum verifiable from the quote alone.
        let q = frame(CLIENT, NODE, UDP, udp(5000, 5353, b"query"));
        assert_eq!(dp.ingress(&q).0, NEXT, "UDP in");
        let answer = frame(POD, CLIENT, UDP, udp(53, 5000, b"answer"));
        let (_, sent) = dp.egress(&answer);
        assert_eq!(ipv4_at(&sent, ETH + 12), NODE);
        let (rc, out) = dp.ingress(&icmp_error(ROUTER, NODE, 11, 0, [0; 4], &sent[ETH..]));
        assert_frame(
            (rc, out.clone()),
            NEXT,
            &icmp_error(ROUTER, POD, 11, 0, [0; 4], &answer[ETH..]),
            "time exceeded about a UDP reply",
        );
        let quoted = &out[ETH + 20 + 8..];
        assert!(
            l4_valid(POD, CLIENT, UDP, &quoted[20..]),
            "quoted UDP checksum right for the pod's tuple"
        );
        assert_eq!(dp.stat("hostPortIcmpErrorsTranslated"), before + 3);

        for (what, quoted) in [
            (
                "the node's own connection from the hostPort to another client",
                frame(NODE, ROUTER, TCP, tcp(8080, 40000, ACK)),
            ),
            (
                "the node's own connection from another port",
                frame(NODE, CLIENT, TCP, tcp(8081, 40000, ACK)),
            ),
            (
                "a flow of another protocol",
                frame(NODE, CLIENT, UDP, udp(8080, 40000, b"x")),
            ),
        ] {
            let e = icmp_error(ROUTER, NODE, 3, 4, mtu, &quoted[ETH..]);
            assert_eq!(dp.ingress(&e), (NEXT, e.clone()), "{what}: untouched");
        }
        assert_eq!(dp.stat("hostPortIcmpErrorsTranslated"), before + 3);
    });
}

/// The pod's port unreachable about a datagram that came in through
/// node:hostPort (quoting client -> pod:containerPort) leaves as
/// node:hostPort's, quoting what the client sent (client ->
/// node:hostPort), every checksum as computed here from scratch; the
/// pod's errors about other packets are left alone.
#[test]
fn a_pods_icmp_error_leaves_as_the_hostports() {
    with_datapath("hpicmpout", |dp| {
        let before = dp.stat("hostPortIcmpErrorsTranslated");
        let sent = frame(CLIENT, NODE, UDP, udp(5000, 5353, b"anyone there?"));
        let (rc, delivered) = dp.ingress(&sent);
        assert_eq!(rc, NEXT);
        assert_ipv4_frame(
            &delivered,
            &frame(CLIENT, POD, UDP, udp(5000, 53, b"anyone there?")),
            "datagram in",
        );
        assert_frame(
            dp.egress(&icmp_error(POD, CLIENT, 3, 3, [0; 4], &delivered[ETH..])),
            NEXT,
            &icmp_error(NODE, CLIENT, 3, 3, [0; 4], &sent[ETH..]),
            "port unreachable from node:5353",
        );
        // TCP: a reset would be the answer, but a router-like error from
        // the pod (e.g. its firewall's) quotes the SYN's 8 bytes.
        let syn = frame(CLIENT, NODE, TCP, tcp(40010, 8080, SYN));
        let (_, in_syn) = dp.ingress(&syn);
        assert_frame(
            dp.egress(&icmp_error(
                POD,
                CLIENT,
                3,
                13,
                [0; 4],
                &in_syn[ETH..ETH + 28],
            )),
            NEXT,
            &icmp_error(NODE, CLIENT, 3, 13, [0; 4], &syn[ETH..ETH + 28]),
            "administratively prohibited, 8 bytes of TCP",
        );
        assert_eq!(dp.stat("hostPortIcmpErrorsTranslated"), before + 2);

        for (what, quoted) in [
            (
                "a datagram of a client the mapping never carried",
                frame(ROUTER, POD, UDP, udp(5000, 53, b"x")),
            ),
            (
                "a datagram to another port of the pod",
                frame(CLIENT, POD, UDP, udp(5000, 54, b"x")),
            ),
        ] {
            let e = icmp_error(POD, CLIENT, 3, 3, [0; 4], &quoted[ETH..]);
            assert_eq!(dp.egress(&e), (NEXT, e.clone()), "{what}: untouched");
        }
        assert_eq!(dp.stat("hostPortIcmpErrorsTranslated"), before + 2);
    });
}
