//! Container images built offline: a single uncompressed layer holding a
//! static busybox (Debian's `busybox-static`) plus a few files, written as
//! a docker-archive tarball (`docker save` layout: `manifest.json`, the
//! image config and `<id>/layer.tar`) that `ctr images import` loads.
//!
//! Everything is deterministic (fixed mtimes and owners), so the same
//! inputs give the same image ID.
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Where Debian's busybox-static installs its binary.
pub const HOST_BUSYBOX: &str = "/bin/busybox";

/// Applets linked into `/bin` of every image built by [`ImageBuilder::busybox`].
pub const APPLETS: &[&str] = &["sh", "sleep", "httpd", "nc", "cat", "echo", "ls", "ip"];

#[derive(Debug, Clone)]
enum Entry {
    Dir(String),
    File {
        path: String,
        data: Vec<u8>,
        mode: u32,
    },
    Symlink {
        path: String,
        target: String,
    },
}

/// An image with one layer, described entry by entry.
#[derive(Debug, Clone)]
pub struct ImageBuilder {
    /// Full reference, e.g. `localhost/cni-tests/pause:1`.
    name: String,
    entries: Vec<Entry>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    env: Vec<String>,
    working_dir: String,
}

impl ImageBuilder {
    pub fn new(name: &str) -> ImageBuilder {
        ImageBuilder {
            name: name.into(),
            entries: Vec::new(),
            entrypoint: Vec::new(),
            cmd: Vec::new(),
            env: vec!["PATH=/bin".into()],
            working_dir: "/".into(),
        }
    }

    /// An image with `busybox` (the host's static binary at `busybox`) in
    /// /bin, the [`APPLETS`] linked to it, and the empty directories a
    /// runtime mounts over (/dev, /proc, /sys, /etc, /tmp, /run).
    pub fn busybox(name: &str, busybox: &Path) -> Result<ImageBuilder> {
        let data = std::fs::read(busybox)
            .map_err(|e| Error::io(format!("cannot read {}", busybox.display()), e))?;
        let mut b = ImageBuilder::new(name);
        for d in ["bin", "dev", "proc", "sys", "etc", "tmp", "run", "var"] {
            b = b.dir(d);
        }
        b = b.file_mode("bin/busybox", data, 0o755);
        for applet in APPLETS {
            b = b.symlink(&format!("bin/{applet}"), "busybox");
        }
        Ok(b)
    }

    pub fn dir(mut self, path: &str) -> ImageBuilder {
        self.entries.push(Entry::Dir(clean(path)));
        self
    }

    /// A regular file, mode 0644.
    pub fn file(self, path: &str, data: impl Into<Vec<u8>>) -> ImageBuilder {
        self.file_mode(path, data, 0o644)
    }

    pub fn file_mode(mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) -> ImageBuilder {
        self.entries.push(Entry::File {
            path: clean(path),
            data: data.into(),
            mode,
        });
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> ImageBuilder {
        self.entries.push(Entry::Symlink {
            path: clean(path),
            target: target.into(),
        });
        self
    }

    pub fn entrypoint<S: Into<String>>(
        mut self,
        argv: impl IntoIterator<Item = S>,
    ) -> ImageBuilder {
        self.entrypoint = argv.into_iter().map(Into::into).collect();
        self
    }

    pub fn cmd<S: Into<String>>(mut self, argv: impl IntoIterator<Item = S>) -> ImageBuilder {
        self.cmd = argv.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the image's environment (`KEY=value` entries), replacing the
    /// default `PATH=/bin`.
    pub fn env<S: Into<String>>(mut self, vars: impl IntoIterator<Item = S>) -> ImageBuilder {
        self.env = vars.into_iter().map(Into::into).collect();
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The layer as an uncompressed tar.
    fn layer_tar(&self) -> Result<Vec<u8>> {
        let mut b = tar::Builder::new(Vec::new());
        for e in &self.entries {
            let mut h = tar::Header::new_ustar();
            h.set_mtime(0);
            h.set_uid(0);
            h.set_gid(0);
            match e {
                Entry::Dir(path) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    b.append_data(&mut h, format!("{path}/"), std::io::empty())
                }
                Entry::File { path, data, mode } => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, path, data.as_slice())
                }
                Entry::Symlink { path, target } => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    b.append_link(&mut h, path, target)
                }
            }
            .map_err(|e| Error::io("cannot build the image layer", e))?;
        }
        b.into_inner()
            .map_err(|e| Error::io("cannot finish the image layer", e))
    }

    /// Writes the image as a docker-archive tarball at `out`; returns the
    /// image ID (`sha256:` of its config).
    pub fn write_docker_archive(&self, out: &Path) -> Result<String> {
        let layer = self.layer_tar()?;
        let layer_hex = hex(&Sha256::digest(&layer));
        let config = json!({
            "architecture": oci_arch(),
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": {
                "Entrypoint": self.entrypoint,
                "Cmd": self.cmd,
                "Env": self.env,
                "WorkingDir": self.working_dir,
            },
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_hex}")]},
            "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "cni-cri image builder"}],
        });
        let config = serde_json::to_vec(&config).map_err(|e| Error::Unexpected(e.to_string()))?;
        let config_hex = hex(&Sha256::digest(&config));
        let manifest = json!([{
            "Config": format!("{config_hex}.json"),
            "RepoTags": [self.name],
            "Layers": [format!("{layer_hex}/layer.tar")],
        }]);
        let manifest =
            serde_json::to_vec(&manifest).map_err(|e| Error::Unexpected(e.to_string()))?;

        let file = std::fs::File::create(out)
            .map_err(|e| Error::io(format!("cannot create {}", out.display()), e))?;
        let mut ar = tar::Builder::new(std::io::BufWriter::new(file));
        let wrote = (|| -> std::io::Result<()> {
            append(&mut ar, &format!("{layer_hex}/"), None)?;
            append(&mut ar, &format!("{layer_hex}/layer.tar"), Some(&layer))?;
            append(&mut ar, &format!("{config_hex}.json"), Some(&config))?;
            append(&mut ar, "manifest.json", Some(&manifest))?;
            let mut w = ar.into_inner()?;
            w.flush()
        })();
        wrote.map_err(|e| Error::io(format!("cannot write {}", out.display()), e))?;
        Ok(format!("sha256:{config_hex}"))
    }
}

