//! Bad input: each case must fail with the spec's error JSON, the right
//! code, a message naming the offending field or variable, and no change at
//! all on the node (namespaces, IPAM store, state dir, bpffs).
//!
//! Every case runs on a node that already has one pod attached (so the
//! bridge and the store exist, as on a real node) against a second, empty
//! pod namespace.
use cni_tests::prelude::*;

/// What a case gets to set up and mutate.
struct Ctx<'a> {
    node: &'a Node,
    pod: &'a NetNs,
}

/// One bad-input case.
struct Case {
    /// Accepted error codes.
    codes: &'static [u64],
    /// The message must contain one of these (case-insensitive).
    msg_any: &'static [&'static str],
    /// Runs before the "before" snapshot (e.g. creates a conflicting link).
    setup: fn(&Ctx),
    /// Turns the valid ADD (config + environment) into the bad one.
    mutate: fn(&Ctx, &mut Value, &mut Invocation),
}

fn no_setup(_: &Ctx) {}

fn run_case(name: &str, case: Case, imp: Impl) {
    let node = Node::new("bad");
    let existing = node.pod("bexist");
    let pod = node.pod("bpod");
    let rt = node.runtime(imp);
    let conf = bridge_conf_for(&node, "1.0.0", imp);
    let existing_att = Attachment::new("bad-input-existing", &existing, "eth0");
    let existing_result = rt.add(&conf, &existing_att);

    let ctx = Ctx {
        node: &node,
        pod: &pod,
    };
    (case.setup)(&ctx);
    let before = node.snapshot(&[&existing, &pod]);

    let mut conf = conf.clone();
    let mut inv = Invocation::new("ADD")
        .container("bad-input-ctr")
        .netns(pod.path_str())
        .ifname("eth0");
    (case.mutate)(&ctx, &mut conf, &mut inv);
    if inv.stdin.is_empty() {
        inv = inv.stdin_json(&conf);
    }
    let out = rt.invoke(imp.bridge_type(), inv).ran();
    let err = out.expect_error();
    assert!(
        case.codes.contains(&err.code),
        "{name}: error code {} not in {:?}: {out}",
        err.code,
        case.codes
    );
    let msg = err.msg.to_lowercase();
    assert!(
        case.msg_any.iter().any(|w| msg.contains(&w.to_lowercase())),
        "{name}: msg {:?} names none of {:?}: {out}",
        err.msg,
        case.msg_any
    );

    let after = node.snapshot(&[&existing, &pod]);
    before.assert_unchanged(&after, &format!("{name}: failed ADD changed the node"));

    rt.del(
        &bridge_conf_for(&node, "1.0.0", imp),
        &existing_att,
        Some(&existing_result),
    )
    .expect_success();
}

/// One #[test] per case, so they run in parallel and fail separately.
macro_rules! bad_input_case {
    ($name:ident, $case:expr) => {
        #[test]
        fn $name() {
            require_e2e!();
            run_case(stringify!($name), $case, Impl::Ours);
        }
    };
}

bad_input_case!(
    malformed_json,
    Case {
        codes: &[6],
        msg_any: &["json", "decode", "parse", "eof"],
        setup: no_setup,
        mutate: |_, _, inv| inv.stdin = br#"{"cniVersion": "1.0.0", "name": "#.to_vec(),
    }
);

bad_input_case!(
    missing_type,
    Case {
        codes: &[6, 7],
        msg_any: &["type"],
        setup: no_setup,
        mutate: |_, conf, _| {
            conf.as_object_mut().unwrap().remove("type");
        },
    }
);

bad_input_case!(
    missing_name,
    Case {
        codes: &[6, 7],
        msg_any: &["name"],
        setup: no_setup,
        mutate: |_, conf, _| {
            conf.as_object_mut().unwrap().remove("name");
        },
    }
);

bad_input_case!(
    unknown_cni_version,
    Case {
        codes: &[1],
        msg_any: &["9.9.9", "cniVersion"],
        setup: no_setup,
        mutate: |_, conf, _| conf["cniVersion"] = json!("9.9.9"),
    }
);

bad_input_case!(
    bad_subnet,
    Case {
        codes: &[7],
        msg_any: &["subnet"],
        setup: no_setup,
        mutate: |_, conf, _| conf["ipam"]["ranges"] = json!([[{"subnet": "10.22.0.0/33"}]]),
    }
);

bad_input_case!(
    overlapping_ranges,
    Case {
        codes: &[7],
        msg_any: &["overlap"],
        setup: no_setup,
        mutate: |_, conf, _| {
            conf["ipam"]["ranges"] =
                json!([[{"subnet": "10.22.0.0/24"}], [{"subnet": "10.22.0.128/25"}]])
        },
    }
);

