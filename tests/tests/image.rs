//! The node image (`cargo xtask image`, deploy/kubernetes) runs: built
//! from the test's binaries exactly as the xtask builds it from the
//! release ones, loaded into a podman whose storage lives in a temp dir,
//! it runs `cni-agent --version`, and `cni-agent install` from it puts the
//! plugins and the conflist into a host directory mounted into the
//! container, as the DaemonSet's init container does. podman runs with
//! runc and lowered ulimits (this machine's cgroup layout and limits),
//! without a network.
use std::path::Path;
use std::process::{Command, Output, Stdio};

use cni_cri::node_image::{node_image, BINARIES};
use cni_tests::plugin::ours_bin_dir;
use cni_tests::prelude::*;

/// podman with every path of its own under `dir`, including the big
/// temporary files of `podman load` (TMPDIR; `--tmpdir` is only its
/// runtime state), which otherwise unpack the archive in /var/tmp.
fn podman(dir: &Path) -> Command {
    let mut c = Command::new("podman");
    c.env("TMPDIR", dir.join("big-tmp"))
        .arg("--root")
        .arg(dir.join("storage"))
        .arg("--runroot")
        .arg(dir.join("run"))
        .arg("--tmpdir")
        .arg(dir.join("tmp"))
        .args([
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
            "--runtime",
            "runc",
        ])
        .stdin(Stdio::null());
    c
}

#[track_caller]
fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "podman failed ({}): {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn have_podman() -> bool {
    Command::new("podman")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn the_node_image_runs_version_and_install() {
    require_e2e!();
    if !have_podman() {
        let msg = "podman is not installed (cargo xtask setup installs it)";
        if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
            panic!("{msg}");
        }
        eprintln!("SKIPPED: {msg}");
        return;
    }
    let dir = TempDir::new("image");
    let name = format!("localhost/cni-ebpf-test:{}", std::process::id());
    let archive = dir.path().join("image.tar");
    std::fs::create_dir(dir.path().join("big-tmp")).expect("mkdir");
    node_image(&name, &ours_bin_dir())
        .expect("image from the built binaries")
        .write_docker_archive(&archive)
        .expect("docker archive");
    ok(podman(dir.path())
        .arg("load")
        .arg("-i")
        .arg(&archive)
        .output()
        .expect("podman load"));
    // Storage is removed with the temp dir; vfs leaves no mounts behind.
    let run = |args: &[&str], mount: Option<&Path>| {
        let mut c = podman(dir.path());
        c.args([
            "run",
            "--rm",
            "--network",
            "none",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1000:1000",
        ]);
        if let Some(m) = mount {
            c.arg("-v").arg(format!("{}:/host", m.display()));
        }
        c.arg(&name).args(args);
        c.output().expect("podman run")
    };
    let version = ok(run(&["cni-agent", "--version"], None));
    assert_eq!(
        version.trim(),
        format!("cni-agent {}", env!("CARGO_PKG_VERSION")),
        "{version}"
    );

    let host = dir.path().join("host");
    std::fs::create_dir(&host).expect("mkdir");
    let out = ok(run(
        &[
            "cni-agent",
            "install",
            "--pod-cidr",
            "10.244.7.0/24,fd00:10:244:7::/64",
            "--bin-dir",
            "/host/opt/cni/bin",
            "--conf-dir",
            "/host/etc/cni/net.d",
            "--state-dir",
            "/host/var/lib/cni-ebpf",
        ],
        Some(&host),
    ));
    eprintln!("{out}");
    for b in BINARIES.iter().filter(|b| **b != "cni-agent") {
        let installed = host.join("opt/cni/bin").join(b);
        assert!(
            std::fs::read(&installed).expect("installed")
                == std::fs::read(ours_bin_dir().join(b)).expect("built"),
            "{b} installed from the image is the built binary"
        );
    }
    let list: Value = serde_json::from_slice(
        &std::fs::read(host.join("etc/cni/net.d/00-cni-ebpf.conflist")).expect("conflist"),
    )
    .expect("JSON");
    assert_eq!(
        list["plugins"][0]["ipam"]["ranges"],
        json!([[{"subnet": "10.244.7.0/24"}], [{"subnet": "fd00:10:244:7::/64"}]])
    );
    // The image's own install is a no-op the second time (an init
    // container restarted).
    let again = ok(run(
        &[
            "cni-agent",
            "install",
            "--pod-cidr",
            "10.244.7.0/24,fd00:10:244:7::/64",
            "--bin-dir",
            "/host/opt/cni/bin",
            "--conf-dir",
            "/host/etc/cni/net.d",
            "--state-dir",
            "/host/var/lib/cni-ebpf",
        ],
        Some(&host),
    ));
    assert!(again.contains("install: unchanged"), "{again}");
    let _ = podman(dir.path()).args(["rmi", "-af"]).output();
}
