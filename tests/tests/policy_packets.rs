//! ebpf-firewall's policy in the programs on a pod's host veth
//! (`veth_from_pod`, `veth_to_pod`; cni-ebpf/src/policy.rs and spoof.rs) on crafted IPv4 and
//! IPv6 frames, through BPF_PROG_TEST_RUN, with every map entry written by
//! the agent's own code (`Entry::Firewall` through `EntryMaps`, i.e. the
//! rule compiler and `PolicyMaps::apply`). The namespace tests (firewall.rs,
//! firewall6.rs) show that some real connections get through or not; these
//! pin each verdict and the exact counters behind it, so that a change to
//! the parser, the tries or conntrack that lets one packet too many through
//! (or one too few) fails here, in seconds. Pinned:
//!
//! - ordered first-match rules with nested CIDRs and port ranges (a deny
//!   before an allow wins, the allow's range applies around it, the
//!   direction's default when nothing matches), per rule hit counts as the
//!   agent's status reports them;
//! - conntrack: replies of an allowed connection pass both ways against a
//!   default deny, replies of a refused one do not; ICMP/ICMPv6 errors
//!   quoting an allowed connection pass, those quoting another do not;
//! - IPv6 neighbour discovery passes against a default deny;
//! - `ingressPolicy` same-bridge and isolated: other pods by address,
//!   anything routed in from another firewalled bridge, link-local sources;
//!   replies of the pod's own connections still pass;
//! - anti-spoofing: a foreign source IPv4/IPv6 address or MAC, an ARP
//!   packet for an address the pod does not own or with a foreign sender
//!   MAC, a Neighbor Advertisement for a foreign target, an NS/NA with a
//!   foreign link-layer address option, a Router Advertisement or Redirect
//!   from the pod, a non-IP ethertype: each dropped and counted in its slot
//!   of the attachment's counters; their legitimate versions pass;
//! - an IPv6 hop-by-hop options header is followed: MLD (which always has
//!   one) passes a default deny like ND, ND behind one is anti-spoofed.
//!
//! Every check states the verdict (TC_ACT_SHOT = 2, or TC_ACT_UNSPEC: tcx
//! "next", the value the programs return for a pass) and the counter slots
//! it moves; after each one the attachment's counters and the node-wide
//! `firewallDropped`/`firewallSpoofed` are compared in full.
//!
//! Each test runs in a private network namespace (the veths, bridges and
//! uplink are devices there; the veth's ifindex and the ingress ifindex go
//! to the programs in the test context) with a private bpffs; nothing is
//! attached and no packet leaves the test. `fw_bridge_forward` and
//! `fw_uplink_ingress` (forward.rs) need the FIB and neighbours and are
//! left to the namespace tests.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::{
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf,
};
use cni_agent::{
    datapath::{
        entries::EntryMaps,
        pins::{load_pinned, read_stats, MapSizes, PinLayout},
        policy::PolicyMaps,
        uplink::program,
    },
    firewall::{Action, FirewallSpec, IngressPolicy, PortRange, Rule, RuleProtocol, RuleSet},
    state::record::Entry,
};
use cni_ebpf_common::{
    fw,
    prog_names::{VETH_FROM_POD, VETH_TO_POD},
};
use cni_tests::{
    bpffs::BpfFs,
    packet::{
        echo, fill_l4_csum, frame, ipv4_fragments, raw_frame, tcp, udp, ETH, ICMP, ICMPV6, TCP, UDP,
    },
    prelude::*,
};

/// TC_ACT_UNSPEC (tcx "next"), as test_run reports it.
const NEXT: u32 = u32::MAX;
const SHOT: u32 = 2;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// Pod A's MAC: the source MAC of every frame packet.rs builds.
const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 2];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 3];
const FOREIGN_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x66];

/// The counter slots a check moves.
const OUT_NEW: &[usize] = &[fw::STAT_EGRESS_ALLOWED];
const OUT_EST: &[usize] = &[fw::STAT_EGRESS_ALLOWED, fw::STAT_EGRESS_ESTABLISHED];
const OUT_DROP: &[usize] = &[fw::STAT_EGRESS_DROPPED];
const IN_NEW: &[usize] = &[fw::STAT_INGRESS_ALLOWED];
const IN_EST: &[usize] = &[fw::STAT_INGRESS_ALLOWED, fw::STAT_INGRESS_ESTABLISHED];
const IN_DROP: &[usize] = &[fw::STAT_INGRESS_DROPPED];
const IN_POLICY: &[usize] = &[fw::STAT_INGRESS_DROPPED, fw::STAT_POLICY_DROPPED];
const SPOOF_IP: &[usize] = &[fw::STAT_SPOOFED_IP];
const SPOOF_MAC: &[usize] = &[fw::STAT_SPOOFED_MAC];
const SPOOF_ARP: &[usize] = &[fw::STAT_SPOOFED_ARP];
const SPOOF_ND: &[usize] = &[fw::STAT_SPOOFED_ND];
const OTHER: &[usize] = &[fw::STAT_OTHER_DROPPED];

/// The addresses of one family's tests.
struct Net {
    v6: bool,
    /// Pods A (the one under test) and B on bridge br0, C on br1.
    pod_a: IpAddr,
    pod_b: IpAddr,
    pod_c: IpAddr,
    /// In the pods' subnet, nobody's.
    unowned: IpAddr,
    /// In the egress allow CIDR (ports 80-443) but not in the deny CIDR
    /// nested in it (port 80).
    near: IpAddr,
    /// In the nested deny CIDR.
    denied: IpAddr,
    /// In no rule's CIDR.
    far: IpAddr,
    /// A router sending ICMP errors (in no rule's CIDR).
    router: IpAddr,
    /// Ingress clients: in the allow CIDR (ports 8000-8100), and the one
    /// address denied before it.
    client: IpAddr,
    client_denied: IpAddr,
}

const V4: Net = Net {
    v6: false,
    pod_a: IpAddr::V4(Ipv4Addr::new(10, 77, 9, 2)),
    pod_b: IpAddr::V4(Ipv4Addr::new(10, 77, 9, 3)),
    pod_c: IpAddr::V4(Ipv4Addr::new(10, 77, 10, 2)),
    unowned: IpAddr::V4(Ipv4Addr::new(10, 77, 9, 99)),
    near: IpAddr::V4(Ipv4Addr::new(198, 51, 7, 7)),
    denied: IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)),
    far: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
    router: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 254)),
    client: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 67)),
    client_denied: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 66)),
};

