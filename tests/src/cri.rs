//! containerd's CRI as the runtime (the path kubelet uses): a node with an
//! uplink to an external namespace, our agent (for our plugins), and a
//! private containerd (Debian's 1.6 with its CRI plugin) running inside
//! the node namespace with a conflist of the test's own, plugins from one
//! bin dir, and locally built busybox images. The test drives it through
//! the CRI client of the `cni-cri` crate.
//!
//! Fields of [`CriNode`] drop in order: containerd first (its teardown
//! stops and removes every sandbox through the CRI, so the CNI DELs run
//! while the agent is still up, then kills and unmounts whatever is
//! left), then its directory guard, the agent, the external side, the
//! node, and the scratch directories.
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cni_cri::{Containerd, ContainerdConfig, RuntimeDir};
use serde_json::{json, Value};

use crate::agentctl::AgentProc;
use crate::plugin::{ours_binary, Impl, REFERENCE_DIR};
use crate::tempdir::TempDir;
use crate::topology::{merge, Node};
use crate::uplink::External;

/// The pause image every sandbox runs (built here, never pulled).
pub const PAUSE_IMAGE: &str = "localhost/cni-tests/pause:1";
/// The workload image: busybox httpd serving [`WORKLOAD_PAYLOAD`].
pub const WORKLOAD_IMAGE: &str = "localhost/cni-tests/httpd:1";
/// The workload's containerPort.
pub const WORKLOAD_PORT: u16 = 8080;
/// What the workload serves at `/index.html`.
pub const WORKLOAD_PAYLOAD: &str = "served by the CRI workload container\n";
/// The plugins containerd needs from the bin dir, ours and the reference's
/// names side by side (containerd runs `loopback` for every sandbox).
pub const OUR_PLUGINS: &[&str] = cni_cri::node_image::PLUGINS;

/// The reference plugins the conflist (and containerd's loopback) needs.
pub const REFERENCE_PLUGINS: &[&str] = &[
    "bridge",
    "host-local",
    "portmap",
    "firewall",
    "bandwidth",
    "loopback",
];

/// Set to a file path to trace every plugin call containerd makes: the
/// bin dir then holds wrapper scripts that append each call's CNI_*
/// environment, stdin, exit code and stdout to that file, then behave as
/// the real plugin (a debugging aid; go-cni's exact payloads).
pub const TRACE_ENV: &str = "CNI_TESTS_CRI_TRACE";

/// Name prefix of the containerd directories under /tmp (not the
/// harness's `cni-tests-`: those are removed blindly when stale, and a
/// containerd directory needs its mounts and processes dealt with first).
pub const CRI_DIR_PREFIX: &str = "cni-cri-";

/// Why containerd's CRI cannot be driven here, or `None`.
pub use cni_cri::containerd_missing;

/// A node whose runtime is a private containerd.
pub struct CriNode {
    pub containerd: Containerd,
    _cri_dir: RuntimeDir,
    pub agent: Option<AgentProc>,
    pub ext: External,
    pub node: Node,
    pub imp: Impl,
    /// The CNI network name.
    pub net: String,
    pub bridge: String,
    pub subnet: String,
    pub gateway: Ipv4Addr,
    /// The hostPort the test maps to the workload.
    pub host_port: u16,
    /// The conflist containerd runs.
    pub conflist: Value,
    /// The bin dir containerd runs plugins from.
    pub bin_dir: PathBuf,
    /// Sandbox log directories.
    pub logs: TempDir,
    _bin: Option<TempDir>,
    _conf: TempDir,
}

