//! What every plugin of the suite does with the agent: the path keys they all
//! accept (`agentSocket`, `stateDir`, `bpffsRoot`), and recording, checking
//! and removing an attachment's datapath entries.
//!
//! ADD needs the agent (it owns the datapath; if it is down, ADD fails with
//! code 11 and the plugin undoes its own work). DEL and GC never do: if the
//! agent is unreachable they run the same operation against the records and
//! pinned maps directly, so a DEL always leaves nothing behind.
use std::path::PathBuf;

use serde::Deserialize;

use crate::{
    agent::{
        api::{Request, DEFAULT_BPFFS_ROOT, DEFAULT_SOCKET, DEFAULT_STATE_DIR},
        client::{self, ClientError},
        ops::{self, Paths},
    },
    spec::{
        env::CmdArgs,
        error::{CniError, ErrorCode},
        NetConf,
    },
    state::record::{AttachmentKey, Entry, Owner, Record},
};

/// The operator-facing path keys, the same in every plugin's config.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DatapathConf {
    #[serde(default = "default_socket")]
    pub agent_socket: PathBuf,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_bpffs_root")]
    pub bpffs_root: PathBuf,
}

fn default_socket() -> PathBuf {
    DEFAULT_SOCKET.into()
}
fn default_state_dir() -> PathBuf {
    DEFAULT_STATE_DIR.into()
}
fn default_bpffs_root() -> PathBuf {
    DEFAULT_BPFFS_ROOT.into()
}

impl Default for DatapathConf {
    fn default() -> Self {
        Self {
            agent_socket: default_socket(),
            state_dir: default_state_dir(),
            bpffs_root: default_bpffs_root(),
        }
    }
}

impl DatapathConf {
    /// The path keys of `conf`, and nothing else of it: what DEL and GC
    /// read, so that neither is refused for a config, runtimeConfig or
    /// prevResult that ADD would refuse (the record says what to remove).
    pub fn from_conf(conf: &NetConf) -> Result<Self, CniError> {
        conf.plugin_options()
    }

    fn paths(&self) -> Paths {
        Paths {
            state_dir: self.state_dir.clone(),
            bpffs_root: self.bpffs_root.clone(),
        }
    }

    /// The attachment this invocation is about.
    pub fn key(network: &str, args: &CmdArgs) -> AttachmentKey {
        AttachmentKey {
            network: network.to_string(),
            container_id: args.container_id.clone(),
            ifname: args.ifname.clone(),
        }
    }

    /// Records `entry` for the attachment before the plugin creates it
    /// itself (a link); needs no agent.
    pub fn record(&self, key: &AttachmentKey, entry: Entry) -> Result<(), CniError> {
        self.validate()?;
        // A record the agent would never see (its dirs are others) is
        // refused before it exists. Without an agent the plugin keeps its
        // own records, and that is consistent.
        let paths = self.paths();
        match client::call(&self.agent_socket, &Request::SamePaths { paths }) {
            Ok(_) | Err(ClientError::Unreachable { .. }) => {}
            // An agent older than this plugin (mid-upgrade) does not know
            // the request: its ADD check still catches a mismatch.
            Err(ClientError::Agent { code: 6, .. }) => {}
            Err(e) => return Err(e.into()),
        }
        ops::record(&self.paths(), key, &[entry]).map_err(Into::into)
    }

    /// Undoes [`record`](Self::record) for an entry that was not created.
    pub fn forget(&self, key: &AttachmentKey, entry: &Entry) -> Result<(), CniError> {
        ops::forget(&self.paths(), key, entry).map_err(Into::into)
    }

    /// ADD: record and create datapath `entries` through the agent.
    pub fn add(&self, key: AttachmentKey, entries: Vec<Entry>) -> Result<(), CniError> {
        self.validate()?;
        let record = Record { key, entries };
        let paths = Some(self.paths());
        client::call(&self.agent_socket, &Request::Add { record, paths })?;
        Ok(())
    }

