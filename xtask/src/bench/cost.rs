//! What the datapath costs the node: the agent's memory and CPU, the
//! kernel memory of its pinned maps and programs, the CPU the plugin
//! processes burn per call, and (for the reference) the rules and qdiscs
//! it leaves in the node netns.
use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::netns::NetNs;
use crate::proc;

/// CPU (user + system) of every child this process has reaped so far,
/// including their own reaped children (a plugin's IPAM, iptables, ...),
/// in ms.
pub fn children_cpu_ms() -> f64 {
    // SAFETY: rusage is plain data; all zeroes is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we pass; RUSAGE_CHILDREN is valid.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return f64::NAN;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// A live process's CPU (utime + stime, all threads, dead ones included)
/// in ms, from /proc/<pid>/stat.
pub fn process_cpu_ms(pid: u32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the parenthesised command name; utime and stime are
    // fields 14 and 15 of the whole line.
    let Some(rest) = s.rfind(')').map(|i| &s[i + 1..]) else {
        return f64::NAN;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (Some(u), Some(st)) = (f.get(11), f.get(12)) else {
        return f64::NAN;
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    match (u.parse::<f64>(), st.parse::<f64>()) {
        (Ok(u), Ok(st)) if hz > 0.0 => (u + st) * 1e3 / hz,
        _ => f64::NAN,
    }
}

/// VmRSS of a live process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Kernel memory of the agent's pinned objects under its bpffs root.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct BpfMem {
    pub maps: usize,
    pub map_bytes: u64,
    pub progs: usize,
    pub prog_bytes: u64,
    pub links: usize,
}

/// Walks `<root>/<layout>/{maps,progs,links}` (whatever layout version)
/// and asks bpftool for each map's and program's `bytes_memlock`.
pub fn pinned_bpf(root: &Path) -> Result<BpfMem> {
    let mut m = BpfMem::default();
    let mut files = Vec::new();
    walk(root, &mut files);
    for f in files {
        let under = |d: &str| f.components().any(|c| c.as_os_str() == d);
        if under("links") {
            m.links += 1;
        } else if under("maps") {
            if let Some(b) = memlock("map", &f) {
                m.maps += 1;
                m.map_bytes += b;
            }
        } else if under("progs") {
            if let Some(b) = memlock("prog", &f) {
                m.progs += 1;
                m.prog_bytes += b;
            }
        }
    }
    Ok(m)
}

fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => walk(&p, out),
            Ok(_) => out.push(p),
            Err(_) => {}
        }
    }
}

fn memlock(kind: &str, pin: &Path) -> Option<u64> {
    let out = proc::output(
        proc::cmd("bpftool")
            .args(["-j", kind, "show", "pinned"])
            .arg(pin),
    )
    .ok()?;
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v["bytes_memlock"].as_u64()
}

/// Netfilter rules and tc state in a netns: `(iptables rules, nft
/// ruleset lines, qdiscs other than the defaults, ifb devices)`.
pub fn netfilter_and_tc(node: &NetNs) -> (usize, usize, usize, usize) {
    let ipt = proc::stdout_of(&mut node.exec("iptables-save"))
        .map(|s| s.lines().filter(|l| l.starts_with("-A ")).count())
        .unwrap_or(0);
    let nft = proc::stdout_of(node.exec("nft").args(["list", "ruleset"]))
        .map(|s| s.lines().filter(|l| !l.trim().is_empty()).count())
        .unwrap_or(0);
    let qd = node
        .try_ip(&["-o", "link", "show"])
        .ok()
        .map(|_| {
            proc::stdout_of(proc::cmd("tc").args(["-n", node.name(), "qdisc", "show"]))
                .map(|s| {
                    s.lines()
                        .filter(|l| {
                            !(l.starts_with("qdisc noqueue")
                                || l.starts_with("qdisc noop")
                                || l.starts_with("qdisc clsact"))
                        })
                        .count()
                })
                .unwrap_or(0)
        })
        .unwrap_or(0);
    let ifb = node
        .try_ip(&["-o", "link", "show", "type", "ifb"])
        .map(|s| s.lines().count())
        .unwrap_or(0);
    (ipt, nft, qd, ifb)
}
