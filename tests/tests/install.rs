//! `cni-agent install` / `uninstall` as an init container or an operator
//! runs them, into temp bin/conf/state dirs (no cluster needed: the pod
//! CIDRs come from `--pod-cidr`, or from a fake Kubernetes API server over
//! TLS in a netns, with the service account volume bind-mounted in a
//! private mount namespace).
//!
//! - the installed conflist and plugins serve a real pod (ADD, CHECK, DEL
//!   by the harness runtime with only the installed bin dir on CNI_PATH)
//!   against a node netns with an agent, masqueraded to the external side;
//! - a re-run changes nothing (same inode and mtime) and says "unchanged";
//! - uninstall leaves the dirs as they were, another plugin it replaced
//!   (a `loopback`) put back;
//! - each bad input fails with one line naming it and changes nothing, not
//!   even a directory's mtime.
//! - without --pod-cidr, the CIDRs are the Node's spec.podCIDRs as kube's
//!   in-cluster client reads them; a rejected token fails with one line
//!   naming the API and changes nothing.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use cni_tests::agent::Agent;
use cni_tests::agentctl::{admin, record_of, AgentProc};
use cni_tests::plugin::ours_bin_dir;
use cni_tests::prelude::*;
use cni_tests::traffic::{tcp_echo, TcpEchoServer};
use cni_tests::uplink::{result_ipv4, External};

const PLUGINS: [&str; 6] = [
    "ebpf-bridge",
    "ebpf-host-local",
    "ebpf-portmap",
    "ebpf-firewall",
    "ebpf-bandwidth",
    "loopback",
];
const CONF_NAME: &str = "00-cni-ebpf.conflist";
const ECHO_PORT: u16 = 7100;

