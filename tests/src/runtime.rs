//! The CNI runtime the tests drive plugins with: `cni_harness::runtime`,
//! the same one the xtask's demo and benchmark use (conflists in order with
//! prevResult, DEL in reverse with the cached result, CHECK, GC, STATUS),
//! here with the tests' deadline on each plugin run, plus single-config
//! shorthands that panic with context ([`RuntimeExt`]).
use serde_json::Value;

pub use cni_harness::conflist::{
    conflist_of, plugin_conf, version_at_least, with_prev_result, Attachment, GcKey,
};
pub use cni_harness::runtime::Runtime;

use crate::netns::NetNs;
use crate::plugin::{plugin_timeout, Expect, Impl, Outcome, Ran};

/// A runtime running `imp`'s plugins inside `node`.
#[track_caller]
pub fn runtime(node: &NetNs, imp: Impl) -> Runtime {
    runtime_with_path(node, imp.cni_path())
}

/// A runtime looking plugins up in `cni_path` only, inside `node`.
#[track_caller]
pub fn runtime_with_path(node: &NetNs, cni_path: Vec<std::path::PathBuf>) -> Runtime {
    Runtime::new(node.path(), cni_path)
        .unwrap_or_else(|e| panic!("{e:#}"))
        .with_deadline(plugin_timeout())
}

/// One plugin config at a time, as most tests call a plugin. A plugin that
/// could not be run at all panics; one that failed is an [`Outcome`].
pub trait RuntimeExt {
    /// ADD of a single plugin config; panics on failure, returns the result.
    fn add(&self, conf: &Value, att: &Attachment) -> Value;
    /// DEL of a single plugin config, passing `prev_result` if any.
    fn del(&self, conf: &Value, att: &Attachment, prev_result: Option<&Value>) -> Outcome;
    /// CHECK of a single plugin config with the ADD result as prevResult.
    fn check(&self, conf: &Value, att: &Attachment, prev_result: &Value) -> Outcome;
}

impl RuntimeExt for Runtime {
    #[track_caller]
    fn add(&self, conf: &Value, att: &Attachment) -> Value {
        self.exec("ADD", att, conf).expect_success()
    }

    #[track_caller]
    fn del(&self, conf: &Value, att: &Attachment, prev_result: Option<&Value>) -> Outcome {
        self.exec("DEL", att, &with_prev_result(conf, prev_result))
            .ran()
    }

    #[track_caller]
    fn check(&self, conf: &Value, att: &Attachment, prev_result: &Value) -> Outcome {
        self.exec("CHECK", att, &with_prev_result(conf, Some(prev_result)))
            .ran()
    }
}
