//! What a device (or a cloudlet acting as one, for handoff) keeps of its pairings:
//! `DATA/trust/peers/NAME/` with `peer.json`, the cloudlet's CA (`ca.pem`), and its own
//! key and certificate (`key.pem`, `cert.pem`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::pairing::Bundle;
use crate::{fingerprint, now_unix, pem_cert, private_key, provider, read_key, read_pem_cert, write_file, TrustError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    /// The cloudlet's name (its CA's common name says the same).
    pub cloudlet: String,
    /// Where it was reached when paired.
    #[serde(default)]
    pub addr: Option<String>,
    pub ca_fingerprint: String,
    pub not_after_unix: u64,
    pub paired_unix: u64,
}

/// One pairing: the cloudlet's CA and this side's credentials for it.
pub struct Peer {
    pub record: PeerRecord,
    dir: PathBuf,
}

impl Peer {
    /// TLS 1.3 client configuration: the cloudlet must present a certificate of its CA;
    /// this side presents its own.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, TrustError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(read_pem_cert(&self.dir.join("ca.pem"))?)?;
        let cert = read_pem_cert(&self.dir.join("cert.pem"))?;
        let key = read_key(&self.dir.join("key.pem"))?;
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![cert], private_key(&key))?;
        Ok(Arc::new(config))
    }

    pub fn expired(&self) -> bool {
        self.record.not_after_unix <= now_unix()
    }
}

/// `YYYY-MM-DD HH:MM UTC`, for messages about credentials.
pub fn date(unix: u64) -> String {
    let t = crate::offset(unix);
    format!("{:04}-{:02}-{:02} {:02}:{:02} UTC", t.year(), t.month() as u8, t.day(), t.hour(), t.minute())
}

/// A device's pairings: `DATA/trust/peers/`.
pub struct DeviceTrust {
    dir: PathBuf,
}

impl DeviceTrust {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf() }
    }

    /// TLS credentials for the cloudlet at `addr` (or named `name`), refused once expired.
    pub fn credentials(&self, addr: SocketAddr, name: Option<&str>) -> Result<Arc<rustls::ClientConfig>, TrustError> {
        Self::usable(self.for_cloudlet(addr, name)?)
    }

    /// TLS credentials only for a pairing recorded with exactly `addr` (no fallback to the
    /// only pairing): for connections whose address came from someone else (a device
    /// asking its instance to follow it, an announcement).
    pub fn credentials_at(&self, addr: SocketAddr) -> Result<Arc<rustls::ClientConfig>, TrustError> {
        let want = addr.to_string();
        let peer = self.peers().into_iter().find(|p| p.record.addr.as_deref() == Some(&want)).ok_or_else(|| {
            TrustError::NotPaired(format!(
                "no pairing recorded with the address {addr} (`forage pair ... --addr {addr}`)"
            ))
        })?;
        Self::usable(peer)
    }

    fn usable(peer: Peer) -> Result<Arc<rustls::ClientConfig>, TrustError> {
        if peer.expired() {
            return Err(TrustError::NotPaired(format!(
                "the pairing with cloudlet {} expired on {}: pair again",
                peer.record.cloudlet,
                date(peer.record.not_after_unix)
            )));
        }
        peer.client_config()
    }

    pub fn peers(&self) -> Vec<Peer> {
        let mut out: Vec<Peer> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let record: PeerRecord =
                    serde_json::from_slice(&std::fs::read(e.path().join("peer.json")).ok()?).ok()?;
                Some(Peer { record, dir: e.path() })
            })
            .collect();
        out.sort_by(|a, b| a.record.cloudlet.cmp(&b.record.cloudlet));
        out
    }

    /// The pairing to use for the cloudlet at `addr` (or named `name`): the one recorded
    /// with that address or name, else the only one there is.
    pub fn for_cloudlet(&self, addr: SocketAddr, name: Option<&str>) -> Result<Peer, TrustError> {
        let mut peers = self.peers();
        let pick = peers
            .iter()
            .position(|p| {
                p.record.addr.as_deref() == Some(&addr.to_string()) || name.is_some_and(|n| p.record.cloudlet == n)
            })
            .or((peers.len() == 1).then_some(0));
        match pick {
            Some(i) => Ok(peers.swap_remove(i)),
            None => Err(TrustError::NotPaired(format!(
                "not paired with the cloudlet at {addr}{}: run `forage pair --cloudlet {addr} --code CODE` with the code `forage pair` shows on it, or import a bundle",
                if peers.is_empty() { String::new() } else { format!(" (paired with {})", peers.iter().map(|p| p.record.cloudlet.as_str()).collect::<Vec<_>>().join(", ")) }
            ))),
        }
    }

    /// Keep a pairing (replacing an earlier one with the same cloudlet).
    pub fn save(
        &self,
        cloudlet: &str,
        addr: Option<String>,
        ca: &[u8],
        cert: &[u8],
        key_pem: &str,
        not_after_unix: u64,
    ) -> Result<PeerRecord, TrustError> {
        if !cloudlet.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            || cloudlet.is_empty()
            || cloudlet.starts_with('.')
        {
            return Err(TrustError::Code(format!("cloudlet name {cloudlet:?} is not a plain name")));
        }
        let dir = self.dir.join(cloudlet);
        write_file(&dir.join("ca.pem"), pem_cert(ca).as_bytes(), false)?;
        write_file(&dir.join("cert.pem"), pem_cert(cert).as_bytes(), false)?;
        write_file(&dir.join("key.pem"), key_pem.as_bytes(), true)?;
        let record = PeerRecord {
            cloudlet: cloudlet.to_string(),
            addr,
            ca_fingerprint: fingerprint(ca),
            not_after_unix,
            paired_unix: now_unix(),
        };
        write_file(&dir.join("peer.json"), &serde_json::to_vec_pretty(&record).expect("serializes"), false)?;
        Ok(record)
    }

    /// Keep the credentials of a bundle.
    pub fn import_bundle(&self, bytes: &[u8]) -> Result<PeerRecord, TrustError> {
        let b = Bundle::parse(bytes)?;
        let der = |pem_text: &str, what: &str| -> Result<Vec<u8>, TrustError> {
            Ok(pem::parse(pem_text)
                .map_err(|e| TrustError::Code(format!("pairing bundle: {what}: {e}")))?
                .into_contents())
        };
        let (ca, cert) = (der(&b.ca_pem, "ca_pem")?, der(&b.cert_pem, "cert_pem")?);
        rcgen::KeyPair::from_pem(&b.key_pem).map_err(|e| TrustError::Code(format!("pairing bundle: key_pem: {e}")))?;
        self.save(&b.cloudlet, b.addr.clone(), &ca, &cert, &b.key_pem, b.not_after_unix)
    }

    pub fn remove(&self, cloudlet: &str) -> Result<(), TrustError> {
        let dir = self.dir.join(cloudlet);
        if !dir.join("peer.json").exists() {
            return Err(TrustError::NoCredential(cloudlet.to_string()));
        }
        std::fs::remove_dir_all(&dir).map_err(crate::io(&dir))
    }
}
