//! Network namespaces and temporary directories that remove themselves.
//!
//! Everything the demo and the benchmark configure lives in namespaces made
//! here; the root namespace is never changed. Names carry the xtask's pid so
//! that concurrent runs (and the test suite) never collide.
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

use crate::proc;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process: `<prefix>-<pid>-<n>`.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    )
}

/// A named netns (`/run/netns/<name>`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(prefix: &str) -> Result<Netns> {
        let name = unique(prefix);
        proc::stdout_of(proc::cmd("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        // Loopback up, as a runtime's `loopback` plugin would.
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        netns_path(&self.name)
    }

    /// `ip -n <ns> <args>`: stdout, error unless it exits 0.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        proc::stdout_of(proc::cmd("ip").arg("-n").arg(&self.name).args(args))
    }

    /// `ip -n <ns> <args>`, printed with its output.
    pub fn show_ip(&self, args: &[&str]) -> Result<String> {
        proc::show(proc::cmd("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Opens /run/netns/<name> (for `enter_on_exec`).
    pub fn open(&self) -> Result<File> {
        File::open(self.path()).with_context(|| format!("opening {}", self.path().display()))
    }

    /// A command run inside the namespace (`ip netns exec`).
    pub fn exec(&self, program: &str) -> std::process::Command {
        let mut c = proc::cmd("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `program args` in the namespace with `input` on its stdin (a
    /// batch for `bridge -batch -`, `iptables-restore`); error unless it
    /// exits 0, with what it printed on stderr.
    pub fn feed(&self, program: &str, args: &[&str], input: &str) -> Result<()> {
        use std::io::Write;
        let mut child = self
            .exec(program)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input.as_bytes())
                .with_context(|| format!("writing to {program}"))?;
        }
        let out = child.wait_with_output()?;
        anyhow::ensure!(
            out.status.success(),
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = delete_netns(std::slice::from_ref(&self.name));
    }
}

/// Moves the calling thread (only it) into the netns at `path`. A socket
/// belongs to the namespace of the thread that creates it, for life.
pub fn enter_thread(path: &Path) -> Result<()> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: setns on an fd we hold open; affects only this thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setns {}", path.display()));
    }
    Ok(())
}

/// Runs `f` on a new thread inside the netns at `ns` and returns its
/// result; the calling thread never changes namespace.
pub fn in_netns<T: Send>(ns: &Path, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_thread(ns)?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("a thread inside {} panicked", ns.display()))?
    })
}

/// Makes `c` run in the network namespace `ns` (an open /run/netns file):
/// `nsenter --net=<ns>` without the extra process. Unlike `ip netns exec`
/// it leaves the mount namespace (/sys, cgroups) alone.
pub fn enter_on_exec(c: &mut Command, ns: &File) {
    let fd = ns.as_raw_fd();
    // SAFETY: runs in the forked child before exec and only makes the
    // async-signal-safe setns(2) syscall on an fd the parent keeps open
    // until the child is spawned.
    unsafe {
        c.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The node's uplink: a veth `dev` from `node` to `eth0` in `ext`, both up
/// and addressed, and the node's default route via the external address.
/// `ext` gets no route back to the pods.
pub fn add_uplink(
    node: &Netns,
    ext: &Netns,
    dev: &str,
    node_addr: &str,
    ext_addr: &str,
) -> Result<()> {
    let gw = ext_addr.split('/').next().unwrap_or(ext_addr);
    node.ip(&[
        "link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", &ext.name,
    ])?;
    node.ip(&["addr", "add", node_addr, "dev", dev])?;
    node.ip(&["link", "set", dev, "up"])?;
    ext.ip(&["addr", "add", ext_addr, "dev", "eth0"])?;
    ext.ip(&["link", "set", "eth0", "up"])?;
    node.ip(&["route", "add", "default", "via", gw])?;
    Ok(())
}

pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
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

/// A directory under the system temp dir, removed (recursively) on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn create(prefix: &str) -> Result<TempDir> {
        let path = std::env::temp_dir().join(unique(prefix));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("cleanup: removing {}: {e}", self.path.display());
            }
        }
    }
}
