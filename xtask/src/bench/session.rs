//! One "node" under test: a node netns with a dual-stack bridge network
//! configured by one conflist, an uplink to an "external" netns
//! (198.18.0.0/15 and fd00:198:18::/64), our agent when the chain is ours,
//! and the pods attached to it, each with an IPv4 and an IPv6 address.
//!
//! The three kinds of node share the topology and addresses:
//! - ours: ebpf-bridge + ebpf-host-local [+ ebpf-portmap, ...], ipMasq on;
//! - reference: bridge + host-local [+ portmap, ...] from /usr/lib/cni,
//!   the same conflist apart from the `type` names;
//! - routed: the ceiling, reference bridge + host-local with ipMasq off
//!   and nothing chained, and the external side routes the pod subnet back
//!   to the node: the kernel's bare forwarding path, no NAT, no eBPF, no
//!   netfilter rule.
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::cost;
use crate::agent::Agent;
use crate::cni::{self, Attachment, Conflist, Runtime};
use crate::netns::{add_uplink, NetNs, TempDir};

pub const POD_SUBNET: &str = "10.244.0.0/16";
pub const BRIDGE: &str = "cnib0";
pub const UPLINK: &str = "up0";
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const POD_SUBNET6: &str = "fd00:10:244::/64";
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, 1);
pub const EXTERNAL_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, 2);
/// The newest version both chains speak (the reference v1.1.1 stops at 1.0.0).
pub const CNI_VERSION: &str = "1.0.0";
pub const REFERENCE_DIR: &str = "/usr/lib/cni";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Impl {
    Ours,
    Reference,
    Routed,
}

impl Impl {
    pub fn key(self) -> &'static str {
        match self {
            Impl::Ours => "ours",
            Impl::Reference => "reference",
            Impl::Routed => "routed",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Impl::Ours => "ours (eBPF)",
            Impl::Reference => "reference (iptables)",
            Impl::Routed => "routed, no NAT (ceiling)",
        }
    }
}

/// Plugins chained after the bridge.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Extra {
    Portmap,
    Firewall,
    Bandwidth,
}

impl Extra {
    pub const ALL: [Extra; 3] = [Extra::Portmap, Extra::Firewall, Extra::Bandwidth];

    pub fn reference(self) -> &'static str {
        match self {
            Extra::Portmap => "portmap",
            Extra::Firewall => "firewall",
            Extra::Bandwidth => "bandwidth",
        }
    }

    pub fn ours(self) -> &'static str {
        match self {
            Extra::Portmap => "ebpf-portmap",
            Extra::Firewall => "ebpf-firewall",
            Extra::Bandwidth => "ebpf-bandwidth",
        }
    }

    fn conf(self, ty: &str) -> Value {
        match self {
            Extra::Portmap => {
                json!({ "type": ty, "capabilities": { "portMappings": true }, "snat": true })
            }
            Extra::Firewall => {
                json!({ "type": ty, "capabilities": { "firewallRules": true } })
            }
            Extra::Bandwidth => json!({ "type": ty, "capabilities": { "bandwidth": true } }),
        }
    }
}

/// What every session is built from.
pub struct Env {
    pub bin_dir: PathBuf,
    pub extras: Vec<Extra>,
    /// `cni-agent run --hostport-mode`.
    pub hostport_mode: String,
}

/// A pod to attach: its netns and what the runtime passes for it.
pub struct PodSpec {
    pub name: String,
    pub netns: PathBuf,
    /// `(hostPort, containerPort)`, TCP.
    pub mappings: Vec<(u16, u16)>,
    /// `(rate bit/s, burst bits)`, both directions.
    pub bandwidth: Option<(u64, u64)>,
    /// Egress firewall rules (`fw_rule`), passed as our capability
    /// `firewallRules`; the reference's are loaded into its admin chain
    /// around each measurement instead (`Session::load_admin_rules`).
    pub fw_rules: usize,
}

/// Firewall rule `r` of a benchmark pod: deny TCP to a /24 in 10.100.0.0/14
/// on a 100-port range. None of them matches the benchmark's traffic (to
/// 198.18.0.2), so every packet or connection is judged by all of them:
/// `(cidr, first port, last port)`.
pub fn fw_rule(r: usize) -> (String, u16, u16) {
    let lo = 1000 + (r % 50) as u16;
    (
        format!("10.{}.{}.0/24", 100 + r / 250, r % 250),
        lo,
        lo + 100,
    )
}

