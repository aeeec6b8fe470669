//! Running one CNI plugin the way a runtime does: the CNI_* environment,
//! the config on stdin, inside the node's network namespace, and what it
//! printed and how it exited collected into an [`Outcome`].
//!
//! One copy for the tests and the xtask's demo and benchmark, so both drive
//! the plugins the same way. A plugin that fails is not an error here: the
//! tests want its [`Outcome`] to check the spec's error JSON. Only a plugin
//! that could not be run at all (not found, not started, past its deadline)
//! is an `Err`.
use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// An open network namespace to run plugins in, and its name for messages.
/// Held open so that each run `setns`es into it from the forked child
/// ([`crate::netns::enter_on_exec`]) without opening it again or starting
/// an `nsenter`, which the benchmark would otherwise time.
#[derive(Debug)]
pub struct NodeNs {
    file: File,
    name: String,
}

impl NodeNs {
    /// Opens the namespace bind-mounted at `path` (e.g. /run/netns/<name>).
    pub fn open(path: &Path) -> Result<NodeNs> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        Ok(NodeNs { file, name })
    }

    pub fn name(&self) -> &str {
        &self.name
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
    /// The config as stdin. Serialising a `Value` cannot fail (its map keys
    /// are strings), so an empty stdin would only stand for that
    /// impossibility.
    pub fn stdin_json(self, conf: &Value) -> Self {
        self.stdin(serde_json::to_vec(conf).unwrap_or_default())
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.extra_env.push((k.to_string(), v.to_string()));
        self
    }

    /// Runs `binary` inside `node` (or in the caller's namespace if `None`,
    /// only for verbs that touch no network state, like VERSION).
    ///
    /// The environment is cleared to PATH, RUST_LOG, RUST_BACKTRACE and the
    /// CNI_* variables, so a CNI_* variable of the caller's never leaks into
    /// a run that leaves it unset on purpose. With a `deadline` a hung plugin
    /// is killed and reported instead of hanging the caller; without one the
    /// run is a plain spawn and wait, which is what the benchmark times.
    pub fn run(
        &self,
        binary: &Path,
        node: Option<&NodeNs>,
        deadline: Option<Duration>,
    ) -> Result<Outcome> {
        let mut cmd = Command::new(binary);
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
        if let Some(ns) = node {
            crate::netns::enter_on_exec(&mut cmd, &ns.file);
        }
        let what = format!(
            "{} {} [{}] in {}",
            self.command.as_deref().unwrap_or("<no CNI_COMMAND>"),
            binary.display(),
            vars.iter()
                .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
                .collect::<Vec<_>>()
                .join(" "),
            node.map(NodeNs::name).unwrap_or("the caller's netns"),
        );
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        let (status, stdout, stderr) = match deadline {
            None => wait_plain(child, &self.stdin),
            Some(d) => wait_with_deadline(child, &self.stdin, d),
        }
        .with_context(|| what.clone())?;
        Ok(Outcome {
            what,
            exit_code: status.code(),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        })
    }
}

type Collected = (ExitStatus, Vec<u8>, Vec<u8>);

/// Writes stdin, then waits: no extra thread in the timed path. A config
/// is read whole by a plugin before it prints anything, so the write
/// cannot block on a full stdout pipe.
fn wait_plain(mut child: Child, input: &[u8]) -> Result<Collected> {
    if let Some(mut stdin) = child.stdin.take() {
        // A plugin may exit without reading stdin (EPIPE is its own error).
        let _ = stdin.write_all(input);
    }
    let out = child.wait_with_output().context("waiting")?;
    Ok((out.status, out.stdout, out.stderr))
}

/// Feeds stdin and drains stdout/stderr on threads, so that a plugin that
/// never reads or never exits is still killed at the deadline.
fn wait_with_deadline(mut child: Child, input: &[u8], timeout: Duration) -> Result<Collected> {
    let mut child_stdin = child.stdin.take().context("stdin not piped")?;
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        // A plugin may exit without reading stdin (EPIPE is fine).
        let _ = child_stdin.write_all(&input);
    });
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut b = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut b);
            }
            b
        })
    };
    let out_reader = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err_reader = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().context("waiting")? {
            Some(s) => break s,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("still running after {timeout:?}, killed");
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let _ = writer.join();
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok((status, stdout, stderr))
}

/// What a plugin run produced. Also the error of a runtime operation that
/// a plugin failed (`anyhow::Error::downcast_ref::<Outcome>()` gets it
/// back), so a caller can check the spec's error JSON.
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
pub struct CniError {
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

    /// The result of a run that exited 0: its stdout JSON, `Null` when
    /// stdout was empty (as for DEL). A failed run is the error itself.
    pub fn result(&self) -> Result<Value> {
        if !self.success() {
            return Err(anyhow::Error::new(self.clone()));
        }
        if self.stdout.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&self.stdout).with_context(|| format!("stdout is not JSON: {self}"))
    }

    /// The error of a run that failed the spec's way (non-zero exit, error
    /// JSON with a numeric `code` and a non-empty `msg` on stdout); an
    /// error saying what is off otherwise.
    pub fn error(&self) -> Result<CniError> {
        if self.exit_code.is_none() || self.success() {
            bail!("expected a CNI error, got: {self}");
        }
        let v = self
            .json()
            .ok_or_else(|| anyhow!("a failing plugin must print error JSON on stdout: {self}"))?;
        let code = v
            .get("code")
            .and_then(Value::as_u64)
            .ok_or_else(|| anyhow!("error JSON without numeric `code`: {self}"))?;
        let msg = v
            .get("msg")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("error JSON without `msg`: {self}"))?
            .to_string();
        if msg.trim().is_empty() {
            bail!("empty error msg: {self}");
        }
        Ok(CniError {
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
        })
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

impl std::error::Error for Outcome {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_gets_only_the_cni_variables_it_sets_and_its_stdin() {
        use std::os::unix::fs::PermissionsExt;
        // A plugin stand-in that echoes what it got and fails without
        // error JSON.
        let dir = crate::tempdir::TempDir::new("invoke");
        let bin = dir.path().join("echo-plugin");
        let script = "echo \"$CNI_COMMAND|$CNI_IFNAME|${CNI_NETNS-unset}|$X|$(cat)\"";
        std::fs::write(&bin, format!("#!/bin/sh\n{script}\nexit 3\n")).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let inv = Invocation::new("VERSION")
            .ifname("eth0")
            .stdin("in")
            .env("X", "1");
        for deadline in [None, Some(Duration::from_secs(10))] {
            let out = inv.run(&bin, None, deadline).unwrap();
            assert_eq!(out.exit_code, Some(3));
            assert_eq!(out.stdout.trim(), "VERSION|eth0|unset|1|in");
            let err = out.result().unwrap_err();
            assert!(err.downcast_ref::<Outcome>().is_some(), "{err:#}");
            assert!(out.error().is_err(), "not error JSON");
        }
    }
}