const V6: Net = Net {
    v6: true,
    pod_a: IpAddr::V6(Ipv6Addr::new(0xfd00, 0x77, 9, 0, 0, 0, 0, 2)),
    pod_b: IpAddr::V6(Ipv6Addr::new(0xfd00, 0x77, 9, 0, 0, 0, 0, 3)),
    pod_c: IpAddr::V6(Ipv6Addr::new(0xfd00, 0x77, 10, 0, 0, 0, 0, 2)),
    unowned: IpAddr::V6(Ipv6Addr::new(0xfd00, 0x77, 9, 0, 0, 0, 0, 0x99)),
    near: IpAddr::V6(Ipv6Addr::new(0xfd00, 0x51, 7, 0, 0, 0, 0, 7)),
    denied: IpAddr::V6(Ipv6Addr::new(0xfd00, 0x51, 0x100, 0, 0, 0, 0, 7)),
    far: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
    router: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0xfe)),
    client: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x113, 0, 0, 0, 0, 0x67)),
    client_denied: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x113, 0, 0, 0, 0, 0x66)),
};

/// Pod A's EUI-64 link-local address (from MAC_A), the one link-local
/// address it can prove it owns.
const A_LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0xff, 0xfe00, 2);
const LINK_LOCAL_OTHER: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x99);
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

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

/// Pod A's egress rules (default deny), both families' CIDRs in one list:
/// an IPv4 rule at an even index is followed by its IPv6 twin, so the
/// rule a family's packet hits is `index + offset(family)`.
fn egress_rules() -> RuleSet {
    use Action::*;
    use RuleProtocol::*;
    RuleSet {
        default: Deny,
        rules: vec![
            rule(Deny, Some("198.51.100.0/24"), Tcp, Some((80, 80))),
            rule(Deny, Some("fd00:51:100::/48"), Tcp, Some((80, 80))),
            rule(Allow, Some("198.51.0.0/16"), Tcp, Some((80, 443))),
            rule(Allow, Some("fd00:51::/32"), Tcp, Some((80, 443))),
            rule(Allow, None, Udp, Some((53, 53))),
            rule(Allow, Some("198.51.0.0/16"), Icmp, None),
            rule(Allow, Some("fd00:51::/32"), Icmp, None),
        ],
    }
}

/// Pod A's ingress rules (default deny).
fn ingress_rules() -> RuleSet {
    use Action::*;
    use RuleProtocol::*;
    RuleSet {
        default: Deny,
        rules: vec![
            rule(Deny, Some("203.0.113.66/32"), Tcp, Some((8080, 8080))),
            rule(Deny, Some("2001:db8:113::66/128"), Tcp, Some((8080, 8080))),
            rule(Allow, Some("203.0.113.0/24"), Tcp, Some((8000, 8100))),
            rule(Allow, Some("2001:db8:113::/48"), Tcp, Some((8000, 8100))),
        ],
    }
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Replaces the source MAC of an Ethernet frame.
fn with_src_mac(mut f: Vec<u8>, mac: [u8; 6]) -> Vec<u8> {
    f[6..12].copy_from_slice(&mac);
    f
}

/// An Ethernet/IPv4 ARP frame from MAC_A (Ethernet source) with operation
/// `op`, sender `sha`/`spa` and target address `tpa`.
fn arp(op: u16, sha: [u8; 6], spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&MAC_A);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&tpa.octets());
    f
}

/// An ICMP (IPv4) or ICMPv6 error of type `ty`/`code` quoting the IP
/// header and first 8 transport bytes of `quoted` (a frame).
fn icmp_error(src: IpAddr, dst: IpAddr, ty: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let ip_len = if src.is_ipv6() {
        40
    } else {
        usize::from(quoted[ETH] & 0x0f) * 4
    };
    let mut body = vec![ty, code, 0, 0, 0, 0, 0, 0];
    if src.is_ipv6() && ty == 2 {
        // Packet too big: the MTU.
        body[4..8].copy_from_slice(&1280u32.to_be_bytes());
    }
    body.extend_from_slice(&quoted[ETH..ETH + ip_len + 8]);
    frame(src, dst, if src.is_ipv6() { ICMPV6 } else { ICMP }, body)
}

/// ICMPv6 neighbour discovery message types.
const ND_RS: u8 = 133;
const ND_RA: u8 = 134;
const ND_NS: u8 = 135;
const ND_NA: u8 = 136;
const ND_REDIRECT: u8 = 137;
const MLD2_REPORT: u8 = 143;
/// Source and target link-layer address options.
const OPT_SLLA: u8 = 1;
const OPT_TLLA: u8 = 2;

/// An NS or NA message for `target`, with a link-layer address option if
/// given.
fn nd_msg(ty: u8, target: Ipv6Addr, opt: Option<(u8, [u8; 6])>) -> Vec<u8> {
    let mut m = vec![ty, 0, 0, 0, 0, 0, 0, 0];
    if ty == ND_NA {
        // Solicited, override.
        m[4] = 0x60;
    }
    m.extend_from_slice(&target.octets());
    if let Some((t, mac)) = opt {
        m.extend_from_slice(&[t, 1]);
        m.extend_from_slice(&mac);
    }
    m
}

/// An NS or NA frame for `target`.
fn nd(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    ty: u8,
    target: Ipv6Addr,
    opt: Option<(u8, [u8; 6])>,
) -> Vec<u8> {
    frame(src, dst, ICMPV6, nd_msg(ty, target, opt))
}

/// A router advertisement, router solicitation or redirect (no options).
fn nd_other(src: Ipv6Addr, dst: Ipv6Addr, ty: u8) -> Vec<u8> {
    let len = match ty {
        ND_RA => 16,
        ND_REDIRECT => 40,
        _ => 8,
    };
    let mut m = vec![0u8; len];
    m[0] = ty;
    frame(src, dst, ICMPV6, m)
}

/// The solicited-node multicast address of `a`.
fn solicited(a: Ipv6Addr) -> Ipv6Addr {
    let o = a.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

fn v6(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V6(a) => a,
        IpAddr::V4(_) => panic!("{a} is not IPv6"),
    }
}

fn v4(a: IpAddr) -> Ipv4Addr {
    match a {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => panic!("{a} is not IPv4"),
    }
}

/// ICMP(v6) echo request and reply types of the family.
fn echo_types(n: &Net) -> (u8, u8, u8) {
    if n.v6 {
        (ICMPV6, 128, 129)
    } else {
        (ICMP, 8, 0)
    }
}

/// The loaded firewall programs, in the test's namespace, and what the
/// checks so far should have counted on pod A's attachment.
struct Datapath {
    ebpf: Ebpf,
    layout: PinLayout,
    /// Host ends of pods A, B, C.
    vh: [u32; 3],
    /// br0 (A and B) and br1 (C).
    br: [u32; 2],
    /// A device that is neither a bridge nor a veth (the uplink).
    uplink: u32,
    spec_a: FirewallSpec,
    tally: [u64; fw::STAT_SLOTS],
    dropped: u64,
    spoofed: u64,
}

