//! deploy/ checked offline: the Kubernetes manifest parsed as YAML (anchors
//! resolved) and decoded into the API's own types (k8s-openapi), with the
//! fields a node-critical CNI DaemonSet needs asserted one by one; kubectl
//! decodes it too (`kubectl label --local --dry-run=client`: `apply` and
//! `create --dry-run=client` need an API server for discovery, which a test
//! machine has not); and the systemd unit runs install before the agent,
//! with the pod CIDRs from its EnvironmentFile, and restarts it always.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn manifest_text() -> String {
    std::fs::read_to_string(deploy_dir().join("kubernetes/cni-ebpf.yaml")).expect("manifest")
}

/// The manifest's documents by kind.
fn documents() -> BTreeMap<String, Value> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(&manifest_text()).expect("valid YAML");
    let mut out = BTreeMap::new();
    for d in docs.into_iter().filter(|d| !d.is_null()) {
        let kind = d["kind"]
            .as_str()
            .expect("every document has a kind")
            .to_string();
        assert!(out.insert(kind.clone(), d).is_none(), "one {kind} only");
    }
    out
}

fn typed<T: serde::de::DeserializeOwned>(docs: &BTreeMap<String, Value>, kind: &str) -> T {
    serde_json::from_value(docs[kind].clone())
        .unwrap_or_else(|e| panic!("{kind} does not decode as the API type: {e}"))
}

fn arg_value<'a>(c: &'a Container, flag: &str) -> Option<&'a str> {
    c.args
        .iter()
        .flatten()
        .find_map(|a| a.strip_prefix(&format!("{flag}=")))
}

#[test]
fn the_manifest_has_what_a_cni_daemonset_needs() {
    let docs = documents();
    assert_eq!(
        docs.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            "ServiceAccount"
        ]
    );
    let sa: ServiceAccount = typed(&docs, "ServiceAccount");
    assert_eq!(sa.metadata.namespace.as_deref(), Some("kube-system"));
    let sa_name = sa.metadata.name.clone().expect("name");

    // RBAC: read nodes, nothing else.
    let role: ClusterRole = typed(&docs, "ClusterRole");
    let rules = role.rules.expect("rules");
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(rules[0].api_groups.as_deref(), Some(&[String::new()][..]));
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&["nodes".to_string()][..])
    );
    let mut verbs = rules[0].verbs.clone();
    verbs.sort();
    assert_eq!(verbs, ["get", "list", "watch"]);
    let binding: ClusterRoleBinding = typed(&docs, "ClusterRoleBinding");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subject = &binding.subjects.expect("subjects")[0];
    assert_eq!(
        (
            subject.kind.as_str(),
            subject.name.as_str(),
            subject.namespace.as_deref()
        ),
        ("ServiceAccount", sa_name.as_str(), Some("kube-system"))
    );

    // The DaemonSet.
    let ds: DaemonSet = typed(&docs, "DaemonSet");
    assert_eq!(ds.metadata.namespace.as_deref(), Some("kube-system"));
    let spec = ds.spec.expect("spec");
    let strategy = spec.update_strategy.expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        strategy
            .rolling_update
            .and_then(|r| r.max_unavailable)
            .map(|m| serde_json::to_value(m).expect("json")),
        Some(serde_json::json!(1))
    );
    let selector = spec.selector.match_labels.expect("matchLabels");
    let labels = spec
        .template
        .metadata
        .and_then(|m| m.labels)
        .expect("labels");
    for (k, v) in &selector {
        assert_eq!(labels.get(k), Some(v), "the selector matches the pods");
    }
    let pod = spec.template.spec.expect("pod spec");
    assert_eq!(pod.service_account_name.as_deref(), Some(sa_name.as_str()));
    assert_eq!(pod.host_network, Some(true));
    assert_ne!(pod.host_pid, Some(true), "hostPID is not needed");
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerations = pod.tolerations.expect("tolerations");
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "tolerates every taint (a CNI runs before the node is Ready): {tolerations:?}"
    );

    let volumes: BTreeMap<String, String> = pod
        .volumes
        .expect("volumes")
        .into_iter()
        .map(|v| (v.name, v.host_path.expect("hostPath volumes only").path))
        .collect();
    for host in [
        "/opt/cni/bin",
        "/etc/cni/net.d",
        "/sys/fs/bpf",
        "/run/cni-ebpf",
        "/var/lib/cni-ebpf",
        "/sys/fs/cgroup",
    ] {
        assert!(
            volumes.values().any(|p| p == host),
            "host {host} is mounted: {volumes:?}"
        );
    }
    // Where a container mounts the host path `host`, if it does.
    let mount_of = |c: &Container, host: &str| {
        c.volume_mounts.iter().flatten().find_map(|m| {
            (volumes.get(&m.name).map(String::as_str) == Some(host)).then(|| m.clone())
        })
    };

    let inits = pod.init_containers.expect("an init container");
    assert_eq!(inits.len(), 1);
    let init = &inits[0];
    let agent = &pod.containers[0];
    assert_eq!(pod.containers.len(), 1);
    assert!(
        init.image.is_some() && init.image == agent.image,
        "one image for both containers"
    );
    for c in [init, agent] {
        assert_eq!(
            c.security_context.as_ref().and_then(|s| s.privileged),
            Some(true),
            "{} is privileged",
            c.name
        );
    }

    // install: NODE_NAME from the downward API, its dirs on the host's.
    assert_eq!(
        init.command.as_deref(),
        Some(&["cni-agent".to_string(), "install".to_string()][..])
    );
    let node_name = init
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.clone());
    assert_eq!(node_name.as_deref(), Some("spec.nodeName"));
    for (flag, host) in [
        ("--bin-dir", "/opt/cni/bin"),
        ("--conf-dir", "/etc/cni/net.d"),
        ("--state-dir", "/var/lib/cni-ebpf"),
    ] {
        let m = mount_of(init, host).unwrap_or_else(|| panic!("install mounts {host}"));
        assert_eq!(
            arg_value(init, flag),
            Some(m.mount_path.as_str()),
            "install's {flag} is where {host} is mounted"
        );
    }
    // The state dir at the host's own path: the conflist's stateDir is the
    // default, which the plugins on the host read.
    assert_eq!(
        mount_of(init, "/var/lib/cni-ebpf").map(|m| m.mount_path),
        Some("/var/lib/cni-ebpf".to_string())
    );

    // The agent.
    assert_eq!(
        agent.command.as_deref(),
        Some(&["cni-agent".to_string(), "run".to_string()][..])
    );
    let bpffs = mount_of(agent, "/sys/fs/bpf").expect("bpffs mounted");
    assert_eq!(bpffs.mount_path, "/sys/fs/bpf");
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("Bidirectional"));
    for host in ["/run/cni-ebpf", "/var/lib/cni-ebpf"] {
        assert_eq!(
            mount_of(agent, host).map(|m| m.mount_path),
            Some(host.to_string()),
            "the plugins on the host find {host} where the agent uses it"
        );
    }
    let cgroup = mount_of(agent, "/sys/fs/cgroup").expect("the host's cgroup2 mounted");
    assert_eq!(
        arg_value(agent, "--cgroup"),
        Some(cgroup.mount_path.as_str())
    );
    let metrics = arg_value(agent, "--metrics-address").expect("--metrics-address");
    let port: i32 = metrics
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("port");
    for (probe, path) in [
        (agent.liveness_probe.as_ref(), "/healthz"),
        (agent.readiness_probe.as_ref(), "/readyz"),
    ] {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("an httpGet probe on {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            serde_json::to_value(&get.port).expect("json"),
            serde_json::json!(port)
        );
        assert_eq!(get.host.as_deref(), Some("127.0.0.1"));
    }
    let requests = agent
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .expect("resource requests");
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
}

