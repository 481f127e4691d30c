//! Pairing from the device: a TLS connection without a certificate, the cloudlet checked
//! against the code's CA fingerprint; PairRequest with the code's secret and a signing
//! request for a new key; PairGranted with the cloudlet's CA and the certificate, kept in
//! the device's pairings (`forage_trust::DeviceTrust`).

use std::net::SocketAddr;

use forage_proto::asynchronous::{read, write};
use forage_proto::PairingMessage as Message;
use forage_trust::{DeviceTrust, PairingCode, PeerRecord};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;

use crate::ClientError;

/// Pair with the cloudlet at `addr` using the code its operator showed; `name` names this
/// device in the cloudlet's records. What the credentials allow (a device's or a
/// cloudlet's) and how long they last was chosen by the operator with the code.
pub async fn pair(addr: SocketAddr, code: &str, name: &str, keep: &DeviceTrust) -> Result<PeerRecord, ClientError> {
    let refused = |message: String| ClientError::Refused { addr, code: forage_proto::ErrorCode::Pairing, message };
    let proto = |source| ClientError::Proto { addr, source };
    let (prefix, secret) = PairingCode::parse(code).map_err(|e| refused(e.to_string()))?;
    let config = forage_trust::pairing_client_config(prefix).map_err(|e| refused(e.to_string()))?;
    let tcp = TcpStream::connect(addr).await.map_err(|e| proto(e.into()))?;
    let server = rustls::pki_types::ServerName::try_from(forage_trust::SERVER_NAME).expect("a valid name");
    let mut stream = tokio_rustls::TlsConnector::from(config)
        .connect(server, tcp)
        .await
        .map_err(|e| ClientError::Tls { addr, detail: e.to_string() })?;
    let (key, csr) = forage_trust::new_csr(name).map_err(|e| refused(e.to_string()))?;
    let req = Message::PairRequest { secret, name: name.into(), csr };
    write(&mut stream, &req).await.map_err(proto)?;
    match read(&mut stream).await.map_err(proto)? {
        Message::PairGranted { cloudlet, ca, cert, not_after_unix } => {
            // The CA sent must be the one the handshake was checked against.
            if Sha256::digest(&ca)[..8] != prefix {
                return Err(refused("the cloudlet granted credentials under another CA than the code names".into()));
            }
            keep.save(&cloudlet, Some(addr.to_string()), &ca, &cert, &key.serialize_pem(), not_after_unix)
                .map_err(|e| refused(e.to_string()))
        }
        Message::Error { code, message } => Err(ClientError::Refused { addr, code, message }),
        other => Err(ClientError::Sequence { addr, expected: "PairGranted", got: other.name() }),
    }
}
