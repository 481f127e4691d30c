//! forage-cloudlet: the cloudlet. It accepts TLS connections and routes each by who it is
//! and what it says first (`forage_proto`):
//! - no client certificate: pairing, nothing else ([`serve`]);
//! - a paired device: a session of the device protocol ([`session`]): VM synthesis
//!   (`synthesis`: cached, pipelined, early start, residue) or the other four
//!   mechanisms of tactical cloudlets (`provision`) and the app store;
//! - a cloudlet paired as one: the peer protocol ([`peer`]): VM handoff (`handoff`).
//!
//! Every instance, whatever made it, lives in the `instance` layer (the bottom): its
//! QEMU and its shim (view and service relay) outlive a restart of the daemon, which
//! adopts them again when it serves ([`recover`]). Arrows point down only:
//! `lib, session, peer -> synthesis, provision -> handoff, substrate -> instance, cache -> error`.

mod cache;
mod cloudlet;
mod cpu;
mod error;
mod faults;
mod handoff;
pub(crate) mod instance;
mod limits;
pub mod package_transfer;
mod peer;
pub mod peer_link;
mod provision;
mod recover;
mod session;
mod substrate;
mod synthesis;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use forage_proto::{ErrorCode, PairingMessage, PeerMessage, Protocol};
use tokio::net::{TcpListener, TcpStream};

pub use cache::LaunchCache;
pub use cloudlet::{Cloudlet, CloudletError, DeviceStream};
pub use error::{ServeError, SessionError};
pub use handoff::{HandoffError, HandoffFailure, HandoffOptions};
pub use instance::dock_order::DockInstanceError;
pub use limits::{raise_fd_limit, Limits};
pub use peer::peer;
pub use session::session;

/// Adopt what a previous daemon left running, then accept connections until the process
/// ends. Each is a TLS 1.3 handshake (the peer's certificate checked against this
/// cloudlet's CA, validity and CRL) within [`Limits::handshake`], then, by who it is and
/// its first message, pairing, a device session or a peer cloudlet's, on its own task.
/// Connections beyond the limits (in all, per source address) are closed at once; an
/// `accept` error (out of file descriptors, say) is logged and accepting goes on. One
/// session's failure does not affect the others.
pub async fn serve(listener: TcpListener, cloudlet: Arc<Cloudlet>) -> std::io::Result<()> {
    let fds = limits::raise_fd_limit();
    recover::adopt_all(&cloudlet).await;
    let l = cloudlet.limits.clone();
    tracing::debug!(fds, ?l, "accepting devices");
    let connections = limits::Counter::new(l.connections, l.connections_per_source);
    let mut warned = std::time::Instant::now() - Duration::from_secs(60);
    loop {
        let (tcp, peer_addr) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS, ECONNABORTED...: transient; never the end of serving.
                if warned.elapsed() > Duration::from_secs(10) {
                    tracing::warn!("accepting a connection failed (going on): {e}");
                    warned = std::time::Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let slot = match connections.take(limits::source_key(peer_addr.ip())) {
            Ok(s) => s,
            Err(full) => {
                tracing::debug!(%peer_addr, ?full, "connection refused: too many open");
                drop(tcp);
                continue;
            }
        };
        let c = cloudlet.clone();
        tokio::spawn(async move {
            let _slot = slot;
            connection(tcp, peer_addr, &c).await;
        });
    }
}

/// One connection: TLS, then the protocol its peer speaks.
async fn connection(tcp: TcpStream, peer_addr: SocketAddr, c: &Cloudlet) {
    let config = match c.trust.server_config() {
        Ok(cfg) => cfg,
        Err(e) => return tracing::error!("cannot serve TLS: {e}"),
    };
    let handshake = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
    let mut stream = match tokio::time::timeout(c.limits.handshake, handshake).await {
        Err(_) => return tracing::debug!(%peer_addr, "refused: no TLS handshake within {:?}", c.limits.handshake),
        Ok(Ok(s)) => s,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return tracing::debug!(%peer_addr, "connection closed before TLS (a reachability probe)")
        }
        Ok(Err(e)) => return tracing::warn!(%peer_addr, "refused: TLS handshake failed: {e}"),
    };
    let who = stream.get_ref().1.peer_certificates().and_then(|p| p.first()).and_then(forage_trust::peer_identity);
    let Some((name, serial)) = who else {
        match pair(stream, peer_addr, c).await {
            Ok(name) => tracing::info!(%peer_addr, name, "paired"),
            Err(e) => tracing::warn!(%peer_addr, "pairing refused: {e}"),
        }
        return;
    };
    let _session = match c.sessions.take(serial) {
        Ok(s) => s,
        Err(full) => {
            let why = match full {
                limits::Full::All(n) => {
                    format!("cloudlet {} runs its maximum of {n} sessions: try again later", c.name)
                }
                limits::Full::This(n) => format!("{name} already has {n} sessions open on cloudlet {}", c.name),
            };
            tracing::warn!(%peer_addr, name, "session refused: {why}");
            let _ = forage_proto::asynchronous::write(
                &mut stream,
                &forage_proto::DeviceMessage::Error { code: ErrorCode::Busy, message: why },
            )
            .await;
            return;
        }
    };
    // The first frame says which protocol the peer speaks.
    let first = match tokio::time::timeout(c.peer_wait, forage_proto::asynchronous::read_frame(&mut stream)).await {
        Ok(Ok(f)) => f,
        Ok(Err(_)) => return tracing::debug!(%peer_addr, "connection closed before its first message"),
        Err(_) => return tracing::debug!(%peer_addr, "silent after the handshake"),
    };
    let result = match forage_proto::frame::kind_of(&first) {
        Some(k) if PeerMessage::has_kind(k) => match forage_proto::decode::<PeerMessage>(&first) {
            Ok(m) => peer(stream, c, &name, serial, m).await,
            Err(e) => Err(e.into()),
        },
        _ => session::session_from(stream, c, &name, &first).await,
    };
    match result {
        Ok(()) => tracing::info!(%peer_addr, name, serial, "session ended"),
        Err(SessionError::NoHello) => tracing::debug!(%peer_addr, "connection closed before Hello"),
        Err(e) => tracing::warn!(%peer_addr, name, "session failed: {e}"),
    }
}

