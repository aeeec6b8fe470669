//! A private containerd (Debian's 1.6, with its CRI plugin) for tests, the
//! demo and benchmarks: every path it writes is inside one directory the
//! caller hands over (root, state, sockets, runc's state, temp mounts), it
//! runs inside a given network namespace (`nsenter --net=`: `ip netns
//! exec` would remount /sys and hide the cgroup hierarchy from runc), and
//! its CRI plugin runs the CNI conflist of a private conf dir with plugins
//! from one bin dir.
//!
//! [`Containerd::start`] waits until the CRI service answers `Version`.
//! [`Containerd::shutdown`] (or drop) removes every sandbox through the
//! CRI like kubelet would, stops containerd, then force-cleans whatever is
//! left (see [`crate::cleanup`]) and removes the directory.
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cleanup::{cleanup_runtime_dir, CleanupReport};
use crate::client::BlockingCriClient;
use crate::error::{Error, Result};

/// How long containerd may take to serve the CRI API.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a graceful stop (SIGTERM) may take before SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Deadline of each CRI call made during teardown.
pub const TEARDOWN_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// What a private containerd is made of.
#[derive(Debug, Clone)]
pub struct ContainerdConfig {
    /// The private directory: containerd creates `root/`, `state/`, its
    /// sockets, config, log and runc state inside. It is removed by
    /// [`Containerd::shutdown`]; keep it short (Unix socket paths are
    /// limited to 107 bytes).
    pub dir: PathBuf,
    /// The network namespace containerd (and so the CNI plugins it runs,
    /// the node side of every pod) lives in.
    pub netns: PathBuf,
    /// `[plugins."io.containerd.grpc.v1.cri".cni] bin_dir`: the one
    /// directory all plugins of the conflist and `loopback` come from.
    pub cni_bin_dir: PathBuf,
    /// `conf_dir`: the conflist (only the first file is loaded).
    pub cni_conf_dir: PathBuf,
    /// The pause image, already imported (nothing is pulled).
    pub sandbox_image: String,
    /// The containerd binary (found on PATH by default).
    pub containerd_bin: PathBuf,
    /// The ctr binary, for image imports.
    pub ctr_bin: PathBuf,
    /// `[debug] level`.
    pub log_level: String,
    pub start_timeout: Duration,
}