impl Datapath {
    /// The verdict of `name` on `frame` crossing pod A's host veth, having
    /// come in on `ingress_ifindex` (0: locally originated).
    fn run(&mut self, name: &str, ingress_ifindex: u32, frame: &[u8]) -> u32 {
        // struct __sk_buff up to and including `ifindex` (offset 40);
        // `ingress_ifindex` is at offset 36.
        let mut ctx = [0u8; 44];
        ctx[36..40].copy_from_slice(&ingress_ifindex.to_ne_bytes());
        ctx[40..44].copy_from_slice(&self.vh[0].to_ne_bytes());
        let prog: &mut SchedClassifier = program(&mut self.ebpf, name).expect("program");
        prog.test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("test_run {name}: {e}"))
        .return_value
    }

    /// Runs `name` on `frame`, asserts the verdict and that exactly
    /// `slots` moved (each by one), and the node-wide counters with them.
    fn check(
        &mut self,
        name: &str,
        iif: u32,
        frame: &[u8],
        want: u32,
        slots: &[usize],
        what: &str,
    ) {
        let got = self.run(name, iif, frame);
        assert_eq!(got, want, "{what}: verdict of {name}");
        for s in slots {
            self.tally[*s] += 1;
        }
        if slots.iter().any(|s| {
            [
                fw::STAT_SPOOFED_IP,
                fw::STAT_SPOOFED_MAC,
                fw::STAT_SPOOFED_ARP,
                fw::STAT_SPOOFED_ND,
                fw::STAT_OTHER_DROPPED,
            ]
            .contains(s)
        }) {
            self.spoofed += 1;
        } else if want == SHOT {
            self.dropped += 1;
        }
        let counters = PolicyMaps::open(&self.layout)
            .expect("firewall maps")
            .counters(self.vh[0]);
        assert_eq!(counters, self.tally, "{what}: counters of pod A");
        assert_eq!(
            (self.stat("firewallDropped"), self.stat("firewallSpoofed")),
            (self.dropped, self.spoofed),
            "{what}: firewallDropped, firewallSpoofed"
        );
    }

    /// A frame pod A sends.
    fn sent(&mut self, frame: &[u8], want: u32, slots: &[usize], what: &str) {
        self.check(VETH_FROM_POD, 0, frame, want, slots, what);
    }

    /// A frame to pod A, routed in from `iif`.
    fn received_via(&mut self, iif: u32, frame: &[u8], want: u32, slots: &[usize], what: &str) {
        self.check(VETH_TO_POD, iif, frame, want, slots, what);
    }

    /// A frame to pod A from the uplink.
    fn received(&mut self, frame: &[u8], want: u32, slots: &[usize], what: &str) {
        self.received_via(self.uplink, frame, want, slots, what);
    }

    fn stat(&self, name: &str) -> u64 {
        read_stats(&self.layout)
            .expect("stats")
            .into_iter()
            .find(|(k, _)| *k == name)
            .unwrap_or_else(|| panic!("no counter {name}"))
            .1
    }

    /// Pod A's entry of the firewall section of the agent's status.
    fn report(&self) -> Value {
        let r = PolicyMaps::open(&self.layout)
            .expect("firewall maps")
            .report(&[("pod-a".into(), self.spec_a.clone())]);
        r["attachments"][0].clone()
    }

    /// Hit counts of a direction's rules, and of its default.
    fn hits(&self, dir: &str) -> (Vec<u64>, u64) {
        let r = self.report();
        let rules = r[dir]["rules"]
            .as_array()
            .expect("rules")
            .iter()
            .map(|h| h["hits"].as_u64().expect("hits"))
            .collect();
        (rules, r[dir]["defaultHits"].as_u64().expect("defaultHits"))
    }

    /// (Re)writes pod A's attachment as the agent does at ADD.
    fn apply_a(&mut self, policy: IngressPolicy, ingress: RuleSet, egress: RuleSet) {
        self.spec_a.ingress_policy = policy;
        self.spec_a.ingress = ingress;
        self.spec_a.egress = egress;
        apply(&self.layout, &self.spec_a);
    }
}

fn apply(layout: &PinLayout, spec: &FirewallSpec) {
    EntryMaps::open(layout)
        .expect("entry maps")
        .apply(&Entry::Firewall(Box::new(spec.clone())))
        .expect("firewall entry");
}

fn revoke(layout: &PinLayout, spec: &FirewallSpec) {
    EntryMaps::open(layout)
        .expect("entry maps")
        .revoke(&Entry::Firewall(Box::new(spec.clone())))
        .expect("revoke the firewall entry");
}

/// Runs `f` on freshly loaded firewall programs in a namespace of its own:
/// pods A (vh0) and B (vh1) on bridge br0, C (vh2) on br1, each with both
/// families' addresses (V4, V6); B and C allow everything, A has
/// `ingress`/`egress` and `policy`.
fn with_datapath(
    tag: &str,
    policy: IngressPolicy,
    ingress: RuleSet,
    egress: RuleSet,
    f: impl FnOnce(&mut Datapath) + Send + 'static,
) {
    require_e2e!();
    let ns = NetNs::new(tag);
    for i in 0..3 {
        let (h, p) = (format!("vh{i}"), format!("vp{i}"));
        ns.ip(&["link", "add", &h, "type", "veth", "peer", "name", &p]);
    }
    ns.ip(&["link", "add", "up0", "type", "veth", "peer", "name", "up1"]);
    for b in ["br0", "br1"] {
        ns.ip(&["link", "add", b, "type", "bridge"]);
    }
    let dir = TempDir::new(tag);
    let bpffs = BpfFs::mount(&dir.path().join("bpf"));
    let root = bpffs.path().join("root");
    // test_run looks the ifindexes up in the namespace of the thread.
    let path = ns.path().to_path_buf();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let index = |n: &str| nix::net::if_::if_nametoindex(n).expect("ifindex");
        let layout = PinLayout::new(root);
        let mut ebpf = load_pinned(&layout, MapSizes::default()).expect("load the object");
        for name in [VETH_FROM_POD, VETH_TO_POD] {
            let p: &mut SchedClassifier = program(&mut ebpf, name).expect("program");
            p.load()
                .unwrap_or_else(|e| panic!("verifier rejects {name}: {e}"));
        }
        let vh = [index("vh0"), index("vh1"), index("vh2")];
        let br = [index("br0"), index("br1")];
        let spec = |i: usize, mac: [u8; 6], bridge: usize, ips: [IpAddr; 2]| FirewallSpec {
            ifname: format!("vh{i}"),
            ifindex: vh[i],
            bridge: format!("br{bridge}"),
            bridge_ifindex: br[bridge],
            mac: mac_str(mac),
            ips: ips.to_vec(),
            ingress_policy: IngressPolicy::Open,
            bypass: false,
            ingress: RuleSet::default(),
            egress: RuleSet::default(),
        };
        apply(&layout, &spec(1, MAC_B, 0, [V4.pod_b, V6.pod_b]));
        apply(
            &layout,
            &spec(2, [2, 0, 0, 0, 0, 4], 1, [V4.pod_c, V6.pod_c]),
        );
        let mut spec_a = spec(0, MAC_A, 0, [V4.pod_a, V6.pod_a]);
        spec_a.ingress_policy = policy;
        spec_a.ingress = ingress;
        spec_a.egress = egress;
        apply(&layout, &spec_a);
        let mut dp = Datapath {
            ebpf,
            layout,
            vh,
            br,
            uplink: index("up0"),
            spec_a,
            tally: [0; fw::STAT_SLOTS],
            dropped: 0,
            spoofed: 0,
        };
        f(&mut dp);
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e));
    drop(bpffs);
}

