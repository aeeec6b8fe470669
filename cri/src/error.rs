//! The crate's error type.
use std::path::PathBuf;
use std::time::Duration;

/// What went wrong talking to, starting or cleaning up a runtime.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The gRPC connection to the runtime's socket could not be set up.
    #[error("cannot connect to {}: {source}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    /// The runtime answered a call with an error status.
    #[error("{method} failed: {} ({:?})", status.message(), status.code())]
    Rpc {
        method: &'static str,
        status: tonic::Status,
    },
    /// A call or a wait did not finish in time.
    #[error("{what}: no answer within {after:?}")]
    Timeout { what: String, after: Duration },
    /// A helper command (containerd, ctr, ...) failed.
    #[error("{command} failed ({status}): {output}")]
    Command {
        command: String,
        status: String,
        output: String,
    },
    /// The runtime's answer lacks something a kubelet relies on.
    #[error("unexpected answer from the runtime: {0}")]
    Unexpected(String),
}

impl Error {
    /// An [`Error::Io`] with a description of what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    /// The gRPC status code, if this is a failed call.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Rpc { status, .. } => Some(status.code()),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