/// Runs `cni-agent <verb> <args>` without NODE_NAME (so the flag path is
/// the only source of CIDRs).
fn agent_cmd(verb: &str, args: &[&str]) -> Output {
    let bin = Agent::binary().expect("cni-agent not built (cargo build -p cni-agent --bins)");
    Command::new(bin)
        .arg(verb)
        .args(args)
        .env_remove("NODE_NAME")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdin(Stdio::null())
        .output()
        .expect("run cni-agent")
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[track_caller]
fn succeeds(o: Output) -> String {
    assert!(o.status.success(), "expected success: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Every entry under `root`: kind, mode and content (a digest for large
/// files); with `strict`, also inode and mtime, of directories too.
fn tree(root: &Path, strict: bool) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, strict: bool, out: &mut BTreeMap<String, String>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        for p in entries {
            let m = std::fs::symlink_metadata(&p).expect("stat");
            let rel = p
                .strip_prefix(root)
                .unwrap_or(&p)
                .to_string_lossy()
                .into_owned();
            let mut line = format!("mode {:o}", m.permissions().mode() & 0o7777);
            if strict {
                line.push_str(&format!(
                    " ino {} mtime {}.{}",
                    m.ino(),
                    m.mtime(),
                    m.mtime_nsec()
                ));
            }
            if m.is_dir() {
                out.insert(format!("{rel}/"), line);
                walk(root, &p, strict, out);
            } else if m.is_file() {
                let content = if m.len() < 64 * 1024 {
                    String::from_utf8_lossy(&std::fs::read(&p).expect("read")).into_owned()
                } else {
                    format!("{} bytes", m.len())
                };
                out.insert(rel, format!("{line} {content:?}"));
            } else {
                out.insert(rel, format!("{line} other"));
            }
        }
    }
    let mut out = BTreeMap::new();
    let m = std::fs::metadata(root).expect("stat root");
    if strict {
        out.insert(
            "./".into(),
            format!("ino {} mtime {}.{}", m.ino(), m.mtime(), m.mtime_nsec()),
        );
    }
    walk(root, root, strict, &mut out);
    out
}

fn write_exec(path: &Path, body: &str) {
    std::fs::write(path, body).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Inode and mtime of each regular file under the dirs.
fn stamps(dirs: &[&Path]) -> BTreeMap<PathBuf, (u64, i64, i64)> {
    let mut out = BTreeMap::new();
    for d in dirs {
        for e in std::fs::read_dir(d).expect("ls").flatten() {
            let m = e.metadata().expect("stat");
            if m.is_file() {
                out.insert(e.path(), (m.ino(), m.mtime(), m.mtime_nsec()));
            }
        }
    }
    out
}

#[test]
fn installed_conflist_serves_a_pod_rerun_is_a_noop_uninstall_restores() {
    require_e2e!();
    let node = Node::new("inst");
    let ext = External::direct(&node);
    let _agent = AgentProc::start(&node, &[]);
    let dirs = TempDir::new("instdirs");
    let bin = dirs.path().join("bin");
    let conf = dirs.path().join("net.d");
    std::fs::create_dir(&bin).expect("mkdir bin");
    std::fs::create_dir(&conf).expect("mkdir conf");
    // What a node has before: another loopback (say the reference one),
    // and another network's config that sorts after ours.
    write_exec(
        &bin.join("loopback"),
        "#!/bin/sh\n# someone else's loopback\n",
    );
    std::fs::write(
        conf.join("99-other.conflist"),
        r#"{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"bridge"}]}"#,
    )
    .expect("write other conflist");
    let before = tree(dirs.path(), false);

    let v4 = ext.pod_subnet();
    let v6 = format!("fd00:77:{}::/64", ext.index);
    let args = [
        "--bin-dir".to_string(),
        s(&bin),
        "--conf-dir".into(),
        s(&conf),
        "--state-dir".into(),
        s(&node.state_dir()),
        "--bpffs-root".into(),
        s(node.bpffs.path()),
        "--socket".into(),
        s(&node.agent_socket()),
        "--ipam-data-dir".into(),
        s(&node.data_dir()),
        "--pod-cidr".into(),
        v4.clone(),
        "--pod-cidr".into(),
        v6.clone(),
        "--network".into(),
        "instnet".into(),
        "--bridge".into(),
        "cniinst0".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // No --from: the plugins come from the running cni-agent's directory.
    let out = succeeds(agent_cmd("install", &args));
    eprintln!("{out}");
    assert!(
        out.contains("set aside") && out.contains("loopback.cni-ebpf-saved"),
        "the foreign loopback is saved: {out}"
    );
    for name in PLUGINS {
        let installed = bin.join(name);
        let m = std::fs::metadata(&installed).expect("installed plugin");
        assert_eq!(m.permissions().mode() & 0o777, 0o755, "{name} mode");
        assert!(
            std::fs::read(&installed).expect("read")
                == std::fs::read(ours_bin_dir().join(name)).expect("read source"),
            "{name} is a copy of the built plugin"
        );
    }
    let list: Value =
        serde_json::from_slice(&std::fs::read(conf.join(CONF_NAME)).expect("conflist"))
            .expect("conflist is JSON");
    let types: Vec<&str> = list["plugins"]
        .as_array()
        .expect("plugins")
        .iter()
        .map(|p| p["type"].as_str().expect("type"))
        .collect();
    assert_eq!(
        types,
        [
            "ebpf-bridge",
            "ebpf-portmap",
            "ebpf-firewall",
            "ebpf-bandwidth"
        ]
    );
    let bridge = &list["plugins"][0];
    assert_eq!(bridge["isGateway"], true);
    assert_eq!(bridge["ipMasq"], true);
    assert_eq!(
        bridge["ipam"]["ranges"],
        json!([[{"subnet": v4}], [{"subnet": v6}]])
    );
    assert_eq!(
        bridge["ipam"]["routes"],
        json!([{"dst": "0.0.0.0/0"}, {"dst": "::/0"}])
    );
    assert_eq!(list["plugins"][1]["capabilities"]["portMappings"], true);
    assert_eq!(list["plugins"][3]["capabilities"]["bandwidth"], true);
    for p in list["plugins"].as_array().expect("plugins") {
        assert_eq!(p["stateDir"], json!(node.state_dir()), "path keys: {p}");
        assert_eq!(
            p["agentSocket"],
            json!(node.agent_socket()),
            "path keys: {p}"
        );
    }

    // A pod through the installed conflist, plugins found only in the
    // installed bin dir.
    let rt = cni_tests::runtime::runtime_with_path(&node.ns, vec![bin.clone()]);
    let pod = node.pod("instpod");
    let mut att = Attachment::new("inst-ctr", &pod, "eth0");
    att.capability_args.insert(
        "bandwidth".into(),
        json!({"egressRate": 100_000_000, "egressBurst": 100_000_000}),
    );
    let result = rt
        .add_list(&list, &att)
        .unwrap_or_else(|o| panic!("ADD through the installed conflist: {o}"));
    let ips: Vec<String> = result["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .map(|i| i["address"].as_str().expect("address").to_string())
        .collect();
    let v4_net: ipnet::IpNet = v4.parse().expect("v4");
    let v6_net: ipnet::IpNet = v6.parse().expect("v6");
    let inside = |net: &ipnet::IpNet| {
        ips.iter()
            .any(|a| net.contains(&a.parse::<ipnet::IpNet>().expect("CIDR").addr()))
    };
    assert!(
        inside(&v4_net) && inside(&v6_net),
        "one IP per CIDR: {ips:?}"
    );
    let server = TcpEchoServer::start(&ext.ns, ECHO_PORT);
    let echo = tcp_echo(
        &pod,
        SocketAddr::new(ext.ext_addr.into(), ECHO_PORT),
        "through the installed chain",
    )
    .unwrap_or_else(|e| panic!("pod -> external: {e}"));
    assert_eq!(
        echo.seen_as.ip(),
        std::net::IpAddr::V4(ext.node_addr),
        "masqueraded to the uplink address"
    );
    drop(server);
    let entries = record_of(&admin(&node, "records"), "instnet", "inst-ctr", "eth0")
        .expect("the agent recorded the attachment");
    assert!(
        entries.to_string().contains("rate-limit"),
        "bandwidth applied: {entries}"
    );
    assert_eq!(result_ipv4(&result).to_string().split('.').count(), 4);
    rt.check_list(&list, &att, &result)
        .unwrap_or_else(|o| panic!("CHECK: {o}"));
    rt.del_list(&list, &att, Some(&result))
        .unwrap_or_else(|o| panic!("DEL: {o}"));
    assert!(
        record_of(&admin(&node, "records"), "instnet", "inst-ctr", "eth0").is_none(),
        "DEL removed the record"
    );

    // Re-run: nothing rewritten.
    let stamped = stamps(&[&bin, &conf, &node.state_dir()]);
    let out = succeeds(agent_cmd("install", &args));
    assert!(out.contains("install: unchanged"), "{out}");
    assert!(!out.contains("written"), "{out}");
    assert_eq!(
        stamps(&[&bin, &conf, &node.state_dir()]),
        stamped,
        "a re-run must not touch any file (inode, mtime)"
    );

    // Uninstall: the dirs as before, the other loopback back in place.
    let out = succeeds(agent_cmd(
        "uninstall",
        &["--state-dir", &s(&node.state_dir())],
    ));
    eprintln!("{out}");
    assert!(out.contains("restored"), "{out}");
    assert_json_eq(
        "before install",
        &json!(before),
        "after uninstall",
        &json!(tree(dirs.path(), false)),
        "uninstall",
    );
    assert!(
        !node.state_dir().join("install-manifest.json").exists(),
        "the manifest goes with uninstall"
    );
}

/// Fake plugins (install never runs them) in `<root>/src`, and the bin,
/// conf and state dirs, with another network's config sorting after ours.
struct Dirs {
    root: TempDir,
}

impl Dirs {
    fn new(tag: &str) -> Dirs {
        let root = TempDir::new(tag);
        for d in ["src", "bin", "net.d", "state"] {
            std::fs::create_dir(root.path().join(d)).expect("mkdir");
        }
        for p in PLUGINS {
            write_exec(
                &root.path().join("src").join(p),
                &format!("#!/bin/sh\necho {p}\n"),
            );
        }
        std::fs::write(
            root.path().join("net.d/99-late.conflist"),
            r#"{"cniVersion":"1.0.0","name":"late","plugins":[{"type":"bridge"}]}"#,
        )
        .expect("write");
        Dirs { root }
    }
    fn p(&self, rel: &str) -> String {
        s(&self.root.path().join(rel))
    }
    /// The usual arguments, with `cidr` (none if empty).
    fn args(&self, cidr: &[&str]) -> Vec<String> {
        let mut v = vec![
            "--from".to_string(),
            self.p("src"),
            "--bin-dir".into(),
            self.p("bin"),
            "--conf-dir".into(),
            self.p("net.d"),
            "--state-dir".into(),
            self.p("state"),
        ];
        for c in cidr {
            v.push("--pod-cidr".into());
            v.push(c.to_string());
        }
        v
    }
    fn install(&self, args: &[String]) -> Output {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        agent_cmd("install", &a)
    }
}

/// `install` with `args` fails with one line containing every `words`,
/// and nothing under the dirs changes (not even a directory's mtime).
#[track_caller]
fn refused(d: &Dirs, what: &str, args: &[String], words: &[&str]) {
    let before = tree(d.root.path(), true);
    let out = d.install(args);
    assert!(!out.status.success(), "{what}: must fail: {}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: one line: {err}");
    for w in words {
        assert!(lines[0].contains(w), "{what}: {w:?} not in {:?}", lines[0]);
    }
    eprintln!("{what}: {}", lines[0]);
    assert_json_eq(
        "before",
        &json!(before),
        "after",
        &json!(tree(d.root.path(), true)),
        what,
    );
}

#[test]
fn bad_input_changes_nothing() {
    require_e2e!();
    let d = Dirs::new("instbad");
    refused(
        &d,
        "no CIDR",
        &d.args(&[]),
        &["no pod CIDR", "--pod-cidr", "NODE_NAME"],
    );
    refused(
        &d,
        "invalid CIDR",
        &d.args(&["10.99.0.0/24", "fd00::/129"]),
        &["--pod-cidr", "fd00::/129", "invalid"],
    );
    refused(
        &d,
        "host bits",
        &d.args(&["10.99.0.1/24"]),
        &["10.99.0.1/24", "host bits"],
    );
    refused(
        &d,
        "overlapping CIDRs",
        &d.args(&["10.99.0.0/16", "10.99.1.0/24"]),
        &["10.99.1.0/24", "overlaps"],
    );

    // A missing plugin binary in the source dir.
    let firewall = d.root.path().join("src/ebpf-firewall");
    std::fs::rename(&firewall, d.root.path().join("ebpf-firewall.away")).expect("move");
    refused(
        &d,
        "missing plugin",
        &d.args(&["10.99.0.0/24"]),
        &["ebpf-firewall", "missing", &d.p("src")],
    );
    std::fs::rename(d.root.path().join("ebpf-firewall.away"), &firewall).expect("move back");

    // A bin dir that is a file, and one under a file.
    let mut args = d.args(&["10.99.0.0/24"]);
    args[3] = d.p("net.d/99-late.conflist");
    refused(
        &d,
        "bin dir is a file",
        &args,
        &["--bin-dir", "not a directory"],
    );
    args[3] = d.p("net.d/99-late.conflist/bin");
    refused(
        &d,
        "bin dir under a file",
        &args,
        &["--bin-dir", "not a directory"],
    );

    // Another network's config that would be used instead of ours: one
    // sorting before, one of the same name.
    let calico = d.root.path().join("net.d/00-calico.conflist");
    std::fs::write(
        &calico,
        r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"calico"}]}"#,
    )
    .expect("write");
    refused(
        &d,
        "a config sorting before ours",
        &d.args(&["10.99.0.0/24"]),
        &["00-calico.conflist", "sorts before", "--force"],
    );
    std::fs::remove_file(&calico).expect("rm");
    let same = d.root.path().join("net.d").join(CONF_NAME);
    std::fs::write(
        &same,
        r#"{"cniVersion":"1.0.0","name":"imposter","plugins":[]}"#,
    )
    .expect("write");
    refused(
        &d,
        "a config of our name",
        &d.args(&["10.99.0.0/24"]),
        &[CONF_NAME, "same name", "--force"],
    );
    std::fs::remove_file(&same).expect("rm");

    let mut args = d.args(&["10.99.0.0/24"]);
    args.extend(["--conf-name".to_string(), "cni-ebpf.conf".into()]);
    refused(&d, "bad conf name", &args, &["--conf-name", ".conflist"]);
}

/// A read-only bin dir (a read-only bind mount, which root cannot write
/// through either), in a private mount namespace so nothing outside this
/// test sees the mount.
#[test]
fn an_unwritable_bin_dir_changes_nothing() {
    require_e2e!();
    let d = Dirs::new("instro");
    let before = tree(d.root.path(), true);
    let bin_path = Agent::binary().expect("cni-agent built");
    let args = d.args(&["10.99.0.0/24"]);
    let script = format!(
        "mount --bind {b} {b} && mount -o remount,bind,ro {b} && exec {agent} install {args}",
        b = d.p("bin"),
        agent = s(&bin_path),
        args = args.join(" ")
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env_remove("NODE_NAME")
        .stdin(Stdio::null())
        .output()
        .expect("unshare");
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("--bin-dir") && err.contains("not writable") && err.contains("Read-only"),
        "{err}"
    );
    assert_json_eq(
        "before",
        &json!(before),
        "after",
        &json!(tree(d.root.path(), true)),
        "read-only bin dir",
    );
}

#[test]
fn force_sets_aside_and_uninstall_puts_back_keeps_what_changed() {
    require_e2e!();
    let d = Dirs::new("instforce");
    let calico = d.root.path().join("net.d/00-calico.conflist");
    std::fs::write(
        &calico,
        r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"calico"}]}"#,
    )
    .expect("write");
    let before = tree(d.root.path(), false);
    let mut args = d.args(&["10.99.0.0/24"]);
    args.push("--force".into());
    let out = succeeds(d.install(&args));
    assert!(out.contains("set aside"), "{out}");
    assert!(!calico.exists(), "calico's config is out of the way");
    assert!(d
        .root
        .path()
        .join("net.d/00-calico.conflist.cni-ebpf-saved")
        .exists());
    // The first config in lexical order is ours now.
    let mut configs: Vec<String> = std::fs::read_dir(d.root.path().join("net.d"))
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".conf") || n.ends_with(".conflist") || n.ends_with(".json"))
        .collect();
    configs.sort();
    assert_eq!(configs[0], CONF_NAME);

    // Another CIDR rewrites the conflist only.
    let stamped = stamps(&[&d.root.path().join("bin")]);
    let mut args = d.args(&["10.98.0.0/24"]);
    args.push("--force".into());
    let out = succeeds(d.install(&args));
    assert!(
        out.contains(&format!(
            "written    {}",
            d.p(&format!("net.d/{CONF_NAME}"))
        )),
        "{out}"
    );
    assert_eq!(
        stamps(&[&d.root.path().join("bin")]),
        stamped,
        "plugins untouched"
    );

    // An operator edits one installed plugin: uninstall keeps it.
    let edited = d.root.path().join("bin/ebpf-portmap");
    write_exec(&edited, "#!/bin/sh\n# patched by the operator\n");
    let out = succeeds(agent_cmd("uninstall", &["--state-dir", &d.p("state")]));
    assert!(out.contains("changed since install, kept"), "{out}");
    assert!(out.contains("restored"), "{out}");
    std::fs::remove_file(&edited).expect("rm");
    assert_json_eq(
        "before install",
        &json!(before),
        "after uninstall",
        &json!(tree(d.root.path(), false)),
        "force + uninstall",
    );
    // Uninstall again: nothing to do.
    let out = succeeds(agent_cmd("uninstall", &["--state-dir", &d.p("state")]));
    assert!(out.contains("nothing to do"), "{out}");
}

