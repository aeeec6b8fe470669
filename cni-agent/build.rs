//! Builds the kernel-side crate (`cni-ebpf`) for `bpfel-unknown-none` and
//! hands its object to the userspace crate as `CNI_EBPF_OBJECT`.
//!
//! rustup's toolchains here have no `rust-src`, so `-Z build-std` is out;
//! Debian's `rustc-web` ships a prebuilt core for the BPF target instead
//! (see shared/docs/ebpf-toolchain.md). `cargo xtask setup` installs it.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const TARGET: &str = "bpfel-unknown-none";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let ebpf_dir = manifest_dir.join("../cni-ebpf");
    let common_dir = manifest_dir.join("../cni-ebpf-common");
    for p in [
        ebpf_dir.join("src"),
        ebpf_dir.join("Cargo.toml"),
        ebpf_dir.join("Cargo.lock"),
        common_dir.join("src"),
    ] {
        println!("cargo:rerun-if-changed={}", p.display());
    }

    for tool in [DEBIAN_CARGO, DEBIAN_RUSTC] {
        if !Path::new(tool).exists() {
            panic!("{tool} is missing: the eBPF programs need Debian's rustc-web; run `cargo xtask setup`");
        }
    }

    let target_dir = ebpf_dir.join("target");
    let mut cmd = Command::new(DEBIAN_CARGO);
    // Strip everything the outer cargo (or clippy, or a wrapper) exported: it
    // describes the host build, not this one.
    for (key, _) in env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("CARGO")
            || k.starts_with("RUSTC")
            || k.starts_with("RUSTFLAGS")
            || k == "RUSTDOC"
        {
            cmd.env_remove(&key);
        }
    }
    cmd.current_dir(&ebpf_dir)
        .env("RUSTC", DEBIAN_RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf",
        )
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(&target_dir);
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running {DEBIAN_CARGO}: {e}"));
    if !status.success() {
        panic!("building cni-ebpf for {TARGET} failed ({status}); is bpf-linker installed? run `cargo xtask setup`");
    }
    let object = target_dir.join(TARGET).join("release").join("cni-ebpf");
    println!("cargo:rustc-env=CNI_EBPF_OBJECT={}", object.display());
}
