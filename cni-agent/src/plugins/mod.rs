//! The plugin implementations behind the binaries in src/bin.
pub mod bridge;
pub mod host_local;
pub mod datapath;
pub mod portmap;
