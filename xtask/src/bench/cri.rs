//! The `cri` section: pods started through containerd's CRI as kubelet
//! starts them, ours against the reference, side by side in one run.
//!
//! Per repeat, a fresh node per chain (the churn's topology: node netns,
//! uplink to the external netns, our agent for ours) with a private
//! containerd of its own in the node netns (crate `cni-cri`), running the
//! chain's conflist (the same apart from the `type` names) with every
//! plugin and `loopback` from one bin dir. Then N pods, one at a time and
//! each chain in turn (the order alternating from pod to pod), each with a
//! hostPort and the bandwidth annotations: RunPodSandbox, timed until the
//! sandbox answers on its hostPort from the external netns ("ready");
//! pod *i* sees *i* others of its chain. Then StopPodSandbox and
//! RemovePodSandbox, timed, in reverse order, and a check that nothing is
//! left (sandboxes, veths, IP reservations, our records).
//!
//! The sandbox image is busybox httpd rather than a pause that only
//! sleeps, so a sandbox serves its hostPort as soon as its process runs,
//! without CreateContainer/StartContainer (their cost is containerd's and
//! runc's, the same for both chains).
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cni_cri::sandbox::pod_ips;
use cni_cri::{HostPort, PodSpec};
use serde::{Deserialize, Serialize};

use super::progress::Progress;
use super::session::{Env, Impl, Session, NODE_IP};
use super::stats::{self, median};
use super::{Config, Extra, Results};
use crate::cri::{Cri, Plugins, HTTPD_IMAGE, HTTPD_PORT};

/// At most this many pods per chain (`min(--pods, 100)`): every sandbox
/// is a runc shim and a process, and each takes about a second.
pub const MAX_PODS: usize = 100;
/// How long a sandbox may take to answer on its hostPort.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The hostPort of pod `i`.
fn host_port(i: usize) -> u16 {
    31000 + i as u16
}

/// Pods per chain for a run with `--pods pods`.
pub fn pods(pods: usize) -> usize {
    pods.min(MAX_PODS)
}

/// One pod's calls, ms (NaN: the call did not happen or failed).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CriPod {
    /// The RunPodSandbox call.
    #[serde(deserialize_with = "stats::f64_or_nan")]
    pub run_ms: f64,
    /// From sending RunPodSandbox until the hostPort answered.
    #[serde(deserialize_with = "stats::f64_or_nan")]
    pub ready_ms: f64,
    #[serde(deserialize_with = "stats::f64_or_nan")]
    pub stop_ms: f64,
    #[serde(deserialize_with = "stats::f64_or_nan")]
    pub remove_ms: f64,
}

impl CriPod {
    pub fn stop_remove_ms(&self) -> f64 {
        self.stop_ms + self.remove_ms
    }
}

/// One chain's pods in one repeat.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CriRun {
    pub rep: usize,
    pub imp: Impl,
    /// In the order they were started.
    pub pods: Vec<CriPod>,
    /// Seconds from starting containerd to its CRI answering, images
    /// imported (not part of any pod's time).
    #[serde(deserialize_with = "stats::f64_or_nan")]
    pub containerd_start_s: f64,
    /// The first call that failed; the chain's remaining pods were not run.
    pub error: Option<String>,
}

/// A chain's node with its containerd. Field order is drop order:
/// containerd (and the sandboxes it still has) goes while the agent runs.
struct CriNode {
    cri: Cri,
    s: Session,
    ids: Vec<String>,
    /// Whether hostPorts are in the chain (else the pod is reached on its
    /// own address from the node).
    portmap: bool,
    bandwidth: bool,
    rep: usize,
}

