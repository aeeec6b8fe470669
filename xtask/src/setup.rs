//! `cargo xtask setup`: install what a fresh Debian 12 machine lacks, and
//! nothing else. Every item is checked first; `apt-get update` runs at most
//! once, and only when something has to be installed.
use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::proc;

/// Debian packages the build, the tests and the demo cannot do without.
const REQUIRED: &[(&str, &str)] = &[
    // The eBPF toolchain (shared/docs/ebpf-toolchain.md): Debian's rustc
    // 1.96 with a prebuilt core for bpfel-unknown-none, and the LLVM 22 that
    // bpf-linker links against.
    ("rustc-web", "rustc with LLVM 22 for the eBPF crate"),
    ("cargo-web", "cargo that drives it"),
    (
        "libstd-rust-web-dev-bpf",
        "prebuilt core for bpfel-unknown-none",
    ),
    ("llvm-22-dev", "LLVM 22 for bpf-linker"),
    ("libpolly-22-dev", "needed to link bpf-linker"),
    ("libzstd-dev", "needed to link bpf-linker"),
    ("zlib1g-dev", "needed to link bpf-linker"),
    ("libxml2-dev", "needed to link bpf-linker"),
    (
        "rust-web-clippy",
        "clippy for the eBPF crate (cargo xtask lint)",
    ),
    // Reference plugins (/usr/lib/cni) for differential tests and benchmarks.
    ("containernetworking-plugins", "reference CNI plugins"),
    ("iperf3", "traffic for tests"),
    ("iproute2", "ip netns for tests and the demo"),
    ("iptables", "checks that the datapath adds no rules"),
    ("nftables", "checks that the datapath adds no rules"),
    ("bpftool", "inspecting programs and maps"),
    ("tcpdump", "packet captures while debugging"),
    ("iputils-ping", "ping for tests and the demo"),
    ("conntrack", "shows the reference plugins' NAT state"),
    ("ethtool", "checksum offload settings in XDP tests"),
    ("socat", "simple servers and clients in tests and the demo"),
    (
        "python3",
        "crafted ARP and neighbour discovery frames in the firewall tests",
    ),
    (
        "util-linux",
        "nsenter for running plugins inside a node netns",
    ),
    // containerd's CRI as a real client (tests/tests/cri.rs): containerd
    // 1.6 with its CRI plugin (and ctr), runc, and the static busybox the
    // offline pause and workload images are built from.
    ("containerd", "the CRI runtime the CRI tests drive"),
    ("runc", "the OCI runtime containerd starts pods with"),
    (
        "busybox-static",
        "/bin/busybox for the locally built images",
    ),
    // podman runs the node image (`cargo xtask image`, tests/tests/image.rs).
    (
        "podman",
        "runs the node image in its test and loads `cargo xtask image`",
    ),
    // The throwaway CA and server certificate of the fake Kubernetes API
    // (tests/tests/install.rs).
    ("openssl", "certificates for the install test's API server"),
    // kubectl, to check deploy/kubernetes offline (tests/tests/deploy.rs).
    (
        "kubernetes-client",
        "kubectl for the offline manifest checks",
    ),
];

/// Required packages that another package's command stands in for: a
/// kubectl from elsewhere (Google's `kubectl` package ships the same
/// /usr/bin/kubectl, and dpkg would refuse to overwrite it).
const PROVIDED_BY_COMMAND: &[(&str, &str)] = &[("kubernetes-client", "kubectl")];

/// `<command> at <path>` when a required package's command is on PATH.
fn provided_by_command(pkg: &str) -> Option<String> {
    let (_, cmd) = PROVIDED_BY_COMMAND.iter().find(|(p, _)| *p == pkg)?;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
        .map(|p| format!("({cmd} at {})", p.display()))
}

