//! A small CNI runtime (what libcni does for containerd or CRI-O), written
//! against the spec independently of the product's spec layer so it can
//! serve as a witness: ADD runs the plugins of a conflist in order feeding
//! each the previous result, CHECK runs them in order with the cached
//! result, DEL in reverse with the cached result (from 0.4.0 on), GC and
//! STATUS hand each plugin the list's config. Each plugin's stdin is built
//! by [`crate::conflist`], and each run goes through [`crate::invoke`].
//!
//! The tests and the xtask's demo and benchmark use this one runtime; what
//! differs between them is set, not copied: a deadline per plugin run (the
//! tests', so a hung plugin fails a test instead of hanging the suite; none
//! in the benchmark, whose runs are timed) and a check before each plugin
//! run (the xtask's Ctrl-C flag).
//!
//! Errors: a plugin that fails makes the operation fail with its
//! [`Outcome`] as the error (`err.downcast_ref::<Outcome>()`), so a caller
//! can look at the spec's error JSON; anything else (plugin not found, not
//! started, bad conflist) is a plain error.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

use crate::conflist::{list_plugin_base, plugin_conf, version_at_least, Attachment, GcKey};
use crate::invoke::{Invocation, NodeNs, Outcome};

/// Runs plugins found in `cni_path` inside a node's network namespace.
#[derive(Debug)]
pub struct Runtime {
    node: NodeNs,
    /// Directories searched in order for a plugin binary (CNI_PATH).
    pub cni_path: Vec<PathBuf>,
    /// How long one plugin run may take; `None` waits as long as it runs.
    pub deadline: Option<Duration>,
    /// Called before each plugin run; an error stops the operation there
    /// (the xtask's way to stop between two plugins on Ctrl-C).
    pub before_each: fn() -> Result<()>,
}

impl Runtime {
    /// A runtime for the node namespace bind-mounted at `node_netns`.
    pub fn new(node_netns: &Path, cni_path: Vec<PathBuf>) -> Result<Runtime> {
        Ok(Runtime {
            node: NodeNs::open(node_netns)?,
            cni_path,
            deadline: None,
            before_each: || Ok(()),
        })
    }

    /// Kills and reports any plugin run that takes longer than `d`.
    pub fn with_deadline(mut self, d: Duration) -> Runtime {
        self.deadline = Some(d);
        self
    }

    /// Runs `f` before each plugin run.
    pub fn with_before_each(mut self, f: fn() -> Result<()>) -> Runtime {
        self.before_each = f;
        self
    }

    /// The CNI_PATH value handed to plugins.
    pub fn cni_path_env(&self) -> String {
        self.cni_path
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(":")
    }

