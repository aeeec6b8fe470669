//! The agent's Unix socket: mode 0600, one JSON request per connection line.
//! Each request runs on a blocking thread (they are file and map syscalls)
//! and is serialised with plugins' own fallbacks by the state lock in `ops`.
use std::{os::unix::fs::PermissionsExt, path::PathBuf};

use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
};

use super::{
    api::{Request, Response},
    daemon::AgentError,
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

pub async fn serve(path: PathBuf, paths: Paths) -> Result<(), AgentError> {
    let listener = bind(&path)?;
    log::info!("listening on {}", path.display());
    let mut term = signal(SignalKind::terminate()).map_err(AgentError::Runtime)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AgentError::Runtime)?;
    loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok((stream, _)) => {
                    let paths = paths.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle(stream, paths).await {
                            log::warn!("client: {e}");
                        }
                    });
                }
                Err(e) => log::warn!("accept: {e}"),
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

async fn handle(stream: UnixStream, paths: Paths) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    BufReader::new(rd).read_line(&mut line).await?;
    let resp = match serde_json::from_str::<Request>(&line) {
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
    };
    let mut out = serde_json::to_vec(&resp).unwrap_or_default();
    out.push(b'\n');
    wr.write_all(&out).await
}

fn ok(data: serde_json::Value) -> Response {
    Response::Ok { data }
}

fn dispatch(paths: &Paths, req: Request) -> Response {
    let res: Result<serde_json::Value, CniError> = match req {
        Request::Add { record } => ops::add(paths, &record.key, &record.entries)
            .map(|()| json!(null))
            .map_err(Into::into),
        Request::Del { key, owner } => ops::del(paths, &key, owner)
            .map(|()| json!(null))
            .map_err(Into::into),
        Request::Check { key, entries } => ops::check(paths, &key, &entries)
            .map(|()| json!(null))
            .map_err(Into::into),
        Request::Gc { network, valid } => ops::gc(paths, &network, &valid)
            .map(|removed| json!({ "removed": removed }))
            .map_err(Into::into),
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