/// The Node the fake API server returns: a kubeadm dual-stack worker as
/// `kubectl get node -o json` shows it (trimmed of images). `podCIDR` is
/// the first family only, so an install that read it instead of
/// `podCIDRs` would miss the IPv6 range.
const API_NODE: &str = "worker-7";
const API_NODE_JSON: &str = r#"{
  "apiVersion": "v1",
  "kind": "Node",
  "metadata": {
    "annotations": {
      "kubeadm.alpha.kubernetes.io/cri-socket": "unix:///var/run/containerd/containerd.sock",
      "node.alpha.kubernetes.io/ttl": "0",
      "volumes.kubernetes.io/controller-managed-attach-detach": "true"
    },
    "creationTimestamp": "2025-03-02T10:15:42Z",
    "labels": {
      "kubernetes.io/arch": "amd64",
      "kubernetes.io/hostname": "worker-7",
      "kubernetes.io/os": "linux"
    },
    "name": "worker-7",
    "resourceVersion": "48213",
    "uid": "6f1c2a8e-2f43-4a57-9a55-0b8c2f1e9d17"
  },
  "spec": {
    "podCIDR": "10.244.7.0/24",
    "podCIDRs": ["10.244.7.0/24", "fd00:10:244:7::/64"],
    "taints": [{"effect": "NoSchedule", "key": "node.kubernetes.io/not-ready"}]
  },
  "status": {
    "addresses": [
      {"address": "192.168.56.17", "type": "InternalIP"},
      {"address": "fd00:56::17", "type": "InternalIP"},
      {"address": "worker-7", "type": "Hostname"}
    ],
    "allocatable": {"cpu": "2", "memory": "3912168Ki", "pods": "110"},
    "capacity": {"cpu": "2", "memory": "4014568Ki", "pods": "110"},
    "conditions": [{
      "lastHeartbeatTime": "2025-03-02T10:20:03Z",
      "lastTransitionTime": "2025-03-02T10:15:42Z",
      "message": "container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady message:Network plugin returns error: cni plugin not initialized",
      "reason": "KubeletNotReady",
      "status": "False",
      "type": "Ready"
    }],
    "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
    "nodeInfo": {
      "architecture": "amd64",
      "containerRuntimeVersion": "containerd://1.7.24",
      "kernelVersion": "6.1.0-31-amd64",
      "kubeProxyVersion": "v1.33.1",
      "kubeletVersion": "v1.33.1",
      "operatingSystem": "linux",
      "osImage": "Debian GNU/Linux 12 (bookworm)"
    }
  }
}"#;