    /// The path keys as an ADD needs them: `stateDir` a directory (or not
    /// yet there), `bpffsRoot` on a bpf filesystem (or not yet there).
    /// Errors are code 7 naming the key.
    pub fn validate(&self) -> Result<(), CniError> {
        if self.state_dir.exists() && !self.state_dir.is_dir() {
            return Err(CniError::invalid_config(format!(
                "stateDir {} is not a directory",
                self.state_dir.display()
            )));
        }
        if self.bpffs_root.exists() && !crate::datapath::pins::on_bpffs(&self.bpffs_root) {
            return Err(CniError::invalid_config(format!(
                "bpffsRoot {} is not on a bpf filesystem (mount -t bpf bpf <dir>)",
                self.bpffs_root.display()
            )));
        }
        Ok(())
    }

    /// DEL of `owner`'s entries: through the agent, or directly when it is
    /// unreachable. Does nothing (and touches nothing) when the attachment
    /// has no record.
    pub fn del(&self, key: &AttachmentKey, owner: Owner) -> Result<(), CniError> {
        let paths = self.paths();
        // No record: never added, or already deleted. (An unreadable one
        // still goes the full way, where the error is reported.)
        if let Ok(None) = paths.records().read(key) {
            return Ok(());
        }
        let req = Request::Del {
            key: key.clone(),
            owner: Some(owner),
        };
        match client::call(&self.agent_socket, &req) {
            // The agent removed what its own record lists. A record still
            // here was written under other paths than the agent's (a config
            // changed since the ADD): it goes too, or it would stay forever.
            Ok(_) => match paths.records().read(key) {
                Ok(Some(_)) => {
                    log::warn!(
                        "{key}: record left in {} after the agent's DEL; removing it directly",
                        paths.state_dir.display()
                    );
                    ops::del(&paths, key, Some(owner)).map_err(Into::into)
                }
                _ => Ok(()),
            },
            Err(ClientError::Unreachable { .. }) => {
                log::info!("cni-agent unreachable; removing {key} directly");
                ops::del(&paths, key, Some(owner)).map_err(Into::into)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// CHECK: the entries are recorded, and map entries are present in the
    /// datapath (asked of the agent, whose absence is then an error).
    pub fn check(&self, key: AttachmentKey, entries: Vec<Entry>) -> Result<(), CniError> {
        if entries.iter().any(Entry::is_map_entry) {
            client::call(&self.agent_socket, &Request::Check { key, entries })?;
            Ok(())
        } else {
            ops::check(&self.paths(), &key, &entries).map_err(Into::into)
        }
    }

    /// GC: every record of the network not in the config's
    /// `cni.dev/valid-attachments` goes. Without a (well-formed) list
    /// nothing is known to be stale, and nothing is removed.
    pub fn gc(&self, conf: &NetConf) -> Result<(), CniError> {
        let Some(valid) = conf.valid_attachments() else {
            return Ok(());
        };
        let network = conf.name.as_str();
        let valid: Vec<AttachmentKey> = valid
            .into_iter()
            .map(|a| AttachmentKey {
                network: network.to_string(),
                container_id: a.container_id,
                ifname: a.ifname,
            })
            .collect();
        let req = Request::Gc {
            network: network.to_string(),
            valid: valid.clone(),
        };
        match client::call(&self.agent_socket, &req) {
            Ok(_) => Ok(()),
            Err(ClientError::Unreachable { .. }) => ops::gc(&self.paths(), network, &valid)
                .map(|_| ())
                .map_err(Into::into),
            Err(e) => Err(e.into()),
        }
    }

    /// STATUS: the agent answers and its datapath is loaded; otherwise the
    /// plugin is not available (code 50).
    pub fn status(&self) -> Result<(), CniError> {
        client::call(&self.agent_socket, &Request::Status)
            .map(|_| ())
            .map_err(|e| CniError::new(ErrorCode::PluginNotAvailable, e.to_string()))
    }
}
