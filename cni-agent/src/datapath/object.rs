//! The compiled kernel-side object, embedded at build time by `build.rs`.

/// ELF object of the `cni-ebpf` crate, aligned as aya requires.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("CNI_EBPF_OBJECT"));
