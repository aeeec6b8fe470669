//! The plugin implementations behind the binaries in src/bin.
pub mod bandwidth;
pub mod bridge;
pub mod chained;
pub mod datapath;
pub mod firewall;
pub mod host_local;
pub mod loopback;
pub mod portmap;