/// The rules, conntrack and ICMP error checks of one family, against
/// egress_rules() and ingress_rules().
fn rules_and_conntrack(dp: &mut Datapath, n: &Net) {
    let a = n.pod_a;
    let off = usize::from(n.v6);
    let (icmp, echo_req, echo_rep) = echo_types(n);

    // Egress, new connections: first match wins.
    dp.sent(
        &frame(a, n.denied, TCP, tcp(40000, 80, SYN)),
        SHOT,
        OUT_DROP,
        "deny tcp/80 before the allow",
    );
    dp.sent(
        &frame(a, n.denied, TCP, tcp(40001, 81, SYN)),
        NEXT,
        OUT_NEW,
        "the allow's range around the deny's port",
    );
    dp.sent(
        &frame(a, n.near, TCP, tcp(40002, 80, SYN)),
        NEXT,
        OUT_NEW,
        "port 80 outside the deny's CIDR",
    );
    dp.sent(
        &frame(a, n.near, TCP, tcp(40003, 443, SYN)),
        NEXT,
        OUT_NEW,
        "last port of the range",
    );
    dp.sent(
        &frame(a, n.near, TCP, tcp(40004, 444, SYN)),
        SHOT,
        OUT_DROP,
        "past the range: default deny",
    );
    dp.sent(
        &frame(a, n.near, TCP, tcp(40005, 79, SYN)),
        SHOT,
        OUT_DROP,
        "below the range: default deny",
    );
    dp.sent(
        &frame(a, n.far, TCP, tcp(40006, 443, SYN)),
        SHOT,
        OUT_DROP,
        "outside every CIDR: default deny",
    );
    dp.sent(
        &frame(a, n.far, UDP, udp(5353, 53, b"q")),
        NEXT,
        OUT_NEW,
        "udp/53 to anywhere",
    );
    dp.sent(
        &frame(a, n.far, UDP, udp(5354, 54, b"q")),
        SHOT,
        OUT_DROP,
        "udp/54: default deny",
    );
    dp.sent(
        &frame(a, n.far, TCP, tcp(40007, 53, SYN)),
        SHOT,
        OUT_DROP,
        "tcp/53: the udp rule does not match",
    );
    dp.sent(
        &frame(a, n.near, icmp, echo(echo_req, 7, 1)),
        NEXT,
        OUT_NEW,
        "echo inside the icmp rule's CIDR",
    );
    dp.sent(
        &frame(a, n.far, icmp, echo(echo_req, 8, 1)),
        SHOT,
        OUT_DROP,
        "echo outside it: default deny",
    );

    // Ingress against its default deny: replies of allowed connections
    // pass, anything else does not.
    dp.received(
        &frame(n.near, a, TCP, tcp(443, 40003, SYN | ACK)),
        NEXT,
        IN_EST,
        "reply of an allowed tcp connection",
    );
    dp.received(
        &frame(n.near, a, TCP, tcp(443, 40099, SYN | ACK)),
        SHOT,
        IN_DROP,
        "same remote, another pod port",
    );
    dp.received(
        &frame(n.near, a, TCP, tcp(444, 40003, SYN | ACK)),
        SHOT,
        IN_DROP,
        "same pod port, another remote port",
    );
    dp.received(
        &frame(n.denied, a, TCP, tcp(80, 40000, SYN | ACK)),
        SHOT,
        IN_DROP,
        "reply of a denied connection",
    );
    dp.received(
        &frame(n.far, a, UDP, udp(53, 5353, b"a")),
        NEXT,
        IN_EST,
        "reply of an allowed udp flow",
    );
    dp.received(
        &frame(n.far, a, UDP, udp(54, 5354, b"a")),
        SHOT,
        IN_DROP,
        "reply of a denied udp flow",
    );
    dp.received(
        &frame(n.near, a, icmp, echo(echo_rep, 7, 1)),
        NEXT,
        IN_EST,
        "echo reply",
    );
    dp.received(
        &frame(n.far, a, icmp, echo(echo_rep, 8, 1)),
        SHOT,
        IN_DROP,
        "echo reply of a denied echo",
    );
    // The reply counts as established on the connection from now on.
    dp.sent(
        &frame(a, n.near, TCP, tcp(40003, 443, ACK)),
        NEXT,
        OUT_EST,
        "the pod's next packet",
    );

    // Ingress, new connections.
    dp.received(
        &frame(n.client_denied, a, TCP, tcp(5555, 8080, SYN)),
        SHOT,
        IN_DROP,
        "deny /32 before the allow",
    );
    dp.received(
        &frame(n.client_denied, a, TCP, tcp(5555, 8081, SYN)),
        NEXT,
        IN_NEW,
        "the allow around the denied port",
    );
    dp.received(
        &frame(n.client, a, TCP, tcp(5555, 8080, SYN)),
        NEXT,
        IN_NEW,
        "allowed client",
    );
    dp.received(
        &frame(n.client, a, TCP, tcp(5556, 8101, SYN)),
        SHOT,
        IN_DROP,
        "past the range: default deny",
    );
    dp.received(
        &frame(n.client, a, UDP, udp(5557, 8080, b"x")),
        SHOT,
        IN_DROP,
        "udp: the tcp rule does not match",
    );
    // The pod answers against its egress default deny.
    dp.sent(
        &frame(a, n.client, TCP, tcp(8080, 5555, SYN | ACK)),
        NEXT,
        OUT_EST,
        "the pod's reply",
    );
    dp.sent(
        &frame(a, n.client_denied, TCP, tcp(8080, 5555, SYN | ACK)),
        SHOT,
        OUT_DROP,
        "a 'reply' to a refused client",
    );

    // ICMP errors about tracked connections pass as part of them.
    let (unreach, port_code, big, big_code) = if n.v6 { (1, 4, 2, 0) } else { (3, 3, 3, 4) };
    let dns = frame(a, n.far, UDP, udp(5353, 53, b"q"));
    let refused = frame(a, n.far, UDP, udp(5354, 54, b"q"));
    let web = frame(a, n.near, TCP, tcp(40003, 443, ACK));
    dp.received(
        &icmp_error(n.far, a, unreach, port_code, &dns),
        NEXT,
        IN_EST,
        "port unreachable for the allowed flow",
    );
    dp.received(
        &icmp_error(n.router, a, big, big_code, &web),
        NEXT,
        IN_EST,
        "too big from a router, allowed connection",
    );
    dp.received(
        &icmp_error(n.far, a, unreach, port_code, &refused),
        SHOT,
        IN_DROP,
        "port unreachable for a denied flow",
    );
    let untracked = frame(a, n.near, TCP, tcp(40003, 444, ACK));
    dp.received(
        &icmp_error(n.router, a, big, big_code, &untracked),
        SHOT,
        IN_DROP,
        "too big about an untracked connection",
    );
    // The pod's error about a connection the client opened.
    let client_syn = frame(n.client, a, TCP, tcp(5555, 8080, SYN));
    dp.sent(
        &icmp_error(a, n.client, unreach, port_code, &client_syn),
        NEXT,
        OUT_EST,
        "the pod's error for an ingress connection",
    );
    let refused_syn = frame(n.client_denied, a, TCP, tcp(5555, 8080, SYN));
    dp.sent(
        &icmp_error(a, n.client_denied, unreach, port_code, &refused_syn),
        SHOT,
        OUT_DROP,
        "the pod's error for a refused one",
    );

    // What the agent's status reports: hits per rule (by the first
    // packet of each new connection) and the default's.
    let mut egress = vec![0u64; 7];
    egress[off] = 1;
    egress[2 + off] = 3;
    egress[4] = 1;
    egress[5 + off] = 1;
    // 444, 79, far:443, udp/54, tcp/53, echo far, the reply to the
    // refused client, the pod's error about it.
    assert_eq!(dp.hits("egress"), (egress, 8), "egress hits");
    let mut ingress = vec![0u64; 4];
    ingress[off] = 1;
    ingress[2 + off] = 2;
    // Every unrelated ingress packet above.
    assert_eq!(dp.hits("ingress"), (ingress, 9), "ingress hits");
    let r = dp.report();
    // Tracked: 81, near:80, near:443, udp/53, echo 7, client_denied:8081,
    // client:8080.
    assert_eq!(r["connections"], json!(7), "tracked connections");
    assert_eq!(
        r["counters"]["egressDropped"],
        json!(dp.tally[fw::STAT_EGRESS_DROPPED])
    );
    assert_eq!(
        r["counters"]["ingressEstablished"],
        json!(dp.tally[fw::STAT_INGRESS_ESTABLISHED])
    );
}

