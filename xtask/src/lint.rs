//! `cargo xtask lint`: formatting (userspace and eBPF crates) and clippy
//! with warnings as errors (userspace). `cargo xtask test` runs it first, so
//! a change that is not clean never reaches the tests, and CI sees the same.
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::{cargo, proc, workspace_root};

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

    println!("\nLint clean.");
    Ok(())
}
