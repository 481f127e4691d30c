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
}

impl SessionError {
    /// What the peer is told.
    pub fn code_and_message(&self) -> (ErrorCode, String) {
        match self {
            SessionError::Refused { code, message } => (*code, message.clone()),
            SessionError::Timeout(_) => (ErrorCode::Timeout, self.to_string()),
            other => (ErrorCode::Protocol, other.to_string()),
        }
    }
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
