//! The image the DaemonSet runs (deploy/kubernetes/cni-ebpf.yaml): the
//! agent and the six binaries `cni-agent install` copies, in /usr/local/bin,
//! with the shared libraries they link (as `ldd` lists them: libc, libgcc_s
//! and the loader), and nothing else — no shell, no package manager. Built
//! offline from binaries on disk, so a machine without a registry can make
//! it (`cargo xtask image`) and the tests can run it under podman.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};
use crate::image::ImageBuilder;

/// The binaries of the image, all from one directory.
pub const BINARIES: [&str; 7] = [
    "cni-agent",
    "ebpf-bridge",
    "ebpf-host-local",
    "ebpf-portmap",
    "ebpf-firewall",
    "ebpf-bandwidth",
    "loopback",
];

/// The CNI plugins among [`BINARIES`] (all but the agent): what a runtime
/// needs in its bin dir to run our conflists (containerd also runs
/// `loopback` for every sandbox). One list, for the tests' and the xtask's
/// containerd bin dirs as for the image.
pub const PLUGINS: &[&str] = BINARIES.split_at(1).1;

/// Where the binaries go in the image (on the image's PATH).
pub const BIN_DIR: &str = "/usr/local/bin";

/// The shared libraries `ldd` resolves for `binary` (absolute paths,
/// including the dynamic loader; the vDSO has no file and is skipped).
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| Error::io("cannot run ldd", e))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A static binary: "not a dynamic executable".
        return Ok(Vec::new());
    }
    Ok(text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// The node image named `name` from the binaries in `bin_dir`.
pub fn node_image(name: &str, bin_dir: &Path) -> Result<ImageBuilder> {
    let mut b = ImageBuilder::new(name)
        .env([format!("PATH={BIN_DIR}:/usr/bin:/bin")])
        .cmd(["cni-agent", "--help"]);
    for d in [
        "dev",
        "proc",
        "sys",
        "etc",
        "tmp",
        "run",
        "var",
        "usr",
        "usr/local",
        "usr/local/bin",
    ] {
        b = b.dir(d);
    }
    let mut libs = BTreeSet::new();
    for name in BINARIES {
        let path = bin_dir.join(name);
        let data = std::fs::read(&path)
            .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
        b = b.file_mode(&format!("{BIN_DIR}/{name}"), data, 0o755);
        libs.extend(shared_libraries(&path)?);
    }
    let mut dirs = BTreeSet::new();
    for lib in &libs {
        let mut parent = lib.parent();
        while let Some(p) = parent.filter(|p| *p != Path::new("/")) {
            dirs.insert(p.to_path_buf());
            parent = p.parent();
        }
    }
    for d in &dirs {
        b = b.dir(&d.to_string_lossy());
    }
    for lib in &libs {
        // The file a symlink such as libc.so.6 points to, under the name
        // the binaries ask for.
        let data = std::fs::read(lib)
            .map_err(|e| Error::io(format!("cannot read {}", lib.display()), e))?;
        b = b.file_mode(&lib.to_string_lossy(), data, 0o755);
    }
    Ok(b)
}
