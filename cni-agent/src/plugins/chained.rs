//! What portmap, firewall and bandwidth have in common: each is chained
//! after the plugin that creates the interface, reads `prevResult`, has the
//! agent write its datapath entries for the attachment, and passes
//! `prevResult` on. Only the config and the entries differ; the verbs are
//! written once here, so DEL and GC read nothing but the path keys in every
//! one of them (the attachment's record says what to remove).
use std::marker::PhantomData;

use crate::{
    plugins::datapath::DatapathConf,
    spec::{CmdArgs, CniError, CniResult, NetConf, Plugin},
    state::record::{Entry, Owner},
};

/// One chained plugin.
pub trait Chained {
    /// The plugin's validated options.
    type Config;
    /// Whose entries these are in the attachment's record.
    const OWNER: Owner;
    /// What an agent error on ADD is about ("portMappings", ...).
    const CONTEXT: &'static str;
    /// The line printed when the binary runs without CNI_COMMAND.
    const ABOUT: &'static str;

    fn config(conf: &NetConf) -> Result<Self::Config, CniError>;
    fn datapath(cfg: &Self::Config) -> &DatapathConf;
    /// Nothing to do whatever `prevResult` holds: ADD passes it (or an
    /// empty result) through without requiring one, as the reference
    /// bandwidth plugin does without limits.
    fn idle(_cfg: &Self::Config) -> bool {
        false
    }
    /// The entries for the attachment; `None` when there is nothing to
    /// install (`prevResult` passes through).
    fn entries(
        cfg: &Self::Config,
        args: &CmdArgs,
        prev: &CniResult,
    ) -> Result<Option<Vec<Entry>>, CniError>;
}

/// The [`Plugin`] of a [`Chained`] one.
pub struct ChainedPlugin<T>(PhantomData<T>);

impl<T> ChainedPlugin<T> {
    pub const fn new() -> Self {
        Self(PhantomData)
    }
}

impl<T> Default for ChainedPlugin<T> {
    fn default() -> Self {
        Self::new()
    }
}

fn required_prev(conf: &NetConf) -> Result<CniResult, CniError> {
    conf.prev_result()?.ok_or_else(|| {
        CniError::invalid_config("must be called as a chained plugin: prevResult is missing")
    })
}

impl<T: Chained> Plugin for ChainedPlugin<T> {
    fn add(&self, args: &CmdArgs, conf: &NetConf) -> Result<CniResult, CniError> {
        let cfg = T::config(conf)?;
        if T::idle(&cfg) {
            return Ok(conf.prev_result()?.unwrap_or_else(|| CniResult {
                cni_version: conf.cni_version.clone(),
                ..CniResult::default()
            }));
        }
        let prev = required_prev(conf)?;
        if let Some(entries) = T::entries(&cfg, args, &prev)? {
            T::datapath(&cfg)
                .add(DatapathConf::key(&conf.name, args), entries)
                .map_err(|e| e.context(T::CONTEXT))?;
        }
        Ok(prev)
    }

    fn del(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        DatapathConf::from_conf(conf)?.del(&DatapathConf::key(&conf.name, args), T::OWNER)
    }

    fn check(&self, args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        let cfg = T::config(conf)?;
        let prev = required_prev(conf)?;
        if T::idle(&cfg) {
            return Ok(());
        }
        match T::entries(&cfg, args, &prev)? {
            Some(entries) => T::datapath(&cfg).check(DatapathConf::key(&conf.name, args), entries),
            None => Ok(()),
        }
    }

    fn status(&self, _args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        T::datapath(&T::config(conf)?).status()
    }

    fn gc(&self, _args: &CmdArgs, conf: &NetConf) -> Result<(), CniError> {
        DatapathConf::from_conf(conf)?.gc(conf)
    }

    fn about(&self) -> &'static str {
        T::ABOUT
    }
}
