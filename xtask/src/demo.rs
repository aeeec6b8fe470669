//! `cargo xtask demo`: the plugins wiring two pods on a "node", run the way
//! a container runtime runs them, in namespaces the demo creates and removes.
//!
//! The demo is a list of steps; each one checks what it shows, and the demo
//! exits 0 only if every step held. Later features (masquerade to an
//! "external" netns on 198.18.0.0/15, hostPort, ...) are new steps.
use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::cni::{self, Attachment, Conflist, Runtime};
use crate::netns::{self, Netns, TempDir};
use crate::proc;

const BRIDGE: &str = "cni-demo0";
const POD_SUBNET: &str = "10.244.1.0/24";
/// Our chain, and the reference plugins' (Debian's containernetworking-plugins).
const OURS: [&str; 2] = ["ebpf-bridge", "ebpf-host-local"];
const REFERENCE: [&str; 2] = ["bridge", "host-local"];
const REFERENCE_DIR: &str = "/usr/lib/cni";

struct Pod {
    label: &'static str,
    ns: Netns,
    att: Attachment,
    result: Option<Value>,
}

/// Field order is drop order: pods' namespaces first, then the node's, then
/// the files.
struct Demo {
    bin_dir: PathBuf,
    /// `[bridge plugin, IPAM plugin]` types.
    plugins: [&'static str; 2],
    pods: Vec<Pod>,
    runtime: Option<Runtime>,
    node: Option<Netns>,
    conflist: Option<Conflist>,
    tmp: TempDir,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let mut names: Vec<&str> = self.pods.iter().map(|p| p.ns.name.as_str()).collect();
        if let Some(n) = &self.node {
            names.push(&n.name);
        }
        proc::heading("Cleanup");
        println!("    deleting netns {}", names.join(" "));
        println!("    removing {}", self.tmp.path.display());
    }
}

type StepFn = fn(&mut Demo) -> Result<()>;

const STEPS: &[(&str, StepFn)] = &[
    ("Create a node netns and two pod netns", Demo::namespaces),
    ("Write the conflist", Demo::write_conflist),
    ("ADD pod1 and pod2, like a runtime", Demo::add_pods),
    ("Show the plumbing", Demo::show_plumbing),
    (
        "No iptables or nftables rules in the node netns",
        Demo::no_rules,
    ),
    (
        "CHECK both pods against their cached results",
        Demo::check_pods,
    ),
    ("pod1 -> pod2 ping across the bridge", Demo::ping_pod_to_pod),
    ("pods -> gateway ping", Demo::ping_gateway),
    (
        "DEL both pods, then DEL again (must be idempotent)",
        Demo::del_pods,
    ),
    (
        "Nothing is left: no veths, no IP reservations",
        Demo::nothing_left,
    ),
];

/// `reference`: the same steps with the reference plugins, for comparison.
pub fn run(reference: bool) -> Result<()> {
    crate::require_root("demo")?;
    crate::setup::run(false, &[])?;
    let bin_dir = crate::build_bins(false)?;
    let (plugins, dir) = if reference {
        (REFERENCE, PathBuf::from(REFERENCE_DIR))
    } else {
        (OURS, bin_dir.clone())
    };
    for p in plugins {
        ensure!(
            dir.join(p).is_file(),
            "{} is missing",
            dir.join(p).display()
        );
    }
    println!("\nDemo of {} + {}", plugins[0], plugins[1]);
    let mut d = Demo {
        bin_dir,
        plugins,
        pods: Vec::new(),
        runtime: None,
        node: None,
        conflist: None,
        tmp: TempDir::create("cni-xtask-demo")?,
    };
    for (i, (title, step)) in STEPS.iter().enumerate() {
        proc::heading(&format!("Step {}/{}: {title}", i + 1, STEPS.len()));
        step(&mut d).with_context(|| format!("step {} ({title}) did not hold", i + 1))?;
        println!("    ok");
    }
    drop(d);
    println!("\nDemo: all {} steps held.", STEPS.len());
    Ok(())
}

impl Demo {
    fn node(&self) -> Result<&Netns> {
        self.node.as_ref().context("no node netns")
    }