bad_input_case!(
    range_start_outside_subnet,
    Case {
        codes: &[7],
        msg_any: &["rangeStart"],
        setup: no_setup,
        mutate: |_, conf, _| {
            conf["ipam"]["ranges"] =
                json!([[{"subnet": "10.22.0.0/24", "rangeStart": "10.99.0.5"}]])
        },
    }
);

bad_input_case!(
    missing_cni_command,
    Case {
        codes: &[4],
        msg_any: &["CNI_COMMAND"],
        setup: no_setup,
        mutate: |_, _, inv| inv.command = None,
    }
);

bad_input_case!(
    missing_cni_netns_on_add,
    Case {
        codes: &[4],
        msg_any: &["CNI_NETNS"],
        setup: no_setup,
        mutate: |_, _, inv| inv.netns = None,
    }
);

bad_input_case!(
    invalid_container_id,
    Case {
        codes: &[4],
        msg_any: &["CNI_CONTAINERID", "containerid", "container id"],
        setup: no_setup,
        mutate: |_, _, inv| inv.container_id = Some("bad/id with spaces!".into()),
    }
);

bad_input_case!(
    ifname_too_long,
    Case {
        codes: &[4],
        msg_any: &["CNI_IFNAME", "ifname", "interface name"],
        setup: no_setup,
        // 16 characters: one more than IFNAMSIZ-1.
        mutate: |_, _, inv| inv.ifname = Some("eth0123456789abc".into()),
    }
);

bad_input_case!(
    netns_path_is_a_regular_file,
    Case {
        codes: &[4],
        msg_any: &["CNI_NETNS", "netns", "namespace"],
        setup: |ctx| {
            std::fs::write(ctx.node.dir.path().join("not-a-netns"), b"").unwrap();
        },
        mutate: |ctx, _, inv| {
            inv.netns = Some(ctx.node.dir.join_str("not-a-netns"));
        },
    }
);

bad_input_case!(
    interface_already_present_in_pod,
    Case {
        codes: &[4, 999],
        msg_any: &["eth0", "CNI_IFNAME"],
        setup: |ctx| {
            ctx.pod.ip(&[
                "link", "add", "eth0", "type", "veth", "peer", "name", "eth0peer",
            ]);
        },
        mutate: |_, _, _| {},
    }
);

bad_input_case!(
    bridge_name_with_nul,
    Case {
        codes: &[7],
        msg_any: &["bridge"],
        setup: no_setup,
        // Netlink would stop at the NUL: ADD on a bridge named "fz".
        mutate: |_, conf, _| conf["bridge"] = json!("fz\u{0}b1"),
    }
);

bad_input_case!(
    bridge_name_too_long,
    Case {
        codes: &[7],
        msg_any: &["bridge"],
        setup: no_setup,
        mutate: |_, conf, _| conf["bridge"] = json!("a-bridge-name-of-20"),
    }
);

