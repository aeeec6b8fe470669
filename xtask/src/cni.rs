//! A small CNI runtime (what libcni does for containerd or CRI-O): runs each
//! plugin of a conflist in order with the previous result, caches the final
//! result, and replays it as `prevResult` for CHECK and (in reverse) DEL.
//!
//! Plugins run in the "node" namespace, the way a runtime on a real node
//! runs them from the host namespace: the child `setns`es into it before
//! exec, which is `nsenter --net=<node>` without an extra process in the
//! timed path.
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};

use crate::proc;

/// One pod attachment: the (container ID, netns, ifname) triple plus what
/// a kubelet passes in CNI_ARGS and as capability arguments.
pub struct Attachment {
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    pub args: Vec<(String, String)>,
    /// Runtime values for capabilities (`portMappings`, `bandwidth`, ...),
    /// passed to the plugins that declare them as `runtimeConfig`.
    pub capability_args: Map<String, Value>,
}

impl Attachment {
    /// An attachment shaped like a kubelet's pod sandbox.
    pub fn pod(container_id: &str, netns: &Path, pod_name: &str) -> Attachment {
        Attachment {
            container_id: container_id.to_string(),
            netns: netns.to_path_buf(),
            ifname: "eth0".to_string(),
            args: vec![
                ("IgnoreUnknown".into(), "1".into()),
                ("K8S_POD_NAMESPACE".into(), "default".into()),
                ("K8S_POD_NAME".into(), pod_name.into()),
                ("K8S_POD_INFRA_CONTAINER_ID".into(), container_id.into()),
            ],
            capability_args: Map::new(),
        }
    }
}

pub struct Conflist {
    pub raw: Value,
}

impl Conflist {
    pub fn new(raw: Value) -> Result<Conflist> {
        for key in ["cniVersion", "name"] {
            if !raw.get(key).is_some_and(Value::is_string) {
                bail!("conflist has no string `{key}`");
            }
        }
        if !raw.get("plugins").is_some_and(Value::is_array) {
            bail!("conflist has no `plugins` list");
        }
        Ok(Conflist { raw })
    }

    pub fn name(&self) -> &str {
        self.raw["name"].as_str().unwrap_or_default()
    }

    fn version(&self) -> &str {
        self.raw["cniVersion"].as_str().unwrap_or_default()
    }

    pub fn plugins(&self) -> &[Value] {
        self.raw["plugins"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The network configuration one plugin gets on stdin.
    fn plugin_conf(&self, plugin: &Value, att: &Attachment, prev: Option<&Value>) -> Value {
        let mut conf = plugin.as_object().cloned().unwrap_or_default();
        conf.insert("cniVersion".into(), json!(self.version()));
        conf.insert("name".into(), json!(self.name()));
        if let Some(prev) = prev {
            conf.insert("prevResult".into(), prev.clone());
        }
        let mut rc = Map::new();
        if let Some(caps) = plugin.get("capabilities").and_then(Value::as_object) {
            for (cap, on) in caps {
                if on.as_bool() == Some(true) {
                    if let Some(v) = att.capability_args.get(cap) {
                        rc.insert(cap.clone(), v.clone());
                    }
                }
            }
        }
        if !rc.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(rc));
        }
        Value::Object(conf)
    }
}

/// Where plugins run and where they are looked up.
pub struct Runtime {
    node_ns: File,
    pub cni_path: Vec<PathBuf>,
}

impl Runtime {
    pub fn new(node_netns: &Path, cni_path: Vec<PathBuf>) -> Result<Runtime> {
        let node_ns =
            File::open(node_netns).with_context(|| format!("opening {}", node_netns.display()))?;
        Ok(Runtime { node_ns, cni_path })
    }

    /// ADD through the chain; returns the final result (to be cached).
    pub fn add(&self, list: &Conflist, att: &Attachment) -> Result<Value> {
        self.add_timed(list, att).map(|(v, _)| v)
    }

    /// ADD through the chain; the final result and each plugin's wall
    /// time in ms, in conflist order (the benchmark's per-plugin split).
    pub fn add_timed(&self, list: &Conflist, att: &Attachment) -> Result<(Value, Vec<f64>)> {
        let mut prev: Option<Value> = None;
        let mut times = Vec::new();
        for plugin in list.plugins() {
            let conf = list.plugin_conf(plugin, att, prev.as_ref());
            let t = std::time::Instant::now();
            let out = self.exec("ADD", plugin, att, &conf)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
            prev =
                Some(out.ok_or_else(|| anyhow!("{} ADD printed no result", plugin_type(plugin)))?);
        }
        let res = prev.ok_or_else(|| anyhow!("conflist has no plugins"))?;
        Ok((res, times))
    }