impl CriNode {
    fn start(env: &Env, imp: Impl, rep: usize) -> Result<(CriNode, f64)> {
        let s = Session::create(env, imp, &format!("cri{rep}"))?;
        let text = serde_json::to_string_pretty(s.conflist_json())?;
        let plugins = match imp {
            Impl::Ours => Plugins::Ours(&env.bin_dir),
            _ => Plugins::Reference,
        };
        let t = Instant::now();
        let cri = Cri::start(s.node.path(), &text, plugins, HTTPD_IMAGE)
            .with_context(|| format!("{}: containerd", imp.key()))?;
        let started = t.elapsed().as_secs_f64();
        Ok((
            CriNode {
                cri,
                s,
                ids: Vec::new(),
                portmap: env.extras.contains(&Extra::Portmap),
                bandwidth: env.extras.contains(&Extra::Bandwidth),
                rep,
            },
            started,
        ))
    }

    fn imp(&self) -> Impl {
        self.s.imp
    }

    /// RunPodSandbox of pod `i`, then GETs until it answers.
    fn run_pod(&mut self, i: usize) -> Result<CriPod> {
        let imp = self.imp();
        let mut spec = PodSpec::new(
            &format!("p{i:03}"),
            "bench",
            &format!("uid-{}-{}-{}-{i}", imp.key(), std::process::id(), self.rep),
            &self.cri.log_dir,
        );
        if self.portmap {
            spec = spec.host_port(HostPort::tcp(HTTPD_PORT, host_port(i)));
        }
        if self.bandwidth {
            let rate = format!("{}M", super::CHURN_RATE);
            spec = spec.bandwidth(&rate, &rate);
        }
        let cl = self.cri.client()?;
        let t = Instant::now();
        let id = cl.run_pod_sandbox(spec.sandbox_config()).with_context(|| {
            format!(
                "{} RunPodSandbox of pod {i}; containerd log:\n{}",
                imp.key(),
                self.cri.log_tail(20)
            )
        })?;
        let run_ms = t.elapsed().as_secs_f64() * 1e3;
        self.ids.push(id.clone());
        let (ns, target) = if self.portmap {
            (
                self.s.ext_path(),
                SocketAddr::new(IpAddr::V4(NODE_IP), host_port(i)),
            )
        } else {
            let status = cl.pod_sandbox_status(&id)?;
            let ip: IpAddr = pod_ips(&status)
                .first()
                .context("containerd reports no pod IP")?
                .parse()?;
            (
                self.s.node.path().to_path_buf(),
                SocketAddr::new(ip, HTTPD_PORT),
            )
        };
        crate::cri::wait_served(&ns, target, READY_TIMEOUT)
            .with_context(|| format!("{} pod {i}", imp.key()))?;
        let ready_ms = t.elapsed().as_secs_f64() * 1e3;
        Ok(CriPod {
            run_ms,
            ready_ms,
            stop_ms: f64::NAN,
            remove_ms: f64::NAN,
        })
    }

    /// StopPodSandbox and RemovePodSandbox of pod `i`, each timed.
    fn remove_pod(&self, i: usize) -> Result<(f64, f64)> {
        let id = self.ids.get(i).context("no such sandbox")?;
        let cl = self.cri.client()?;
        let imp = self.imp().key();
        let t = Instant::now();
        cl.stop_pod_sandbox(id).with_context(|| {
            format!(
                "{imp} StopPodSandbox of pod {i}; containerd log:\n{}",
                self.cri.log_tail(20)
            )
        })?;
        let stop = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        cl.remove_pod_sandbox(id)
            .with_context(|| format!("{imp} RemovePodSandbox of pod {i}"))?;
        Ok((stop, t.elapsed().as_secs_f64() * 1e3))
    }

    /// What the pods left behind, if anything.
    fn leftovers(&self) -> Vec<String> {
        let imp = self.imp().key();
        let mut out = Vec::new();
        match self.cri.client().and_then(|c| Ok(c.list_pod_sandbox()?)) {
            Ok(l) if l.is_empty() => {}
            Ok(l) => out.push(format!("{imp}: {} sandboxes left in containerd", l.len())),
            Err(e) => out.push(format!("{imp}: ListPodSandbox: {e:#}")),
        }
        if let Err(e) = self.s.check_clean() {
            out.push(format!("{e:#}"));
        }
        if let Some(a) = &self.s.agent {
            let dir = a.state_dir.join("attachments").join(self.s.list.name());
            let n = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
            if n > 0 {
                out.push(format!(
                    "{imp}: {n} attachment records left in {}",
                    dir.display()
                ));
            }
        }
        out
    }
}