/// Installed when the distribution has it (checked with apt-cache policy).
const OPTIONAL: &[(&str, &str)] = &[
    ("sockperf", "latency tests"),
    ("fonts-dejavu-core", "text in the benchmark's PNG charts"),
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// What has to happen; computed from the machine's state before anything runs.
#[derive(Debug, Default, PartialEq)]
struct Plan {
    apt_update: bool,
    apt_install: Vec<String>,
    /// Optional packages to re-check after `apt-get update` (their
    /// candidate may only appear then).
    recheck_after_update: Vec<String>,
    bpf_linker: Option<BpfLinkerAction>,
}

#[derive(Debug, PartialEq)]
enum BpfLinkerAction {
    Install,
    /// Another version is on the machine: replace it.
    Replace(String),
}

/// The machine as seen before installing.
struct State<'a> {
    /// Packages that are missing.
    missing_required: Vec<&'a str>,
    /// Optional packages missing, each with whether apt has a candidate now.
    missing_optional: Vec<(&'a str, bool)>,
    /// `bpf-linker --version`, if any.
    bpf_linker: Option<String>,
}

fn plan(st: &State) -> Plan {
    let mut p = Plan::default();
    for pkg in &st.missing_required {
        p.apt_install.push(pkg.to_string());
    }
    let mut optional_with_candidate = Vec::new();
    for (pkg, has_candidate) in &st.missing_optional {
        if *has_candidate {
            optional_with_candidate.push(pkg.to_string());
        } else if !p.apt_install.is_empty() {
            // A fresh machine has empty package lists: decide after update.
            p.recheck_after_update.push(pkg.to_string());
        }
    }
    p.apt_install.extend(optional_with_candidate);
    p.apt_update = !p.apt_install.is_empty();
    p.bpf_linker = match &st.bpf_linker {
        None => Some(BpfLinkerAction::Install),
        Some(v) if v.split_whitespace().any(|w| w == BPF_LINKER_VERSION) => None,
        Some(v) => Some(BpfLinkerAction::Replace(v.clone())),
    };
    p
}

fn dpkg_installed(pkg: &str) -> Option<String> {
    let out =
        proc::output(proc::cmd("dpkg-query").args(["-W", "-f=${Status}\t${Version}", pkg])).ok()?;
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, version) = s.split_once('\t')?;
    (out.status.success() && status == "install ok installed").then(|| version.to_string())
}

/// Whether apt knows an installable version (`Candidate:` not `(none)`).
fn apt_candidate(pkg: &str) -> Option<String> {
    let out = proc::output(proc::cmd("apt-cache").args(["policy", pkg])).ok()?;
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty() && c != "(none)")
}

/// Where `cargo install` puts binaries.
pub fn cargo_bin_dir() -> PathBuf {
    if let Some(h) = std::env::var_os("CARGO_HOME") {
        return PathBuf::from(h).join("bin");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cargo").join("bin")
}

/// Puts cargo's bin dir on PATH for every child (cni-agent/build.rs's
/// Debian cargo finds bpf-linker through PATH), in case the caller's PATH
/// lacks it.
pub fn ensure_cargo_bin_on_path() {
    let bin = cargo_bin_dir();
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|p| p == bin) {
        return;
    }
    let mut parts = vec![bin];
    parts.extend(std::env::split_paths(&path));
    if let Ok(joined) = std::env::join_paths(parts) {
        std::env::set_var("PATH", joined);
    }
}

