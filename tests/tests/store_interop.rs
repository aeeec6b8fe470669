//! The host-local on-disk store is shared with the reference: one file per
//! IP holding `<containerID>\r\n<ifname>`, `last_reserved_ip.<range>`, and a
//! flock'd `lock`. Either implementation must be able to take over a dataDir
//! from the other, and concurrent ADDs must never hand out an IP twice.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Barrier;

use cni_tests::prelude::*;

const SUBNET_24: &str = "10.23.0.0/24";

/// Calls an IPAM plugin directly, as a main plugin would delegate to it.
fn ipam(
    rt: &Runtime,
    ipam_type: &str,
    verb: &str,
    node: &Node,
    att: &Attachment,
    subnet: &str,
) -> Outcome {
    let conf = ipam_conf(node, "1.0.0", ipam_type, subnet);
    let conf = if verb == "ADD" {
        conf
    } else {
        with_prev_result(&conf, None)
    };
    rt.exec_plugin(ipam_type, verb, att, &conf).ran()
}

fn single_address(result: &Value) -> String {
    let addrs = result_addresses(result);
    assert_eq!(addrs.len(), 1, "expected one IP in {result}");
    addrs[0].addr().to_string()
}

fn net_dir(node: &Node) -> std::path::PathBuf {
    node.data_dir().join(NET_NAME)
}

/// Reserve with `first`, check the file format, release with `second`.
fn reserve_then_release(first: &str, second: &str) {
    let node = Node::new("store");
    let pod = node.pod("spod");
    // CNI_PATH with both suites: each call names its binary explicitly.
    let rt = node.runtime(Impl::Ours);
    let att = Attachment::new("store-ctr-1", &pod, "eth0");

    let result = ipam(&rt, first, "ADD", &node, &att, SUBNET_24).expect_success();
    let ip = single_address(&result);
    assert_eq!(
        ip, "10.23.0.2",
        "{first}: first free IP of the range (.1 is the gateway)"
    );
    let file = net_dir(&node).join(&ip);
    let content = std::fs::read(&file)
        .unwrap_or_else(|e| panic!("{first}: reservation file {} missing: {e}", file.display()));
    assert_eq!(
        content, b"store-ctr-1\r\neth0",
        "{first}: reservation file must hold `<containerID>\\r\\n<ifname>`"
    );
    let last = std::fs::read_to_string(net_dir(&node).join("last_reserved_ip.0"))
        .unwrap_or_else(|e| panic!("{first}: last_reserved_ip.0 missing: {e}"));
    assert_eq!(last.trim(), ip, "{first}: last_reserved_ip.0");
    assert!(
        net_dir(&node).join("lock").exists(),
        "{first}: no lock file"
    );

    ipam(&rt, second, "DEL", &node, &att, SUBNET_24).expect_success();
    assert!(
        !file.exists(),
        "{second} DEL did not release {ip} reserved by {first}"
    );
    assert!(node.reservations(NET_NAME).is_empty());
}

#[test]
fn ours_reserves_reference_releases() {
    require_e2e!();
    reserve_then_release("ebpf-host-local", "host-local");
}

#[test]
fn reference_reserves_ours_releases() {
    require_e2e!();
    reserve_then_release("host-local", "ebpf-host-local");
}

/// Alternating allocations continue each other's round-robin position
/// (`last_reserved_ip.0`), and each DELs the other's reservations.
#[test]
fn alternating_allocations_share_position_and_store() {
    require_e2e!();
    let node = Node::new("alt");
    let pod = node.pod("apod");
    let rt = node.runtime(Impl::Ours);
    let order = [
        "host-local",
        "ebpf-host-local",
        "host-local",
        "ebpf-host-local",
    ];
    let mut atts = Vec::new();
    for (i, plugin) in order.iter().enumerate() {
        let att = Attachment::new(&format!("alt-ctr-{i}"), &pod, "eth0");
        let ip = single_address(&ipam(&rt, plugin, "ADD", &node, &att, SUBNET_24).expect_success());
        assert_eq!(
            ip,
            format!("10.23.0.{}", i + 2),
            "allocation {i} by {plugin}"
        );
        atts.push(att);
    }
    let store = node.reservations(NET_NAME);
    for (i, att) in atts.iter().enumerate() {
        assert_eq!(
            store.get(&format!("10.23.0.{}", i + 2)),
            Some(&(att.container_id.clone(), "eth0".to_string()))
        );
    }
    for (i, att) in atts.iter().enumerate() {
        // Released by the other implementation than the one that reserved.
        let releaser = if order[i] == "host-local" {
            "ebpf-host-local"
        } else {
            "host-local"
        };
        ipam(&rt, releaser, "DEL", &node, att, SUBNET_24).expect_success();
    }
    assert!(
        node.reservations(NET_NAME).is_empty(),
        "left: {:?}",
        node.reservations(NET_NAME)
    );
}

