//! What ends a session badly, and the helpers every protocol step uses: the bottom of the
//! crate with `instance`.

use std::time::Duration;

use forage_proto::asynchronous::read;
use forage_proto::{ErrorCode, ProtoError, Protocol};
use tokio::io::AsyncRead;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("peer: {0}")]
    Proto(#[from] ProtoError),
    #[error("peer broke the sequence: expected {expected}, got {got}")]
    Sequence { expected: &'static str, got: &'static str },
    #[error("connection closed before Hello (a reachability probe)")]
    NoHello,
    #[error("peer went silent for {0:?}")]
    Timeout(Duration),
    #[error("{code:?}: {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("serving a package to a peer cloudlet")]
    Serve(#[source] Box<ServeError>),
}

impl From<ServeError> for SessionError {
    fn from(e: ServeError) -> Self {
        SessionError::Serve(Box::new(e))
    }
}

impl SessionError {
    /// What the peer is told.
    pub fn code_and_message(&self) -> (ErrorCode, String) {
        match self {
            SessionError::Refused { code, message } => (*code, message.clone()),
            SessionError::Timeout(_) => (ErrorCode::Timeout, self.to_string()),
            SessionError::Serve(e) if matches!(**e, ServeError::PeerStalled(_)) => (ErrorCode::Timeout, e.to_string()),
            SessionError::Serve(e) => (ErrorCode::Internal, forage_proto::one_line(&**e)),
            other => (ErrorCode::Protocol, other.to_string()),
        }
    }
}

/// What went wrong on the holder's side once the package was found (the peer is told
/// `internal`, or `timeout` when it stopped taking pieces).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("opening base {name}")]
    OpenBase {
        name: String,
        #[source]
        source: Box<forage_synth::SynthError>,
    },
    #[error("opening service {name}")]
    OpenService {
        name: String,
        #[source]
        source: forage_service::ServiceError,
    },
    #[error("exporting {what} {name}")]
    Export {
        what: &'static str,
        name: String,
        #[source]
        source: forage_service::ServiceError,
    },
    #[error("the export of {what} {name} did not finish")]
    ExportTask {
        what: &'static str,
        name: String,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("{}", path.display())]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the peer took nothing for {}s", .0.as_secs())]
    PeerStalled(std::time::Duration),
}

pub(crate) fn refused(code: ErrorCode, message: impl Into<String>) -> SessionError {
    SessionError::Refused { code, message: message.into() }
}

pub(crate) fn internal(e: impl std::fmt::Display) -> SessionError {
    refused(ErrorCode::Internal, e.to_string())
}

/// The next message of protocol `P`, or a timeout after `wait`.
pub(crate) async fn next<P: Protocol>(
    stream: &mut (impl AsyncRead + Unpin),
    wait: Duration,
) -> Result<P, SessionError> {
    match tokio::time::timeout(wait, read::<P>(stream)).await {
        Ok(m) => Ok(m?),
        Err(_) => Err(SessionError::Timeout(wait)),
    }
}
