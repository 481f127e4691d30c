//! What can go wrong talking to a cloudlet.

use std::net::SocketAddr;
use std::path::PathBuf;

use forage_proto::ProtoError;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("overlay {path}: {detail}")]
    Overlay { path: PathBuf, detail: String },
    #[error("cloudlet {addr}: {source}")]
    Proto {
        addr: SocketAddr,
        #[source]
        source: ProtoError,
    },
    #[error("cloudlet {addr} refused: {code:?}: {message}")]
    Refused { addr: SocketAddr, code: forage_proto::ErrorCode, message: String },
    #[error("cloudlet {addr} holds none of the overlay's bases; node {to} of its cluster does")]
    Redirected { addr: SocketAddr, to: SocketAddr },
    #[error("cloudlet {addr} redirected to {to}, a node this device is not paired with")]
    RedirectUnpaired {
        addr: SocketAddr,
        to: SocketAddr,
        #[source]
        source: Box<forage_trust::TrustError>,
    },
    #[error("cloudlet {addr} redirected to {to:?}, not an address")]
    BadRedirect { addr: SocketAddr, to: String },
    #[error("cloudlet {addr} holds none of the overlay's bases (missing {missing:?})")]
    NoBase { addr: SocketAddr, missing: Vec<String> },
    #[error("cloudlet {addr} sent {got} where {expected} was due")]
    Sequence { addr: SocketAddr, expected: &'static str, got: &'static str },
    #[error("cloudlet {addr} closed the session before {what}")]
    Closed { addr: SocketAddr, what: &'static str },
    #[error("cloudlet {addr} refused the secure connection: {detail}")]
    Tls { addr: SocketAddr, detail: String },
    #[error("no credentials for cloudlet {0}: pair with it first (`forage pair`)")]
    NoCredentials(SocketAddr),
    #[error("the service at {endpoint} did not answer: {detail}")]
    Service { endpoint: String, detail: String },
}