    /// CHECK through the chain, with the cached ADD result.
    pub fn check(&self, list: &Conflist, att: &Attachment, cached: &Value) -> Result<()> {
        for plugin in list.plugins() {
            let conf = list.plugin_conf(plugin, att, Some(cached));
            self.exec("CHECK", plugin, att, &conf)?;
        }
        Ok(())
    }

    /// DEL through the chain in reverse, with the cached ADD result if any.
    pub fn del(&self, list: &Conflist, att: &Attachment, cached: Option<&Value>) -> Result<()> {
        self.del_timed(list, att, cached).map(|_| ())
    }

    /// DEL through the chain in reverse; each plugin's wall time in ms,
    /// in conflist order (not call order).
    pub fn del_timed(
        &self,
        list: &Conflist,
        att: &Attachment,
        cached: Option<&Value>,
    ) -> Result<Vec<f64>> {
        let mut times = vec![0.0; list.plugins().len()];
        for (i, plugin) in list.plugins().iter().enumerate().rev() {
            let conf = list.plugin_conf(plugin, att, cached);
            let t = std::time::Instant::now();
            self.exec("DEL", plugin, att, &conf)?;
            times[i] = t.elapsed().as_secs_f64() * 1e3;
        }
        Ok(times)
    }

    fn find(&self, ty: &str) -> Result<PathBuf> {
        self.cni_path
            .iter()
            .map(|d| d.join(ty))
            .find(|p| p.is_file())
            .ok_or_else(|| anyhow!("plugin `{ty}` not found in CNI_PATH {:?}", self.cni_path))
    }

    fn exec(
        &self,
        command: &str,
        plugin: &Value,
        att: &Attachment,
        conf: &Value,
    ) -> Result<Option<Value>> {
        proc::check_interrupted()?;
        let ty = plugin_type(plugin);
        let bin = self.find(ty)?;
        let cni_path = std::env::join_paths(&self.cni_path)?;
        let cni_args: Vec<String> = att.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut c = proc::cmd(&bin);
        c.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &att.container_id)
            .env("CNI_NETNS", &att.netns)
            .env("CNI_IFNAME", &att.ifname)
            .env("CNI_ARGS", cni_args.join(";"))
            .env("CNI_PATH", cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        crate::netns::enter_on_exec(&mut c, &self.node_ns);
        let mut child = c
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let input = serde_json::to_vec(conf)?;
        if let Some(mut stdin) = child.stdin.take() {
            // A plugin that exits without reading stdin is its own error.
            let _ = stdin.write_all(&input);
        }
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let detail = match serde_json::from_str::<Value>(&stdout) {
                Ok(e) => format!(
                    "code {} msg {:?} details {:?}",
                    e["code"],
                    e["msg"].as_str().unwrap_or(""),
                    e["details"].as_str().unwrap_or("")
                ),
                Err(_) => format!("stdout {:?}", stdout.trim()),
            };
            bail!(
                "{ty} {command} ({}) failed ({}): {detail}{}",
                att.container_id,
                out.status,
                if stderr.trim().is_empty() {
                    String::new()
                } else {
                    format!("; stderr: {}", stderr.trim())
                }
            );
        }
        if stdout.trim().is_empty() {
            return Ok(None);
        }
        let v = serde_json::from_str(&stdout)
            .with_context(|| format!("{ty} {command} printed invalid JSON: {:?}", stdout.trim()))?;
        Ok(Some(v))
    }
}

fn plugin_type(plugin: &Value) -> &str {
    plugin["type"].as_str().unwrap_or("<no type>")
}

/// IP addresses (without prefix) of a 1.x result, in order.
pub fn result_ips(result: &Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| ip["address"].as_str())
                .map(|a| a.split('/').next().unwrap_or(a).to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Gateways of a 1.x result, in order.
pub fn result_gateways(result: &Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| ip["gateway"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// host-local's store holds one file per reserved IP besides `lock` and
/// `last_reserved_ip.N`; returns those IP files.
pub fn ipam_reservations(store: &std::path::Path) -> Result<Vec<String>> {
    let rd = match std::fs::read_dir(store) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", store.display())),
    };
    let mut left = Vec::new();
    for entry in rd {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name != "lock" && !name.starts_with("last_reserved_ip") {
            left.push(name);
        }
    }
    left.sort();
    Ok(left)
}