/// A connection without a client certificate: it may pair (PairRequest with a code's
/// secret), and do nothing else. What the credential grants comes from the code; a source
/// that sent too many wrong codes is refused without its code being looked at.
async fn pair(mut stream: DeviceStream, peer: SocketAddr, cloudlet: &Cloudlet) -> Result<String, PairError> {
    use forage_proto::asynchronous::{read_frame, write};
    let refuse = |code: ErrorCode, message: String| PairingMessage::Error { code, message };
    let first = tokio::time::timeout(cloudlet.peer_wait, read_frame(&mut stream))
        .await
        .map_err(|_| PairError::Silent)?
        .map_err(PairError::Wire)?;
    let Ok(PairingMessage::PairRequest { secret, name, csr }) = forage_proto::decode::<PairingMessage>(&first) else {
        let why = format!(
            "this device is not paired with cloudlet {}: pair first (`forage pair --cloudlet ADDR --code CODE`)",
            cloudlet.name
        );
        let _ = write(&mut stream, &refuse(ErrorCode::Unpaired, why)).await;
        return Err(PairError::Unpaired(forage_proto::frame::kind_of(&first).unwrap_or(0)));
    };
    let granted = cloudlet
        .pairing_guard
        .check(peer.ip())
        .and_then(|()| forage_trust::check_peer_name(&name).map(|_| ()))
        .and_then(|()| cloudlet.trust.redeem(&secret).inspect_err(|_| cloudlet.pairing_guard.failed(peer.ip())))
        .and_then(|grant| cloudlet.trust.issue_for_csr(&csr, &name, grant.kind, grant.valid()));
    match granted {
        Ok((cert, issued)) => {
            let m = PairingMessage::PairGranted {
                cloudlet: cloudlet.name.clone(),
                ca: cloudlet.trust.ca_der().to_vec(),
                cert: cert.to_vec(),
                not_after_unix: issued.not_after_unix,
            };
            write(&mut stream, &m).await.map_err(PairError::Wire)?;
            Ok(format!("{name} ({:?})", issued.kind))
        }
        Err(e) => {
            let _ = write(&mut stream, &refuse(ErrorCode::Pairing, e.to_string())).await;
            Err(PairError::Refused(e))
        }
    }
}

/// Why a pairing connection ended without credentials.
#[derive(Debug, thiserror::Error)]
enum PairError {
    #[error("silent")]
    Silent,
    #[error("the connection")]
    Wire(#[source] forage_proto::ProtoError),
    #[error("message kind {0} without credentials")]
    Unpaired(u8),
    #[error("refused")]
    Refused(#[source] forage_trust::TrustError),
}
