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
use cni_harness::conflist::plugin_conf;
use serde_json::Value;

use crate::proc;

pub use cni_harness::conflist::Attachment;

/// A conflist checked to have a name, a version and a plugin list.
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

    pub fn plugins(&self) -> &[Value] {
        self.raw["plugins"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
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
        for (i, plugin) in list.plugins().iter().enumerate() {
            let conf = plugin_conf(&list.raw, i, prev.as_ref(), att);
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
        for (i, plugin) in list.plugins().iter().enumerate() {
            let conf = plugin_conf(&list.raw, i, Some(cached), att);
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
            let conf = plugin_conf(&list.raw, i, cached, att);
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
        let mut c = proc::cmd(&bin);
        c.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &att.container_id)
            .env("CNI_NETNS", &att.netns)
            .env("CNI_IFNAME", &att.ifname)
            .env("CNI_ARGS", att.cni_args_env().unwrap_or_default())
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
