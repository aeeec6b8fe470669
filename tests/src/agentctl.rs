//! A node agent the test controls: started with extra environment (crash
//! points), stopped with SIGTERM or SIGKILL mid-test, restarted on the same
//! paths; plus the admin CLI (`cni-agent status|nat|records --json`).
//!
//! Unlike [`crate::agent::Agent`], readiness is "the socket accepts a
//! connection", not "the socket file exists": a SIGKILLed agent leaves its
//! socket file behind, and its successor must be waited for properly.
//! The log lives outside the node's directory so node snapshots never see
//! it; it is printed when a test panics with the agent still owned.
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::agent::Agent;
use crate::tempdir::TempDir;
use crate::topology::Node;

/// How long an agent may take to load its datapath and listen.
pub const AGENT_START_TIMEOUT: Duration = Duration::from_secs(30);

/// A `cni-agent run` process inside a node.
pub struct AgentProc {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
    _log_dir: TempDir,
}

impl AgentProc {
    /// Starts the agent on `node`'s paths and waits until it serves.
    pub fn start(node: &Node, extra_args: &[&str]) -> AgentProc {
        AgentProc::start_with_env(node, extra_args, &[])
    }

    /// Like [`start`](Self::start) with extra environment variables.
    pub fn start_with_env(node: &Node, extra_args: &[&str], env: &[(&str, &str)]) -> AgentProc {
        let bin = Agent::binary().expect("cni-agent not built (cargo build -p cni-agent --bins)");
        let log_dir = TempDir::new("agentlog");
        let log = log_dir.path().join("agent.log");
        let log_file = std::fs::File::create(&log).expect("create agent log");
        let mut cmd = node.ns.command(&bin);
        cmd.arg("run")
            .arg("--socket")
            .arg(node.agent_socket())
            .arg("--state-dir")
            .arg(node.state_dir())
            .arg("--bpffs-root")
            .arg(node.bpffs.path())
            .args(extra_args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup log fd"))
            .stderr(log_file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("cannot start cni-agent");
        let mut agent = AgentProc {
            child: Some(child),
            socket: node.agent_socket(),
            log,
            _log_dir: log_dir,
        };
        agent.wait_ready();
        agent
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + AGENT_START_TIMEOUT;
        loop {
            if probe(&self.socket) {
                return;
            }
            if let Some(status) = self.try_status() {
                panic!(
                    "cni-agent exited ({status}) before serving:\n{}",
                    self.log_text()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "cni-agent did not serve {} within {AGENT_START_TIMEOUT:?}:\n{}",
                    self.socket.display(),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("agent already reaped").id() as i32
    }

    /// The exit status if the process has ended.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Sends `sig` and waits (10 s at most) for the process to end.
    pub fn signal_and_wait(&mut self, sig: i32) -> ExitStatus {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe {
            libc::kill(self.pid(), sig);
        }
        self.wait_exit(Duration::from_secs(10))
    }

    /// SIGTERM: the graceful stop an operator (or an upgrade) does.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal_and_wait(libc::SIGTERM)
    }

    /// SIGKILL: a crash or OOM kill.
    pub fn kill(&mut self) -> ExitStatus {
        self.signal_and_wait(libc::SIGKILL)
    }

    /// Waits for the process to end by itself (e.g. at a crash point).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                return s;
            }
            if Instant::now() >= deadline {
                panic!(
                    "cni-agent still running after {timeout:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Whether an agent answers a status request on `socket` (a real request,
/// so the agent does not log a half-open connection).
fn probe(socket: &std::path::Path) -> bool {
    use std::io::{BufRead, BufReader, Write};
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"{\"op\":\"status\"}\n").is_err() {
        return false;
    }
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).is_ok()
        && serde_json::from_str::<Value>(&line).is_ok_and(|v| v["result"] == "ok")
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!("---- cni-agent log (last {} lines) ----", tail.len());
            for l in tail {
                eprintln!("{l}");
            }
        }
    }
}

/// Runs `cni-agent <what> --socket <node socket> --json` and parses it, or
/// returns the failure text.
pub fn try_admin(node: &Node, what: &str) -> Result<Value, String> {
    let bin = Agent::binary().expect("cni-agent not built");
    let out = Command::new(bin)
        .arg(what)
        .arg("--socket")
        .arg(node.agent_socket())
        .arg("--json")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run cni-agent {what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cni-agent {what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "cni-agent {what} --json printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// [`try_admin`] that panics on failure.
#[track_caller]
pub fn admin(node: &Node, what: &str) -> Value {
    try_admin(node, what).unwrap_or_else(|e| panic!("{e}"))
}

/// What a DEL or GC leaves of the firewall's maps (`cni-agent firewall`
/// occupancy): every keyed entry is gone when it returns; tracked
/// connections and fragment verdicts, which only a walk of the whole table
/// finds, go with the agent's next sweep (within a second or two).
#[track_caller]
pub fn assert_firewall_removed(node: &Node, when: &str) {
    let entries = || admin(node, "firewall")["entries"].clone();
    let e = entries();
    let keyed_gone = e.as_object().is_some_and(|m| {
        m.iter()
            .all(|(k, v)| k == "connections" || k == "fragments" || v == 0)
    });
    assert!(keyed_gone, "firewall map entries {when}: {e:#}");
    crate::poll::eventually(
        &format!("the agent to sweep the firewall connections left {when}"),
        crate::poll::SETTLE,
        || {
            entries()
                .as_object()
                .is_some_and(|m| m.values().all(|v| v == 0))
        },
    );
}

/// `status --json` → (nat.originalHalves, nat.replyHalves).
pub fn nat_occupancy(status: &Value) -> (u64, u64) {
    (
        status["nat"]["originalHalves"]
            .as_u64()
            .expect("nat.originalHalves"),
        status["nat"]["replyHalves"]
            .as_u64()
            .expect("nat.replyHalves"),
    )
}

/// `records --json` entries of one attachment, if it has a record.
pub fn record_of(
    records: &Value,
    network: &str,
    container_id: &str,
    ifname: &str,
) -> Option<Value> {
    records.as_array()?.iter().find_map(|r| {
        (r["network"] == network && r["containerID"] == container_id && r["ifname"] == ifname)
            .then(|| r["entries"].clone())
    })
}

/// Every masquerade source IP listed in `records --json`.
pub fn recorded_masq_ips(records: &Value) -> Vec<String> {
    let mut v: Vec<String> = records
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| r["entries"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["kind"] == "masq-source")
        .filter_map(|e| e["ip"].as_str().map(str::to_string))
        .collect();
    v.sort();
    v
}