fn bpf_linker_version() -> Option<String> {
    let out = proc::output(proc::cmd("bpf-linker").arg("--version")).ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn apt_get(args: &[&str]) -> Result<()> {
    let mut c = proc::cmd("apt-get");
    c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
    println!(
        "$ DEBIAN_FRONTEND=noninteractive apt-get {}",
        args.join(" ")
    );
    proc::run_checked(&mut c)
}

fn bpf_linker_install_args(replace: bool) -> Vec<String> {
    let mut a: Vec<String> = [
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--no-default-features",
        "--features",
        "llvm-22",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if replace {
        a.push("--force".into());
    }
    a
}

pub fn run(dry_run: bool, assume_missing: &[String]) -> Result<()> {
    ensure_cargo_bin_on_path();
    proc::heading(if dry_run {
        "Setup (dry run): checking what this machine lacks"
    } else {
        "Setup: checking what this machine lacks"
    });
    let assumed = |p: &str| assume_missing.iter().any(|a| a == p);

    let mut st = State {
        missing_required: Vec::new(),
        missing_optional: Vec::new(),
        bpf_linker: None,
    };
    for (pkg, why) in REQUIRED {
        match dpkg_installed(pkg)
            .or_else(|| provided_by_command(pkg))
            .filter(|_| !assumed(pkg))
        {
            Some(v) => println!("  ok       {pkg} {v}"),
            None => {
                println!("  missing  {pkg} ({why})");
                st.missing_required.push(pkg);
            }
        }
    }
    for (pkg, why) in OPTIONAL {
        match dpkg_installed(pkg).filter(|_| !assumed(pkg)) {
            Some(v) => println!("  ok       {pkg} {v}"),
            None => {
                let cand = apt_candidate(pkg);
                match &cand {
                    Some(c) => println!("  missing  {pkg} ({why}; apt has {c})"),
                    None => println!("  missing  {pkg} ({why}; apt has no candidate yet)"),
                }
                st.missing_optional.push((pkg, cand.is_some()));
            }
        }
    }
    st.bpf_linker = bpf_linker_version().filter(|_| !assumed("bpf-linker"));
    match &st.bpf_linker {
        Some(v) => println!("  found    {v} (want {BPF_LINKER_VERSION})"),
        None => println!("  missing  bpf-linker {BPF_LINKER_VERSION} (links the eBPF object)"),
    }

    let p = plan(&st);
    if p.apt_install.is_empty() && p.bpf_linker.is_none() {
        for (pkg, _) in &st.missing_optional {
            println!("  note: {pkg} is not available from apt here; skipping it");
        }
        println!("Setup: nothing to install.");
        return Ok(());
    }

    if dry_run {
        println!("Would run:");
        if p.apt_update {
            println!("  DEBIAN_FRONTEND=noninteractive apt-get update");
        }
        if !p.apt_install.is_empty() {
            println!(
                "  DEBIAN_FRONTEND=noninteractive apt-get install -y {}",
                p.apt_install.join(" ")
            );
        }
        for pkg in &p.recheck_after_update {
            println!("  (then install {pkg} too if apt-cache policy shows a candidate)");
        }
        if let Some(a) = &p.bpf_linker {
            println!(
                "  LLVM_PREFIX={LLVM_PREFIX} cargo {}",
                bpf_linker_install_args(matches!(a, BpfLinkerAction::Replace(_))).join(" ")
            );
        }
        return Ok(());
    }

    crate::require_root("setup")?;
    let mut install = p.apt_install.clone();
    if p.apt_update {
        proc::heading("Setup: refreshing the package lists");
        apt_get(&["update"])?;
        for pkg in &p.recheck_after_update {
            match apt_candidate(pkg) {
                Some(_) => install.push(pkg.clone()),
                None => println!("  note: {pkg} is not available from apt here; skipping it"),
            }
        }
    }
    if !install.is_empty() {
        proc::heading(&format!("Setup: installing {}", install.join(" ")));
        let mut args = vec!["install", "-y"];
        args.extend(install.iter().map(String::as_str));
        apt_get(&args)?;
    }
    if let Some(a) = &p.bpf_linker {
        if let BpfLinkerAction::Replace(old) = a {
            println!("  replacing {old}");
        }
        let args = bpf_linker_install_args(matches!(a, BpfLinkerAction::Replace(_)));
        proc::heading(&format!(
            "Setup: LLVM_PREFIX={LLVM_PREFIX} cargo {} (about 3 minutes on 2 cores)",
            args.join(" ")
        ));
        proc::run_checked(
            proc::cmd(crate::cargo())
                .args(&args)
                .env("LLVM_PREFIX", LLVM_PREFIX),
        )?;
    }

    // Check the result rather than trusting exit codes.
    let still: Vec<&str> = REQUIRED
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| dpkg_installed(p).is_none() && provided_by_command(p).is_none())
        .collect();
    if !still.is_empty() {
        bail!("still missing after install: {}", still.join(" "));
    }
    match bpf_linker_version() {
        Some(v) if v.split_whitespace().any(|w| w == BPF_LINKER_VERSION) => {}
        other => bail!(
            "bpf-linker {BPF_LINKER_VERSION} is still not on PATH (found {other:?}; PATH should include {})",
            cargo_bin_dir().display()
        ),
    }
    println!("Setup: done.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st<'a>(req: Vec<&'a str>, opt: Vec<(&'a str, bool)>, linker: Option<&str>) -> State<'a> {
        State {
            missing_required: req,
            missing_optional: opt,
            bpf_linker: linker.map(String::from),
        }
    }

    #[test]
    fn nothing_missing_means_nothing_to_do() {
        assert_eq!(
            plan(&st(vec![], vec![], Some("bpf-linker 0.13.0"))),
            Plan::default()
        );
    }

    #[test]
    fn missing_package_updates_once_and_installs() {
        let p = plan(&st(
            vec!["iperf3", "tcpdump"],
            vec![],
            Some("bpf-linker 0.13.0"),
        ));
        assert!(p.apt_update);
        assert_eq!(p.apt_install, vec!["iperf3", "tcpdump"]);
        assert_eq!(p.bpf_linker, None);
    }

    #[test]
    fn optional_without_candidate_is_skipped_unless_updating() {
        let p = plan(&st(
            vec![],
            vec![("sockperf", false)],
            Some("bpf-linker 0.13.0"),
        ));
        assert_eq!(p, Plan::default());
        let p = plan(&st(
            vec!["iperf3"],
            vec![("sockperf", false)],
            Some("bpf-linker 0.13.0"),
        ));
        assert_eq!(p.recheck_after_update, vec!["sockperf"]);
        let p = plan(&st(
            vec![],
            vec![("sockperf", true)],
            Some("bpf-linker 0.13.0"),
        ));
        assert!(p.apt_update);
        assert_eq!(p.apt_install, vec!["sockperf"]);
    }

    #[test]
    fn bpf_linker_wrong_or_missing_version() {
        assert_eq!(
            plan(&st(vec![], vec![], None)).bpf_linker,
            Some(BpfLinkerAction::Install)
        );
        assert_eq!(
            plan(&st(vec![], vec![], Some("bpf-linker 0.9.13"))).bpf_linker,
            Some(BpfLinkerAction::Replace("bpf-linker 0.9.13".into()))
        );
        assert!(!plan(&st(vec![], vec![], None)).apt_update);
    }
}
