//! The plugins' side of the agent socket: blocking, with timeouts, so a
//! wedged agent fails an ADD with "try again later" instead of hanging the
//! runtime.
use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use super::api::{Request, Response};
use crate::spec::error::{CniError, ErrorCode};

const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cni-agent is not running (cannot connect to {path}: {source})")]
    Unreachable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to cni-agent at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cni-agent at {path} sent a malformed response: {source}")]
    Protocol {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cni-agent: {msg}")]
    Agent { code: u32, msg: String },
}

impl From<ClientError> for CniError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Agent { code, msg } => CniError {
                code,
                msg: format!("cni-agent: {msg}"),
                details: String::new(),
            },
            // The agent being down is transient from the runtime's view.
            ClientError::Unreachable { .. } => {
                CniError::new(ErrorCode::TryAgainLater, e.to_string())
            }
            _ => CniError::new(ErrorCode::Io, e.to_string()),
        }
    }
}

/// Sends one request and returns the `data` of an Ok response.
pub fn call(socket: &Path, req: &Request) -> Result<serde_json::Value, ClientError> {
    let io = |source| ClientError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let stream = UnixStream::connect(socket).map_err(|source| ClientError::Unreachable {
        path: socket.to_path_buf(),
        source,
    })?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    let mut line = serde_json::to_vec(req).map_err(|source| ClientError::Protocol {
        path: socket.to_path_buf(),
        source,
    })?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(io)?;
    let mut reply = String::new();
    let n = BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(|source| {
            // A reset mid-request: the agent died under us.
            if source.kind() == std::io::ErrorKind::ConnectionReset {
                ClientError::Unreachable {
                    path: socket.to_path_buf(),
                    source,
                }
            } else {
                io(source)
            }
        })?;
    if n == 0 {
        // The agent closed without answering (it died, or is stopping):
        // like an unreachable agent, worth a retry.
        return Err(ClientError::Unreachable {
            path: socket.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed without a response",
            ),
        });
    }
    match serde_json::from_str(&reply).map_err(|source| ClientError::Protocol {
        path: socket.to_path_buf(),
        source,
    })? {
        Response::Ok { data } => Ok(data),
        Response::Error { code, msg } => Err(ClientError::Agent { code, msg }),
    }
}
