//! Test harness: network namespaces, plugin invocation, a mini CNI runtime,
//! kernel/on-disk state snapshots, and cleanup that survives panics.
//!
//! A typical end-to-end test:
//! ```ignore
//! use cni_tests::prelude::*;
//! #[test]
//! fn add_works() {
//!     require_e2e!();
//!     let node = Node::new("add");
//!     let pod = node.pod("pod");
//!     let rt = node.runtime(Impl::Ours);
//!     let conf = bridge_conf_for(&node, "1.0.0", Impl::Ours);
//!     let att = Attachment::new("c1", &pod, "eth0");
//!     let result = rt.add(&conf, &att);
//!     assert_result_matches_kernel(&result, &node.ns, &pod);
//!     rt.del(&conf, &att, Some(&result)).expect_success();
//! }
//! ```
//! Every namespace and directory is a guard removed on drop, so a failing
//! test leaves nothing behind; nothing here touches the root namespace
//! (plugins run in the node namespace, entered by the child before exec).
pub mod agent;
pub mod agentctl;
pub mod bpffs;
pub mod cri;
pub mod diff;
pub mod hostport;
pub mod hostport_node;
pub mod packet;
pub mod plugin;
pub mod poll;
pub mod preconditions;
pub mod residue;
pub mod result;
pub mod runtime;
pub mod snapshot;
pub mod topology;
pub mod traffic;
pub mod uplink;

/// Shared with the xtask (crate `cni-harness`), under the paths tests use.
pub use cni_harness::{netns, tempdir};

/// Everything a test file usually needs.
pub mod prelude {
    pub use crate::diff::assert_json_eq;
    pub use crate::netns::NetNs;
    pub use crate::plugin::{
        ours_binary, CniErrorOut, Expect, Impl, Invocation, Outcome, Ran, REFERENCE_DIR,
    };
    pub use crate::poll::{eventually, wait_until, SETTLE};
    pub use crate::require_e2e;
    pub use crate::result::{
        assert_result_matches_kernel, normalize_result, result_addresses, ResultNorm,
    };
    pub use crate::runtime::{
        conflist_of, with_prev_result, Attachment, GcKey, Runtime, RuntimeExt,
    };
    pub use crate::snapshot::{kernel_state, NodeSnapshot, Normalize};
    pub use crate::tempdir::TempDir;
    pub use crate::topology::{
        bridge_conf, bridge_conf_for, ipam_conf, merge, reservations_in, Node, BRIDGE, NET_NAME,
        SUBNET,
    };
    pub use serde_json::{json, Value};
}
