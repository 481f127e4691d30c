//! This cloudlet as a client of a peer cloudlet (the peer protocol, `forage_proto::peer`):
//! a TLS connection with the credentials paired at the peer's very address, PeerHello and
//! PeerWelcome. Handoffs and base transfers start here.

use std::net::SocketAddr;
use std::time::Duration;

use forage_datadir::DataDir;
use forage_proto::asynchronous::{read, write};
use forage_proto::{ErrorCode, PeerMessage, ProtoError, VERSION_MAX, VERSION_MIN};
use tokio::io::AsyncRead;

/// How long a peer may stay silent at a step.
pub const PEER_WAIT: Duration = Duration::from_secs(60);

/// Why a peer cloudlet could not be talked to.
#[derive(Debug, thiserror::Error)]
pub enum PeerLinkError {
    #[error("this cloudlet is not paired with cloudlet {to} as a cloudlet (`forage pair --as-cloudlet` there, `forage pair import` here)")]
    NotPaired {
        to: SocketAddr,
        #[source]
        source: forage_trust::TrustError,
    },
    #[error("cloudlet {to} did not answer in {wait:?}")]
    NoAnswer { to: SocketAddr, wait: Duration },
    #[error("connecting to cloudlet {to}")]
    Connect {
        to: SocketAddr,
        #[source]
        source: forage_client::ClientError,
    },
    #[error("the connection to cloudlet {to}")]
    Wire {
        to: SocketAddr,
        #[source]
        source: ProtoError,
    },
    #[error("cloudlet {to} refused: {message}")]
    Refused { to: SocketAddr, code: ErrorCode, message: String },
    #[error("cloudlet {to} sent {got} where {expected} was due")]
    Unexpected { to: SocketAddr, expected: &'static str, got: &'static str },
}

/// Connect to the peer cloudlet at `to` as cloudlet `me`, with the pairing recorded with
/// exactly that address: the address may come from a device (Follow), an announcement or
/// the cluster, and must not borrow another cloudlet's credentials.
pub async fn connect(data: &DataDir, me: &str, to: SocketAddr) -> Result<forage_client::CloudletStream, PeerLinkError> {
    let credentials = forage_trust::DeviceTrust::new(&data.trust_peers())
        .credentials_at(to)
        .map_err(|source| PeerLinkError::NotPaired { to, source })?;
    let mut stream = tokio::time::timeout(PEER_WAIT, forage_client::connect(to, &credentials, None))
        .await
        .map_err(|_| PeerLinkError::NoAnswer { to, wait: PEER_WAIT })?
        .map_err(|source| PeerLinkError::Connect { to, source })?;
    write(&mut stream, &PeerMessage::PeerHello { versions: (VERSION_MIN, VERSION_MAX), cloudlet: me.to_string() })
        .await
        .map_err(|source| PeerLinkError::Wire { to, source })?;
    match next(&mut stream, to).await? {
        PeerMessage::PeerWelcome { .. } => Ok(stream),
        other => Err(PeerLinkError::Unexpected { to, expected: "PeerWelcome", got: other.name() }),
    }
}

/// The peer's next message within [`PEER_WAIT`]; its Error as [`PeerLinkError::Refused`].
pub async fn next(stream: &mut (impl AsyncRead + Unpin), to: SocketAddr) -> Result<PeerMessage, PeerLinkError> {
    next_within(stream, to, PEER_WAIT).await
}

/// [`next`] within `wait`.
pub async fn next_within(
    stream: &mut (impl AsyncRead + Unpin),
    to: SocketAddr,
    wait: Duration,
) -> Result<PeerMessage, PeerLinkError> {
    match tokio::time::timeout(wait, read::<PeerMessage>(stream)).await {
        Err(_) => Err(PeerLinkError::NoAnswer { to, wait }),
        Ok(Err(source)) => Err(PeerLinkError::Wire { to, source }),
        Ok(Ok(PeerMessage::Error { code, message })) => Err(PeerLinkError::Refused { to, code, message }),
        Ok(Ok(m)) => Ok(m),
    }
}
