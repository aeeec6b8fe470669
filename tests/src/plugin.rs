//! Finding and running CNI plugin binaries: ours (built by cargo) and the
//! reference ones (Debian containernetworking-plugins in /usr/lib/cni).
//!
//! A plugin always runs inside a "node" namespace (`nsenter --net=...`) so
//! that whatever it does to "the host" happens there, never in the root
//! namespace. Each run has a deadline: a hung plugin fails the test instead of
//! hanging the suite.
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::netns::NetNs;

/// Where Debian installs the reference plugins.
pub const REFERENCE_DIR: &str = "/usr/lib/cni";

/// How long one plugin run may take; `CNI_TESTS_PLUGIN_TIMEOUT` (seconds) overrides.
pub fn plugin_timeout() -> Duration {
    std::env::var("CNI_TESTS_PLUGIN_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(60))
}

/// Directory of our binaries: `$CNI_EBPF_BIN_DIR`, else `<workspace>/target/debug`.
pub fn ours_bin_dir() -> PathBuf {
    match std::env::var_os("CNI_EBPF_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"),
    }
}

/// Path of one of our binaries; panics with a how-to when it was not built
/// (`cargo test -p cni-tests` does not build another package's binaries).
pub fn ours_binary(name: &str) -> PathBuf {
    let p = ours_bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: build our plugins first with `cargo build -p cni-agent --bins` \
         (or set CNI_EBPF_BIN_DIR), or run `cargo xtask test`",
        p.display()
    );
    p
}

/// Which suite a test drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    /// ebpf-bridge + ebpf-host-local, CNI_PATH = our bin dir + /usr/lib/cni.
    Ours,
    /// bridge + host-local from /usr/lib/cni, CNI_PATH = /usr/lib/cni.
    Reference,
}

impl Impl {
    pub fn bridge_type(self) -> &'static str {
        match self {
            Impl::Ours => "ebpf-bridge",
            Impl::Reference => "bridge",
        }
    }

    pub fn ipam_type(self) -> &'static str {
        match self {
            Impl::Ours => "ebpf-host-local",
            Impl::Reference => "host-local",
        }
    }

    /// CNI_PATH directories, searched in order.
    pub fn cni_path(self) -> Vec<PathBuf> {
        match self {
            Impl::Ours => vec![ours_bin_dir(), PathBuf::from(REFERENCE_DIR)],
            Impl::Reference => vec![PathBuf::from(REFERENCE_DIR)],
        }
    }

    /// Highest cniVersion the suite speaks (the Debian reference stops at 1.0.0).
    pub fn max_version(self) -> &'static str {
        match self {
            Impl::Ours => "1.1.0",
            Impl::Reference => "1.0.0",
        }
    }
}

/// One plugin execution's environment and stdin. `None` leaves the variable
/// unset, which the bad-input tests need.
#[derive(Debug, Clone, Default)]
pub struct Invocation {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
    pub path: Option<String>,
    pub stdin: Vec<u8>,
    /// Additional environment (e.g. RUST_LOG).
    pub extra_env: Vec<(String, String)>,
}