/// The image is named once in the file (a YAML anchor both containers
/// use), so a release edits one line.
#[test]
fn the_image_is_named_once() {
    let text = manifest_text();
    let named: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_start().starts_with("image:"))
        .collect();
    assert_eq!(named.len(), 2, "{named:?}");
    assert!(named[0].contains("&image"), "{named:?}");
    assert_eq!(named[1].trim(), "image: *image", "{named:?}");
}

fn kubectl() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("kubectl"))
            .find(|k| k.is_file())
    })
}

/// kubectl decodes every object with its own scheme, offline.
#[test]
fn kubectl_decodes_the_manifest_offline() {
    let Some(kubectl) = kubectl() else {
        let msg = "kubectl is not installed (cargo xtask setup installs kubernetes-client)";
        if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
            panic!("{msg}");
        }
        eprintln!("SKIPPED: {msg}");
        return;
    };
    let file = deploy_dir().join("kubernetes/cni-ebpf.yaml");
    let out = Command::new(kubectl)
        .args(["label", "--local", "--dry-run=client", "-o", "json", "-f"])
        .arg(&file)
        .arg("checked=offline")
        // No kubeconfig: nothing to contact even by mistake.
        .env("KUBECONFIG", "/dev/null")
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One JSON object per manifest object, one after the other.
    let items: Vec<Value> = serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .expect("kubectl printed JSON objects");
    let kinds: Vec<&str> = items
        .iter()
        .map(|i| i["kind"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        kinds,
        [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet"
        ]
    );
    let ds = &items[3]["spec"]["template"]["spec"];
    assert_eq!(
        ds["initContainers"][0]["image"], ds["containers"][0]["image"],
        "kubectl resolves the image anchor for both containers"
    );
}

/// The systemd unit: install (CIDRs from the EnvironmentFile) before the
/// agent, restarted always.
#[test]
fn the_systemd_unit_installs_then_runs_and_restarts() {
    let text =
        std::fs::read_to_string(deploy_dir().join("systemd/cni-agent.service")).expect("unit file");
    let mut section = String::new();
    let mut keys: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_string();
            continue;
        }
        let (k, v) = line.split_once('=').expect("key=value");
        keys.entry((section.clone(), k.to_string()))
            .or_default()
            .push(v.to_string());
    }
    let one = |s: &str, k: &str| -> String {
        let v = keys
            .get(&(s.to_string(), k.to_string()))
            .unwrap_or_else(|| panic!("[{s}] {k} missing"));
        assert_eq!(v.len(), 1, "[{s}] {k}");
        v[0].clone()
    };
    let env_file = one("Service", "EnvironmentFile");
    let pre = one("Service", "ExecStartPre");
    assert!(pre.contains("cni-agent install"), "{pre}");
    assert!(pre.contains("--pod-cidr=${POD_CIDR}"), "{pre}");
    let start = one("Service", "ExecStart");
    assert!(start.contains("cni-agent run"), "{start}");
    assert_eq!(one("Service", "Restart"), "always");
    assert_eq!(one("Install", "WantedBy"), "multi-user.target");
    // The example EnvironmentFile sets POD_CIDR to CIDRs install accepts.
    let example = std::fs::read_to_string(deploy_dir().join("systemd/cni-agent.env"))
        .expect("example env file");
    let cidrs = example
        .lines()
        .find_map(|l| l.strip_prefix("POD_CIDR="))
        .expect("POD_CIDR in the example");
    for c in cidrs.split(',') {
        c.parse::<ipnet::IpNet>()
            .unwrap_or_else(|e| panic!("{c}: {e}"));
    }
    assert!(env_file.starts_with('/'), "{env_file}");
}
