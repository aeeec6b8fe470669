//! Our node agent (`cni-agent run`) inside a node netns, with a private
//! socket, state dir and bpffs: nothing node-wide (/run/cni-ebpf,
//! /var/lib/cni-ebpf, /sys/fs/bpf) is touched. Stopped and unmounted on drop.
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

use crate::netns::{self, NetNs};
use crate::proc;

/// A fresh bpffs instance mounted on a directory; detached on drop. Each
/// mount is a new, empty instance, so unmounting drops every pin the agent
/// made (and with them its maps and links).
pub struct BpfFs {
    path: PathBuf,
}

impl BpfFs {
    pub fn mount(path: &Path) -> Result<BpfFs> {
        std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
        proc::stdout_of(proc::cmd("mount").args(["-t", "bpf", "bpf"]).arg(path))?;
        Ok(BpfFs {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = proc::cmd("umount")
            .arg("-l")
            .arg(&self.path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A running agent. Field order is drop order: stop the process, then
/// unmount its bpffs.
pub struct Agent {
    child: Child,
    bin: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    bpffs: BpfFs,
}

impl Agent {
    /// Starts `cni-agent run` in `node` with everything under `dir`, and
    /// waits (30 s at most) for its socket.
    pub fn start(bin_dir: &Path, node: &NetNs, dir: &Path, uplinks: &[&str]) -> Result<Agent> {
        Agent::start_with(bin_dir, node, dir, uplinks, &[])
    }

    /// [`Agent::start`] with extra `cni-agent run` flags (e.g.
    /// `--hostport-mode xdp`).
    pub fn start_with(
        bin_dir: &Path,
        node: &NetNs,
        dir: &Path,
        uplinks: &[&str],
        extra_args: &[&str],
    ) -> Result<Agent> {
        let bin = bin_dir.join("cni-agent");
        if !bin.is_file() {
            bail!("{} was not built", bin.display());
        }
        let bpffs = BpfFs::mount(&dir.join("bpffs"))?;
        let socket = dir.join("agent.sock");
        let state_dir = dir.join("state");
        let log = dir.join("agent.log");
        let log_file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let ns = node.open()?;
        let mut c = proc::cmd(&bin);
        c.arg("run")
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--bpffs-root")
            .arg(&bpffs.path);
        for u in uplinks {
            c.args(["--uplink", u]);
        }
        c.args(extra_args);
        c.stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        netns::enter_on_exec(&mut c, &ns);
        proc::check_interrupted()?;
        let child = c
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut agent = Agent {
            child,
            bin,
            socket,
            state_dir,
            log,
            bpffs,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !agent.socket.exists() {
            proc::check_interrupted()?;
            if let Some(status) = agent.child.try_wait()? {
                bail!(
                    "cni-agent exited ({status}) before listening:\n{}",
                    agent.log_tail(30)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "cni-agent made no socket within 30 s:\n{}",
                    agent.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(agent)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (10 s at most) until `cni-agent status` lists an uplink with
    /// `addr`: the socket may come up before the uplink scan has run.
    pub fn wait_for_uplink(&self, addr: &str) -> Result<()> {
        self.wait_for_uplink_key("address", addr)
    }

    /// As [`Agent::wait_for_uplink`], for the uplink's IPv6 address (taken
    /// once it is no longer tentative).
    pub fn wait_for_uplink_v6(&self, addr: &str) -> Result<()> {
        self.wait_for_uplink_key("addressV6", addr)
    }

    fn wait_for_uplink_key(&self, key: &str, addr: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = proc::stdout_of(
                proc::cmd(&self.bin)
                    .args(["status", "--json", "--socket"])
                    .arg(&self.socket),
            )?;
            let v: Value = serde_json::from_str(&st).context("cni-agent status --json")?;
            let served = v["uplinks"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|u| u[key].as_str() == Some(addr));
            if served {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("the agent serves no uplink with {addr} after 10 s:\n{st}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `cni-agent status --json`: uplinks, occupancy and datapath counters.
    pub fn status_json(&self) -> Result<Value> {
        let st = proc::stdout_of(
            proc::cmd(&self.bin)
                .args(["status", "--json", "--socket"])
                .arg(&self.socket),
        )?;
        serde_json::from_str(&st).context("cni-agent status --json")
    }

    /// The bpffs instance the agent pins its maps, programs and links in.
    pub fn bpffs_root(&self) -> &Path {
        &self.bpffs.path
    }

    /// The path keys every plugin of our suite takes, pointing at this agent.
    pub fn conf_keys(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("agentSocket".into(), json!(self.socket));
        m.insert("stateDir".into(), json!(self.state_dir));
        m.insert("bpffsRoot".into(), json!(self.bpffs.path));
        m
    }

    /// `cni-agent <cmd> --socket <socket>`, printed with its output.
    pub fn show(&self, cmd: &str) -> Result<String> {
        proc::show(
            proc::cmd(&self.bin)
                .arg(cmd)
                .arg("--socket")
                .arg(&self.socket),
        )
    }

    /// The last `n` lines the agent logged.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: signalling our own child, which has not been reaped yet.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
