//! A connection to a cloudlet: TLS 1.3, both sides authenticated.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use crate::error::ClientError;

/// A connection to a cloudlet: TLS 1.3, both sides authenticated.
pub type CloudletStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Connect to the cloudlet at `addr` with `credentials`. `send_buffer` shrinks the socket's
/// send buffer (early start: fetched segments must not queue behind much bulk data).
pub async fn connect(
    addr: SocketAddr,
    credentials: &Arc<rustls::ClientConfig>,
    send_buffer: Option<usize>,
) -> Result<CloudletStream, ClientError> {
    let proto = |source| ClientError::Proto { addr, source };
    let tcp = TcpStream::connect(addr).await.map_err(|e| proto(e.into()))?;
    tcp.set_nodelay(true).ok();
    if let Some(b) = send_buffer {
        let _ = socket2::SockRef::from(&tcp).set_send_buffer_size(b);
    }
    let name = rustls::pki_types::ServerName::try_from(forage_trust::SERVER_NAME).expect("a valid name");
    let mut stream = tokio_rustls::TlsConnector::from(credentials.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| ClientError::Tls { addr, detail: tls_detail(&e) })?;
    if send_buffer.is_some() {
        // The TLS layer queues records too (64 KiB by default): keep that queue small as
        // well, so that a fetched segment waits behind little bulk data.
        stream.get_mut().1.set_buffer_limit(Some(16 << 10));
    }
    Ok(stream)
}

/// What a failed handshake means, in the operator's words.
fn tls_detail(e: &std::io::Error) -> String {
    let text = e.to_string();
    let t = text.to_lowercase();
    let hint = if t.contains("expired") {
        ": this device's credentials expired; pair again"
    } else if t.contains("revoked") {
        ": this device's credentials were revoked by the cloudlet"
    } else if t.contains("unknownca")
        || t.contains("unknown issuer")
        || t.contains("unknownissuer")
        || t.contains("badsignature")
        || t.contains("decrypterror")
    {
        ": the credentials do not match (another cloudlet, or not this device's)"
    } else {
        ""
    };
    format!("{text}{hint}")
}