#[test]
fn v4_first_match_rules_conntrack_and_icmp_errors() {
    with_datapath(
        "polrules4",
        IngressPolicy::Open,
        ingress_rules(),
        egress_rules(),
        |dp| {
            rules_and_conntrack(dp, &V4);
        },
    );
}

#[test]
fn v6_first_match_rules_conntrack_icmp_errors_and_nd() {
    with_datapath(
        "polrules6",
        IngressPolicy::Open,
        ingress_rules(),
        egress_rules(),
        |dp| {
            rules_and_conntrack(dp, &V6);
            // Neighbour discovery passes against both default denies, without
            // touching the rules or conntrack.
            let (ingress_default, egress_default) = (dp.hits("ingress").1, dp.hits("egress").1);
            let a = v6(V6.pod_a);
            let router = v6(V6.router);
            dp.received(
                &nd(
                    router,
                    solicited(a),
                    ND_NS,
                    a,
                    Some((OPT_SLLA, FOREIGN_MAC)),
                ),
                NEXT,
                IN_NEW,
                "NS for the pod",
            );
            dp.received(
                &nd(
                    LINK_LOCAL_OTHER,
                    A_LINK_LOCAL,
                    ND_NA,
                    LINK_LOCAL_OTHER,
                    Some((OPT_TLLA, FOREIGN_MAC)),
                ),
                NEXT,
                IN_NEW,
                "NA to the pod",
            );
            dp.received(
                &nd_other(LINK_LOCAL_OTHER, ALL_NODES, ND_RA),
                NEXT,
                IN_NEW,
                "RA from the router",
            );
            dp.sent(
                &nd(
                    A_LINK_LOCAL,
                    solicited(LINK_LOCAL_OTHER),
                    ND_NS,
                    LINK_LOCAL_OTHER,
                    Some((OPT_SLLA, MAC_A)),
                ),
                NEXT,
                OUT_NEW,
                "the pod's NS",
            );
            dp.sent(
                &nd(a, router, ND_NA, a, Some((OPT_TLLA, MAC_A))),
                NEXT,
                OUT_NEW,
                "the pod's NA",
            );
            dp.sent(
                &nd_other(
                    A_LINK_LOCAL,
                    Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2),
                    ND_RS,
                ),
                NEXT,
                OUT_NEW,
                "the pod's RS",
            );
            dp.sent(
                &nd_other(
                    A_LINK_LOCAL,
                    Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x16),
                    MLD2_REPORT,
                ),
                NEXT,
                OUT_NEW,
                "the pod's MLDv2 report",
            );
            assert_eq!(
                (dp.hits("ingress").1, dp.hits("egress").1),
                (ingress_default, egress_default),
                "neighbour discovery meets no rule"
            );
            assert_eq!(dp.report()["connections"], json!(7), "nor conntrack");
        },
    );
}

