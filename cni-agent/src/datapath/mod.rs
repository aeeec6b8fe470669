//! The eBPF datapath as userspace sees it: the embedded object, the bpffs
//! layout, attaching programs, and the maps the agent and plugins write.
pub mod batch;
pub mod cgroup;
pub mod conntrack;
pub mod entries;
pub mod links;
pub mod loader;
pub mod node;
pub mod object;
pub mod occupancy;
pub mod pins;
pub mod policy;
pub mod rate;
pub mod sys;
pub mod uplink;