/// A /28 with the default gateway (.1) excluded holds .2–.14: 13 leases.
const SUBNET_28: &str = "10.24.0.0/28";
const CAPACITY_28: usize = 13;
const PARALLEL: usize = 32;

/// Whether an error message says the pool is exhausted (wording differs
/// between implementations, but it must say so and name the range).
fn is_exhaustion(e: &CniErrorOut) -> bool {
    let m = e.msg.to_lowercase();
    let says_exhausted = [
        "no ip addresses available",
        "no ips available",
        "exhaust",
        "no free",
        "no available",
        "full",
    ]
    .iter()
    .any(|p| m.contains(p));
    says_exhausted && m.contains("10.24.0.")
}

/// 32 processes ADD at once into one /28: 13 distinct leases, 19 clear
/// exhaustion errors, and the store holds exactly the 13 winners.
fn parallel_adds(plugin_for: impl Fn(usize) -> &'static str + Sync) {
    let node = Node::new("par");
    let pod = node.pod("ppod");
    let rt = node.runtime(Impl::Ours);
    let barrier = Barrier::new(PARALLEL);
    let outcomes: Vec<(usize, Outcome)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..PARALLEL)
            .map(|i| {
                let (rt, node, pod, barrier, plugin_for) =
                    (&rt, &node, &pod, &barrier, &plugin_for);
                s.spawn(move || {
                    let att = Attachment::new(&format!("par-ctr-{i}"), pod, "eth0");
                    barrier.wait();
                    (i, ipam(rt, plugin_for(i), "ADD", node, &att, SUBNET_28))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });

    let mut leases: BTreeMap<String, String> = BTreeMap::new();
    let mut failures = Vec::new();
    for (i, out) in &outcomes {
        let id = format!("par-ctr-{i}");
        if out.success() {
            let ip = single_address(&out.expect_success());
            if let Some(other) = leases.insert(ip.clone(), id.clone()) {
                panic!("{ip} handed out twice: to {other} and {id}");
            }
        } else {
            let e = out.expect_error();
            assert!(
                is_exhaustion(&e),
                "ADD {i} failed but not with a clear exhaustion error: {out}"
            );
            failures.push(i);
        }
    }
    assert_eq!(
        leases.len(),
        CAPACITY_28,
        "successful ADDs (leases {leases:?}); failures {failures:?}"
    );
    assert_eq!(failures.len(), PARALLEL - CAPACITY_28);
    let store: BTreeMap<String, String> = node
        .reservations(NET_NAME)
        .into_iter()
        .map(|(ip, (id, ifname))| {
            assert_eq!(ifname, "eth0");
            (ip, id)
        })
        .collect();
    assert_eq!(store, leases, "store vs leases");
    let all: BTreeSet<String> = (2..=14).map(|h| format!("10.24.0.{h}")).collect();
    assert_eq!(leases.keys().cloned().collect::<BTreeSet<_>>(), all);

    // Everyone DELs (winners and losers), in parallel too: store ends empty.
    std::thread::scope(|s| {
        for i in 0..PARALLEL {
            let (rt, node, pod, plugin_for) = (&rt, &node, &pod, &plugin_for);
            s.spawn(move || {
                let att = Attachment::new(&format!("par-ctr-{i}"), pod, "eth0");
                ipam(rt, plugin_for(i), "DEL", node, &att, SUBNET_28).expect_success();
            });
        }
    });
    assert!(
        node.reservations(NET_NAME).is_empty(),
        "{:?}",
        node.reservations(NET_NAME)
    );
}

#[test]
fn parallel_adds_ours() {
    require_e2e!();
    parallel_adds(|_| "ebpf-host-local");
}

/// Both implementations at once on one dataDir: the flock'd `lock` must
/// serialise them against each other.
#[test]
fn parallel_adds_mixed_with_reference() {
    require_e2e!();
    parallel_adds(|i| {
        if i % 2 == 0 {
            "ebpf-host-local"
        } else {
            "host-local"
        }
    });
}

/// Harness self-test: the reference passes the same checks.
#[test]
fn parallel_adds_reference_baseline() {
    require_e2e!();
    parallel_adds(|_| "host-local");
}