/// Appends a directory (`data` None) or a regular file to an archive.
fn append<W: Write>(
    ar: &mut tar::Builder<W>,
    path: &str,
    data: Option<&[u8]>,
) -> std::io::Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    match data {
        None => {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            ar.append_data(&mut h, path, std::io::empty())
        }
        Some(d) => {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(d.len() as u64);
            ar.append_data(&mut h, path, d)
        }
    }
}

/// `path` without leading `/` or `./` (tar members are relative).
fn clean(path: &str) -> String {
    path.trim_start_matches("./")
        .trim_start_matches('/')
        .trim_end_matches('/')
        .to_string()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The OCI architecture name of this machine.
pub fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// The two images the tests and the xtask run pods from, written into
/// `dir` as docker archives: `pause` (its process sleeps) and `httpd`
/// (busybox httpd serving `payload` at `/` on `port`). Returns the
/// archives, pause first.
pub fn write_pause_and_httpd(
    dir: &Path,
    pause: &str,
    httpd: &str,
    port: u16,
    payload: &str,
) -> Result<Vec<PathBuf>> {
    let busybox = Path::new(HOST_BUSYBOX);
    let pause =
        ImageBuilder::busybox(pause, busybox)?.entrypoint(["/bin/busybox", "sleep", "2147483647"]);
    let httpd = ImageBuilder::busybox(httpd, busybox)?
        .dir("www")
        .file("www/index.html", payload)
        .entrypoint(["/bin/busybox", "httpd", "-f", "-p"])
        .cmd([port.to_string(), "-h".into(), "/www".into()]);
    let mut out = Vec::new();
    for img in [pause, httpd] {
        let path = archive_path(dir, img.name());
        img.write_docker_archive(&path)?;
        out.push(path);
    }
    Ok(out)
}

/// The path of a tarball for `image` in `dir` (its name made file-safe).
pub fn archive_path(dir: &Path, image: &str) -> PathBuf {
    let safe: String = image
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    dir.join(format!("{safe}.tar"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_lists_manifest_config_and_layer() {
        let dir = std::env::temp_dir().join(format!("cnicri-image-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let out = dir.join("img.tar");
        let id = ImageBuilder::new("localhost/test/img:1")
            .dir("bin")
            .file("www/index.html", "hello")
            .symlink("bin/sh", "busybox")
            .entrypoint(["/bin/sh"])
            .write_docker_archive(&out)
            .expect("write");
        assert!(id.starts_with("sha256:"));
        let mut names = Vec::new();
        let f = std::fs::File::open(&out).expect("open");
        let mut ar = tar::Archive::new(f);
        for e in ar.entries().expect("entries") {
            let e = e.expect("entry");
            names.push(e.path().expect("path").to_string_lossy().into_owned());
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert!(names.contains(&"manifest.json".to_string()), "{names:?}");
        assert!(names.iter().any(|n| n.ends_with("/layer.tar")), "{names:?}");
        assert!(
            names.contains(&format!("{}.json", &id["sha256:".len()..])),
            "{names:?}"
        );
    }
}