impl Invocation {
    pub fn new(command: &str) -> Invocation {
        Invocation {
            command: Some(command.to_string()),
            ..Default::default()
        }
    }
    pub fn container(mut self, id: &str) -> Self {
        self.container_id = Some(id.to_string());
        self
    }
    pub fn netns(mut self, path: &str) -> Self {
        self.netns = Some(path.to_string());
        self
    }
    pub fn ifname(mut self, name: &str) -> Self {
        self.ifname = Some(name.to_string());
        self
    }
    pub fn args(mut self, args: &str) -> Self {
        self.args = Some(args.to_string());
        self
    }
    pub fn path(mut self, path: &str) -> Self {
        self.path = Some(path.to_string());
        self
    }
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = bytes.into();
        self
    }
    pub fn stdin_json(self, conf: &Value) -> Self {
        self.stdin(serde_json::to_vec(conf).expect("serialise config"))
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.extra_env.push((k.to_string(), v.to_string()));
        self
    }

    /// Runs `binary` inside `node` (or in the caller's namespace if `None`,
    /// only for verbs that touch no network state, like VERSION).
    pub fn run(&self, node: Option<&NetNs>, binary: &Path) -> Outcome {
        let mut cmd = match node {
            Some(ns) => ns.command(binary),
            None => Command::new(binary),
        };
        cmd.env_clear();
        cmd.env(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
        );
        for k in ["RUST_LOG", "RUST_BACKTRACE"] {
            if let Ok(v) = std::env::var(k) {
                cmd.env(k, v);
            }
        }
        let vars = [
            ("CNI_COMMAND", &self.command),
            ("CNI_CONTAINERID", &self.container_id),
            ("CNI_NETNS", &self.netns),
            ("CNI_IFNAME", &self.ifname),
            ("CNI_ARGS", &self.args),
            ("CNI_PATH", &self.path),
        ];
        for (k, v) in vars {
            if let Some(v) = v {
                cmd.env(k, v);
            }
        }
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        let what = format!(
            "{} {} [{}] in {}",
            self.command.as_deref().unwrap_or("<no CNI_COMMAND>"),
            binary.display(),
            vars.iter()
                .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
                .collect::<Vec<_>>()
                .join(" "),
            node.map(|n| n.name()).unwrap_or("the caller's netns"),
        );
        run_with_deadline(cmd, &self.stdin, plugin_timeout(), what)
    }
}

/// Runs `cmd` feeding `stdin`, killing it after `timeout`.
fn run_with_deadline(mut cmd: Command, stdin: &[u8], timeout: Duration, what: String) -> Outcome {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let mut child_stdin = child.stdin.take().expect("stdin piped");
    let input = stdin.to_vec();
    // A plugin may exit without reading stdin (EPIPE is fine).
    let writer = std::thread::spawn(move || {
        let _ = child_stdin.write_all(&input);
    });
    let mut out = child.stdout.take().expect("stdout piped");
    let mut err = child.stderr.take().expect("stderr piped");
    let out_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let err_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what}: still running after {timeout:?}, killed");
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("{what}: wait failed: {e}"),
        }
    };
    let _ = writer.join();
    let stdout = String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    Outcome {
        what,
        exit_code: status.code(),
        stdout,
        stderr,
    }
}

/// What a plugin run produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Human description of the run, for failure messages.
    pub what: String,
    /// `None` when killed by a signal.
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// The spec's error object, as printed on stdout by a failing plugin.
#[derive(Debug, Clone)]
pub struct CniErrorOut {
    pub code: u64,
    pub msg: String,
    pub details: String,
    pub cni_version: Option<String>,
    pub raw: Value,
}

impl Outcome {
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }

    /// stdout parsed as JSON (None if empty or not JSON).
    pub fn json(&self) -> Option<Value> {
        serde_json::from_str(&self.stdout).ok()
    }

    /// Panics unless the plugin exited 0; returns its stdout JSON (Null if
    /// stdout was empty, as for DEL).
    #[track_caller]
    pub fn expect_success(&self) -> Value {
        assert!(self.success(), "plugin failed: {self}");
        if self.stdout.trim().is_empty() {
            return Value::Null;
        }
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self}"))
    }

    /// Panics unless the plugin failed the spec's way (non-zero exit, error
    /// JSON with `code` and `msg` on stdout); returns the error.
    #[track_caller]
    pub fn expect_error(&self) -> CniErrorOut {
        assert!(
            self.exit_code.is_some() && !self.success(),
            "expected a CNI error, got: {self}"
        );
        let v = self
            .json()
            .unwrap_or_else(|| panic!("a failing plugin must print error JSON on stdout: {self}"));
        let code = v
            .get("code")
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("error JSON without numeric `code`: {self}"));
        let msg = v
            .get("msg")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("error JSON without `msg`: {self}"))
            .to_string();
        assert!(!msg.trim().is_empty(), "empty error msg: {self}");
        CniErrorOut {
            code,
            msg,
            details: v
                .get("details")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            cni_version: v
                .get("cniVersion")
                .and_then(Value::as_str)
                .map(str::to_string),
            raw: v,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}\n  exit: {:?}\n  stdout: {}\n  stderr: {}",
            self.what,
            self.exit_code,
            self.stdout.trim(),
            self.stderr.trim()
        )
    }
}