/// The reference firewall plugin's place for an operator's rules: the
/// admin chain it creates and jumps to first from its FORWARD chain.
pub const REFERENCE_ADMIN_CHAIN: &str = "CNI-ADMIN";

pub struct Pod {
    pub name: String,
    pub netns: PathBuf,
    pub att: Attachment,
    pub result: Option<Value>,
    pub ip: Option<Ipv4Addr>,
    pub ip6: Option<Ipv6Addr>,
}

/// One timed runtime call through the whole conflist.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Call {
    /// Wall time of the call, ms.
    #[serde(deserialize_with = "super::stats::f64_or_nan")]
    pub ms: f64,
    /// CPU of the plugin processes and what they ran (IPAM, iptables, ...), ms.
    #[serde(deserialize_with = "super::stats::f64_or_nan")]
    pub cpu_ms: f64,
    /// Wall time per plugin, conflist order, ms.
    pub plugin_ms: Vec<f64>,
}

/// Field order is drop order: the agent is stopped (and its bpffs
/// unmounted) before the namespaces go, and the temp dir goes last.
pub struct Session {
    pub imp: Impl,
    pub pods: Vec<Pod>,
    pub agent: Option<Agent>,
    rt: Runtime,
    pub list: Conflist,
    pub ext: NetNs,
    pub node: NetNs,
    tmp: TempDir,
    tag: String,
}