/// `ingressPolicy` of one family: same-bridge, then (the attachment
/// rewritten) isolated. A's rules allow everything.
fn ingress_policy(dp: &mut Datapath, n: &Net) {
    let a = n.pod_a;
    let (br0, br1) = (dp.br[0], dp.br[1]);
    let syn = |src: IpAddr, sport: u16| frame(src, a, TCP, tcp(sport, 80, SYN));

    dp.apply_a(
        IngressPolicy::SameBridge,
        RuleSet::default(),
        RuleSet::default(),
    );
    dp.received_via(
        br0,
        &syn(n.pod_b, 1000),
        NEXT,
        IN_NEW,
        "same-bridge: a pod of the bridge",
    );
    dp.received_via(
        br1,
        &syn(n.pod_c, 1001),
        SHOT,
        IN_POLICY,
        "same-bridge: a pod of another bridge",
    );
    dp.received_via(
        dp.uplink,
        &syn(n.pod_c, 1002),
        SHOT,
        IN_POLICY,
        "same-bridge: that pod, whatever the way in",
    );
    dp.received_via(
        br1,
        &syn(n.unowned, 1003),
        SHOT,
        IN_POLICY,
        "same-bridge: routed in from another pod bridge",
    );
    dp.received_via(
        br0,
        &syn(n.unowned, 1004),
        NEXT,
        IN_NEW,
        "same-bridge: routed in from its own bridge",
    );
    dp.received_via(
        dp.uplink,
        &syn(n.far, 1005),
        NEXT,
        IN_NEW,
        "same-bridge: from outside",
    );
    dp.received_via(
        0,
        &syn(n.far, 1006),
        NEXT,
        IN_NEW,
        "same-bridge: from the node",
    );
    if n.v6 {
        dp.received_via(
            br0,
            &syn(IpAddr::V6(LINK_LOCAL_OTHER), 1007),
            NEXT,
            IN_NEW,
            "same-bridge: link-local",
        );
    }
    // The pod's own connection to C: C's replies pass.
    dp.sent(
        &frame(a, n.pod_c, TCP, tcp(41000, 80, SYN)),
        NEXT,
        OUT_NEW,
        "same-bridge: A opens to C",
    );
    dp.received_via(
        br1,
        &frame(n.pod_c, a, TCP, tcp(80, 41000, SYN | ACK)),
        NEXT,
        IN_EST,
        "same-bridge: C's reply",
    );

    dp.apply_a(
        IngressPolicy::Isolated,
        RuleSet::default(),
        RuleSet::default(),
    );
    dp.received_via(
        br0,
        &syn(n.pod_b, 2000),
        SHOT,
        IN_POLICY,
        "isolated: a pod of the bridge",
    );
    dp.received_via(
        br1,
        &syn(n.pod_c, 2001),
        SHOT,
        IN_POLICY,
        "isolated: a pod of another bridge",
    );
    dp.received_via(
        br0,
        &syn(n.unowned, 2002),
        SHOT,
        IN_POLICY,
        "isolated: routed in from its own bridge",
    );
    if n.v6 {
        dp.received_via(
            dp.uplink,
            &syn(IpAddr::V6(LINK_LOCAL_OTHER), 2003),
            SHOT,
            IN_POLICY,
            "isolated: link-local",
        );
    }
    dp.received_via(
        dp.uplink,
        &syn(n.far, 2004),
        NEXT,
        IN_NEW,
        "isolated: from outside",
    );
    dp.sent(
        &frame(a, n.pod_b, TCP, tcp(42000, 80, SYN)),
        NEXT,
        OUT_NEW,
        "isolated: A opens to B",
    );
    dp.received_via(
        br0,
        &frame(n.pod_b, a, TCP, tcp(80, 42000, SYN | ACK)),
        NEXT,
        IN_EST,
        "isolated: B's reply",
    );
    dp.received_via(
        br0,
        &frame(n.pod_b, a, TCP, tcp(80, 42001, SYN | ACK)),
        SHOT,
        IN_POLICY,
        "isolated: B, another port",
    );
}

#[test]
fn ingress_policy_same_bridge_and_isolated() {
    with_datapath(
        "polbridge",
        IngressPolicy::Open,
        RuleSet::default(),
        RuleSet::default(),
        |dp| {
            // Open: other pods are judged by the rules only (allow all).
            let a = V4.pod_a;
            dp.received_via(
                dp.br[1],
                &frame(V4.pod_c, a, TCP, tcp(999, 80, SYN)),
                NEXT,
                IN_NEW,
                "open: a pod of another bridge",
            );
            ingress_policy(dp, &V4);
            ingress_policy(dp, &V6);
        },
    );
}

#[test]
fn v4_spoofing_dropped_and_counted() {
    with_datapath(
        "polspoof4",
        IngressPolicy::Open,
        RuleSet::default(),
        RuleSet::default(),
        |dp| {
            let (a, b) = (v4(V4.pod_a), v4(V4.pod_b));
            let gw = Ipv4Addr::new(10, 77, 9, 1);
            let pkt =
                |src: Ipv4Addr| frame(src, Ipv4Addr::new(192, 0, 2, 1), UDP, udp(4000, 53, b"q"));
            dp.sent(&pkt(a), NEXT, OUT_NEW, "the pod's own address");
            dp.sent(&pkt(b), SHOT, SPOOF_IP, "another pod's address");
            dp.sent(&pkt(v4(V4.unowned)), SHOT, SPOOF_IP, "nobody's address");
            dp.sent(&pkt(Ipv4Addr::UNSPECIFIED), SHOT, SPOOF_IP, "0.0.0.0");
            dp.sent(
                &with_src_mac(pkt(a), FOREIGN_MAC),
                SHOT,
                SPOOF_MAC,
                "a foreign source MAC",
            );
            dp.sent(
                &with_src_mac(pkt(a), MAC_B),
                SHOT,
                SPOOF_MAC,
                "another pod's MAC",
            );
            dp.sent(
                &arp(1, MAC_A, a, gw),
                NEXT,
                &[],
                "ARP request for the gateway",
            );
            dp.sent(
                &arp(2, MAC_A, a, gw),
                NEXT,
                &[],
                "ARP reply for its own address",
            );
            dp.sent(
                &arp(1, MAC_A, Ipv4Addr::UNSPECIFIED, a),
                NEXT,
                &[],
                "ARP probe",
            );
            dp.sent(
                &arp(2, MAC_A, b, gw),
                SHOT,
                SPOOF_ARP,
                "ARP reply for another pod's address",
            );
            dp.sent(
                &arp(2, MAC_A, gw, b),
                SHOT,
                SPOOF_ARP,
                "ARP reply for the gateway's address",
            );
            dp.sent(
                &arp(1, FOREIGN_MAC, a, gw),
                SHOT,
                SPOOF_ARP,
                "ARP with a foreign sender MAC",
            );
            dp.sent(
                &with_src_mac(arp(1, MAC_A, a, gw), FOREIGN_MAC),
                SHOT,
                SPOOF_MAC,
                "ARP from a foreign MAC",
            );
            let mut lldp = with_src_mac(
                vec![0x01, 0x80, 0xc2, 0, 0, 0x0e, 0, 0, 0, 0, 0, 0, 0x88, 0xcc],
                MAC_A,
            );
            lldp.extend_from_slice(&[0; 46]);
            dp.sent(&lldp, SHOT, OTHER, "another ethertype");
            // What the pod receives is not anti-spoofed.
            dp.received(
                &frame(v4(V4.far), a, UDP, udp(53, 4000, b"a")),
                NEXT,
                IN_EST,
                "the reply",
            );
            let r = dp.report();
            assert_eq!(
                (
                    r["counters"]["spoofedIp"].clone(),
                    r["counters"]["spoofedMac"].clone(),
                    r["counters"]["spoofedArp"].clone(),
                    r["counters"]["otherDropped"].clone()
                ),
                (json!(3), json!(3), json!(3), json!(1)),
                "the agent's report"
            );
        },
    );
}

