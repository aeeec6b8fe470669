//! Running our node agent (`cni-agent run`) inside a test node, with the
//! node's private socket, state dir and bpffs root; killed on drop.
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::plugin::ours_bin_dir;
use crate::topology::Node;

/// A running agent; dropping it kills it.
pub struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    /// The agent binary, if it has been built.
    pub fn binary() -> Option<PathBuf> {
        let p = ours_bin_dir().join("cni-agent");
        p.is_file().then_some(p)
    }

    /// Starts `cni-agent run --socket … --state-dir … --bpffs-root … <extra>`
    /// inside `node` and waits (30 s at most) until its socket exists.
    pub fn start(node: &Node, extra_args: &[&str]) -> Agent {
        let bin = Agent::binary().expect("cni-agent not built (cargo build -p cni-agent --bins)");
        let log = node.dir.path().join("agent.log");
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
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup log fd"))
            .stderr(log_file);
        let child = cmd.spawn().expect("cannot start cni-agent");
        let mut agent = Agent { child, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !node.agent_socket().exists() {
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!(
                    "cni-agent exited ({status}) before listening:\n{}",
                    agent.log_text()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "cni-agent did not create its socket within 30 s:\n{}",
                    agent.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        agent
    }

    /// Everything the agent printed so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