impl CriNode {
    /// A node `tag` with an uplink, our agent (for [`Impl::Ours`]), the
    /// images imported and containerd serving the CRI.
    pub fn start(tag: &str, imp: Impl) -> CriNode {
        if let Some(why) = containerd_missing() {
            panic!("cannot drive containerd's CRI: {why}");
        }
        let node = Node::new(tag);
        let ext = External::direct(&node);
        // A real node's loopback is up (containerd's stream server binds
        // 127.0.0.1).
        node.ns.ip(&["link", "set", "lo", "up"]);
        let agent = (imp == Impl::Ours).then(|| AgentProc::start(&node, &[]));
        let x = ext.index;
        let net = format!("crinet{x}");
        let bridge = format!("cnicri{x}");
        let subnet = ext.pod_subnet();
        let gateway = ext.pod_gateway();
        let host_port = 31000 + u16::from(x);

        let (bin, bin_dir) = match (imp, std::env::var_os(TRACE_ENV)) {
            (_, Some(log)) => {
                let d = trace_bin_dir(imp, Path::new(&log));
                let p = d.path().to_path_buf();
                (Some(d), p)
            }
            (Impl::Ours, None) => {
                let d = TempDir::new("cribin");
                for name in OUR_PLUGINS {
                    symlink(ours_binary(name), d.path().join(name))
                        .unwrap_or_else(|e| panic!("cannot link {name} into the bin dir: {e}"));
                }
                let p = d.path().to_path_buf();
                (Some(d), p)
            }
            (Impl::Reference, None) => (None, PathBuf::from(REFERENCE_DIR)),
        };
        let conflist = conflist(&node, imp, &net, &bridge, &subnet);
        let conf = TempDir::new("criconf");
        std::fs::write(
            conf.path().join(format!("10-{net}.conflist")),
            serde_json::to_vec_pretty(&conflist).expect("serialise conflist"),
        )
        .expect("write the conflist");
        let logs = TempDir::new("crilogs");

        let images = TempDir::new("criimg");
        let archives = cni_cri::image::write_pause_and_httpd(
            images.path(),
            PAUSE_IMAGE,
            WORKLOAD_IMAGE,
            WORKLOAD_PORT,
            WORKLOAD_PAYLOAD,
        )
        .unwrap_or_else(|e| panic!("writing the images: {e}"));
        let cri_dir =
            RuntimeDir::create(CRI_DIR_PREFIX).unwrap_or_else(|e| panic!("containerd dir: {e}"));
        let cfg = ContainerdConfig::new(
            cri_dir.path(),
            node.ns.path(),
            &bin_dir,
            conf.path(),
            PAUSE_IMAGE,
        );
        let containerd = Containerd::start(cfg).unwrap_or_else(|e| panic!("containerd: {e}"));
        for a in &archives {
            containerd
                .import_image(a)
                .unwrap_or_else(|e| panic!("importing {}: {e}", a.display()));
        }
        CriNode {
            containerd,
            _cri_dir: cri_dir,
            agent,
            ext,
            node,
            imp,
            net,
            bridge,
            subnet,
            gateway,
            host_port,
            conflist,
            bin_dir,
            logs,
            _bin: bin,
            _conf: conf,
        }
    }

    /// The links of the node namespace as `(name, kind)` (kind: veth,
    /// bridge, ifb, ...; empty for loopback), sorted.
    pub fn links(&self) -> Vec<(String, String)> {
        let links = self.node.ns.ip_json(&["-d", "link", "show"]);
        let mut v: Vec<(String, String)> = links
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| {
                let name = l["ifname"].as_str()?.to_string();
                let kind = l["linkinfo"]["info_kind"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                Some((name, kind))
            })
            .collect();
        v.sort();
        v
    }

    /// Names of the veths in the node namespace.
    pub fn veths(&self) -> Vec<String> {
        self.links()
            .into_iter()
            .filter(|(_, kind)| kind == "veth")
            .map(|(name, _)| name)
            .collect()
    }

    /// Files below the node's state dir (the agent's records).
    pub fn state_files(&self) -> Vec<PathBuf> {
        files_below(&self.node.state_dir().join("attachments"))
    }

