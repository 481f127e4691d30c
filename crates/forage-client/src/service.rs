//! Reaching an instance's service from the device: TLS 1.3 to the cloudlet's relay (its
//! certificate must chain to the CA the cloudlet named in Ready or Moved), then the
//! instance's token (`forage_proto::service`), then the service's own bytes.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use forage_proto::ServiceEndpoint;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("the instance has no service endpoint")]
    NoEndpoint,
    #[error("{0:?} is not the address of a service relay")]
    BadAddress(String),
    #[error("{0:?} is not a CA fingerprint")]
    BadFingerprint(String),
    #[error("the relay at {addr} is not the cloudlet's: {detail}")]
    Tls { addr: SocketAddr, detail: String },
    #[error("the service at {addr}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the service at {addr} closed the connection without an answer (a wrong token is refused this way)")]
    NoAnswer { addr: SocketAddr },
}

/// A connection to the service, token presented.
pub type ServiceStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn tls_config(ep: &ServiceEndpoint) -> Result<(SocketAddr, Arc<rustls::ClientConfig>), ServiceError> {
    if ep.addr.is_empty() {
        return Err(ServiceError::NoEndpoint);
    }
    let addr: SocketAddr = ep.addr.parse().map_err(|_| ServiceError::BadAddress(ep.addr.clone()))?;
    let ca = hex::decode(&ep.ca_sha256)
        .ok()
        .filter(|c| c.len() == 32)
        .ok_or_else(|| ServiceError::BadFingerprint(ep.ca_sha256.clone()))?;
    let config =
        forage_trust::pinned_client_config(&ca).map_err(|e| ServiceError::Tls { addr, detail: e.to_string() })?;
    Ok((addr, config))
}

/// Connect to `ep`'s relay and present the token (blocking).
pub fn connect(ep: &ServiceEndpoint, timeout: Duration) -> Result<ServiceStream, ServiceError> {
    let (addr, config) = tls_config(ep)?;
    let io = |source| ServiceError::Io { addr, source };
    let tcp = TcpStream::connect_timeout(&addr, timeout.min(Duration::from_secs(10))).map_err(io)?;
    tcp.set_nodelay(true).ok();
    tcp.set_read_timeout(Some(timeout)).map_err(io)?;
    tcp.set_write_timeout(Some(timeout)).map_err(io)?;
    let name = rustls::pki_types::ServerName::try_from(forage_trust::SERVER_NAME).expect("a valid name");
    let conn =
        rustls::ClientConnection::new(config, name).map_err(|e| ServiceError::Tls { addr, detail: e.to_string() })?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    s.write_all(ep.preamble().as_bytes()).map_err(|e| {
        match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(t) => ServiceError::Tls { addr, detail: t.to_string() },
            None => io(e),
        }
    })?;
    Ok(s)
}

/// Send one request line and read one answer line (blocking): the line protocol of the
/// sample apps and probes.
pub fn request_line(ep: &ServiceEndpoint, line: &str, timeout: Duration) -> Result<String, ServiceError> {
    let mut s = connect(ep, timeout)?;
    let addr = s.sock.peer_addr().unwrap_or_else(|_| ep.addr.parse().expect("checked"));
    s.write_all(format!("{line}\n").as_bytes())
        .and_then(|()| s.flush())
        .map_err(|source| ServiceError::Io { addr, source })?;
    let mut answer = String::new();
    match BufReader::new(s).read_line(&mut answer) {
        Ok(_) if answer.is_empty() => Err(ServiceError::NoAnswer { addr }),
        Ok(_) => Ok(answer.trim_end().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof || e.kind() == std::io::ErrorKind::ConnectionReset => {
            Err(ServiceError::NoAnswer { addr })
        }
        Err(source) => Err(ServiceError::Io { addr, source }),
    }
}