/// Runs `openssl args` in `dir`, panicking with its stderr on failure.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl (is it installed?)");
    assert!(out.status.success(), "openssl {args:?}: {}", text(&out));
}

/// A throwaway CA (`ca.crt`) and a server certificate for IP 127.0.0.1
/// signed by it (`srv.crt`, `srv.key`), in `dir`.
fn make_certs(dir: &Path) {
    std::fs::write(
        dir.join("openssl.cnf"),
        "[req]\ndistinguished_name = dn\nprompt = no\n\
         [dn]\nCN = cni-tests fake API\n\
         [ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n\
         subjectKeyIdentifier = hash\n\
         [srv]\nbasicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\n\
         extendedKeyUsage = serverAuth\nsubjectAltName = IP:127.0.0.1\n\
         authorityKeyIdentifier = keyid\n",
    )
    .expect("write openssl.cnf");
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    let mut ca = vec![
        "req",
        "-x509",
        "-config",
        "openssl.cnf",
        "-extensions",
        "ca",
    ];
    ca.extend(ec);
    ca.extend([
        "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
    ]);
    openssl(dir, &ca);
    let mut csr = vec!["req", "-new", "-config", "openssl.cnf"];
    csr.extend(ec);
    csr.extend(["-nodes", "-keyout", "srv.key", "-out", "srv.csr"]);
    openssl(dir, &csr);
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-set_serial",
            "2",
            "-days",
            "2",
            "-extfile",
            "openssl.cnf",
            "-extensions",
            "srv",
            "-out",
            "srv.crt",
        ],
    );
}

