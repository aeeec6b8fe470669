//! Userspace of the eBPF CNI: the CNI spec layer, IPAM, netlink plumbing, the
//! plugin implementations and the datapath loader. The binaries in `src/bin`
//! are thin: each parses its input and calls into this library.
pub mod agent;
pub mod crash;
pub mod datapath;
pub mod firewall;
pub mod install;
pub mod ipam;
pub mod netlink;
pub mod plugins;
pub mod spec;
pub mod state;
