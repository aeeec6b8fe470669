//! The CNI runtime of the demo and the benchmark: `cni_harness::runtime`,
//! the one the tests use too (each plugin of a conflist in order with the
//! previous result, the final result cached and replayed as `prevResult`
//! for CHECK and, in reverse, DEL), here stopping between two plugins on
//! Ctrl-C; plus what the xtask reads out of results.
//!
//! Plugins run in the "node" namespace, the way a runtime on a real node
//! runs them from the host namespace: the child `setns`es into it before
//! exec, which is `nsenter --net=<node>` without an extra process in the
//! timed path, and no deadline is polled for in the timed wait.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::proc;

pub use cni_harness::conflist::Attachment;
pub use cni_harness::runtime::Runtime;

/// A runtime running the plugins found in `cni_path` inside the node
/// namespace at `node_netns`.
pub fn runtime(node_netns: &Path, cni_path: Vec<PathBuf>) -> Result<Runtime> {
    Ok(Runtime::new(node_netns, cni_path)?.with_before_each(proc::check_interrupted))
}

/// A conflist checked to have a name, a version and plugins, so the
/// benchmark's store paths and reports can rely on them.
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
        if cni_harness::runtime::plugin_count(&raw)? == 0 {
            bail!("conflist has no plugins");
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
pub fn ipam_reservations(store: &Path) -> Result<Vec<String>> {
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
