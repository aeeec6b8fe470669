//! `cargo xtask <cmd>`: the project's set-up, test, demo and benchmark tasks.
//!
//! A fresh machine needs only `cargo xtask demo` or `cargo xtask test`: both
//! run `setup` first, which installs whatever the machine lacks.
mod agent;
mod bench;
mod cni;
mod cri;
mod demo;
mod image;
mod lint;
mod netns;
mod proc;
mod setup;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Set-up, test, demo and benchmark tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchain and tools a fresh Debian 12 machine lacks.
    Setup {
        /// Only print what would be installed.
        #[arg(long)]
        dry_run: bool,
        /// Treat these Debian packages (or `bpf-linker`) as missing; with
        /// --dry-run this shows the install path on a machine that has them.
        #[arg(long, value_name = "PKG")]
        assume_missing: Vec<String>,
    },
    /// rustfmt and clippy (warnings are errors), userspace and eBPF.
    Lint,
    /// Set up, lint, build every binary, run the whole test suite (root).
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a filter.
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Set up, build, and show the plugins wiring two pods in private netns (root).
    Demo {
        /// Run the same steps with the reference bridge + host-local instead.
        #[arg(long)]
        reference: bool,
    },
    /// Benchmark our plugins against the reference ones, side by side:
    /// pod churn, datapath, connection rate, bandwidth, firewall, cost,
    /// pods through containerd's CRI (root; release build). Writes
    /// target/bench/report.{md,json} and charts.
    Bench(bench::Opts),
    /// Build the node image of deploy/kubernetes offline (release binaries
    /// and their shared libraries) and load it into podman.
    Image {
        /// Use the debug build instead of the release build.
        #[arg(long)]
        debug: bool,
        /// Only write target/image/cni-ebpf-<version>.tar.
        #[arg(long)]
        no_load: bool,
    },
}

fn main() -> ExitCode {
    proc::install_signal_handlers();
    setup::ensure_cargo_bin_on_path();
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Setup {
            dry_run,
            assume_missing,
        } => setup::run(dry_run, &assume_missing),
        Cmd::Lint => lint::run(),
        Cmd::Test { cargo_test_args } => test(&cargo_test_args),
        Cmd::Demo { reference } => demo::run(reference),
        Cmd::Bench(opts) => bench::run(&opts),
        Cmd::Image { debug, no_load } => image::run(debug, no_load),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nxtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Root of the workspace (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// The cargo that runs this xtask (rustup's stable), not Debian's /usr/bin/cargo.
pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string())
}

/// Network namespaces, veths and bridges need CAP_NET_ADMIN; say so up front
/// instead of failing halfway through with EPERM.
pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("`cargo xtask {what}` must run as root: it creates network namespaces, veths and bridges (try `sudo -E cargo xtask {what}`)");
    }
    Ok(())
}

/// `cargo build --workspace --bins` (plus `--release` if asked); the eBPF
/// object is built by cni-agent/build.rs as part of it.
pub fn build_bins(release: bool) -> Result<PathBuf> {
    let root = workspace_root();
    let mut args = vec!["build", "--workspace", "--bins"];
    if release {
        args.push("--release");
    }
    proc::heading(&format!("Building: cargo {}", args.join(" ")));
    proc::run_checked(proc::cmd(cargo()).args(&args).current_dir(&root))?;
    Ok(target_dir().join(if release { "release" } else { "debug" }))
}

/// Cargo's target dir, honouring CARGO_TARGET_DIR.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                workspace_root().join(d)
            }
        }
        None => workspace_root().join("target"),
    }
}

fn test(extra: &[String]) -> Result<()> {
    require_root("test")?;
    setup::run(false, &[])?;
    lint::run()?;
    let bin_dir = build_bins(false)?;
    let root = workspace_root();
    proc::heading(&format!(
        "Testing: CNI_EBPF_BIN_DIR={} cargo test --workspace --no-fail-fast {}",
        bin_dir.display(),
        extra.join(" ")
    ));
    let mut c = proc::cmd(cargo());
    c.args(["test", "--workspace", "--no-fail-fast"])
        .args(extra)
        .env("CNI_EBPF_BIN_DIR", &bin_dir)
        .current_dir(&root);
    proc::run_checked(&mut c)?;
    println!("\nAll tests passed.");
    Ok(())
}