/// Runs the section: `cfg.repeats` rounds of the two chains side by side.
/// A chain whose call fails stops there (the error is kept with its run);
/// the other chain goes on.
pub fn phase(cfg: &Config, env: &Env, pg: &mut Progress, res: &mut Results) -> Result<()> {
    let n = pods(cfg.pods);
    for rep in 0..cfg.repeats {
        pg.step(&format!(
            "cri {}/{}: a node per chain, each with its own containerd (not timed)",
            rep + 1,
            cfg.repeats
        ));
        let mut nodes = Vec::new();
        let mut runs = Vec::new();
        for imp in [Impl::Ours, Impl::Reference] {
            let (node, started) = CriNode::start(env, imp, rep)?;
            res.conflists
                .entry(imp.key().to_string())
                .or_insert_with(|| node.s.conflist_json().clone());
            pg.note(&format!(
                "{}: containerd serving the CRI, images imported, in {started:.1} s",
                imp.label()
            ));
            nodes.push(node);
            runs.push(CriRun {
                rep,
                imp,
                pods: Vec::new(),
                containerd_start_s: started,
                error: None,
            });
        }
        pg.step(&format!(
            "cri {}/{}: RunPodSandbox of {n} pods per chain in turn, each until its hostPort answers",
            rep + 1,
            cfg.repeats
        ));
        for i in 0..n {
            crate::proc::check_interrupted()?;
            for k in super::rotated(&[0, 1], i + rep) {
                if runs[k].error.is_some() {
                    continue;
                }
                match nodes[k].run_pod(i) {
                    Ok(p) => runs[k].pods.push(p),
                    Err(e) => {
                        pg.note(&format!("{}: FAILED: {e:#}", runs[k].imp.label()));
                        runs[k].error = Some(format!("{e:#}"));
                    }
                }
            }
            pg.count("RunPodSandbox", i + 1, n);
        }
        for r in &runs {
            let ready: Vec<f64> = r.pods.iter().map(|p| p.ready_ms).collect();
            let run: Vec<f64> = r.pods.iter().map(|p| p.run_ms).collect();
            pg.note(&format!(
                "{}: ready median {:.0} ms (RunPodSandbox call {:.0} ms), {} pods",
                r.imp.label(),
                median(&ready),
                median(&run),
                r.pods.len()
            ));
        }
        pg.step(&format!(
            "cri {}/{}: StopPodSandbox + RemovePodSandbox of every pod in reverse, in turn",
            rep + 1,
            cfg.repeats
        ));
        for i in (0..n).rev() {
            crate::proc::check_interrupted()?;
            for k in super::rotated(&[0, 1], i + rep) {
                if i >= nodes[k].ids.len() {
                    continue;
                }
                match nodes[k].remove_pod(i) {
                    Ok((stop, remove)) => {
                        if let Some(p) = runs[k].pods.get_mut(i) {
                            p.stop_ms = stop;
                            p.remove_ms = remove;
                        }
                    }
                    Err(e) => {
                        pg.note(&format!("{}: FAILED: {e:#}", runs[k].imp.label()));
                        runs[k].error.get_or_insert(format!("{e:#}"));
                    }
                }
            }
            pg.count("Stop+Remove", n - i, n);
        }
        for (node, r) in nodes.iter().zip(&runs) {
            let sr: Vec<f64> = r.pods.iter().map(CriPod::stop_remove_ms).collect();
            let left = node.leftovers();
            pg.note(&format!(
                "{}: stop + remove median {:.0} ms; {}",
                r.imp.label(),
                median(&sr),
                if left.is_empty() {
                    "nothing left behind".to_string()
                } else {
                    left.join("; ")
                }
            ));
            for l in left {
                res.notes.push(format!(
                    "cri repeat {}: after every pod was removed: {l}",
                    rep + 1
                ));
            }
        }
        res.cri.extend(runs);
        // containerd stopped, then its nodes (not timed).
        drop(nodes);
    }
    Ok(())
}
