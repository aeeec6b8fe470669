//! The node agent: owns the eBPF datapath (loads it once, pins it, keeps it
//! across restarts), serves the plugins over a Unix socket, and expires NAT
//! bindings; serves Prometheus metrics and health probes over HTTP.
pub mod api;
pub mod client;
pub mod daemon;
pub mod health;
pub mod http;
pub mod metrics;
pub mod ops;
pub mod server;
