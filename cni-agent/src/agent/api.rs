//! The wire protocol between the plugins (and the admin CLI) and the agent:
//! one JSON request per line on a Unix socket, one JSON response line back.
use serde::{Deserialize, Serialize};

use crate::state::record::{AttachmentKey, Entry, Owner, Record};

/// Default paths, the same in every plugin of the suite and in the agent.
pub const DEFAULT_SOCKET: &str = "/run/cni-ebpf/agent.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/cni-ebpf";
pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/cni-ebpf";

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Record `record` durably, then create its entries. `paths` are the
    /// plugin's `stateDir`/`bpffsRoot`: the agent refuses a request whose
    /// paths are not its own, since the plugin would then look for the
    /// record where the agent never wrote it, and DEL would leak it.
    Add {
        record: Record,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        paths: Option<crate::agent::ops::Paths>,
    },
    /// Remove the entries of the attachment's record (only `owner`'s, if
    /// given), then the record once empty.
    Del {
        key: AttachmentKey,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<Owner>,
    },
    /// Verify that the attachment's record holds `entries` and all of them
    /// are present in the datapath.
    Check {
        key: AttachmentKey,
        entries: Vec<Entry>,
    },
    /// Remove every record (and its entries) of `network` whose attachment
    /// is not in `valid`.
    Gc {
        network: String,
        valid: Vec<AttachmentKey>,
    },
    /// Whether `paths` are the agent's own (asked before a plugin writes a
    /// record itself): error code 7 naming the differing key otherwise.
    SamePaths { paths: crate::agent::ops::Paths },
    /// Agent and datapath health plus occupancy.
    Status,
    /// Every NAT binding.
    Nat,
    /// Every attachment record.
    Records,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    Ok {
        #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
        data: serde_json::Value,
    },
    /// `code` is the CNI error code the plugin should return.
    Error { code: u32, msg: String },
}
