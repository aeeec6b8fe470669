//! `cargo xtask image`: the node image of deploy/kubernetes/cni-ebpf.yaml,
//! built offline (no registry is reachable here, none is needed): the
//! release binaries and the shared libraries they link, as one layer in a
//! docker-archive tarball (target/image/), loaded into podman as
//! `localhost/cni-ebpf:<version>`. `ctr -n k8s.io images import` takes the
//! same tarball on a containerd node.
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::proc;

/// The image's name, as the manifest names it.
pub fn image_name() -> String {
    format!("localhost/cni-ebpf:{}", env!("CARGO_PKG_VERSION"))
}

pub fn run(debug: bool, no_load: bool) -> Result<()> {
    let bins = crate::build_bins(!debug)?;
    let name = image_name();
    proc::heading(&format!("Image {name} from {}", bins.display()));
    let image = cni_cri::node_image::node_image(&name, &bins)
        .with_context(|| format!("building the image from {}", bins.display()))?;
    let dir: PathBuf = crate::target_dir().join("image");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let archive = dir.join(format!("cni-ebpf-{}.tar", env!("CARGO_PKG_VERSION")));
    let id = image
        .write_docker_archive(&archive)
        .with_context(|| format!("writing {}", archive.display()))?;
    println!("    {} ({id})", archive.display());
    if no_load {
        return Ok(());
    }
    proc::heading(&format!("podman load -i {}", archive.display()));
    proc::run_checked(proc::cmd("podman").arg("load").arg("-i").arg(&archive)).context(
        "podman load (install podman, or pass --no-load and import the tarball elsewhere)",
    )?;
    println!("    loaded as {name}: `podman push {name} REGISTRY/cni-ebpf:{}`, then set the image in deploy/kubernetes/cni-ebpf.yaml", env!("CARGO_PKG_VERSION"));
    Ok(())
}
