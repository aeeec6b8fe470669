//! containerd's CRI as the runtime, for the demo and the benchmark: a
//! private containerd (crate `cni-cri`) started with `nsenter --net=` in a
//! node netns the caller made, whose CRI plugin runs one conflist from a
//! conf dir of its own with every plugin (and `loopback`) from one bin
//! dir, and the offline busybox images it runs pods from.
//!
//! Everything containerd makes lives under a private directory in /tmp
//! ([`RuntimeDir`]): its root and state, its sockets, runc's state, the pods'
//! network namespace bind mounts. Dropping a [`Cri`] stops and removes
//! every sandbox through the CRI (so the CNI DELs run), stops containerd,
//! then kills, unmounts and removes whatever is left, even when containerd
//! never came up. Directories of an xtask that died without cleaning up
//! are reaped by the next one.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cni_cri::{BlockingCriClient, Containerd, ContainerdConfig, RuntimeDir, Teardown};

use crate::netns::{self, TempDir};
use crate::proc;

/// The pause image: the sandbox's process sleeps.
pub const PAUSE_IMAGE: &str = "localhost/cni-xtask/pause:1";
/// busybox httpd serving [`PAYLOAD`] on [`HTTPD_PORT`]: the demo's
/// workload container, and the benchmark's sandbox image (so that a
/// sandbox answers on its hostPort as soon as it runs).
pub const HTTPD_IMAGE: &str = "localhost/cni-xtask/httpd:1";
pub const HTTPD_PORT: u16 = 8080;
/// What [`HTTPD_IMAGE`] serves at `/`.
pub const PAYLOAD: &str = "hello from a pod that containerd started\n";

/// Our plugins containerd needs in its one bin dir (it runs `loopback`
/// for every sandbox).
pub const OUR_PLUGINS: &[&str] = cni_cri::node_image::PLUGINS;
/// The reference plugins' directory (it has `loopback` too).
pub const REFERENCE_DIR: &str = "/usr/lib/cni";

/// Name prefix of the containerd directories in /tmp: `<prefix><pid>-<n>`.
const DIR_PREFIX: &str = "cnix-cri-";

/// Why containerd's CRI cannot run here, or `None`.
pub fn missing() -> Option<String> {
    cni_cri::containerd_missing()
}

/// Where containerd finds the plugins.
pub enum Plugins<'a> {
    /// Our binaries in this build dir, linked into a bin dir of their own
    /// together with our `loopback`.
    Ours(&'a Path),
    /// The reference plugins' directory as it is.
    Reference,
}

/// A running private containerd. Field order is drop order: containerd
/// (every sandbox removed through the CRI, then stopped), then whatever is
/// left below its directory, then the conf, bin, image and log files.
pub struct Cri {
    containerd: Option<Containerd>,
    dir: RuntimeDir,
    _files: TempDir,
    /// The one directory every plugin comes from.
    pub bin_dir: PathBuf,
    /// The conflist containerd loaded.
    pub conf_file: PathBuf,
    /// Log directory for the pods' containers.
    pub log_dir: PathBuf,
}

impl Cri {
    /// Writes `conflist` (text, so its key order stays as written) into a
    /// conf dir of its own, makes the bin dir, builds the pause and httpd
    /// images, starts containerd in the netns at `netns` with
    /// `sandbox_image` as the pause image, and imports the images.
    pub fn start(
        netns: &Path,
        conflist: &str,
        plugins: Plugins,
        sandbox_image: &str,
    ) -> Result<Cri> {
        if let Some(why) = missing() {
            bail!("cannot run containerd's CRI: {why}");
        }
        let name = serde_json::from_str::<serde_json::Value>(conflist)
            .context("the conflist for containerd")?["name"]
            .as_str()
            .context("the conflist has no name")?
            .to_string();
        let files = TempDir::create("cni-xtask-cri")?;
        let conf_dir = files.path().join("conf");
        let log_dir = files.path().join("logs");
        let images = files.path().join("images");
        for d in [&conf_dir, &log_dir, &images] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let conf_file = conf_dir.join(format!("10-{name}.conflist"));
        std::fs::write(&conf_file, conflist)
            .with_context(|| format!("writing {}", conf_file.display()))?;
        let bin_dir = match plugins {
            Plugins::Ours(build) => {
                let d = files.path().join("bin");
                std::fs::create_dir_all(&d)?;
                // Every plugin of ours that is built; containerd cannot run
                // a sandbox without `loopback`.
                for &p in OUR_PLUGINS {
                    let target = build.join(p);
                    if !target.is_file() {
                        if p == "loopback" {
                            bail!("{} is missing (not built?)", target.display());
                        }
                        continue;
                    }
                    std::os::unix::fs::symlink(&target, d.join(p))
                        .with_context(|| format!("linking {p} into {}", d.display()))?;
                }
                d
            }
            Plugins::Reference => PathBuf::from(REFERENCE_DIR),
        };
        let archives = cni_cri::image::write_pause_and_httpd(
            &images,
            PAUSE_IMAGE,
            HTTPD_IMAGE,
            HTTPD_PORT,
            PAYLOAD,
        )
        .context("writing the pause and httpd images")?;
        let dir = RuntimeDir::create(DIR_PREFIX)?;
        let cfg = ContainerdConfig::new(dir.path(), netns, &bin_dir, &conf_dir, sandbox_image);
        let containerd = Containerd::start(cfg).context("starting containerd")?;
        for a in &archives {
            containerd
                .import_image(a)
                .with_context(|| format!("importing {}", a.display()))?;
        }
        Ok(Cri {
            containerd: Some(containerd),
            dir,
            _files: files,
            bin_dir,
            conf_file,
            log_dir,
        })
    }

    pub fn containerd(&self) -> Result<&Containerd> {
        self.containerd.as_ref().context("containerd was stopped")
    }

    pub fn client(&self) -> Result<&BlockingCriClient> {
        Ok(self.containerd()?.client())
    }

    /// containerd's private directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last lines of containerd's log (for error messages).
    pub fn log_tail(&self, lines: usize) -> String {
        self.containerd
            .as_ref()
            .map(|c| c.log_tail(lines))
            .unwrap_or_default()
    }

    /// Stops containerd now (see [`Containerd::shutdown`]); `None` if it
    /// was already stopped.
    pub fn shutdown(&mut self) -> Option<Teardown> {
        self.containerd.take().map(Containerd::shutdown)
    }
}

/// One HTTP/1.0 GET of `/` from the calling thread's netns; the body.
pub fn http_get(server: SocketAddr, connect_timeout: Duration) -> Result<String> {
    cni_harness::http::http_get(server, "/", connect_timeout)
}

/// Polls `server` with GETs from the netns at `ns` until one returns
/// [`PAYLOAD`] (a refused connection is retried at once, a lost SYN after
/// 1 s) or `within` has passed; the time it took.
pub fn wait_served(ns: &Path, server: SocketAddr, within: Duration) -> Result<Duration> {
    netns::in_netns(ns, || {
        let t = Instant::now();
        loop {
            proc::check_interrupted()?;
            let last = match http_get(server, Duration::from_secs(1)) {
                Ok(body) if body == PAYLOAD => return Ok(t.elapsed()),
                Ok(body) => format!("served {body:?}"),
                Err(e) => format!("{e:#}"),
            };
            if t.elapsed() > within {
                bail!("{server} did not serve the pod's page within {within:?} (last: {last})");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    })
}
