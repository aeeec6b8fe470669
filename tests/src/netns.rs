//! Network namespaces the tests create, and their guaranteed removal.
//!
//! Every namespace is created with `ip netns add` (so it is bind-mounted under
//! /run/netns and visible to iproute2, our independent witness) under a name
//! that is unique per process and per call. Dropping the guard kills whatever
//! still runs inside and deletes the namespace, which also destroys every
//! interface in it (veth peers included), so a test that panics halfway
//! leaves nothing behind.
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

/// Prefix of every namespace the harness creates; also how stale ones from a
/// crashed earlier run are recognised.
pub const NETNS_PREFIX: &str = "ct";

static COUNTER: AtomicU32 = AtomicU32::new(0);
static REAP_STALE: Once = Once::new();

/// A uniquely named network namespace, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    path: PathBuf,
}

impl NetNs {
    /// Creates `ct<pid>-<n>-<tag>`. `tag` only helps a human reading `ip netns`.
    pub fn new(tag: &str) -> NetNs {
        REAP_STALE.call_once(reap_stale_namespaces);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let tag: String = tag
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(8)
            .collect();
        let name = format!("{NETNS_PREFIX}{}-{n}-{tag}", std::process::id());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("cannot run `ip netns add`");
        assert!(
            out.status.success(),
            "ip netns add {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = PathBuf::from("/run/netns").join(&name);
        NetNs { name, path }
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

    /// Runs `program args` inside the namespace and returns its output.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        self.command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program} in {}: {e}", self.name))
    }

    /// Runs `ip -n <ns> args` (iproute2 as an independent witness) and panics
    /// unless it succeeds; returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = self.ip_output(args);
        assert!(
            out.status.success(),
            "`ip -n {} {}` failed: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
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
    if !Path::new("/run/netns").join(name).exists() {
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
/// test binary killed by a signal cannot run its destructors).
fn reap_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            remove_namespace(&name);
        }
    }
}
