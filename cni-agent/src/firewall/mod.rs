//! ebpf-firewall's rules as data: the model an attachment's record holds
//! (`model`) and its compilation into datapath map entries (`compile`).
//! Applying them to the pinned maps is `datapath::policy`; the plugin is
//! `plugins::firewall`.
pub mod compile;
pub mod model;

pub use compile::{compile, CompileError, Compiled, MAX_COMPILED_ENTRIES};
pub use model::{Action, FirewallSpec, IngressPolicy, PortRange, Rule, RuleProtocol, RuleSet};