#[test]
fn v6_spoofing_and_neighbour_discovery_dropped_and_counted() {
    with_datapath(
        "polspoof6",
        IngressPolicy::Open,
        RuleSet::default(),
        RuleSet::default(),
        |dp| {
            let (a, b) = (v6(V6.pod_a), v6(V6.pod_b));
            let router = LINK_LOCAL_OTHER;
            let pkt = |src: Ipv6Addr| frame(src, v6(V6.far), UDP, udp(4000, 53, b"q"));
            dp.sent(&pkt(a), NEXT, OUT_NEW, "the pod's own address");
            dp.sent(&pkt(A_LINK_LOCAL), NEXT, OUT_NEW, "a link-local source");
            dp.sent(&pkt(b), SHOT, SPOOF_IP, "another pod's address");
            dp.sent(&pkt(v6(V6.unowned)), SHOT, SPOOF_IP, "nobody's address");
            dp.sent(&pkt(v6(V6.far)), SHOT, SPOOF_IP, "an outside address");
            dp.sent(
                &with_src_mac(pkt(a), FOREIGN_MAC),
                SHOT,
                SPOOF_MAC,
                "a foreign source MAC",
            );

            // Neighbor Advertisements: only for the pod's own addresses.
            dp.sent(
                &nd(a, router, ND_NA, a, Some((OPT_TLLA, MAC_A))),
                NEXT,
                OUT_NEW,
                "NA for its address",
            );
            dp.sent(
                &nd(A_LINK_LOCAL, router, ND_NA, A_LINK_LOCAL, None),
                NEXT,
                OUT_NEW,
                "NA for its EUI-64 link-local",
            );
            dp.sent(
                &nd(a, router, ND_NA, b, Some((OPT_TLLA, MAC_A))),
                SHOT,
                SPOOF_ND,
                "NA for another pod's address",
            );
            dp.sent(
                &nd(A_LINK_LOCAL, router, ND_NA, router, None),
                SHOT,
                SPOOF_ND,
                "NA for the router's link-local",
            );
            dp.sent(
                &nd(a, router, ND_NA, v6(V6.unowned), None),
                SHOT,
                SPOOF_ND,
                "NA for nobody's address",
            );
            dp.sent(
                &nd(a, router, ND_NA, a, Some((OPT_TLLA, FOREIGN_MAC))),
                SHOT,
                SPOOF_ND,
                "NA with a foreign TLLA",
            );
            // Solicitations: any target, but the pod's own link-layer address.
            dp.sent(
                &nd(
                    A_LINK_LOCAL,
                    solicited(router),
                    ND_NS,
                    router,
                    Some((OPT_SLLA, MAC_A)),
                ),
                NEXT,
                OUT_NEW,
                "NS with its SLLA",
            );
            dp.sent(
                &nd(Ipv6Addr::UNSPECIFIED, solicited(a), ND_NS, a, None),
                NEXT,
                OUT_NEW,
                "DAD NS from ::",
            );
            dp.sent(
                &nd(
                    A_LINK_LOCAL,
                    solicited(router),
                    ND_NS,
                    router,
                    Some((OPT_SLLA, FOREIGN_MAC)),
                ),
                SHOT,
                SPOOF_ND,
                "NS with a foreign SLLA",
            );
            dp.sent(
                &nd(a, solicited(router), ND_NS, router, Some((OPT_SLLA, MAC_B))),
                SHOT,
                SPOOF_ND,
                "NS with another pod's MAC",
            );
            // Router messages are the router's.
            dp.sent(
                &nd_other(A_LINK_LOCAL, ALL_NODES, ND_RA),
                SHOT,
                SPOOF_ND,
                "RA from the pod",
            );
            dp.sent(
                &nd_other(A_LINK_LOCAL, router, ND_REDIRECT),
                SHOT,
                SPOOF_ND,
                "redirect from the pod",
            );
            dp.sent(
                &nd_other(
                    A_LINK_LOCAL,
                    Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2),
                    ND_RS,
                ),
                NEXT,
                OUT_NEW,
                "RS from the pod",
            );
            // Behind a hop-by-hop options header, ND gets the same checks.
            dp.sent(
                &with_hop_by_hop(a, router, nd_msg(ND_NA, a, Some((OPT_TLLA, MAC_A)))),
                NEXT,
                OUT_NEW,
                "NA for its address behind hop-by-hop options",
            );
            dp.sent(
                &with_hop_by_hop(a, router, nd_msg(ND_NA, b, Some((OPT_TLLA, MAC_A)))),
                SHOT,
                SPOOF_ND,
                "NA for another pod's address behind hop-by-hop options",
            );
            // A foreign MAC is caught before anything ND says.
            dp.sent(
                &with_src_mac(
                    nd(a, router, ND_NA, a, Some((OPT_TLLA, MAC_A))),
                    FOREIGN_MAC,
                ),
                SHOT,
                SPOOF_MAC,
                "NA from a foreign MAC",
            );
            // Received ND is not the pod's claim.
            dp.received(
                &nd(
                    router,
                    A_LINK_LOCAL,
                    ND_NA,
                    router,
                    Some((OPT_TLLA, FOREIGN_MAC)),
                ),
                NEXT,
                IN_NEW,
                "the router's NA",
            );
            let r = dp.report();
            assert_eq!(
                (
                    r["counters"]["spoofedIp"].clone(),
                    r["counters"]["spoofedMac"].clone(),
                    r["counters"]["spoofedNd"].clone()
                ),
                (json!(3), json!(2), json!(9)),
                "the agent's report"
            );
        },
    );
}

/// An IPv6 frame whose ICMPv6 message follows a hop-by-hop options header
/// with a router alert, as every MLD message carries one (RFC 3810 5).
fn with_hop_by_hop(src: Ipv6Addr, dst: Ipv6Addr, mut icmp6: Vec<u8>) -> Vec<u8> {
    fill_l4_csum(src, dst, ICMPV6, &mut icmp6);
    let mut l4 = vec![ICMPV6, 0, 5, 2, 0, 0, 1, 0];
    l4.extend_from_slice(&icmp6);
    raw_frame(src, dst, 0, &l4)
}

