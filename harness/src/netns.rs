//! Network namespaces that remove themselves, and ways into them.
//!
//! Every namespace is created with `ip netns add` (so it is bind-mounted under
//! /run/netns and visible to iproute2, our independent witness) under a name
//! that is unique per process and per call. Dropping the guard kills whatever
//! still runs inside and deletes the namespace, which also destroys every
//! interface in it (veth peers included), so a test that panics or a demo
//! that fails halfway leaves nothing behind; the root namespace is never
//! changed.
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

use anyhow::{anyhow, ensure, Context, Result};

/// Prefix of every namespace [`NetNs`] creates; also how stale ones from a
/// crashed earlier run are recognised.
pub const NETNS_PREFIX: &str = "ct";

static COUNTER: AtomicU32 = AtomicU32::new(0);
static REAP_STALE: Once = Once::new();

/// The next number of this process's sequence (namespace, directory and
/// container names).
pub fn next_seq() -> u32 {
    COUNTER.fetch_add(1, Ordering::SeqCst)
}

/// A name unique to this process: `<prefix>-<pid>-<n>`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), next_seq())
}

/// `/run/netns/<name>`, where `ip netns add` bind-mounts a namespace.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// A uniquely named network namespace, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    path: PathBuf,
}

impl NetNs {
    /// Creates `ct<pid>-<n>-<tag>`. `tag` only helps a human reading
    /// `ip netns`. Panics if it cannot (for tests).
    #[track_caller]
    pub fn new(tag: &str) -> NetNs {
        NetNs::create(tag).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Creates `ct<pid>-<n>-<tag>`, first reaping the namespaces of
    /// processes that died without their destructors.
    pub fn create(tag: &str) -> Result<NetNs> {
        REAP_STALE.call_once(reap_stale_namespaces);
        let tag: String = tag
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(16)
            .collect();
        let name = format!("{NETNS_PREFIX}{}-{}-{tag}", std::process::id(), next_seq());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .context("cannot run `ip netns add`")?;
        ensure!(
            out.status.success(),
            "ip netns add {name} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let path = netns_path(&name);
        Ok(NetNs { name, path })
    }

    /// Brings loopback up, as a runtime's `loopback` plugin would.
    pub fn lo_up(self) -> Result<NetNs> {
        self.try_ip(&["link", "set", "lo", "up"])?;
        Ok(self)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mount path, as a runtime passes it in CNI_NETNS.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn path_str(&self) -> &str {
        self.path.to_str().expect("netns path is ASCII")
    }

    /// Opens the namespace's bind mount (for [`enter_on_exec`]).
    pub fn open(&self) -> Result<File> {
        File::open(&self.path).with_context(|| format!("opening {}", self.path.display()))
    }

    /// A command that runs `program` inside this namespace (network only:
    /// `nsenter --net`, not `ip netns exec`, which would remount /sys and hide
    /// the cgroup and bpffs mounts).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path.display()));
        c.arg("--");
        c.arg(program);
        c
    }

    /// A command run inside the namespace with `ip netns exec`: its own
    /// /sys too, so sysfs shows this namespace's devices.
    pub fn exec(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `program args` inside the namespace and returns its output.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        self.command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program} in {}: {e}", self.name))
    }

    /// Runs `program args` in the namespace (`ip netns exec`) with `input`
    /// on its stdin (a batch for `bridge -batch -`, `iptables-restore`);
    /// error unless it exits 0, with what it printed on stderr.
    pub fn feed(&self, program: &str, args: &[&str], input: &str) -> Result<()> {
        let mut child = self
            .exec(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input.as_bytes())
                .with_context(|| format!("writing to {program}"))?;
        }
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// `ip -n <ns> args`: stdout, an error unless it exits 0.
    pub fn try_ip(&self, args: &[&str]) -> Result<String> {
        let out = self.ip_output(args);
        ensure!(
            out.status.success(),
            "`ip -n {} {}` failed ({}): {}",
            self.name,
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `ip -n <ns> args` (iproute2 as an independent witness) and panics
    /// unless it succeeds; returns stdout.
    #[track_caller]
    pub fn ip(&self, args: &[&str]) -> String {
        self.try_ip(args).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Like [`NetNs::ip`] but returns the raw output, for commands allowed to fail.
    pub fn ip_output(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("cannot run ip")
    }

    /// `ip -j ...` parsed as JSON.
    pub fn ip_json(&self, args: &[&str]) -> serde_json::Value {
        let mut full = vec!["-j"];
        full.extend_from_slice(args);
        let text = self.ip(&full);
        if text.trim().is_empty() {
            return serde_json::Value::Array(vec![]);
        }
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("bad JSON from ip {}: {e}: {text}", full.join(" ")))
    }

    /// Whether a link of that name exists in the namespace.
    pub fn has_link(&self, ifname: &str) -> bool {
        self.ip_output(&["link", "show", "dev", ifname])
            .status
            .success()
    }

    /// Reads a sysctl of this namespace through /proc/sys (per netns for
    /// `net.*`), e.g. `net/ipv4/ip_forward`.
    pub fn sysctl(&self, key: &str) -> Option<String> {
        let out = self.run("cat", &[&format!("/proc/sys/{key}")]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The iptables/nftables rules of this namespace (`-A` lines of
    /// iptables-save and the non-empty lines of `nft list ruleset`); empty
    /// when nothing was installed.
    pub fn firewall_rules(&self) -> Vec<String> {
        let mut rules = Vec::new();
        for (prog, args) in [
            ("iptables-save", &[][..]),
            ("ip6tables-save", &[][..]),
            ("nft", &["list", "ruleset"][..]),
        ] {
            let out = self.run(prog, args);
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let keep = if prog == "nft" {
                    !line.trim().is_empty()
                } else {
                    line.starts_with("-A")
                };
                if keep {
                    rules.push(format!("{prog}: {line}"));
                }
            }
        }
        rules
    }

    /// Deletes the namespace now (for "DEL with the netns gone" cases); drop
    /// then has nothing left to do.
    pub fn delete(&self) {
        remove_namespace(&self.name);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        remove_namespace(&self.name);
    }
}

/// Kills the processes left inside a namespace and deletes it; idempotent.
fn remove_namespace(name: &str) {
    if !netns_path(name).exists() {
        return;
    }
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: plain kill(2) on a pid that lives in our namespace.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
    let out = Command::new("ip").args(["netns", "del", name]).output();
    if let Ok(out) = out {
        if !out.status.success() {
            eprintln!(
                "warning: ip netns del {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Removes namespaces named `ct<pid>-...` whose creating process is gone (a
/// process killed by a signal cannot run its destructors).
fn reap_stale_namespaces() {
    for path in crate::stale_entries(Path::new("/run/netns"), NETNS_PREFIX) {
        if let Some(name) = path.file_name() {
            remove_namespace(&name.to_string_lossy());
        }
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
        .map_err(|_| anyhow!("a thread inside {} panicked", ns.display()))?
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
