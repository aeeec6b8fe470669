//! The node agent (`cni-agent run`), its admin CLI (`status`, `nat`,
//! `records`), which talk to a running agent over its socket, and
//! `install`/`uninstall`, which put the plugins and a conflist in place.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use cni_agent::{
    agent::{
        api::{Request, DEFAULT_BPFFS_ROOT, DEFAULT_SOCKET, DEFAULT_STATE_DIR},
        client,
        daemon::{self, AgentConfig},
        ops::Paths,
    },
    datapath::{conntrack::Timeouts, pins::MapSizes, uplink::HostPortMode},
    install::{
        self, conflist::NetworkOptions, CidrSource, InstallOptions, DEFAULT_BIN_DIR,
        DEFAULT_BRIDGE, DEFAULT_CONF_DIR, DEFAULT_CONF_NAME, DEFAULT_NETWORK,
    },
};

#[derive(Parser)]
#[command(
    name = "cni-agent",
    version,
    about = "Node agent of the eBPF CNI datapath"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct SocketArg {
    /// Unix socket of the agent.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load the datapath (reusing pinned maps and links) and serve the plugins.
    Run {
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        #[arg(long, default_value = DEFAULT_BPFFS_ROOT)]
        bpffs_root: PathBuf,
        /// Uplink interface (repeatable). Default: the default-route interfaces.
        #[arg(long = "uplink")]
        uplinks: Vec<String>,
        /// Source ports for masquerade, MIN-MAX.
        #[arg(long, default_value = "61000-65535", value_parser = parse_range)]
        nat_ports: (u16, u16),
        /// Entries in each connection-tracking map (NAT halves, hostPort
        /// flows, firewall connections). Default: 262144, or the size of
        /// the pinned maps; a pinned map of another size is refused.
        #[arg(long)]
        conntrack_size: Option<u32>,
        /// Seconds a closed (FIN both ways, or RST) TCP binding is kept.
        #[arg(long, default_value_t = 10)]
        tcp_closed_timeout: u64,
        /// Seconds an idle established TCP binding is kept.
        #[arg(long, default_value_t = 3600)]
        tcp_established_timeout: u64,
        /// Seconds an idle UDP binding is kept.
        #[arg(long, default_value_t = 60)]
        udp_timeout: u64,
        /// Where hostPort DNAT runs on the uplinks.
        #[arg(long, value_enum, default_value = "tc")]
        hostport_mode: HostPortMode,
        /// cgroup v2 directory whose processes reach hostPorts on the node's
        /// addresses and 127.0.0.1 (socket hooks). Default: the cgroup v2
        /// root (mounted privately under the state dir if none is). Only
        /// sockets of the agent's network namespace are rewritten.
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// Address of the HTTP endpoint serving /metrics (Prometheus),
        /// /healthz and /readyz; `none` disables it.
        #[arg(long, default_value = "127.0.0.1:9964", value_parser = parse_metrics_address)]
        metrics_address: MetricsAddress,
    },
    /// Copy the plugins into the CNI bin dir and write the conflist
    /// (atomically; a re-run with the same input changes nothing).
    Install(InstallArgs),
    /// Remove what `install` wrote (as listed in its manifest in the state
    /// dir), where it is still what install wrote.
    Uninstall {
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Agent health, uplinks and map occupancy.
    Status(SocketArg),
    /// The NAT bindings (conntrack table).
    Nat(SocketArg),
    /// The per-attachment records.
    Records(SocketArg),
    /// ebpf-firewall: per-attachment counters and rule hits (allowed/dropped).
    Firewall(SocketArg),
}

#[derive(Args)]
struct InstallArgs {
    /// Directory holding the plugin binaries. Default: the directory of
    /// this cni-agent binary.
    #[arg(long)]
    from: Option<PathBuf>,
    /// Where the runtime looks for plugins.
    #[arg(long, default_value = DEFAULT_BIN_DIR)]
    bin_dir: PathBuf,
    /// Where the runtime looks for network configs.
    #[arg(long, default_value = DEFAULT_CONF_DIR)]
    conf_dir: PathBuf,
    /// File name of the conflist (it must sort before other configs).
    #[arg(long, default_value = DEFAULT_CONF_NAME)]
    conf_name: String,
    /// A pod CIDR of this node (repeatable, or comma-separated: one per
    /// address family). When absent, read from the Node object
    /// (spec.podCIDRs) in a cluster.
    #[arg(long = "pod-cidr")]
    pod_cidrs: Vec<String>,
    /// The Kubernetes node to read pod CIDRs from. Default: $NODE_NAME.
    #[arg(long)]
    node_name: Option<String>,
    /// Seconds to wait for the API server and the node's pod CIDR.
    #[arg(long, default_value_t = 60)]
    wait: u64,
    /// The conflist's network name.
    #[arg(long, default_value = DEFAULT_NETWORK)]
    network: String,
    /// The pods' bridge.
    #[arg(long, default_value = DEFAULT_BRIDGE)]
    bridge: String,
    /// MTU of the bridge and the pods' veths (default: the bridge plugin's).
    #[arg(long)]
    mtu: Option<u32>,
    /// host-local's dataDir (IP reservations). Default: host-local's own,
    /// /var/lib/cni/networks.
    #[arg(long)]
    ipam_data_dir: Option<PathBuf>,
    /// The agent's socket, written into the conflist when not the default.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// The agent's state dir (also where the install manifest is kept),
    /// written into the conflist when not the default.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// The agent's bpffs root, written into the conflist when not the default.
    #[arg(long, default_value = DEFAULT_BPFFS_ROOT)]
    bpffs_root: PathBuf,
    /// Set aside (rename to *.cni-ebpf-saved) other networks' configs that
    /// would be used instead of ours; uninstall puts them back.
    #[arg(long)]
    force: bool,
}

/// One line, whatever the error's sources printed.
fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn print_report(verb: &str, r: &install::Report) {
    if !r.cidrs.is_empty() {
        println!("pod CIDRs: {}", r.cidrs.join(", "));
    }
    for (path, outcome) in &r.lines {
        println!("{:<10} {}", outcome.to_string(), path.display());
    }
    if r.lines.is_empty() {
        println!("{verb}: nothing to do");
    } else if r.unchanged() {
        println!("{verb}: unchanged");
    }
}

fn install_cmd(a: InstallArgs) -> ExitCode {
    let from = match a.from {
        Some(d) => d,
        None => match std::env::current_exe() {
            Ok(exe) => exe.parent().map(PathBuf::from).unwrap_or_default(),
            Err(e) => {
                eprintln!("cni-agent install: cannot find my own directory ({e}): pass --from");
                return ExitCode::FAILURE;
            }
        },
    };
    let node = a
        .node_name
        .or_else(|| std::env::var("NODE_NAME").ok())
        .filter(|n| !n.is_empty());
    let cidrs = match (a.pod_cidrs.is_empty(), node) {
        (false, _) => CidrSource::Flags(a.pod_cidrs),
        (true, Some(name)) => CidrSource::Node {
            name,
            wait: Duration::from_secs(a.wait),
        },
        (true, None) => CidrSource::None,
    };
    let opts = InstallOptions {
        from,
        bin_dir: a.bin_dir,
        conf_dir: a.conf_dir,
        conf_name: a.conf_name,
        cidrs,
        network: NetworkOptions {
            network: a.network,
            bridge: a.bridge,
            mtu: a.mtu,
            ipam_data_dir: a.ipam_data_dir,
            socket: a.socket,
            paths: Paths {
                state_dir: a.state_dir,
                bpffs_root: a.bpffs_root,
            },
        },
        force: a.force,
    };
    match install::install(&opts) {
        Ok(r) => {
            print_report("install", &r);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cni-agent install: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// `--metrics-address`: an address, or none.
#[derive(Clone, Copy, Debug)]
struct MetricsAddress(Option<std::net::SocketAddr>);

fn parse_metrics_address(s: &str) -> Result<MetricsAddress, String> {
    if s == "none" {
        return Ok(MetricsAddress(None));
    }
    s.parse()
        .map(|a| MetricsAddress(Some(a)))
        .map_err(|e| format!("{s}: {e} (expected ADDRESS:PORT or none)"))
}

fn parse_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('-').ok_or("expected MIN-MAX")?;
    let a: u16 = a.parse().map_err(|e| format!("{a}: {e}"))?;
    let b: u16 = b.parse().map_err(|e| format!("{b}: {e}"))?;
    if a == 0 || a > b {
        return Err(format!("{s}: need 1 <= MIN <= MAX"));
    }
    Ok((a, b))
}

fn query(s: &SocketArg, req: Request) -> ExitCode {
    match client::call(&s.socket, &req) {
        Ok(data) => {
            if s.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&data).unwrap_or_default()
                );
            } else {
                print_text(&req, &data);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cni-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_text(req: &Request, data: &serde_json::Value) {
    match req {
        Request::Nat => {
            println!(
                "{:<5} {:<22} {:<22} {:<22} {:<16} {:>8}",
                "PROTO", "POD", "REMOTE", "NAT", "STATE", "IDLE_MS"
            );
            for b in data.as_array().into_iter().flatten() {
                println!(
                    "{:<5} {:<22} {:<22} {:<22} {:<16} {:>8}",
                    b["proto"].as_str().unwrap_or(""),
                    b["pod"].as_str().unwrap_or(""),
                    b["remote"].as_str().unwrap_or(""),
                    b["nat"].as_str().unwrap_or(""),
                    b["state"].as_str().unwrap_or(""),
                    b["idle_ms"],
                );
            }
        }
        Request::Records => {
            for r in data.as_array().into_iter().flatten() {
                println!(
                    "{}/{}/{}:",
                    r["network"].as_str().unwrap_or(""),
                    r["containerID"].as_str().unwrap_or(""),
                    r["ifname"].as_str().unwrap_or("")
                );
                for e in r["entries"].as_array().into_iter().flatten() {
                    println!("  {e}");
                }
            }
        }
        _ => {
            println!("agent: running");
            for u in data["uplinks"].as_array().into_iter().flatten() {
                println!(
                    "uplink: ifindex {} address {} address6 {}",
                    u["ifindex"],
                    u["address"].as_str().unwrap_or("-"),
                    u["addressV6"].as_str().unwrap_or("-")
                );
            }
            println!(
                "nat bindings: {} (reply halves {})",
                data["nat"]["originalHalves"], data["nat"]["replyHalves"]
            );
            println!("masquerade sources: {}", data["masqSources"]);
            println!("hostPort mappings: {}", data["hostPorts"]);
            println!("attachment records: {}", data["records"]);
            for (k, v) in data["stats"].as_object().into_iter().flatten() {
                println!("counter {k}: {v}");
            }
        }
    }
}

/// `cni-agent firewall`: the firewall section of the agent's status.
fn firewall(s: &SocketArg) -> ExitCode {
    let data = match client::call(&s.socket, &Request::Status) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cni-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    let fw = &data["firewall"];
    if s.json {
        println!("{}", serde_json::to_string_pretty(fw).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    println!("tracked connections: {}", fw["trackedConnections"]);
    for a in fw["attachments"].as_array().into_iter().flatten() {
        println!(
            "{}: veth {} (ifindex {}) bridge {} ingressPolicy {} bypass {} connections {}",
            a["attachment"].as_str().unwrap_or(""),
            a["ifname"].as_str().unwrap_or(""),
            a["ifindex"],
            a["bridge"].as_str().unwrap_or(""),
            a["ingressPolicy"].as_str().unwrap_or(""),
            a["bypass"],
            a["connections"],
        );
        let counters: Vec<String> = a["counters"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("  {}", counters.join(" "));
        for dir in ["ingress", "egress"] {
            let d = &a[dir];
            println!(
                "  {dir}: default {} ({} hits)",
                d["default"].as_str().unwrap_or(""),
                d["defaultHits"]
            );
            for r in d["rules"].as_array().into_iter().flatten() {
                println!(
                    "    [{}] {}: {} hits ({} allowed, {} dropped)",
                    r["index"],
                    r["rule"].as_str().unwrap_or(""),
                    r["hits"],
                    r["allowed"],
                    r["dropped"]
                );
            }
        }
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match Cli::parse().cmd {
        Cmd::Run {
            socket,
            state_dir,
            bpffs_root,
            uplinks,
            nat_ports,
            conntrack_size,
            tcp_closed_timeout,
            tcp_established_timeout,
            udp_timeout,
            hostport_mode,
            cgroup,
            metrics_address,
        } => {
            let cfg = AgentConfig {
                socket,
                paths: Paths {
                    state_dir,
                    bpffs_root,
                },
                uplinks,
                nat_ports,
                sizes: MapSizes {
                    conntrack: conntrack_size,
                    ..MapSizes::default()
                },
                timeouts: Timeouts {
                    tcp_closed: Duration::from_secs(tcp_closed_timeout),
                    tcp_established: Duration::from_secs(tcp_established_timeout),
                    udp: Duration::from_secs(udp_timeout),
                    ..Timeouts::default()
                },
                hostport_mode,
                cgroup,
                interval: Duration::from_secs(1),
                metrics: metrics_address.0,
            };
            match daemon::run(cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    log::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Install(a) => install_cmd(a),
        Cmd::Uninstall { state_dir } => match install::uninstall(&state_dir) {
            Ok(r) => {
                print_report("uninstall", &r);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cni-agent uninstall: {}", one_line(&e));
                ExitCode::FAILURE
            }
        },
        Cmd::Status(s) => query(&s, Request::Status),
        Cmd::Nat(s) => query(&s, Request::Nat),
        Cmd::Records(s) => query(&s, Request::Records),
        Cmd::Firewall(s) => firewall(&s),
    }
}
