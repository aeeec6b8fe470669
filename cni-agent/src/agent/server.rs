//! The agent's Unix socket: mode 0600, one JSON request per connection line.
//! Each request runs on a blocking thread (they are file and map syscalls)
//! and is serialised with plugins' own fallbacks by the state lock in `ops`.
use std::{os::unix::fs::PermissionsExt, path::PathBuf, time::Duration};

use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
};

use super::{
    api::{Request, Response},
    daemon::AgentError,
    health::Health,
    ops::{self, Paths},
};
use crate::{
    datapath::{conntrack::NatTable, entries::EntryMaps, uplink::UplinkMap},
    spec::error::CniError,
};

fn bind(path: &PathBuf) -> Result<UnixListener, AgentError> {
    let err = |source| AgentError::Socket {
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    // A socket file left by a previous agent: refuse if someone answers
    // on it, otherwise replace it.
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another agent is serving this socket",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// The largest request line: a record of thousands of entries fits.
const MAX_REQUEST_BYTES: u64 = 4 << 20;
/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn serve(path: PathBuf, paths: Paths, health: Health) -> Result<(), AgentError> {
    let listener = bind(&path)?;
    log::info!("listening on {}", path.display());
    let mut term = signal(SignalKind::terminate()).map_err(AgentError::Runtime)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AgentError::Runtime)?;
    let mut watch = tokio::time::interval(Duration::from_secs(1));
    let outcome = loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok((stream, _)) => {
                    let paths = paths.clone();
                    let health = health.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle(stream, paths, health).await {
                            log::warn!("client: {e}");
                        }
                    });
                }
                Err(e) => log::warn!("accept: {e}"),
            },
            _ = watch.tick() => {
                if health.worker_stopped() {
                    let why = health.problem().unwrap_or_default();
                    log::error!("{why}");
                    break Err(AgentError::WorkerStopped(why));
                }
            }
            _ = term.recv() => break Ok(()),
            _ = int.recv() => break Ok(()),
        }
    };
    let _ = std::fs::remove_file(&path);
    outcome
}

async fn handle(stream: UnixStream, paths: Paths, health: Health) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(rd.take(MAX_REQUEST_BYTES));
    let read = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await;
    let resp = match read {
        Err(_) => Response::Error {
            code: 6,
            msg: format!("no request line within {} s", REQUEST_TIMEOUT.as_secs()),
        },
        Ok(Err(e)) => return Err(e),
        Ok(Ok(n)) if n as u64 >= MAX_REQUEST_BYTES && !line.ends_with('\n') => Response::Error {
            code: 6,
            msg: format!("request larger than {MAX_REQUEST_BYTES} bytes"),
        },
        Ok(Ok(_)) => respond(&line, paths, health).await,
    };
    let mut out = serde_json::to_vec(&resp).unwrap_or_default();
    out.push(b'\n');
    wr.write_all(&out).await
}

async fn respond(line: &str, paths: Paths, health: Health) -> Response {
    match serde_json::from_str::<Request>(line) {
        Ok(Request::Status) if health.problem().is_some() => Response::Error {
            code: 50,
            msg: health.problem().unwrap_or_default(),
        },
        Ok(req) => tokio::task::spawn_blocking(move || dispatch(&paths, req))
            .await
            .unwrap_or_else(|e| Response::Error {
                code: 999,
                msg: format!("agent task failed: {e}"),
            }),
        Err(e) => Response::Error {
            code: 6,
            msg: format!("malformed request: {e}"),
        },
    }
}

fn ok(data: serde_json::Value) -> Response {
    Response::Ok { data }
}

/// The plugin's path keys must name the agent's own directories.
fn same_paths(own: &Paths, asked: Option<&Paths>) -> Result<(), CniError> {
    let Some(asked) = asked else {
        return Ok(());
    };
    for (key, flag, theirs, ours) in [
        ("stateDir", "--state-dir", &asked.state_dir, &own.state_dir),
        (
            "bpffsRoot",
            "--bpffs-root",
            &asked.bpffs_root,
            &own.bpffs_root,
        ),
    ] {
        if theirs != ours {
            return Err(CniError::invalid_config(format!(
                "{key} {} differs from the agent's {flag} {}: set {key} to {} (or leave it out for the default)",
                theirs.display(),
                ours.display(),
                ours.display()
            )));
        }
    }
    Ok(())
}

fn dispatch(paths: &Paths, req: Request) -> Response {
    let res: Result<serde_json::Value, CniError> = match req {
        Request::Add {
            record,
            paths: asked,
        } => same_paths(paths, asked.as_ref())
            .and_then(|()| ops::add(paths, &record.key, &record.entries).map_err(Into::into))
            .map(|()| json!(null)),
        Request::Del { key, owner } => ops::del(paths, &key, owner)
            .map(|()| json!(null))
            .map_err(Into::into),
        Request::Check { key, entries } => ops::check(paths, &key, &entries)
            .map(|()| json!(null))
            .map_err(Into::into),
        Request::Gc { network, valid } => ops::gc(paths, &network, &valid)
            .map(|removed| json!({ "removed": removed }))
            .map_err(Into::into),
        Request::SamePaths { paths: asked } => {
            same_paths(paths, Some(&asked)).map(|()| json!(null))
        }
        Request::Status => status(paths),
        Request::Nat => NatTable::open(&paths.layout())
            .map(|t| json!(t.dump()))
            .map_err(|e| CniError::new(crate::spec::error::ErrorCode::Internal, e.to_string())),
        Request::Records => paths
            .records()
            .list(None)
            .map(|r| json!(r))
            .map_err(|e| CniError::new(crate::spec::error::ErrorCode::Io, e.to_string())),
    };
    match res {
        Ok(data) => ok(data),
        Err(e) => Response::Error {
            code: e.code,
            msg: e.msg,
        },
    }
}

fn status(paths: &Paths) -> Result<serde_json::Value, CniError> {
    let layout = paths.layout();
    let internal = |e: crate::datapath::loader::DatapathError| {
        CniError::new(
            crate::spec::error::ErrorCode::PluginNotAvailable,
            e.to_string(),
        )
    };
    let nat = NatTable::open(&layout).map_err(internal)?;
    let entries = EntryMaps::open(&layout).map_err(internal)?;
    let uplinks = UplinkMap::open(&layout).map_err(internal)?;
    let (orig, reply) = nat.occupancy();
    let records = paths.records().list(None).map(|r| r.len()).unwrap_or(0);
    let stats: serde_json::Map<String, serde_json::Value> =
        crate::datapath::pins::read_stats(&layout)
            .map_err(internal)?
            .into_iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
    Ok(json!({
        "uplinks": uplinks
            .list()
            .into_iter()
            .map(|(i, v4, v6)| json!({"ifindex": i, "address": v4, "addressV6": v6}))
            .collect::<Vec<_>>(),
        "nat": {"originalHalves": orig, "replyHalves": reply},
        "masqSources": entries.masq_len(),
        "hostPorts": entries.hostports_len(),
        "records": records,
        "stats": stats,
        "firewall": crate::datapath::policy::status_section(
            &layout,
            &paths.records().list(None).unwrap_or_default(),
        ),
        "rateLimits": crate::datapath::rate::status_json(&layout),
        "bpffsRoot": paths.bpffs_root,
        "stateDir": paths.state_dir,
    }))
}