/// A container ID of 5,000 characters (the spec sets no limit, runtimes
/// hash or concatenate IDs): the full chain's ADD, CHECK and DEL work, the
/// record is found again, and DEL leaves nothing.
#[test]
fn very_long_container_ids_work() {
    require_e2e!();
    use cni_tests::agentctl::AgentProc;
    use cni_tests::residue::residue;
    use cni_tests::uplink::{masq_conf, External};
    let node = Node::new("longid");
    let ext = External::direct(&node);
    let _agent = AgentProc::start(&node, &[]);
    let pod = node.pod("longidpod");
    let rt = node.runtime(Impl::Ours);
    let list = conflist_of(&masq_conf(
        &node,
        "longidnet",
        "cnilongid",
        &ext.pod_subnet(),
    ));
    let warm = Attachment::new("longid-warm", &pod, "eth0");
    let res = rt.add_list(&list, &warm).unwrap_or_else(|o| panic!("{o}"));
    rt.del_list(&list, &warm, Some(&res))
        .unwrap_or_else(|o| panic!("{o}"));
    let baseline = residue(&node, &pod, "longidnet");

    let id: String = (0..5000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let att = Attachment::new(&id, &pod, "eth0");
    let res = rt
        .add_list(&list, &att)
        .unwrap_or_else(|o| panic!("ADD with a 5,000-character ID: {o}"));
    rt.check_list(&list, &att, &res)
        .unwrap_or_else(|o| panic!("CHECK: {o}"));
    let records = cni_tests::agentctl::admin(&node, "records");
    assert!(
        cni_tests::agentctl::record_of(&records, "longidnet", &id, "eth0").is_some(),
        "the record holds the whole ID"
    );
    rt.del_list(&list, &att, Some(&res))
        .unwrap_or_else(|o| panic!("DEL: {o}"));
    rt.del_list(&list, &att, Some(&res))
        .unwrap_or_else(|o| panic!("second DEL: {o}"));
    assert_json_eq(
        "baseline",
        &baseline,
        "after DEL",
        &residue(&node, &pod, "longidnet"),
        "a 5,000-character container ID",
    );
}

/// Harness self-test: the reference fails these cases with no change too,
/// so a zero-change failure of ours is not snapshot noise.
#[test]
fn harness_reference_zero_change() {
    require_e2e!();
    let cases = [
        (
            "missing_cni_netns_on_add",
            Case {
                codes: &[4],
                msg_any: &["CNI_NETNS"],
                setup: no_setup,
                mutate: |_, _, inv| inv.netns = None,
            },
        ),
        // (Not rangeStart outside the subnet: the reference bridge creates
        // the veth pair before asking IPAM and leaves it behind when IPAM
        // fails. Ours must not: `range_start_outside_subnet` checks that.)
        (
            "invalid_container_id",
            Case {
                codes: &[4],
                msg_any: &["containerID"],
                setup: no_setup,
                mutate: |_, _, inv| inv.container_id = Some("bad/id with spaces!".into()),
            },
        ),
        (
            "interface_already_present_in_pod",
            Case {
                codes: &[999],
                msg_any: &["eth0"],
                setup: |ctx| {
                    ctx.pod.ip(&[
                        "link", "add", "eth0", "type", "veth", "peer", "name", "eth0peer",
                    ]);
                },
                mutate: |_, _, _| {},
            },
        ),
    ];
    for (name, case) in cases {
        run_case(name, case, Impl::Reference);
    }
}

/// The agent is the authority on where records and pins live: a plugin
/// config whose `stateDir` or `bpffsRoot` is not the agent's fails ADD with
/// code 7 naming the key (instead of records split between two dirs that
/// DEL then leaks); a `stateDir` that is a file, or a `bpffsRoot` off any
/// bpf filesystem, too. The runtime's DEL after the failure leaves nothing.
#[test]
fn path_keys_must_be_the_agents() {
    require_e2e!();
    use cni_tests::agentctl::{admin, AgentProc};
    use cni_tests::residue::residue;
    use cni_tests::uplink::{masq_conf, External};
    let node = Node::new("paths");
    let ext = External::direct(&node);
    let _agent = AgentProc::start(&node, &[]);
    let pod = node.pod("pathspod");
    let rt = node.runtime(Impl::Ours);
    let conf = masq_conf(&node, "pathsnet", "cnipaths", &ext.pod_subnet());
    let warm = Attachment::new("paths-warm", &pod, "eth0");
    let list = conflist_of(&conf);
    let res = rt.add_list(&list, &warm).unwrap_or_else(|o| panic!("{o}"));
    rt.del_list(&list, &warm, Some(&res))
        .unwrap_or_else(|o| panic!("{o}"));
    let baseline = residue(&node, &pod, "pathsnet");

    let elsewhere = TempDir::new("paths-elsewhere");
    let a_file = elsewhere.path().join("a-file");
    std::fs::write(&a_file, "x").expect("write a file");
    for (key, value, says) in [
        (
            "stateDir",
            elsewhere.path().join("state"),
            "differs from the agent's",
        ),
        ("stateDir", a_file.clone(), "not a directory"),
        (
            "bpffsRoot",
            elsewhere.path().to_path_buf(),
            "not on a bpf filesystem",
        ),
    ] {
        let mut bad = conf.clone();
        bad[key] = json!(value);
        let list = conflist_of(&bad);
        let att = Attachment::new("paths-ctr", &pod, "eth0");
        let out = rt
            .add_list(&list, &att)
            .expect_err("ADD with foreign path keys");
        let err = out.expect_error();
        assert_eq!(err.code, 7, "{key}={}: {err:?}", value.display());
        assert!(
            err.msg.contains(key) && err.msg.contains(says),
            "{key}: {} should name it and say {says:?}",
            err.msg
        );
        assert_json_eq(
            "baseline",
            &baseline,
            "after the refused ADD",
            &residue(&node, &pod, "pathsnet"),
            key,
        );
        assert_eq!(admin(&node, "records"), json!([]), "{key}: no record left");
    }
    let leftovers: Vec<_> = std::fs::read_dir(elsewhere.path())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        leftovers.iter().all(|n| n == "a-file" || n == "state"),
        "{leftovers:?}"
    );
    let stray = cni_tests::residue::files(&elsewhere.path().join("state"));
    assert!(
        stray.is_empty(),
        "records left in the foreign stateDir: {stray:?}"
    );
}