impl Session {
    pub fn create(env: &Env, imp: Impl, tag: &str) -> Result<Session> {
        let tmp = TempDir::create("cni-xtask-bench")?;
        let node = NetNs::create("cnib-node")?.lo_up()?;
        let ext = NetNs::create("cnib-ext")?.lo_up()?;
        add_uplink(
            &node,
            &ext,
            UPLINK,
            &format!("{NODE_IP}/24"),
            &format!("{EXTERNAL_IP}/24"),
        )?;
        // No DAD: an address that is still tentative cannot be used (or
        // served by the agent) for the first second or so.
        node.try_ip(&[
            "-6",
            "addr",
            "add",
            &format!("{NODE_IP6}/64"),
            "dev",
            UPLINK,
            "nodad",
        ])?;
        ext.try_ip(&[
            "-6",
            "addr",
            "add",
            &format!("{EXTERNAL_IP6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        node.try_ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &EXTERNAL_IP6.to_string(),
        ])?;
        if imp == Impl::Routed {
            ext.try_ip(&["route", "add", POD_SUBNET, "via", &NODE_IP.to_string()])?;
            ext.try_ip(&[
                "-6",
                "route",
                "add",
                POD_SUBNET6,
                "via",
                &NODE_IP6.to_string(),
            ])?;
        }
        let agent = match imp {
            Impl::Ours => {
                let a = Agent::start_with(
                    &env.bin_dir,
                    &node,
                    &tmp.path().join("agent"),
                    &[UPLINK],
                    &["--hostport-mode", &env.hostport_mode],
                )?;
                a.wait_for_uplink(&NODE_IP.to_string())?;
                a.wait_for_uplink_v6(&NODE_IP6.to_string())?;
                Some(a)
            }
            _ => None,
        };
        let list = Conflist::new(conflist(env, imp, tmp.path(), agent.as_ref()))?;
        let cni_path = match imp {
            Impl::Ours => vec![env.bin_dir.clone(), PathBuf::from(REFERENCE_DIR)],
            _ => vec![PathBuf::from(REFERENCE_DIR)],
        };
        let rt = cni::runtime(node.path(), cni_path)?;
        Ok(Session {
            imp,
            pods: Vec::new(),
            agent,
            rt,
            list,
            ext,
            node,
            tmp,
            tag: tag.to_string(),
        })
    }

    pub fn ext_path(&self) -> PathBuf {
        self.ext.path().to_path_buf()
    }

    /// ADD one pod through the conflist, timed.
    pub fn add(&mut self, spec: &PodSpec) -> Result<Call> {
        let id = format!(
            "bench-{}-{}-{}-{}",
            self.imp.key(),
            std::process::id(),
            self.tag,
            spec.name
        );
        let mut att = Attachment::pod(&id, &spec.netns, &spec.name);
        if !spec.mappings.is_empty() {
            let pm: Vec<Value> = spec
                .mappings
                .iter()
                .map(|(h, c)| json!({ "hostPort": h, "containerPort": c, "protocol": "tcp" }))
                .collect();
            att.capability_args
                .insert("portMappings".into(), Value::Array(pm));
        }
        if let Some((rate, burst)) = spec.bandwidth {
            att.capability_args.insert(
                "bandwidth".into(),
                json!({ "ingressRate": rate, "ingressBurst": burst, "egressRate": rate, "egressBurst": burst }),
            );
        }
        if spec.fw_rules > 0 {
            let rules: Vec<Value> = (0..spec.fw_rules)
                .map(|r| {
                    let (cidr, lo, hi) = fw_rule(r);
                    json!({ "action": "deny", "protocol": "tcp", "cidr": cidr, "ports": format!("{lo}-{hi}") })
                })
                .collect();
            att.capability_args.insert(
                "firewallRules".into(),
                json!({ "egress": { "rules": rules } }),
            );
        }
        let cpu0 = cost::children_cpu_ms();
        let t = Instant::now();
        let (res, plugin_ms) = self
            .rt
            .add_list_timed(&self.list.raw, &att)
            .with_context(|| format!("{} ADD of {}", self.imp.key(), spec.name))?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let cpu_ms = cost::children_cpu_ms() - cpu0;
        let ips = cni::result_ips(&res);
        let ip = ips.iter().find_map(|s| s.parse::<Ipv4Addr>().ok());
        let ip6 = ips.iter().find_map(|s| s.parse::<Ipv6Addr>().ok());
        self.pods.push(Pod {
            name: spec.name.clone(),
            netns: spec.netns.clone(),
            att,
            result: Some(res),
            ip,
            ip6,
        });
        Ok(Call {
            ms,
            cpu_ms,
            plugin_ms,
        })
    }

    /// DEL the pod at `idx` (with its cached result), timed.
    pub fn del(&mut self, idx: usize) -> Result<Call> {
        let pod = self.pods.get_mut(idx).context("no such pod")?;
        let cpu0 = cost::children_cpu_ms();
        let t = Instant::now();
        let plugin_ms = self
            .rt
            .del_list_timed(&self.list.raw, &pod.att, pod.result.as_ref())
            .with_context(|| format!("{} DEL of {}", self.imp.key(), pod.name))?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let cpu_ms = cost::children_cpu_ms() - cpu0;
        pod.result = None;
        Ok(Call {
            ms,
            cpu_ms,
            plugin_ms,
        })
    }

    pub fn pod(&self, name: &str) -> Result<&Pod> {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("{}: no pod {name}", self.imp.key()))
    }

    pub fn pod_ip(&self, name: &str) -> Result<Ipv4Addr> {
        self.pod(name)?
            .ip
            .with_context(|| format!("{}: pod {name} got no IPv4 address", self.imp.key()))
    }