impl ContainerdConfig {
    pub fn new(
        dir: &Path,
        netns: &Path,
        cni_bin_dir: &Path,
        cni_conf_dir: &Path,
        sandbox_image: &str,
    ) -> ContainerdConfig {
        ContainerdConfig {
            dir: dir.to_path_buf(),
            netns: netns.to_path_buf(),
            cni_bin_dir: cni_bin_dir.to_path_buf(),
            cni_conf_dir: cni_conf_dir.to_path_buf(),
            sandbox_image: sandbox_image.into(),
            containerd_bin: PathBuf::from("containerd"),
            ctr_bin: PathBuf::from("ctr"),
            log_level: "info".into(),
            start_timeout: START_TIMEOUT,
        }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The gRPC socket (CRI and containerd's own API).
    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    pub fn config_file(&self) -> PathBuf {
        self.dir.join("config.toml")
    }

    pub fn log_file(&self) -> PathBuf {
        self.dir.join("containerd.log")
    }

    /// runc's `--root` (its container state).
    pub fn runc_root(&self) -> PathBuf {
        self.dir.join("runc")
    }

    /// TMPDIR of containerd (its temporary mounts while unpacking).
    pub fn tmp(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    /// Where the CRI plugin bind-mounts the pods' network namespaces
    /// (`netns_mounts_under_state_dir = true`).
    pub fn netns_dir(&self) -> PathBuf {
        self.state().join("io.containerd.grpc.v1.cri").join("netns")
    }

    /// The config file (format version 2 of containerd 1.6).
    pub fn toml(&self) -> String {
        let q = |p: &Path| toml_str(&p.to_string_lossy());
        format!(
            r#"# A private containerd for cni-cri; every path is below {dir}.
version = 2
root = {root}
state = {state}
temp = {tmp}
oom_score = 0
# Unused snapshotters and the /opt installer stay off.
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.internal.v1.opt",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = {sock}

[ttrpc]
  address = {ttrpc}

[debug]
  level = {level}

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = {sandbox}
    # No CAP_SYS_RESOURCE on these machines: runc cannot lower the
    # sandbox's oom_score_adj below containerd's own otherwise.
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    disable_apparmor = true
    enable_selinux = false
    disable_tcp_service = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"

    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = {bin_dir}
      conf_dir = {conf_dir}
      max_conf_num = 1
      conf_template = ""

    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      disable_snapshot_annotations = true

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"

        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          Root = {runc_root}
          SystemdCgroup = false
"#,
            dir = self.dir.display(),
            root = q(&self.root()),
            state = q(&self.state()),
            tmp = q(&self.tmp()),
            sock = q(&self.socket()),
            ttrpc = q(&PathBuf::from(format!("{}.ttrpc", self.socket().display()))),
            level = toml_str(&self.log_level),
            sandbox = toml_str(&self.sandbox_image),
            bin_dir = q(&self.cni_bin_dir),
            conf_dir = q(&self.cni_conf_dir),
            runc_root = q(&self.runc_root()),
        )
    }
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A running private containerd; stopped and cleaned up on drop.
pub struct Containerd {
    config: ContainerdConfig,
    child: Option<Child>,
    client: Option<BlockingCriClient>,
    cleaned: bool,
}

impl Containerd {
    /// Writes the config, starts containerd in `config.netns` and waits
    /// until its CRI service answers. The directory must not hold another
    /// runtime; it is created if missing.
    pub fn start(config: ContainerdConfig) -> Result<Containerd> {
        for d in [
            config.dir.clone(),
            config.tmp(),
            config.root(),
            config.state(),
        ] {
            std::fs::create_dir_all(&d)
                .map_err(|e| Error::io(format!("cannot create {}", d.display()), e))?;
        }
        std::fs::write(config.config_file(), config.toml()).map_err(|e| {
            Error::io(
                format!("cannot write {}", config.config_file().display()),
                e,
            )
        })?;
        let log = File::create(config.log_file())
            .map_err(|e| Error::io(format!("cannot create {}", config.log_file().display()), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| Error::io("cannot duplicate the log fd", e))?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", config.netns.display()))
            .arg("--")
            .arg(&config.containerd_bin)
            .arg("--config")
            .arg(config.config_file())
            .env("TMPDIR", config.tmp())
            .env("PATH", runtime_path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| {
                Error::io(
                    format!(
                        "cannot start `nsenter --net={} {}` (is containerd installed?)",
                        config.netns.display(),
                        config.containerd_bin.display()
                    ),
                    e,
                )
            })?;
        let mut c = Containerd {
            config,
            child: Some(child),
            client: None,
            cleaned: false,
        };
        c.wait_ready()?;
        Ok(c)
    }

    /// Polls `Version` until it answers, containerd exits, or the deadline.
    fn wait_ready(&mut self) -> Result<()> {
        let timeout = self.config.start_timeout;
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no attempt yet");
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(Error::Command {
                        command: format!(
                            "containerd --config {}",
                            self.config.config_file().display()
                        ),
                        status: status.to_string(),
                        output: self.log_tail(40),
                    });
                }
            }
            if self.config.socket().exists() {
                match BlockingCriClient::connect(&self.config.socket(), Duration::from_secs(5))
                    .map(|c| c.with_call_timeout(Duration::from_secs(5)))
                    .and_then(|c| c.version().map(|v| (c, v)))
                {
                    Ok((c, v)) if !v.runtime_api_version.is_empty() => {
                        self.client =
                            Some(c.with_call_timeout(crate::client::DEFAULT_CALL_TIMEOUT));
                        return Ok(());
                    }
                    Ok((_, v)) => last = format!("Version answered {v:?}"),
                    Err(e) => last = e.to_string(),
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "containerd serving CRI on {} (last: {last}); log:\n{}",
                        self.config.socket().display(),
                        self.log_tail(40)
                    ),
                    after: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn config(&self) -> &ContainerdConfig {
        &self.config
    }

    pub fn socket(&self) -> PathBuf {
        self.config.socket()
    }

    /// containerd's pid (it runs under `nsenter`, which execs it).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The CRI client connected during start.
    pub fn client(&self) -> &BlockingCriClient {
        self.client
            .as_ref()
            .expect("a started Containerd always holds its client")
    }

    /// `ctr -a <socket> -n k8s.io images import <tarball>`: loads (and
    /// unpacks for the overlayfs snapshotter) an image archive.
    pub fn import_image(&self, tarball: &Path) -> Result<()> {
        let out = Command::new(&self.config.ctr_bin)
            .arg("-a")
            .arg(self.config.socket())
            .args(["-n", crate::cleanup::CRI_NAMESPACE, "images", "import"])
            .arg(tarball)
            .env("TMPDIR", self.config.tmp())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Error::io(format!("cannot run {}", self.config.ctr_bin.display()), e))?;
        if !out.status.success() {
            return Err(Error::Command {
                command: format!("ctr images import {}", tarball.display()),
                status: out.status.to_string(),
                output: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        Ok(())
    }

    /// The last `lines` lines of containerd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let Ok(mut f) = File::open(self.config.log_file()) else {
            return String::new();
        };
        // The end of a possibly long log is enough.
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(256 * 1024)));
        let mut text = String::new();
        let _ = f.read_to_string(&mut text);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The whole log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.config.log_file()).unwrap_or_default()
    }

    /// Tears everything down: every sandbox stopped and removed through
    /// the CRI (which runs the CNI DELs), containerd stopped (SIGTERM, then
    /// SIGKILL), then whatever is still there killed, unmounted and
    /// removed along with the directory. Returns the sandboxes the sweep
    /// found and what had to be cleaned by force.
    pub fn shutdown(mut self) -> Teardown {
        self.teardown()
    }

    fn teardown(&mut self) -> Teardown {
        let mut t = Teardown::default();
        if self.cleaned {
            return t;
        }
        self.cleaned = true;
        if let Some(client) = self.client.take() {
            let client = client.with_call_timeout(TEARDOWN_CALL_TIMEOUT);
            match client.remove_all_sandboxes() {
                Ok(ids) => t.sandboxes_removed = ids,
                Err(e) => t.errors.push(format!("removing sandboxes: {e}")),
            }
        }
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + STOP_TIMEOUT;
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        t.errors.push("containerd ignored SIGTERM; killed".into());
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        t.log_tail = self.log_tail(80);
        t.forced = cleanup_runtime_dir(&self.config.dir, &self.config.socket());
        t
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let panicking = std::thread::panicking();
        let t = self.teardown();
        if panicking {
            eprintln!("---- containerd log (last lines) ----\n{}", t.log_tail);
        }
        if !t.forced.is_empty() || !t.errors.is_empty() {
            eprintln!("containerd teardown: {t:#?}");
        }
    }
}

/// What [`Containerd::shutdown`] did.
#[derive(Debug, Default, Clone)]
pub struct Teardown {
    /// Sandboxes the CRI sweep still found (and stopped, removed).
    pub sandboxes_removed: Vec<String>,
    /// What had to be killed, unmounted or removed by force.
    pub forced: CleanupReport,
    /// Failed steps.
    pub errors: Vec<String>,
    /// The end of containerd's log.
    pub log_tail: String,
}

/// PATH for containerd and the shims it starts (runc, containerd-shim-runc-v2).
fn runtime_path() -> String {
    let base = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    match std::env::var("PATH") {
        Ok(p) if !p.is_empty() => format!("{p}:{base}"),
        _ => base.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_names_every_private_path() {
        let c = ContainerdConfig::new(
            Path::new("/tmp/ctd"),
            Path::new("/run/netns/node"),
            Path::new("/tmp/bin"),
            Path::new("/tmp/conf"),
            "localhost/pause:1",
        );
        let t = c.toml();
        for needle in [
            "root = \"/tmp/ctd/root\"",
            "state = \"/tmp/ctd/state\"",
            "address = \"/tmp/ctd/containerd.sock\"",
            "bin_dir = \"/tmp/bin\"",
            "conf_dir = \"/tmp/conf\"",
            "sandbox_image = \"localhost/pause:1\"",
            "Root = \"/tmp/ctd/runc\"",
            "restrict_oom_score_adj = true",
        ] {
            assert!(t.contains(needle), "{needle} missing in\n{t}");
        }
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_str(r#"a"b\c"#), r#""a\"b\\c""#);
    }
}
