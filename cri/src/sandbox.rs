//! Pod and container specs as kubelet turns them into CRI requests, and
//! what a runtime's verbose PodSandboxStatus tells about a sandbox (its
//! pid, network namespace and CNI result).
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::api::{self, NamespaceMode, Protocol};
use crate::error::{Error, Result};

/// Pod annotation kubelet reads the ingress limit from (a quantity such as
/// `10M`, bits per second); containerd hands it to CNI as `bandwidth`.
pub const INGRESS_BANDWIDTH: &str = "kubernetes.io/ingress-bandwidth";
/// Pod annotation for the egress limit.
pub const EGRESS_BANDWIDTH: &str = "kubernetes.io/egress-bandwidth";

/// One `hostPort` of a pod's container ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub protocol: Protocol,
    pub container_port: u16,
    pub host_port: u16,
    /// Empty: every node address.
    pub host_ip: String,
}

impl HostPort {
    pub fn tcp(container_port: u16, host_port: u16) -> HostPort {
        HostPort {
            protocol: Protocol::Tcp,
            container_port,
            host_port,
            host_ip: String::new(),
        }
    }

    pub fn udp(container_port: u16, host_port: u16) -> HostPort {
        HostPort {
            protocol: Protocol::Udp,
            ..HostPort::tcp(container_port, host_port)
        }
    }
}

/// A pod as kubelet describes it to the runtime.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// Where the runtime writes container logs (`<dir>/<container>/0.log`).
    pub log_directory: PathBuf,
    pub host_ports: Vec<HostPort>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Empty: the runtime's default cgroup.
    pub cgroup_parent: String,
}

impl PodSpec {
    pub fn new(name: &str, namespace: &str, uid: &str, log_directory: &Path) -> PodSpec {
        PodSpec {
            name: name.into(),
            namespace: namespace.into(),
            uid: uid.into(),
            log_directory: log_directory.to_path_buf(),
            host_ports: Vec::new(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            cgroup_parent: String::new(),
        }
    }

    pub fn host_port(mut self, port: HostPort) -> PodSpec {
        self.host_ports.push(port);
        self
    }

    /// The bandwidth annotations (quantities as in a pod manifest, e.g. `10M`).
    pub fn bandwidth(mut self, ingress: &str, egress: &str) -> PodSpec {
        self.annotations
            .insert(INGRESS_BANDWIDTH.into(), ingress.into());
        self.annotations
            .insert(EGRESS_BANDWIDTH.into(), egress.into());
        self
    }

    /// The RunPodSandbox config kubelet builds: metadata, hostname, log
    /// directory, port mappings, the `io.kubernetes.pod.*` labels, the
    /// pod's annotations, and the namespace options of a pod without
    /// hostNetwork or a shared process namespace.
    pub fn sandbox_config(&self) -> api::PodSandboxConfig {
        let mut labels: HashMap<String, String> = self.labels.clone().into_iter().collect();
        labels.insert("io.kubernetes.pod.name".into(), self.name.clone());
        labels.insert("io.kubernetes.pod.namespace".into(), self.namespace.clone());
        labels.insert("io.kubernetes.pod.uid".into(), self.uid.clone());
        api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: self.name.clone(),
                uid: self.uid.clone(),
                namespace: self.namespace.clone(),
                attempt: 0,
            }),
            hostname: self.name.clone(),
            log_directory: self.log_directory.to_string_lossy().into_owned(),
            dns_config: Some(api::DnsConfig::default()),
            port_mappings: self
                .host_ports
                .iter()
                .map(|p| api::PortMapping {
                    protocol: p.protocol as i32,
                    container_port: p.container_port.into(),
                    host_port: p.host_port.into(),
                    host_ip: p.host_ip.clone(),
                })
                .collect(),
            labels,
            annotations: self.annotations.clone().into_iter().collect(),
            linux: Some(api::LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent.clone(),
                security_context: Some(api::LinuxSandboxSecurityContext {
                    namespace_options: Some(pod_namespaces()),
                    ..Default::default()
                }),
                sysctls: HashMap::new(),
            }),
        }
    }
}

/// Network and IPC per pod, PID per container: kubelet's default.
fn pod_namespaces() -> api::NamespaceOption {
    api::NamespaceOption {
        network: NamespaceMode::Pod as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        target_id: String::new(),
    }
}