    /// Finds a plugin binary by type, like libcni (first match in CNI_PATH).
    pub fn find(&self, plugin_type: &str) -> Result<PathBuf> {
        self.cni_path
            .iter()
            .map(|d| d.join(plugin_type))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                anyhow!(
                    "plugin {plugin_type:?} not found in CNI_PATH {} (ours are built by \
                     `cargo build -p cni-agent --bins`)",
                    self.cni_path_env()
                )
            })
    }

    /// Runs plugin `plugin_type` with an explicit invocation; CNI_PATH is
    /// filled in unless the invocation sets it. A plugin that fails is an
    /// `Ok` outcome here.
    pub fn invoke(&self, plugin_type: &str, mut inv: Invocation) -> Result<Outcome> {
        (self.before_each)()?;
        if inv.path.is_none() {
            inv.path = Some(self.cni_path_env());
        }
        inv.run(&self.find(plugin_type)?, Some(&self.node), self.deadline)
    }

    /// Runs one verb of a single plugin config for an attachment (the
    /// binary is the config's `type`).
    pub fn exec(&self, verb: &str, att: &Attachment, conf: &Value) -> Result<Outcome> {
        let plugin_type = conf["type"]
            .as_str()
            .ok_or_else(|| anyhow!("config without type: {conf}"))?;
        self.exec_plugin(plugin_type, verb, att, conf)
    }

    /// Runs one verb of plugin `plugin_type` (e.g. an IPAM plugin called
    /// directly with a network config whose `type` is the main plugin).
    pub fn exec_plugin(
        &self,
        plugin_type: &str,
        verb: &str,
        att: &Attachment,
        conf: &Value,
    ) -> Result<Outcome> {
        let mut inv = Invocation::new(verb)
            .container(&att.container_id)
            .netns(&att.netns)
            .ifname(&att.ifname)
            .stdin_json(conf);
        inv.args = att.cni_args_env();
        self.invoke(plugin_type, inv)
    }

    /// One verb of plugin `i` of the list, with `prev` as prevResult; the
    /// run's result (`Null` for none) or its failure.
    fn list_step(
        &self,
        verb: &str,
        list: &Value,
        i: usize,
        prev: Option<&Value>,
        att: &Attachment,
    ) -> Result<Value> {
        self.exec(verb, att, &plugin_conf(list, i, prev, att))?
            .result()
    }

    /// ADD of a conflist: the final result (to be cached). A failure DELs
    /// the list first (as a CRI runtime does after a failed ADD), so it
    /// leaves nothing behind, and is then returned.
    pub fn add_list(&self, list: &Value, att: &Attachment) -> Result<Value> {
        self.add_list_timed(list, att).map(|(v, _)| v)
    }

    /// [`Runtime::add_list`], with each plugin's wall time in ms, in
    /// conflist order (the benchmark's per-plugin split).
    pub fn add_list_timed(&self, list: &Value, att: &Attachment) -> Result<(Value, Vec<f64>)> {
        let n = plugin_count(list)?;
        if n == 0 {
            bail!("conflist has no plugins: {list}");
        }
        let mut prev: Option<Value> = None;
        let mut times = Vec::with_capacity(n);
        for i in 0..n {
            let t = Instant::now();
            let step = self.list_step("ADD", list, i, prev.as_ref(), att);
            times.push(t.elapsed().as_secs_f64() * 1e3);
            let step = step.and_then(|v| match v {
                Value::Null => Err(anyhow!("{} ADD printed no result", plugin_type(list, i))),
                v => Ok(v),
            });
            match step {
                Ok(v) => prev = Some(v),
                Err(e) => {
                    let _ = self.del_list(list, att, prev.as_ref());
                    return Err(e);
                }
            }
        }
        Ok((prev.unwrap_or(Value::Null), times))
    }

    /// CHECK of a conflist with the cached result.
    pub fn check_list(&self, list: &Value, att: &Attachment, result: &Value) -> Result<()> {
        for i in 0..plugin_count(list)? {
            self.list_step("CHECK", list, i, Some(result), att)?;
        }
        Ok(())
    }

    /// DEL of a conflist in reverse order with the cached result (if any,
    /// and only from 0.4.0 on, which is when DEL got prevResult).
    pub fn del_list(&self, list: &Value, att: &Attachment, result: Option<&Value>) -> Result<()> {
        self.del_list_timed(list, att, result).map(|_| ())
    }

    /// [`Runtime::del_list`], with each plugin's wall time in ms, in
    /// conflist order (not call order).
    pub fn del_list_timed(
        &self,
        list: &Value,
        att: &Attachment,
        result: Option<&Value>,
    ) -> Result<Vec<f64>> {
        let n = plugin_count(list)?;
        let version = list["cniVersion"].as_str().unwrap_or("0.0.0");
        let prev = result.filter(|_| version_at_least(version, "0.4.0"));
        let mut times = vec![0.0; n];
        for i in (0..n).rev() {
            let t = Instant::now();
            self.list_step("DEL", list, i, prev, att)?;
            times[i] = t.elapsed().as_secs_f64() * 1e3;
        }
        Ok(times)
    }

    /// GC of a conflist: every plugin gets the valid attachments under `key`.
    pub fn gc_list(&self, list: &Value, valid: &[Attachment], key: GcKey) -> Result<()> {
        let valid: Vec<Value> = valid
            .iter()
            .map(|a| json!({"containerID": a.container_id, "ifname": a.ifname}))
            .collect();
        for i in 0..plugin_count(list)? {
            let mut conf = list_plugin_base(list, i);
            conf[key.key()] = Value::Array(valid.clone());
            let inv = Invocation::new("GC").stdin_json(&conf);
            self.invoke(plugin_type(list, i), inv)?.result()?;
        }
        Ok(())
    }

    /// STATUS of every plugin of a conflist.
    pub fn status_list(&self, list: &Value) -> Result<()> {
        for i in 0..plugin_count(list)? {
            let inv = Invocation::new("STATUS").stdin_json(&list_plugin_base(list, i));
            self.invoke(plugin_type(list, i), inv)?.result()?;
        }
        Ok(())
    }
}

/// The number of plugins of a conflist, after checking what the
/// [`crate::conflist`] helpers rely on: a `plugins` list of objects with a
/// string `type`. The rest (`name`, `cniVersion`) is the plugins' to judge,
/// which the bad-input tests rely on.
pub fn plugin_count(list: &Value) -> Result<usize> {
    let plugins = list
        .get("plugins")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("conflist has no `plugins` list: {list}"))?;
    for p in plugins {
        if !p.get("type").is_some_and(Value::is_string) {
            bail!("conflist plugin without a string `type`: {p}");
        }
    }
    Ok(plugins.len())
}

/// The `type` of plugin `i` (checked by [`plugin_count`]).
fn plugin_type(list: &Value, i: usize) -> &str {
    list["plugins"][i]["type"].as_str().unwrap_or("<no type>")
}