/// One request the fake API server answered: request line, whether the
/// bearer token was the expected one, and the status sent.
#[derive(Clone, Debug)]
struct Seen {
    request: String,
    token_ok: bool,
    status: u16,
}

/// A minimal Kubernetes API server over TLS, inside a netns: GET
/// /api/v1/nodes/<API_NODE> with `Authorization: Bearer <token>` returns
/// the Node; a missing or wrong token 401, anything else 404, each with a
/// `Status` body as the real API server sends. Stops on drop.
struct FakeApi {
    port: u16,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Seen>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeApi {
    fn start(ns: &NetNs, certs: &Path, token: &str) -> FakeApi {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};

        let chain = vec![CertificateDer::from_pem_file(certs.join("srv.crt")).expect("srv.crt")];
        let key = PrivateKeyDer::from_pem_file(certs.join("srv.key")).expect("srv.key");
        // ring, as the agent's kube client uses (deprecated in 0.23.48 for
        // lacking post-quantum key exchange, which a test does not need).
        #[allow(deprecated)]
        let provider = rustls::crypto::ring::default_provider();
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(provider))
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .expect("server certificate"),
        );
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let token = token.to_string();
        let (seen2, stop2) = (seen.clone(), stop.clone());
        let thread = cni_tests::traffic::spawn_in_netns(ns, move || {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind in netns");
            listener.set_nonblocking(true).expect("nonblocking");
            tx.send(listener.local_addr().expect("addr").port())
                .expect("send port");
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((tcp, _)) => match serve_api(tcp, config.clone(), &token) {
                        Ok(s) => seen2.lock().expect("lock").push(s),
                        Err(e) => eprintln!("fake API: {e}"),
                    },
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(std::time::Duration::from_millis(10))
                    }
                    Err(e) => panic!("fake API accept: {e}"),
                }
            }
        });
        let port = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("fake API listening");
        FakeApi {
            port,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One connection: the TLS handshake, one request, one response, close.
fn serve_api(
    tcp: std::net::TcpStream,
    config: std::sync::Arc<rustls::ServerConfig>,
    token: &str,
) -> Result<Seen, String> {
    use std::io::{Read, Write};
    tcp.set_nonblocking(false).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let conn = rustls::ServerConnection::new(config).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut head = Vec::new();
    let mut chunk = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tls.read(&mut chunk).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err(format!(
                "connection closed mid-request: {:?}",
                String::from_utf8_lossy(&head)
            ));
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.lines();
    let request = lines.next().unwrap_or_default().to_string();
    let auth = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v.trim().to_string());
    let token_ok = auth.as_deref() == Some(format!("Bearer {token}").as_str());
    let path = request.split_whitespace().nth(1).unwrap_or_default();
    let path = path.split('?').next().unwrap_or_default();
    let status_body = |code: u16, reason: &str, message: &str| {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code})
        .to_string()
    };
    let (status, body) = if !token_ok {
        (401, status_body(401, "Unauthorized", "Unauthorized"))
    } else if request.starts_with("GET ") && path == format!("/api/v1/nodes/{API_NODE}") {
        (200, API_NODE_JSON.to_string())
    } else {
        (
            404,
            status_body(404, "NotFound", &format!("{path} not found")),
        )
    };
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        _ => "Not Found",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(response.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    tls.conn.send_close_notify();
    tls.flush().map_err(|e| format!("flush: {e}"))?;
    Ok(Seen {
        request,
        token_ok,
        status,
    })
}