/// A container of a pod.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    /// Replaces the image's entrypoint when not empty.
    pub command: Vec<String>,
    /// Replaces the image's cmd when not empty.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl ContainerSpec {
    pub fn new(name: &str, image: &str) -> ContainerSpec {
        ContainerSpec {
            name: name.into(),
            image: image.into(),
            command: Vec::new(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    pub fn command<S: Into<String>>(mut self, argv: impl IntoIterator<Item = S>) -> ContainerSpec {
        self.command = argv.into_iter().map(Into::into).collect();
        self
    }

    /// The CreateContainer config kubelet builds for `pod`.
    pub fn container_config(&self, pod: &PodSpec) -> api::ContainerConfig {
        let mut labels = HashMap::new();
        labels.insert("io.kubernetes.container.name".into(), self.name.clone());
        labels.insert("io.kubernetes.pod.name".into(), pod.name.clone());
        labels.insert("io.kubernetes.pod.namespace".into(), pod.namespace.clone());
        labels.insert("io.kubernetes.pod.uid".into(), pod.uid.clone());
        api::ContainerConfig {
            metadata: Some(api::ContainerMetadata {
                name: self.name.clone(),
                attempt: 0,
            }),
            image: Some(api::ImageSpec {
                image: self.image.clone(),
                annotations: HashMap::new(),
            }),
            command: self.command.clone(),
            args: self.args.clone(),
            working_dir: String::new(),
            envs: self
                .env
                .iter()
                .map(|(k, v)| api::KeyValue {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
            labels,
            annotations: HashMap::new(),
            log_path: format!("{}/0.log", self.name),
            linux: Some(api::LinuxContainerConfig {
                security_context: Some(api::LinuxContainerSecurityContext {
                    namespace_options: Some(pod_namespaces()),
                    ..Default::default()
                }),
            }),
        }
    }
}

/// What containerd's verbose PodSandboxStatus (`info["info"]`, a JSON
/// document) says about a sandbox.
#[derive(Debug, Clone)]
pub struct SandboxInfo {
    /// The sandbox (pause) process, as seen from the runtime's pid namespace.
    pub pid: Option<u32>,
    /// The pod's network namespace: the bind mount the runtime created.
    pub netns_path: Option<PathBuf>,
    /// The CNI result the runtime keeps for the sandbox.
    pub cni_result: Option<Value>,
    /// The whole document.
    pub raw: Value,
}

impl SandboxInfo {
    /// Parses the `info` map of a verbose PodSandboxStatus.
    pub fn from_status(resp: &api::PodSandboxStatusResponse) -> Result<SandboxInfo> {
        let text = resp.info.get("info").ok_or_else(|| {
            Error::Unexpected(format!(
                "verbose PodSandboxStatus without info[\"info\"] (keys: {:?})",
                resp.info.keys().collect::<Vec<_>>()
            ))
        })?;
        let raw: Value = serde_json::from_str(text)
            .map_err(|e| Error::Unexpected(format!("sandbox info is not JSON ({e}): {text}")))?;
        let pid = raw["pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .filter(|p| *p > 0);
        let netns_path = raw["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|ns| ns["type"] == "network")
            .and_then(|ns| ns["path"].as_str())
            .filter(|p| !p.is_empty())
            .map(PathBuf::from);
        let cni_result = raw.get("cniResult").filter(|v| !v.is_null()).cloned();
        Ok(SandboxInfo {
            pid,
            netns_path,
            cni_result,
            raw,
        })
    }

    /// A path that names the pod's network namespace: the runtime's bind
    /// mount, or else `/proc/<pid>/ns/net` of the sandbox process.
    pub fn netns(&self) -> Option<PathBuf> {
        self.netns_path
            .clone()
            .or_else(|| self.pid.map(|p| PathBuf::from(format!("/proc/{p}/ns/net"))))
    }
}

/// The pod's IPs from a PodSandboxStatus (primary first).
pub fn pod_ips(resp: &api::PodSandboxStatusResponse) -> Vec<String> {
    let Some(net) = resp.status.as_ref().and_then(|s| s.network.as_ref()) else {
        return Vec::new();
    };
    std::iter::once(net.ip.clone())
        .chain(net.additional_ips.iter().map(|ip| ip.ip.clone()))
        .filter(|ip| !ip.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_config_carries_ports_and_annotations() {
        let pod = PodSpec::new("web", "default", "uid-1", Path::new("/tmp/logs"))
            .host_port(HostPort::tcp(8080, 30080))
            .bandwidth("10M", "20M");
        let c = pod.sandbox_config();
        assert_eq!(c.port_mappings.len(), 1);
        assert_eq!(c.port_mappings[0].host_port, 30080);
        assert_eq!(c.port_mappings[0].container_port, 8080);
        assert_eq!(c.annotations[INGRESS_BANDWIDTH], "10M");
        assert_eq!(c.annotations[EGRESS_BANDWIDTH], "20M");
        assert_eq!(c.labels["io.kubernetes.pod.name"], "web");
    }

    #[test]
    fn sandbox_info_finds_the_netns() {
        let doc = serde_json::json!({
            "pid": 42,
            "runtimeSpec": {"linux": {"namespaces": [
                {"type": "pid"},
                {"type": "network", "path": "/run/netns/cni-1"}
            ]}},
            "cniResult": {"Interfaces": {}}
        });
        let mut resp = api::PodSandboxStatusResponse::default();
        resp.info.insert("info".into(), doc.to_string());
        let info = SandboxInfo::from_status(&resp).expect("parse");
        assert_eq!(info.pid, Some(42));
        assert_eq!(info.netns(), Some(PathBuf::from("/run/netns/cni-1")));
        assert!(info.cni_result.is_some());
    }
}
