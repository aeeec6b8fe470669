//! A minimal CNI runtime (what libcni does for a conflist), written against
//! the spec independently of our spec layer so it can serve as a witness:
//! ADD runs the plugins in order feeding each the previous result, DEL runs
//! them in reverse with the cached result, CHECK in order with the cached
//! result, and capabilities select what goes into `runtimeConfig` (each
//! plugin's stdin is built by `cni_harness::conflist`, which the xtask's
//! runtime uses too).
use std::path::PathBuf;

use serde_json::{json, Value};

pub use cni_harness::conflist::{
    conflist_of, plugin_conf, version_at_least, with_prev_result, Attachment, GcKey,
};
use cni_harness::conflist::{list_plugin_base, plugins};

use crate::netns::NetNs;
use crate::plugin::{Impl, Invocation, Outcome};

/// Runs plugins found in `cni_path` inside the `node` namespace.
pub struct Runtime<'a> {
    pub node: &'a NetNs,
    pub cni_path: Vec<PathBuf>,
}

impl<'a> Runtime<'a> {
    pub fn new(node: &'a NetNs, imp: Impl) -> Runtime<'a> {
        Runtime {
            node,
            cni_path: imp.cni_path(),
        }
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
    pub fn find(&self, plugin_type: &str) -> PathBuf {
        for dir in &self.cni_path {
            let p = dir.join(plugin_type);
            if p.is_file() {
                return p;
            }
        }
        panic!(
            "plugin {plugin_type:?} not found in CNI_PATH {} (ours are built by \
             `cargo build -p cni-agent --bins`)",
            self.cni_path_env()
        )
    }

    /// Runs plugin `plugin_type` with an explicit invocation; CNI_PATH is
    /// filled in unless the invocation sets it.
    pub fn invoke(&self, plugin_type: &str, mut inv: Invocation) -> Outcome {
        if inv.path.is_none() {
            inv.path = Some(self.cni_path_env());
        }
        inv.run(Some(self.node), &self.find(plugin_type))
    }

    /// Runs one verb of a single plugin config for an attachment (the
    /// binary is the config's `type`).
    pub fn exec(&self, verb: &str, att: &Attachment, conf: &Value) -> Outcome {
        let plugin_type = conf["type"]
            .as_str()
            .unwrap_or_else(|| panic!("config without type: {conf}"));
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
    ) -> Outcome {
        let mut inv = Invocation::new(verb)
            .container(&att.container_id)
            .netns(&att.netns)
            .ifname(&att.ifname)
            .stdin_json(conf);
        inv.args = att.cni_args_env();
        self.invoke(plugin_type, inv)
    }

    /// ADD of a single plugin config; panics on failure, returns the result.
    #[track_caller]
    pub fn add(&self, conf: &Value, att: &Attachment) -> Value {
        self.exec("ADD", att, conf).expect_success()
    }

    /// DEL of a single plugin config, passing `prev_result` (if any and if the
    /// version has prevResult on DEL, i.e. >= 0.4.0).
    pub fn del(&self, conf: &Value, att: &Attachment, prev_result: Option<&Value>) -> Outcome {
        self.exec("DEL", att, &with_prev_result(conf, prev_result))
    }

    /// CHECK of a single plugin config with the ADD result as prevResult.
    pub fn check(&self, conf: &Value, att: &Attachment, prev_result: &Value) -> Outcome {
        self.exec("CHECK", att, &with_prev_result(conf, Some(prev_result)))
    }

    /// ADD of a conflist. Returns the final result, or the failing plugin's
    /// outcome after DELing the list (as a CRI runtime does after a failed
    /// ADD), so a failure leaves no leftovers.
    pub fn add_list(&self, list: &Value, att: &Attachment) -> Result<Value, Outcome> {
        let mut prev: Option<Value> = None;
        for i in 0..plugins(list).len() {
            let conf = plugin_conf(list, i, prev.as_ref(), att);
            let out = self.exec("ADD", att, &conf);
            if !out.success() {
                let _ = self.del_list(list, att, prev.as_ref());
                return Err(out);
            }
            prev = Some(out.expect_success());
        }
        Ok(prev.unwrap_or(Value::Null))
    }

    /// CHECK of a conflist with the cached result.
    pub fn check_list(
        &self,
        list: &Value,
        att: &Attachment,
        result: &Value,
    ) -> Result<(), Outcome> {
        for i in 0..plugins(list).len() {
            let out = self.exec("CHECK", att, &plugin_conf(list, i, Some(result), att));
            if !out.success() {
                return Err(out);
            }
        }
        Ok(())
    }

    /// DEL of a conflist in reverse order with the cached result.
    pub fn del_list(
        &self,
        list: &Value,
        att: &Attachment,
        result: Option<&Value>,
    ) -> Result<(), Outcome> {
        let version = list["cniVersion"].as_str().unwrap_or("0.0.0");
        let prev = result.filter(|_| version_at_least(version, "0.4.0"));
        for i in (0..plugins(list).len()).rev() {
            let out = self.exec("DEL", att, &plugin_conf(list, i, prev, att));
            if !out.success() {
                return Err(out);
            }
        }
        Ok(())
    }

    /// GC of a conflist: every plugin gets the valid attachments under `key`.
    pub fn gc_list(&self, list: &Value, valid: &[Attachment], key: GcKey) -> Result<(), Outcome> {
        let valid: Vec<Value> = valid
            .iter()
            .map(|a| json!({"containerID": a.container_id, "ifname": a.ifname}))
            .collect();
        for i in 0..plugins(list).len() {
            let mut conf = list_plugin_base(list, i);
            conf[key.key()] = Value::Array(valid.clone());
            let plugin_type = conf["type"].as_str().expect("type").to_string();
            let out = self.invoke(&plugin_type, Invocation::new("GC").stdin_json(&conf));
            if !out.success() {
                return Err(out);
            }
        }
        Ok(())
    }

    /// STATUS of every plugin of a conflist.
    pub fn status_list(&self, list: &Value) -> Result<(), Outcome> {
        for i in 0..plugins(list).len() {
            let conf = list_plugin_base(list, i);
            let plugin_type = conf["type"].as_str().expect("type").to_string();
            let out = self.invoke(&plugin_type, Invocation::new("STATUS").stdin_json(&conf));
            if !out.success() {
                return Err(out);
            }
        }
        Ok(())
    }
}
