//! The node's pod CIDRs from its Node object, read through the Kubernetes
//! API with the pod's service account (the DaemonSet's init container runs
//! `cni-agent install` this way). The kube client reads the API address from
//! KUBERNETES_SERVICE_HOST/PORT and the token and CA from
//! /var/run/secrets/kubernetes.io/serviceaccount, as every in-cluster
//! client does; the ClusterRole only needs `get` on nodes.
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client, Config};

use super::InstallError;

/// Where the node's pod CIDRs are: `spec.podCIDRs` (dual-stack, since
/// Kubernetes 1.16), else the older single `spec.podCIDR`. Empty when the
/// controller-manager has not allocated any yet (or does not allocate:
/// `--allocate-node-cidrs=false`).
pub fn pod_cidrs_of(node: &Node) -> Vec<String> {
    let Some(spec) = node.spec.as_ref() else {
        return Vec::new();
    };
    match (&spec.pod_cidrs, &spec.pod_cidr) {
        (Some(list), _) if !list.is_empty() => list.clone(),
        (_, Some(one)) if !one.is_empty() => vec![one.clone()],
        _ => Vec::new(),
    }
}

/// How long one API request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between attempts while waiting for the API or for the CIDRs.
const RETRY_EVERY: Duration = Duration::from_secs(2);

/// Reads node `name`'s pod CIDRs from the API server, retrying for up to
/// `wait` while the API is unreachable or the node has no CIDR yet (a node
/// that has just registered gets its CIDR from the controller-manager a
/// moment later; failing at once would only make kubelet restart the init
/// container with a growing back-off).
pub fn fetch_pod_cidrs(name: &str, wait: Duration) -> Result<Vec<String>, InstallError> {
    let mut config =
        Config::incluster().map_err(|e| InstallError::NotInCluster { why: e.to_string() })?;
    config.read_timeout = Some(REQUEST_TIMEOUT);
    config.connect_timeout = Some(REQUEST_TIMEOUT);
    let api_url = config.cluster_url.to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| InstallError::Io {
            path: "tokio runtime".into(),
            source,
        })?;
    rt.block_on(async move {
        let client = Client::try_from(config).map_err(|e| InstallError::Api {
            node: name.to_string(),
            url: api_url.clone(),
            why: e.to_string(),
        })?;
        let nodes: Api<Node> = Api::all(client);
        let deadline = Instant::now() + wait;
        loop {
            let outcome = match nodes.get(name).await {
                Ok(node) => {
                    let cidrs = pod_cidrs_of(&node);
                    if !cidrs.is_empty() {
                        return Ok(cidrs);
                    }
                    InstallError::NodeWithoutCidr {
                        node: name.to_string(),
                    }
                }
                // Unauthorized, forbidden and not found do not heal by
                // waiting: say so at once, with the server's short reason.
                Err(kube::Error::Api(s)) if matches!(s.code, 401 | 403 | 404) => {
                    return Err(InstallError::Api {
                        node: name.to_string(),
                        url: api_url.clone(),
                        why: s.message.clone(),
                    })
                }
                Err(e) => InstallError::Api {
                    node: name.to_string(),
                    url: api_url.clone(),
                    why: e.to_string(),
                },
            };
            if Instant::now() + RETRY_EVERY > deadline {
                return Err(outcome);
            }
            log::warn!("{outcome}; retrying");
            tokio::time::sleep(RETRY_EVERY).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Node as a kubeadm dual-stack cluster's API server returns it
    /// (`kubectl get node -o json`, trimmed of images and conditions).
    const DUAL_STACK_NODE: &str = r#"{
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
          "beta.kubernetes.io/arch": "amd64",
          "beta.kubernetes.io/os": "linux",
          "kubernetes.io/arch": "amd64",
          "kubernetes.io/hostname": "worker-1",
          "kubernetes.io/os": "linux"
        },
        "name": "worker-1",
        "resourceVersion": "48213",
        "uid": "6f1c2a8e-2f43-4a57-9a55-0b8c2f1e9d11"
      },
      "spec": {
        "podCIDR": "10.244.1.0/24",
        "podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"],
        "taints": [
          {"effect": "NoSchedule", "key": "node.kubernetes.io/not-ready"}
        ]
      },
      "status": {
        "addresses": [
          {"address": "192.168.56.11", "type": "InternalIP"},
          {"address": "worker-1", "type": "Hostname"}
        ],
        "allocatable": {"cpu": "2", "ephemeral-storage": "28447967613", "memory": "3912168Ki", "pods": "110"},
        "capacity": {"cpu": "2", "ephemeral-storage": "30867360Ki", "memory": "4014568Ki", "pods": "110"},
        "conditions": [
          {
            "lastHeartbeatTime": "2025-03-02T10:20:03Z",
            "lastTransitionTime": "2025-03-02T10:15:42Z",
            "message": "container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady message:Network plugin returns error: cni plugin not initialized",
            "reason": "KubeletNotReady",
            "status": "False",
            "type": "Ready"
          }
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {
          "architecture": "amd64",
          "bootID": "c2b1b7f0-5d4e-4f3c-9a8b-7e6d5c4b3a21",
          "containerRuntimeVersion": "containerd://1.7.24",
          "kernelVersion": "6.1.0-31-amd64",
          "kubeProxyVersion": "v1.32.2",
          "kubeletVersion": "v1.32.2",
          "machineID": "0f3e4d5c6b7a89012345678901234567",
          "operatingSystem": "linux",
          "osImage": "Debian GNU/Linux 12 (bookworm)",
          "systemUUID": "0f3e4d5c-6b7a-8901-2345-678901234567"
        }
      }
    }"#;

    fn node(json: &str) -> Node {
        serde_json::from_str(json).expect("a Node")
    }

    #[test]
    fn pod_cidrs_wins_over_pod_cidr() {
        assert_eq!(
            pod_cidrs_of(&node(DUAL_STACK_NODE)),
            vec!["10.244.1.0/24", "fd00:10:244:1::/64"]
        );
    }

    #[test]
    fn a_node_of_an_old_cluster_has_only_pod_cidr() {
        let mut v: serde_json::Value = serde_json::from_str(DUAL_STACK_NODE).expect("json");
        v["spec"].as_object_mut().expect("spec").remove("podCIDRs");
        let n: Node = serde_json::from_value(v).expect("node");
        assert_eq!(pod_cidrs_of(&n), vec!["10.244.1.0/24"]);
    }

    #[test]
    fn a_node_without_an_allocation_has_none() {
        let mut v: serde_json::Value = serde_json::from_str(DUAL_STACK_NODE).expect("json");
        let spec = v["spec"].as_object_mut().expect("spec");
        spec.remove("podCIDRs");
        spec.remove("podCIDR");
        let n: Node = serde_json::from_value(v).expect("node");
        assert!(pod_cidrs_of(&n).is_empty());
        let empty: Node = serde_json::from_str(r#"{"metadata":{"name":"x"}}"#).expect("node");
        assert!(pod_cidrs_of(&empty).is_empty());
    }

    #[test]
    fn the_cidrs_of_a_node_pass_the_install_checks() {
        let cidrs: Vec<_> = pod_cidrs_of(&node(DUAL_STACK_NODE))
            .iter()
            .map(|c| super::super::conflist::parse_cidr("node", c).expect("valid"))
            .collect();
        super::super::conflist::check_set("node", &cidrs).expect("a valid set");
    }
}