/// Packets to a group (IPv4 multicast, the limited broadcast, IPv6
/// multicast) are judged by the rules but never tracked: the bridge floods
/// them to every port, and tracking them cost an entry per pair of pods.
/// Sent by pod A and flooded to it from pod B, they pass and the
/// attachment's tracked connections stay at zero; a unicast flow right
/// after is tracked (the count moves), so the count is live.
#[test]
fn group_destinations_are_not_tracked() {
    with_datapath(
        "polgrp",
        IngressPolicy::Open,
        RuleSet::default(),
        RuleSet::default(),
        |dp| {
            let groups: [(IpAddr, IpAddr, IpAddr); 3] = [
                (V4.pod_a, V4.pod_b, Ipv4Addr::new(224, 0, 0, 251).into()),
                (V4.pod_a, V4.pod_b, Ipv4Addr::BROADCAST.into()),
                (
                    V6.pod_a,
                    V6.pod_b,
                    Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0xfb).into(),
                ),
            ];
            let vh_b = dp.vh[1];
            for (a, b, group) in groups {
                dp.sent(
                    &frame(a, group, UDP, udp(5353, 5353, b"q")),
                    NEXT,
                    OUT_NEW,
                    &format!("pod A -> {group}"),
                );
                dp.received_via(
                    vh_b,
                    &frame(b, group, UDP, udp(5353, 5353, b"q")),
                    NEXT,
                    IN_NEW,
                    &format!("pod B -> {group}, flooded to A"),
                );
                assert_eq!(
                    dp.report()["connections"],
                    json!(0),
                    "{group}: group packets are not tracked"
                );
            }
            dp.sent(
                &frame(V4.pod_a, V4.far, UDP, udp(5353, 53, b"q")),
                NEXT,
                OUT_NEW,
                "a unicast flow",
            );
            assert_eq!(dp.report()["connections"], json!(1), "unicast is tracked");
        },
    );
}

#[test]
fn v6_mld_with_router_alert_passes_default_deny() {
    let deny = || RuleSet {
        default: Action::Deny,
        rules: Vec::new(),
    };
    with_datapath("polmld", IngressPolicy::Open, deny(), deny(), |dp| {
        let report = vec![MLD2_REPORT, 0, 0, 0, 0, 0, 0, 0];
        let mld_routers = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x16);
        dp.sent(
            &with_hop_by_hop(A_LINK_LOCAL, mld_routers, report),
            NEXT,
            OUT_NEW,
            "the pod's MLDv2 report",
        );
        let mut query = vec![130, 0, 0, 0, 0, 0, 0, 0];
        query.extend_from_slice(&[0; 20]);
        dp.received(
            &with_hop_by_hop(LINK_LOCAL_OTHER, ALL_NODES, query),
            NEXT,
            IN_NEW,
            "the router's MLD query",
        );
        // Anything else behind a hop-by-hop header is judged by the rules.
        let mut l4 = vec![UDP, 0, 1, 4, 0, 0, 0, 0];
        l4.extend_from_slice(&udp(4000, 53, b"q"));
        dp.sent(
            &raw_frame(V6.pod_a, V6.far, 0, &l4),
            SHOT,
            OUT_DROP,
            "udp behind hop-by-hop",
        );
    });
}

/// The fragments of the UDP datagram `l4` (checksum filled in here), of at
/// most `chunk` payload bytes each: IPv4 fragments, or IPv6 ones with a
/// fragment header, both with identification `id`.
fn fragments(src: IpAddr, dst: IpAddr, id: u16, mut l4: Vec<u8>, chunk: usize) -> Vec<Vec<u8>> {
    if let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) {
        return ipv4_fragments(s, d, UDP, id, l4, chunk);
    }
    fill_l4_csum(src, dst, UDP, &mut l4);
    let n = l4.len().div_ceil(chunk);
    l4.chunks(chunk)
        .enumerate()
        .map(|(i, part)| {
            let off_m = (i * chunk) as u16 | u16::from(i + 1 < n);
            let mut h = vec![UDP, 0];
            h.extend_from_slice(&off_m.to_be_bytes());
            h.extend_from_slice(&u32::from(id).to_be_bytes());
            h.extend_from_slice(part);
            raw_frame(src, dst, 44, &h)
        })
        .collect()
}

/// Fragments of a datagram share their first fragment's verdict (FW_FRAGS):
/// the rest of an allowed datagram passes the default deny, the rest of a
/// denied one does not, and a fragment that comes before its first
/// fragment has no verdict to share.
#[test]
fn fragments_get_their_first_fragments_verdict() {
    with_datapath(
        "polfrag",
        IngressPolicy::Open,
        ingress_rules(),
        egress_rules(),
        |dp| {
            for n in [&V4, &V6] {
                let payload = vec![0x5a; 600];
                let allowed = fragments(n.pod_a, n.far, 7, udp(5353, 53, &payload), 200);
                let denied = fragments(n.pod_a, n.far, 8, udp(5354, 54, &payload), 200);
                let early = fragments(n.pod_a, n.far, 9, udp(5355, 53, &payload), 200);
                assert_eq!(allowed.len(), 4);
                for (i, f) in allowed.iter().enumerate() {
                    dp.sent(
                        f,
                        NEXT,
                        OUT_NEW,
                        &format!("fragment {i} of an allowed datagram"),
                    );
                }
                for (i, f) in denied.iter().enumerate() {
                    dp.sent(
                        f,
                        SHOT,
                        OUT_DROP,
                        &format!("fragment {i} of a denied datagram"),
                    );
                }
                dp.sent(&early[1], SHOT, OUT_DROP, "a fragment before its first");
                // Only first fragments meet the rules.
                let off = usize::from(n.v6);
                let (rules, default) = dp.hits("egress");
                assert_eq!((rules[4], default), (1 + off as u64, 1 + off as u64));
            }
        },
    );
}

/// A DEL leaves its tracked connections to the agent's sweeper (finding
/// them walks the whole table). Until the sweep they count for nothing: a
/// new ADD on the same veth (same ifindex) draws a new cookie, so the old
/// connection's reply is a new connection again and meets the rules. The
/// sweep removes exactly the entries of the old attachment.
#[test]
fn connections_do_not_outlive_their_attachment() {
    with_datapath(
        "polcookie",
        IngressPolicy::Open,
        ingress_rules(),
        egress_rules(),
        |dp| {
            let query = frame(V4.pod_a, V4.far, UDP, udp(5353, 53, b"q"));
            let reply = frame(V4.far, V4.pod_a, UDP, udp(53, 5353, b"r"));
            dp.sent(&query, NEXT, OUT_NEW, "a query out (udp/53 allowed)");
            dp.received(&reply, NEXT, IN_EST, "its reply, tracked");

            revoke(&dp.layout, &dp.spec_a);
            let spec = dp.spec_a.clone();
            apply(&dp.layout, &spec);
            // The DEL took the attachment's counters with it.
            dp.tally = [0; fw::STAT_SLOTS];
            assert_eq!(dp.report()["connections"], json!(1), "left for the sweep");
            dp.received(
                &reply,
                SHOT,
                IN_DROP,
                "the old connection's reply under the new attachment: default deny",
            );

            let mut maps = PolicyMaps::open(&dp.layout).expect("firewall maps");
            assert_eq!(maps.sweep().expect("sweep"), 1, "the old connection");
            assert_eq!(dp.report()["connections"], json!(0));
            dp.sent(&query, NEXT, OUT_NEW, "the query again");
            dp.received(&reply, NEXT, IN_EST, "its reply, tracked again");
            assert_eq!(maps.sweep().expect("sweep"), 0, "a live connection stays");
            assert_eq!(dp.report()["connections"], json!(1));
        },
    );
}
