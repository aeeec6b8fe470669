//! `cargo xtask lint`: formatting and clippy with warnings as errors, for the
//! userspace workspace and for the eBPF crate (its own workspace, checked by
//! Debian's clippy, the one that matches the rustc that builds it). `cargo
//! xtask test` runs it first, so a change that is not clean never reaches
//! the tests, and CI sees the same.
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::{cargo, proc, workspace_root};

/// Debian's `cargo-clippy` (package rust-web-clippy), called directly:
/// `cargo clippy` would find rustup's first, in ~/.cargo/bin.
const DEBIAN_CARGO_CLIPPY: &str = "/usr/bin/cargo-clippy";

pub fn run() -> Result<()> {
    let root = workspace_root();
    proc::heading("Lint: cargo fmt --all --check");
    proc::run_checked(
        proc::cmd(cargo())
            .args(["fmt", "--all", "--check"])
            .current_dir(&root),
    )?;

    let ebpf = root.join("cni-ebpf");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(ebpf.join("src"))
        .with_context(|| format!("reading {}", ebpf.join("src").display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .collect();
    sources.sort();
    proc::heading("Lint: rustfmt --check (cni-ebpf)");
    proc::run_checked(
        proc::cmd("rustfmt")
            .args(["--edition", "2021", "--check"])
            .args(&sources),
    )?;

    proc::heading("Lint: cargo clippy --workspace --all-targets -- -D warnings");
    proc::run_checked(
        proc::cmd(cargo())
            .args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])
            .current_dir(&root),
    )?;

    proc::heading("Lint: clippy -D warnings (cni-ebpf for bpfel-unknown-none, Debian's clippy)");
    let mut c = proc::cmd(DEBIAN_CARGO_CLIPPY);
    // Only Debian's toolchain: the outer cargo's (rustup's) variables and
    // ~/.cargo/bin describe another compiler.
    c.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env(
            "HOME",
            std::env::var_os("HOME").unwrap_or_else(|| "/root".into()),
        )
        .env("RUSTC", "/usr/bin/rustc")
        .env("RUSTC_BOOTSTRAP", "1")
        .args([
            "clippy",
            "--release",
            "--locked",
            "--target",
            "bpfel-unknown-none",
            "--target-dir",
        ])
        .arg(crate::target_dir().join("ebpf-clippy"))
        .args(["--", "-D", "warnings"])
        .current_dir(&ebpf);
    proc::run_checked(&mut c)?;
    println!("\nLint clean.");
    Ok(())
}