    pub fn pod_ip6(&self, name: &str) -> Result<Ipv6Addr> {
        self.pod(name)?
            .ip6
            .with_context(|| format!("{}: pod {name} got no IPv6 address", self.imp.key()))
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Agent::pid)
    }

    pub fn agent_cpu_ms(&self) -> f64 {
        self.agent_pid()
            .map(cost::process_cpu_ms)
            .unwrap_or(f64::NAN)
    }

    /// The agent's datapath counters (`cni-agent status --json`).
    pub fn agent_stats(&self) -> BTreeMap<String, u64> {
        let Some(a) = &self.agent else {
            return BTreeMap::new();
        };
        a.status_json()
            .ok()
            .and_then(|v| v["stats"].as_object().cloned())
            .map(|m| {
                m.into_iter()
                    .filter_map(|(k, v)| v.as_u64().map(|v| (k, v)))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn bpffs_root(&self) -> Option<&Path> {
        self.agent.as_ref().map(Agent::bpffs_root)
    }

    /// After every pod's DEL: no IP reserved, no pod veth or ifb left.
    pub fn check_clean(&self) -> Result<()> {
        let store = self.tmp.path().join("ipam").join(self.list.name());
        let held = cni::ipam_reservations(&store)?.len();
        ensure!(
            held == 0,
            "{}: {held} IPs still reserved after DEL of every pod",
            self.imp.key()
        );
        let veths = self.node.try_ip(&["-o", "link", "show", "type", "veth"])?;
        let left = veths
            .lines()
            .filter(|l| !l.contains(&format!(": {UPLINK}@")))
            .count();
        ensure!(
            left == 0,
            "{}: {left} pod veths left in the node netns after DEL",
            self.imp.key()
        );
        Ok(())
    }

    /// The conflist as the runtime reads it (written next to the report).
    pub fn conflist_json(&self) -> &Value {
        &self.list.raw
    }

    /// Reference node: puts `n` rules (`fw_rule`) for traffic from
    /// `src` into the firewall plugin's admin chain, replacing what it held.
    /// They are the reference's counterpart of our per-attachment rules:
    /// every forwarded packet of every pod walks that chain.
    pub fn load_admin_rules(&self, src: Ipv4Addr, n: usize) -> Result<()> {
        let mut script = format!("*filter\n-F {REFERENCE_ADMIN_CHAIN}\n");
        for r in 0..n {
            let (cidr, lo, hi) = fw_rule(r);
            script.push_str(&format!(
                "-A {REFERENCE_ADMIN_CHAIN} -s {src}/32 -d {cidr} -p tcp -m tcp --dport {lo}:{hi} -j DROP\n"
            ));
        }
        script.push_str("COMMIT\n");
        self.node
            .feed("iptables-restore", &["--noflush"], &script)
            .with_context(|| format!("loading {n} rules into {REFERENCE_ADMIN_CHAIN}"))?;
        let held = self.admin_rules()?;
        ensure!(
            held == n,
            "{REFERENCE_ADMIN_CHAIN} holds {held} rules after loading {n}"
        );
        Ok(())
    }

    /// Rules in the reference's admin chain.
    pub fn admin_rules(&self) -> Result<usize> {
        let out = self
            .node
            .exec("iptables")
            .args(["-w", "-S", REFERENCE_ADMIN_CHAIN])
            .output()
            .context("running iptables -S")?;
        ensure!(
            out.status.success(),
            "iptables -S {REFERENCE_ADMIN_CHAIN}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("-A "))
            .count())
    }

    /// Waits for the agent's NAT table to drain below `max` bindings
    /// (connections of a previous measurement closing), at most `wait`.
    pub fn wait_nat_below(&self, max: u64, wait: Duration) {
        let Some(a) = &self.agent else { return };
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            let n = a
                .status_json()
                .ok()
                .and_then(|v| v["nat"]["originalHalves"].as_u64())
                .unwrap_or(0);
            if n < max {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// The conflist of one session. Ours and the reference's differ only in
/// the `type` names, plus our plugins' private path keys (agentSocket,
/// stateDir, bpffsRoot) pointing at this run's agent instead of the
/// node-wide defaults.
fn conflist(env: &Env, imp: Impl, tmp: &Path, agent: Option<&Agent>) -> Value {
    let ours = imp == Impl::Ours;
    let ty = |o: &'static str, r: &'static str| if ours { o } else { r };
    let keys: Map<String, Value> = agent.map(Agent::conf_keys).unwrap_or_default();
    let with_keys = |mut v: Value| {
        if let Some(o) = v.as_object_mut() {
            o.extend(keys.clone());
        }
        v
    };
    let mut plugins = vec![with_keys(json!({
        "type": ty("ebpf-bridge", "bridge"),
        "bridge": BRIDGE,
        "isGateway": true,
        "isDefaultGateway": true,
        "ipMasq": imp != Impl::Routed,
        "ipam": {
            "type": ty("ebpf-host-local", "host-local"),
            "ranges": [[{ "subnet": POD_SUBNET }], [{ "subnet": POD_SUBNET6 }]],
            "dataDir": tmp.join("ipam"),
        }
    }))];
    if imp != Impl::Routed {
        for e in &env.extras {
            plugins.push(with_keys(e.conf(ty(e.ours(), e.reference()))));
        }
    }
    json!({ "cniVersion": CNI_VERSION, "name": "bench", "plugins": plugins })
}
