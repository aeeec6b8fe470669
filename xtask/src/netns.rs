//! Network namespaces for the demo and the benchmark: the shared ones of
//! `cni-harness` (re-exported here), plus what only the xtask needs: many
//! namespaces at once, a node's uplink, and `ip` commands shown as they run.
//!
//! Everything the demo and the benchmark configure lives in these
//! namespaces; the root namespace is never changed. Names carry the xtask's
//! pid so that concurrent runs (and the test suite) never collide.
use std::io::Write;
use std::process::Stdio;

use anyhow::{bail, Context, Result};

use crate::proc;

pub use cni_harness::netns::{enter_on_exec, enter_thread, in_netns, netns_path, unique, NetNs};
pub use cni_harness::tempdir::TempDir;

/// `ip -n <ns> <args>` printed with its output, as the demo shows each
/// command it runs.
pub trait ShowIp {
    fn show_ip(&self, args: &[&str]) -> Result<String>;
}

impl ShowIp for NetNs {
    fn show_ip(&self, args: &[&str]) -> Result<String> {
        proc::show(proc::cmd("ip").arg("-n").arg(self.name()).args(args))
    }
}

/// The node's uplink: a veth `dev` from `node` to `eth0` in `ext`, both up
/// and addressed, and the node's default route via the external address.
/// `ext` gets no route back to the pods.
pub fn add_uplink(
    node: &NetNs,
    ext: &NetNs,
    dev: &str,
    node_addr: &str,
    ext_addr: &str,
) -> Result<()> {
    let gw = ext_addr.split('/').next().unwrap_or(ext_addr);
    node.try_ip(&[
        "link",
        "add",
        dev,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ext.name(),
    ])?;
    node.try_ip(&["addr", "add", node_addr, "dev", dev])?;
    node.try_ip(&["link", "set", dev, "up"])?;
    ext.try_ip(&["addr", "add", ext_addr, "dev", "eth0"])?;
    ext.try_ip(&["link", "set", "eth0", "up"])?;
    node.try_ip(&["route", "add", "default", "via", gw])?;
    Ok(())
}

/// Many namespaces at once through `ip -batch`, which is far quicker than
/// one `ip` process each. Deleted on drop.
pub struct NetnsSet {
    pub names: Vec<String>,
}

impl NetnsSet {
    pub fn create(prefix: &str, n: usize) -> Result<NetnsSet> {
        let names: Vec<String> = (0..n).map(|_| unique(prefix)).collect();
        let mut set = NetnsSet { names: Vec::new() };
        for chunk in names.chunks(200) {
            let mut script = String::new();
            for name in chunk {
                script.push_str(&format!("netns add {name}\n"));
            }
            ip_batch(&script)?;
            set.names.extend(chunk.iter().cloned());
            // `ip -batch` lines take no global options such as `-n`.
            for name in chunk {
                proc::stdout_of(proc::cmd("ip").args(["-n", name, "link", "set", "lo", "up"]))?;
            }
        }
        Ok(set)
    }
}

impl Drop for NetnsSet {
    fn drop(&mut self) {
        let _ = delete_netns(&self.names);
    }
}

fn ip_batch(script: &str) -> Result<()> {
    let mut child = proc::cmd("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting `ip -batch -`")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`ip -batch` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Deletes namespaces, ignoring ones already gone (cleanup must not stop
/// halfway because one step already happened).
fn delete_netns(names: &[String]) -> Result<()> {
    let existing: Vec<&String> = names.iter().filter(|n| netns_path(n).exists()).collect();
    for chunk in existing.chunks(200) {
        let mut script = String::new();
        for name in chunk {
            script.push_str(&format!("netns del {name}\n"));
        }
        if let Err(e) = ip_batch(&script) {
            eprintln!("cleanup: {e:#}");
        }
    }
    Ok(())
}