    /// The agent's pinned links (bpffs `v1/links`).
    pub fn link_pins(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.node.bpffs.path().join("v1/links"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

/// A bin dir of tracing wrappers around `imp`'s plugins (see [`TRACE_ENV`]).
pub fn trace_bin_dir(imp: Impl, log: &Path) -> TempDir {
    let d = TempDir::new("critrace");
    let names = match imp {
        Impl::Ours => OUR_PLUGINS,
        Impl::Reference => REFERENCE_PLUGINS,
    };
    for name in names {
        let real = match imp {
            Impl::Ours => ours_binary(name),
            Impl::Reference => Path::new(REFERENCE_DIR).join(name),
        };
        let script = format!(
            r#"#!/bin/sh
# cni-tests: traces one plugin call, then behaves as {real}
log='{log}'
in=$(cat)
{{ printf '=== %s %s\n' "$(date +%H:%M:%S.%N)" "$(basename "$0")"; env | grep '^CNI_' | sort
   printf 'stdin: %s\n' "$in"; }} >> "$log"
out=$(printf '%s' "$in" | '{real}'); rc=$?
printf 'exit %s, stdout: %s\n' "$rc" "$out" >> "$log"
printf '%s\n' "$out"
exit $rc
"#,
            real = real.display(),
            log = log.display(),
        );
        let path = d.path().join(name);
        std::fs::write(&path, script).expect("write a trace wrapper");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod a trace wrapper");
    }
    d
}

/// Every regular file below `dir`.
pub fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(_) => out.push(e.path()),
                Err(_) => {}
            }
        }
    }
    out.sort();
    out
}

/// The conflist under test: bridge (gateway, ipMasq, default route,
/// host-local in the node's dataDir), portmap (snat), firewall, bandwidth;
/// ours carry the node's path keys.
pub fn conflist(node: &Node, imp: Impl, net: &str, bridge: &str, subnet: &str) -> Value {
    let (bridge_t, ipam_t, portmap_t, firewall_t, bandwidth_t) = match imp {
        Impl::Ours => (
            "ebpf-bridge",
            "ebpf-host-local",
            "ebpf-portmap",
            "ebpf-firewall",
            "ebpf-bandwidth",
        ),
        Impl::Reference => ("bridge", "host-local", "portmap", "firewall", "bandwidth"),
    };
    let mut plugins = vec![
        json!({
            "type": bridge_t,
            "bridge": bridge,
            "isGateway": true,
            "ipMasq": true,
            "ipam": {
                "type": ipam_t,
                "dataDir": node.data_dir(),
                "ranges": [[{"subnet": subnet}]],
                "routes": [{"dst": "0.0.0.0/0"}]
            }
        }),
        json!({"type": portmap_t, "capabilities": {"portMappings": true}, "snat": true}),
        json!({"type": firewall_t}),
        json!({"type": bandwidth_t, "capabilities": {"bandwidth": true}}),
    ];
    if imp == Impl::Ours {
        for p in &mut plugins {
            merge(p, &node.path_keys());
        }
    }
    json!({"cniVersion": "1.0.0", "name": net, "plugins": plugins})
}

/// Runs `f` on a thread inside the network namespace at `path` (a
/// namespace the runtime created, which the harness's `NetNs` does not own).
pub fn in_netns_path<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> T {
    let path = path.to_path_buf();
    std::thread::scope(|s| {
        s.spawn(move || {
            crate::netns::enter_thread(&path).unwrap_or_else(|e| panic!("{e:#}"));
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// One HTTP/1.0 GET of `path` from `server`; the response body.
pub fn http_get(server: SocketAddr, path: &str) -> Result<String, String> {
    cni_harness::http::http_get(server, path, Duration::from_secs(3)).map_err(|e| format!("{e:#}"))
}

/// One TCP line round trip to an echo server of `crate::traffic` from the
/// current namespace: (the address the server saw, our own address).
pub fn tcp_echo_here(server: SocketAddr, line: &str) -> Result<(SocketAddr, SocketAddr), String> {
    use std::io::{BufRead, BufReader, Write};
    let s = TcpStream::connect_timeout(&server, Duration::from_secs(5))
        .map_err(|e| format!("connect {server}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let local = s.local_addr().map_err(|e| e.to_string())?;
    (&s).write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("send to {server}: {e}"))?;
    let mut reply = String::new();
    BufReader::new(&s)
        .read_line(&mut reply)
        .map_err(|e| format!("echo from {server}: {e}"))?;
    let (peer, text) = reply
        .trim_end()
        .split_once(' ')
        .ok_or_else(|| format!("malformed echo {reply:?}"))?;
    if text != line {
        return Err(format!("echo {text:?} for {line:?}"));
    }
    let seen = peer
        .parse()
        .map_err(|e| format!("malformed peer in {reply:?}: {e}"))?;
    Ok((seen, local))
}
