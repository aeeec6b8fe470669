//! The eBPF datapath as userspace sees it: the embedded object, loading,
//! pinning and attaching.
pub mod object;