    fn rt(&self) -> Result<(&Runtime, &Conflist)> {
        Ok((
            self.runtime.as_ref().context("no runtime")?,
            self.conflist.as_ref().context("no conflist")?,
        ))
    }

    fn version(&self) -> &'static str {
        if self.plugins == REFERENCE {
            "1.0.0"
        } else {
            "1.1.0"
        }
    }

    fn ipam_dir(&self) -> PathBuf {
        self.tmp.path.join("ipam")
    }

    fn namespaces(&mut self) -> Result<()> {
        let node = Netns::create("cnidemo-node")?;
        println!("    node: {}", node.name);
        self.runtime = Some(Runtime::new(
            &node.path(),
            vec![self.bin_dir.clone(), PathBuf::from(REFERENCE_DIR)],
        )?);
        self.node = Some(node);
        for label in ["pod1", "pod2"] {
            let ns = Netns::create(&format!("cnidemo-{label}"))?;
            println!("    {label}: {}", ns.name);
            let id = netns::unique(&format!("xtask-demo-{label}"));
            let att = Attachment::pod(&id, &ns.path(), label);
            self.pods.push(Pod {
                label,
                ns,
                att,
                result: None,
            });
        }
        Ok(())
    }

    fn write_conflist(&mut self) -> Result<()> {
        // Written as text to keep the familiar key order on screen; the
        // reference plugins (v1.1.1) stop at spec 1.0.0. stateDir and
        // agentSocket are private, so the demo never touches the node-wide
        // defaults (the reference bridge ignores them).
        let q = |v: &dyn std::fmt::Display| Value::String(v.to_string()).to_string();
        let text = format!(
            r#"{{
  "cniVersion": {version},
  "name": "demo",
  "plugins": [
    {{
      "type": {bridge_type},
      "bridge": {bridge},
      "isGateway": true,
      "isDefaultGateway": true,
      "ipMasq": true,
      "stateDir": {state},
      "agentSocket": {sock},
      "ipam": {{
        "type": {ipam_type},
        "ranges": [[{{ "subnet": {subnet} }}]],
        "dataDir": {data}
      }}
    }}
  ]
}}
"#,
            version = q(&self.version()),
            bridge_type = q(&self.plugins[0]),
            bridge = q(&BRIDGE),
            state = q(&self.tmp.path.join("state").display()),
            sock = q(&self.tmp.path.join("agent.sock").display()),
            ipam_type = q(&self.plugins[1]),
            subnet = q(&POD_SUBNET),
            data = q(&self.ipam_dir().display()),
        );
        let raw: Value = serde_json::from_str(&text).context("demo conflist")?;
        let path = self.tmp.path.join("10-demo.conflist");
        std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
        println!("    {}:", path.display());
        for line in text.lines() {
            println!("    {line}");
        }
        self.conflist = Some(Conflist::new(raw)?);
        Ok(())
    }

    fn add_pods(&mut self) -> Result<()> {
        let (rt, list) = self.rt()?;
        let mut results = Vec::new();
        for pod in &self.pods {
            println!(
                "    ADD {} (CNI_CONTAINERID={} CNI_NETNS={} CNI_IFNAME={})",
                pod.label,
                pod.att.container_id,
                pod.att.netns.display(),
                pod.att.ifname
            );
            let res = rt.add(list, &pod.att)?;
            for line in serde_json::to_string_pretty(&res)?.lines() {
                println!("      {line}");
            }
            ensure!(
                !cni::result_ips(&res).is_empty(),
                "{}: result has no IP",
                pod.label
            );
            results.push(res);
        }
        for (pod, res) in self.pods.iter_mut().zip(results) {
            pod.result = Some(res);
        }
        let ips: Vec<String> = self
            .pods
            .iter()
            .flat_map(|p| cni::result_ips(p.result.as_ref().unwrap_or(&Value::Null)))
            .collect();
        let mut uniq = ips.clone();
        uniq.sort();
        uniq.dedup();
        ensure!(uniq.len() == ips.len(), "pods got overlapping IPs: {ips:?}");
        Ok(())
    }

    fn show_plumbing(&mut self) -> Result<()> {
        let node = self.node()?;
        node.show_ip(&["-br", "link", "show", "master", BRIDGE])?;
        node.show_ip(&["-br", "addr", "show", "dev", BRIDGE])?;
        for pod in &self.pods {
            pod.ns
                .show_ip(&["-br", "addr", "show", "dev", &pod.att.ifname])?;
            let routes = pod.ns.show_ip(&["route"])?;
            ensure!(
                routes.starts_with("default") || routes.contains("\ndefault"),
                "{}: no default route (isDefaultGateway)",
                pod.label
            );
        }
        Ok(())
    }

    /// The product's promise: ipMasq and friends are eBPF, so the node
    /// netns has no netfilter rules. The reference bridge's ipMasq does add
    /// some: shown, not asserted, in --reference mode.
    fn no_rules(&mut self) -> Result<()> {
        let node = self.node()?;
        let ipt = proc::show(&mut node.exec("iptables-save"))?;
        let nft = proc::show(node.exec("nft").args(["list", "ruleset"]))?;
        let rules = ipt
            .lines()
            .any(|l| !l.trim().is_empty() && !l.starts_with('#'))
            || !nft.trim().is_empty();
        if self.plugins == REFERENCE {
            println!("    (the reference bridge implements ipMasq with the rules above)");
        } else {
            ensure!(!rules, "netfilter rules found in the node netns");
        }
        Ok(())
    }

    fn check_pods(&mut self) -> Result<()> {
        let (rt, list) = self.rt()?;
        for pod in &self.pods {
            let cached = pod.result.as_ref().context("no cached result")?;
            rt.check(list, &pod.att, cached)?;
            println!("    CHECK {}: ok", pod.label);
        }
        Ok(())
    }

    fn ping(from: &Pod, to: &str) -> Result<()> {
        let mut c = from.ns.exec("ping");
        c.args(["-c", "3", "-i", "0.2", "-W", "1", to]);
        let out =
            proc::show(&mut c).with_context(|| format!("{} cannot reach {to}", from.label))?;
        ensure!(
            out.contains(" 0% packet loss"),
            "{} -> {to}: packets lost",
            from.label
        );
        Ok(())
    }

    fn ping_pod_to_pod(&mut self) -> Result<()> {
        let [p1, p2] = &self.pods[..] else {
            bail!("expected two pods")
        };
        let dst = cni::result_ips(p2.result.as_ref().context("pod2 has no result")?);
        let dst = dst.first().context("pod2 has no IP")?;
        Self::ping(p1, dst)
    }

    fn ping_gateway(&mut self) -> Result<()> {
        for pod in &self.pods {
            let gws = cni::result_gateways(pod.result.as_ref().context("no result")?);
            let gw = gws.first().context("result has no gateway (isGateway)")?;
            Self::ping(pod, gw)?;
        }
        Ok(())
    }

    fn del_pods(&mut self) -> Result<()> {
        let (rt, list) = self.rt()?;
        for pod in &self.pods {
            rt.del(list, &pod.att, pod.result.as_ref())?;
            println!("    DEL {}: ok", pod.label);
        }
        for pod in &self.pods {
            rt.del(list, &pod.att, pod.result.as_ref())?;
            println!("    DEL {} again: ok", pod.label);
        }
        Ok(())
    }

    fn nothing_left(&mut self) -> Result<()> {
        let node = self.node()?;
        let veths = node.show_ip(&["-o", "link", "show", "type", "veth"])?;
        ensure!(veths.trim().is_empty(), "veths left in the node netns");
        for pod in &self.pods {
            let links = pod.ns.show_ip(&["-o", "link", "show"])?;
            ensure!(
                !links.contains(&format!(": {}", pod.att.ifname)),
                "{}: {} is still there",
                pod.label,
                pod.att.ifname
            );
        }
        let store = self.ipam_dir().join("demo");
        let left = cni::ipam_reservations(&store)?;
        println!(
            "    IPAM store {}: {} reservation(s) {:?}",
            store.display(),
            left.len(),
            left
        );
        ensure!(left.is_empty(), "IP reservations left behind");
        Ok(())
    }
}