/// `cni-agent install <args>` as the DaemonSet's init container runs it:
/// inside `ns` (where the fake API listens) and a private mount namespace
/// where `sa_dir` is the service account volume at
/// /var/run/secrets/kubernetes.io/serviceaccount. When that path does not
/// exist, a tmpfs goes over its nearest existing parent first (/var/run is
/// the /run symlink here) — inside the private namespace only, so the host
/// sees neither the mount nor the directories.
fn install_in_pod(ns: &NetNs, sa_dir: &Path, port: u16, args: &[String]) -> Output {
    let agent = Agent::binary().expect("cni-agent not built (cargo build -p cni-agent --bins)");
    let script = r#"set -e
sa=/var/run/secrets/kubernetes.io/serviceaccount
if [ ! -d "$sa" ]; then
    if [ -d /var/run/secrets ]; then top=/var/run/secrets; else top=$(readlink -f /var/run); fi
    mount -t tmpfs -o mode=0755 cni-tests-sa "$top"
    mkdir -p "$sa"
fi
mount --bind -o ro "$SA_DIR" "$sa"
[ -f "$sa/token" ] || { echo "service account volume not visible at $sa" >&2; exit 99; }
exec "$AGENT" install "$@""#;
    ns.command("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .args(args)
        .env("SA_DIR", sa_dir)
        .env("AGENT", &agent)
        .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        .env("KUBERNETES_SERVICE_PORT", port.to_string())
        .env("NODE_NAME", API_NODE)
        .stdin(Stdio::null())
        .output()
        .expect("nsenter + unshare")
}

/// The pod CIDRs from the Kubernetes API for real, with no cluster: a fake
/// API server over TLS (throwaway CA, certificate for 127.0.0.1) in a
/// fresh netns, and `install` run there with only NODE_NAME,
/// KUBERNETES_SERVICE_HOST/PORT and the service account volume (token,
/// ca.crt, namespace) — kube's in-cluster configuration end to end.
/// A wrong token fails with one line naming the API and changes nothing;
/// the right one writes the Node's two podCIDRs as the host-local ranges.
#[test]
fn pod_cidrs_from_the_kubernetes_api() {
    require_e2e!();
    let d = Dirs::new("instapi");
    let certs = TempDir::new("apicerts");
    make_certs(certs.path());
    let token = "eyJhbGciOiJSUzI1NiJ9.cni-tests-sa-token.c2lnbmF0dXJl";
    let sa = TempDir::new("apisa");
    std::fs::copy(certs.path().join("ca.crt"), sa.path().join("ca.crt")).expect("ca.crt");
    std::fs::write(sa.path().join("namespace"), "kube-system").expect("namespace");

    let ns = NetNs::new("api");
    ns.ip(&["link", "set", "lo", "up"]);
    let api = FakeApi::start(&ns, certs.path(), token);
    let host_secrets = Path::new("/var/run/secrets").exists();
    let url = format!("https://127.0.0.1:{}", api.port);

    // The wrong token: 401, one line naming the API and the node, nothing
    // written (--wait 0: one attempt, no retry).
    std::fs::write(sa.path().join("token"), "not-the-token").expect("token");
    let mut args = d.args(&[]);
    args.extend(["--wait".to_string(), "0".into()]);
    let before = tree(d.root.path(), true);
    let out = install_in_pod(&ns, sa.path(), api.port, &args);
    assert!(
        !out.status.success(),
        "wrong token must fail: {}",
        text(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    eprintln!("wrong token: {}", lines[0]);
    for w in ["Kubernetes API", url.as_str(), API_NODE, "Unauthorized"] {
        assert!(lines[0].contains(w), "{w:?} not in {:?}", lines[0]);
    }
    assert_json_eq(
        "before",
        &json!(before),
        "after",
        &json!(tree(d.root.path(), true)),
        "wrong token",
    );
    let seen = api.seen();
    assert!(
        seen.iter().any(|s| !s.token_ok && s.status == 401),
        "the 401 came from the fake API: {seen:?}"
    );

    // The right token: the Node's podCIDRs, both families, in order.
    std::fs::write(sa.path().join("token"), token).expect("token");
    let out = install_in_pod(&ns, sa.path(), api.port, &d.args(&[]));
    assert!(out.status.success(), "install: {}", text(&out));
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    let list: Value = serde_json::from_slice(
        &std::fs::read(d.root.path().join("net.d").join(CONF_NAME)).expect("conflist"),
    )
    .expect("conflist is JSON");
    assert_eq!(
        list["plugins"][0]["ipam"]["ranges"],
        json!([[{"subnet": "10.244.7.0/24"}], [{"subnet": "fd00:10:244:7::/64"}]]),
        "host-local ranges are the Node's spec.podCIDRs: {list}"
    );
    let seen = api.seen();
    assert!(
        seen.iter().any(|s| s.token_ok
            && s.status == 200
            && s.request
                .starts_with(&format!("GET /api/v1/nodes/{API_NODE}"))),
        "the Node was read from the fake API with the token: {seen:?}"
    );
    assert_eq!(
        Path::new("/var/run/secrets").exists(),
        host_secrets,
        "nothing of the service account volume on the host"
    );
}
