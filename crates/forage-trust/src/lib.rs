//! forage-trust: who may talk to whom.
//!
//! - Every cloudlet is its own small certificate authority ([`CloudletTrust`]): a CA key
//!   and certificate, and a server certificate it signs, kept in `DATA/trust/cloudlet/`.
//! - A device (or another cloudlet, for handoff) gets a client certificate from the CA by
//!   **pairing**, which works offline: a one-time code the cloudlet's operator reads out
//!   ([`PairingCode`]: the CA's fingerprint prefix, so the device can tell it talks to the
//!   right cloudlet, plus a single-use secret, so the cloudlet can tell the device was
//!   given the code), or a bundle file carried over USB. Credentials expire; the cloudlet
//!   can revoke them (a CRL it signs and checks at every handshake).
//! - Every connection is TLS 1.3 with mutual authentication ([`CloudletTrust::server_config`],
//!   [`Peer::client_config`]). A connection without a client certificate may only pair.
//!
//! Files are PEM and JSON; private keys are written with mode 0600. `docs/security.md`
//! has the threat model.

mod code;
mod device;
mod pairing;
pub mod signing;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use code::{Grant, PairingCode, PairingGuard, MAX_FAILURES as MAX_PAIRING_FAILURES};
pub use device::{date, DeviceTrust, Peer, PeerRecord};
pub use pairing::{new_csr, pairing_client_config, pinned_client_config, Bundle};

/// The name in every cloudlet's server certificate; devices connect with it as SNI.
pub const SERVER_NAME: &str = "forage-cloudlet";
/// Default lifetime of credentials given by pairing (tactical cloudlets are short-lived).
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);
/// The longest credentials a cloudlet gives.
pub const MAX_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long a pairing code can be redeemed.
pub const CODE_TTL: Duration = Duration::from_secs(10 * 60);

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {detail}", path.display())]
    Bad { path: PathBuf, detail: String },
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("pairing code refused: {0}")]
    Code(String),
    #[error("no credential named {0} (see `forage pair list`)")]
    NoCredential(String),
    #[error("{0}")]
    NotPaired(String),
    #[error("{name:?} cannot name a device or cloudlet: use 1 to 64 letters, digits, '-', '_' and '.', starting with a letter or digit")]
    BadName { name: String },
    #[error("the name {name} is held by credential serial {serial}, valid until its expiry: revoke it first (`forage pair revoke {serial}`) or choose another name")]
    NameTaken { name: String, serial: u64 },
}

/// Names of devices and cloudlets go into certificates, records and log lines: plain.
pub fn check_peer_name(name: &str) -> Result<&str, TrustError> {
    let ok = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(name)
    } else {
        Err(TrustError::BadName { name: name.to_string() })
    }
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrustError + '_ {
    move |source| TrustError::Io { path: path.to_path_buf(), source }
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub(crate) fn offset(unix: u64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix as i64).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// Write `data` through a temporary file of its own (created with mode 0600, unique
/// name, synced), renamed into place; files that are not `secret` then get mode 0644. An
/// interrupted write leaves at worst a private temporary file, never a readable key.
pub(crate) fn write_file(path: &Path, data: &[u8], secret: bool) -> Result<(), TrustError> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut tmp = tempfile::Builder::new().prefix(".partial-").tempfile_in(dir).map_err(io(dir))?;
    tmp.write_all(data).map_err(io(tmp.path()))?;
    if !secret {
        tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644)).map_err(io(path))?;
    }
    tmp.as_file().sync_all().map_err(io(path))?;
    tmp.persist(path).map_err(|e| TrustError::Io { path: path.to_path_buf(), source: e.error })?;
    Ok(())
}

pub(crate) fn read_pem_cert(path: &Path) -> Result<CertificateDer<'static>, TrustError> {
    let text = std::fs::read(path).map_err(io(path))?;
    let p = pem::parse(&text).map_err(|e| TrustError::Bad { path: path.to_path_buf(), detail: e.to_string() })?;
    Ok(CertificateDer::from(p.into_contents()))
}

pub(crate) fn pem_cert(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

pub(crate) fn read_key(path: &Path) -> Result<KeyPair, TrustError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    KeyPair::from_pem(&text).map_err(|e| TrustError::Bad { path: path.to_path_buf(), detail: e.to_string() })
}

pub(crate) fn private_key(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

/// The first 12 characters of a digest or key (any string: it may be untrusted).
pub fn short(s: &str) -> &str {
    s.char_indices().nth(12).map(|(i, _)| &s[..i]).unwrap_or(s)
}

/// SHA-256 of a certificate's DER, hex.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What kind of peer a credential was given to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerKind {
    Device,
    Cloudlet,
}

/// A credential the cloudlet issued (`issued.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issued {
    pub serial: u64,
    pub name: String,
    pub kind: PeerKind,
    pub issued_unix: u64,
    pub not_after_unix: u64,
    /// How it was given: `code` or `bundle`.
    pub via: String,
    #[serde(default)]
    pub revoked_unix: Option<u64>,
}

/// A cloudlet's authority: `DATA/trust/cloudlet/`.
pub struct CloudletTrust {
    dir: PathBuf,
    pub name: String,
    ca_key: KeyPair,
    ca: rcgen::Certificate,
    ca_der: CertificateDer<'static>,
    server_key: KeyPair,
    server_der: CertificateDer<'static>,
}

impl CloudletTrust {
    /// Open the cloudlet's authority in `dir`, creating its keys and certificates the
    /// first time.
    pub fn open_or_init(dir: &Path, name: &str) -> Result<Self, TrustError> {
        // The name given when the authority was created stays its name (pairings are
        // filed under it on the devices).
        let name_path = dir.join("name");
        let name = match std::fs::read_to_string(&name_path) {
            Ok(n) if !n.trim().is_empty() => n.trim().to_string(),
            _ => {
                write_file(&name_path, name.as_bytes(), false)?;
                name.to_string()
            }
        };
        let name = name.as_str();
        let (ca_key_path, ca_path) = (dir.join("ca.key"), dir.join("ca.pem"));
        if !ca_path.exists() {
            let key = KeyPair::generate()?;
            let mut p = CertificateParams::new(Vec::<String>::new())?;
            p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            p.distinguished_name.push(DnType::CommonName, format!("forage cloudlet {name}"));
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
            p.not_before = offset(now_unix().saturating_sub(3600));
            p.not_after = offset(now_unix() + 20 * 365 * 24 * 3600);
            let cert = p.self_signed(&key)?;
            write_file(&ca_key_path, key.serialize_pem().as_bytes(), true)?;
            write_file(&ca_path, cert.pem().as_bytes(), false)?;
        }
        let ca_key = read_key(&ca_key_path)?;
        let ca_der = read_pem_cert(&ca_path)?;
        // rcgen signs with a Certificate: rebuilt from the CA's own DER (same name and key,
        // so what it signs verifies against the stored CA certificate).
        let ca = CertificateParams::from_ca_cert_der(&ca_der)?.self_signed(&ca_key)?;
        let (server_key_path, server_path) = (dir.join("server.key"), dir.join("server.pem"));
        if !server_path.exists() {
            let key = KeyPair::generate()?;
            let mut p = CertificateParams::new(vec![SERVER_NAME.to_string()])?;
            p.distinguished_name.push(DnType::CommonName, name);
            p.not_before = offset(now_unix().saturating_sub(3600));
            p.not_after = offset(now_unix() + 20 * 365 * 24 * 3600);
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
            let cert = p.signed_by(&key, &ca, &ca_key)?;
            write_file(&server_key_path, key.serialize_pem().as_bytes(), true)?;
            write_file(&server_path, cert.pem().as_bytes(), false)?;
        }
        let server_key = read_key(&server_key_path)?;
        let server_der = read_pem_cert(&server_path)?;
        let trust = Self { dir: dir.to_path_buf(), name: name.to_string(), ca_key, ca, ca_der, server_key, server_der };
        if !trust.dir.join("crl.pem").exists() {
            trust.write_crl(&[])?;
        }
        Ok(trust)
    }

    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    pub fn ca_fingerprint(&self) -> String {
        fingerprint(&self.ca_der)
    }

    fn issued_path(&self) -> PathBuf {
        self.dir.join("issued.json")
    }

    /// Every credential issued, revoked ones included.
    pub fn issued(&self) -> Vec<Issued> {
        std::fs::read(self.issued_path()).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    fn save_issued(&self, all: &[Issued]) -> Result<(), TrustError> {
        write_file(&self.issued_path(), &serde_json::to_vec_pretty(all).expect("serializes"), false)
    }

    /// Sign `public_key` (a CSR's or a fresh key's) as `name` for `valid`.
    /// The name must be plain and not held by another credential that is still valid (so
    /// that `pair revoke NAME` means one peer).
    fn sign(&self, mut params: CertificateParams, public_key: &impl rcgen::PublicKeyData, name: &str, kind: PeerKind, valid: Duration, via: &str) -> Result<(CertificateDer<'static>, Issued), TrustError> {
        check_peer_name(name)?;
        let valid = valid.min(MAX_VALIDITY);
        let mut all = self.issued();
        let now = now_unix();
        if let Some(held) = all.iter().find(|i| i.name == name && i.revoked_unix.is_none() && i.not_after_unix > now) {
            return Err(TrustError::NameTaken { name: name.to_string(), serial: held.serial });
        }
        let serial = all.iter().map(|i| i.serial).max().unwrap_or(1) + 1;
        params.serial_number = Some(rcgen::SerialNumber::from(serial));
        params.not_before = offset(now.saturating_sub(60));
        params.not_after = offset(now + valid.as_secs());
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.subject_alt_names = Vec::new();
        let cert = params.signed_by(public_key, &self.ca, &self.ca_key)?;
        let issued = Issued { serial, name: name.to_string(), kind, issued_unix: now, not_after_unix: now + valid.as_secs(), via: via.to_string(), revoked_unix: None };
        all.push(issued.clone());
        self.save_issued(&all)?;
        tracing::info!(name, serial, via, "credential issued");
        Ok((cert.der().clone(), issued))
    }

    /// Issue a certificate for a certificate signing request (pairing by code).
    pub fn issue_for_csr(&self, csr_der: &[u8], name: &str, kind: PeerKind, valid: Duration) -> Result<(CertificateDer<'static>, Issued), TrustError> {
        let csr = rcgen::CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())?;
        self.sign(csr.params, &csr.public_key, name, kind, valid, "code")
    }

    /// A pairing bundle: a fresh key and its certificate, for carrying over USB.
    pub fn issue_bundle(&self, name: &str, kind: PeerKind, valid: Duration, addr: Option<std::net::SocketAddr>) -> Result<Bundle, TrustError> {
        let key = KeyPair::generate()?;
        let (cert, issued) = self.sign(CertificateParams::default(), &key, name, kind, valid, "bundle")?;
        Ok(Bundle {
            kind: pairing::BUNDLE_KIND.into(),
            format: 1,
            cloudlet: self.name.clone(),
            addr: addr.map(|a| a.to_string()),
            ca_pem: pem_cert(&self.ca_der),
            cert_pem: pem_cert(&cert),
            key_pem: key.serialize_pem(),
            not_after_unix: issued.not_after_unix,
        })
    }

    /// Revoke every credential named `who` (or with serial `who`); returns how many.
    pub fn revoke(&self, who: &str) -> Result<usize, TrustError> {
        let mut all = self.issued();
        let mut n = 0;
        for i in all.iter_mut().filter(|i| i.name == who || i.serial.to_string() == who) {
            if i.revoked_unix.is_none() {
                i.revoked_unix = Some(now_unix());
                n += 1;
            }
        }
        if n == 0 && !all.iter().any(|i| i.name == who || i.serial.to_string() == who) {
            return Err(TrustError::NoCredential(who.to_string()));
        }
        self.save_issued(&all)?;
        let revoked: Vec<u64> = all.iter().filter(|i| i.revoked_unix.is_some()).map(|i| i.serial).collect();
        self.write_crl(&revoked)?;
        tracing::info!(who, n, "credentials revoked");
        Ok(n)
    }

    fn write_crl(&self, serials: &[u64]) -> Result<(), TrustError> {
        let now = now_unix();
        let params = rcgen::CertificateRevocationListParams {
            this_update: offset(now.saturating_sub(60)),
            next_update: offset(now + 20 * 365 * 24 * 3600),
            crl_number: rcgen::SerialNumber::from(now),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| rcgen::RevokedCertParams { serial_number: rcgen::SerialNumber::from(*s), revocation_time: offset(now), reason_code: None, invalidity_date: None })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.ca, &self.ca_key)?;
        write_file(&self.dir.join("crl.pem"), crl.pem()?.as_bytes(), false)
    }

    fn crl(&self) -> Result<CertificateRevocationListDer<'static>, TrustError> {
        let path = self.dir.join("crl.pem");
        let text = std::fs::read(&path).map_err(io(&path))?;
        let p = pem::parse(&text).map_err(|e| TrustError::Bad { path: path.clone(), detail: e.to_string() })?;
        Ok(CertificateRevocationListDer::from(p.into_contents()))
    }

    /// TLS 1.3 server configuration: the server certificate (with the CA), client
    /// certificates verified against the CA, its validity and the current CRL. A client
    /// without a certificate is let through the handshake; the session then lets it pair
    /// and nothing else. Built per connection, so a revocation applies to the next one.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TrustError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone())?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .with_crls(vec![self.crl()?])
            .allow_unauthenticated()
            .build()
            .map_err(|e| TrustError::Tls(rustls::Error::General(e.to_string())))?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.server_der.clone(), self.ca_der.clone()], private_key(&self.server_key))?;
        Ok(Arc::new(config))
    }

    /// TLS 1.3 for the service relays: the server certificate (with the CA), no client
    /// certificates (a device proves it owns the instance with the instance's token).
    pub fn relay_server_config(&self) -> Result<Arc<rustls::ServerConfig>, TrustError> {
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![self.server_der.clone(), self.ca_der.clone()], private_key(&self.server_key))?;
        Ok(Arc::new(config))
    }

    /// Create a pairing code, valid for [`CODE_TTL`], redeemable once, that grants what
    /// `grant` says (the operator's choice; a pairing request cannot change it).
    pub fn new_code(&self, grant: Grant) -> Result<PairingCode, TrustError> {
        code::create(&self.dir, &self.ca_der, grant)
    }

    /// Redeem a code's secret (single use, before its expiry): what the code grants.
    pub fn redeem(&self, secret: &[u8]) -> Result<Grant, TrustError> {
        code::redeem(&self.dir, secret)
    }
}

/// The name and serial in a peer's certificate (after the handshake verified it).
pub fn peer_identity(cert: &CertificateDer<'_>) -> Option<(String, u64)> {
    let (_, x) = x509_parser::parse_x509_certificate(cert).ok()?;
    let name = x.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    let serial = x.tbs_certificate.serial.to_u64_digits().first().copied().unwrap_or(0);
    Some((name, serial))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run a TLS handshake in memory; the server's view of the client on success.
    fn handshake(client: Arc<rustls::ClientConfig>, server: Arc<rustls::ServerConfig>) -> Result<Option<(String, u64)>, String> {
        let name = rustls::pki_types::ServerName::try_from(SERVER_NAME).unwrap();
        let mut c = rustls::ClientConnection::new(client, name).unwrap();
        let mut s = rustls::ServerConnection::new(server).unwrap();
        for _ in 0..20 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
            }
            s.process_new_packets().map_err(|e| format!("server: {e}"))?;
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
            }
            c.process_new_packets().map_err(|e| format!("client: {e}"))?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(s.peer_certificates().and_then(|p| p.first()).and_then(peer_identity));
            }
        }
        Err("handshake did not finish".into())
    }

    fn paired(cloudlet: &CloudletTrust, device: &DeviceTrust, name: &str, valid: Duration) -> Peer {
        let (key, csr) = pairing::new_csr(name).unwrap();
        let (cert, issued) = cloudlet.issue_for_csr(&csr, name, PeerKind::Device, valid).unwrap();
        device.save(&cloudlet.name, None, cloudlet.ca_der(), &cert, &key.serialize_pem(), issued.not_after_unix).unwrap();
        device.for_cloudlet("127.0.0.1:1".parse().unwrap(), Some(&cloudlet.name)).unwrap()
    }

    #[test]
    fn paired_devices_get_in_and_the_rest_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cloudlet = CloudletTrust::open_or_init(&dir.path().join("c"), "c1").unwrap();
        let device = DeviceTrust::new(&dir.path().join("d"));
        let peer = paired(&cloudlet, &device, "phone", DEFAULT_VALIDITY);
        let who = handshake(peer.client_config().unwrap(), cloudlet.server_config().unwrap()).unwrap();
        assert_eq!(who.as_ref().map(|w| w.0.as_str()), Some("phone"));

        // Reopened from its files, the cloudlet still knows the device.
        let cloudlet = CloudletTrust::open_or_init(&dir.path().join("c"), "c1").unwrap();
        assert!(handshake(peer.client_config().unwrap(), cloudlet.server_config().unwrap()).unwrap().is_some());

        // Revoked: refused at the next handshake.
        assert_eq!(cloudlet.revoke("phone").unwrap(), 1);
        let e = handshake(peer.client_config().unwrap(), cloudlet.server_config().unwrap()).unwrap_err();
        assert!(e.to_lowercase().contains("revoked"), "{e}");
        assert!(matches!(cloudlet.revoke("nobody"), Err(TrustError::NoCredential(_))));

        // Expired.
        let short = paired(&cloudlet, &DeviceTrust::new(&dir.path().join("d2")), "tablet", Duration::ZERO);
        std::thread::sleep(Duration::from_millis(1100));
        assert!(short.expired());
        let e = handshake(short.client_config().unwrap(), cloudlet.server_config().unwrap()).unwrap_err();
        assert!(e.to_lowercase().contains("expired"), "{e}");

        // A device of another cloudlet: unknown issuer.
        let other = CloudletTrust::open_or_init(&dir.path().join("o"), "c2").unwrap();
        let stranger = paired(&other, &DeviceTrust::new(&dir.path().join("d3")), "phone", DEFAULT_VALIDITY);
        let e = handshake(stranger.client_config().unwrap(), cloudlet.server_config().unwrap()).unwrap_err();
        assert!(e.to_lowercase().contains("unknown issuer") || e.to_lowercase().contains("unknownissuer"), "{e}");

        // Someone else's certificate with one's own key: the handshake's proof fails.
        let d4 = DeviceTrust::new(&dir.path().join("d4"));
        let owner = paired(&cloudlet, &d4, "laptop", DEFAULT_VALIDITY);
        let thief_dir = dir.path().join("d4").join("c1");
        let (thief_key, _) = pairing::new_csr("thief").unwrap();
        write_file(&thief_dir.join("key.pem"), thief_key.serialize_pem().as_bytes(), true).unwrap();
        let e = owner.client_config().map(|c| handshake(c, cloudlet.server_config().unwrap()));
        match e {
            Err(err) => assert!(err.to_string().contains("key"), "{err}"),
            Ok(r) => assert!(r.is_err(), "a stolen certificate got in"),
        }

        // A client with no certificate gets through the handshake, unidentified.
        let anon = pairing::pairing_client_config(Sha256::digest(cloudlet.ca_der().as_ref())[..8].try_into().unwrap()).unwrap();
        assert_eq!(handshake(anon, cloudlet.server_config().unwrap()).unwrap(), None);
        // ... but not if the code names another cloudlet's CA.
        let wrong = pairing::pairing_client_config(Sha256::digest(other.ca_der().as_ref())[..8].try_into().unwrap()).unwrap();
        let e = handshake(wrong, cloudlet.server_config().unwrap()).unwrap_err();
        assert!(e.contains("does not match the pairing code"), "{e}");
    }

    #[test]
    fn codes_are_single_use_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let cloudlet = CloudletTrust::open_or_init(dir.path(), "c1").unwrap();
        let grant = Grant::new(PeerKind::Cloudlet, Duration::from_secs(3600));
        let code = cloudlet.new_code(grant).unwrap();
        assert_eq!(code.text.chars().filter(|c| c.is_ascii_alphanumeric()).count(), 23);
        let (fp, secret) = PairingCode::parse(&code.text.to_lowercase().replace('-', " ")).unwrap();
        assert_eq!(hex::encode(fp), cloudlet.ca_fingerprint()[..16]);
        assert_eq!(cloudlet.redeem(&secret).unwrap(), grant, "the code grants what its maker chose");
        assert!(cloudlet.redeem(&secret).is_err(), "a code works once");
        assert!(PairingCode::parse("ABC").is_err());
        // Wrong guesses do not void the pending codes.
        let code = cloudlet.new_code(Grant::default()).unwrap();
        let (_, secret) = PairingCode::parse(&code.text).unwrap();
        for _ in 0..=code::MAX_FAILURES * 3 {
            assert!(cloudlet.redeem(b"nope!!").is_err());
        }
        assert_eq!(cloudlet.redeem(&secret).unwrap().kind, PeerKind::Device);
    }

    #[test]
    fn wrong_codes_are_limited_per_source() {
        let guard = PairingGuard::default();
        let (a, b): (std::net::IpAddr, std::net::IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..code::MAX_FAILURES {
            guard.check(a).unwrap();
            guard.failed(a);
        }
        assert!(guard.check(a).is_err(), "a source that guessed too often is refused");
        guard.check(b).expect("others are not affected");
        // An IPv6 /64 counts as one source.
        let (c, d): (std::net::IpAddr, std::net::IpAddr) = ("2001:db8::1".parse().unwrap(), "2001:db8::2".parse().unwrap());
        for _ in 0..code::MAX_FAILURES {
            guard.failed(c);
        }
        assert!(guard.check(d).is_err());
    }

    #[test]
    fn names_are_plain_and_held_once() {
        let dir = tempfile::tempdir().unwrap();
        let cloudlet = CloudletTrust::open_or_init(dir.path(), "c1").unwrap();
        for bad in ["", "a b", "evil\u{1b}[2J", "-x", "a/b", &"x".repeat(65)] {
            assert!(matches!(cloudlet.issue_bundle(bad, PeerKind::Device, DEFAULT_VALIDITY, None), Err(TrustError::BadName { .. })), "{bad:?} accepted");
        }
        cloudlet.issue_bundle("phone", PeerKind::Device, DEFAULT_VALIDITY, None).unwrap();
        assert!(matches!(cloudlet.issue_bundle("phone", PeerKind::Device, DEFAULT_VALIDITY, None), Err(TrustError::NameTaken { .. })));
        assert_eq!(cloudlet.revoke("phone").unwrap(), 1);
        cloudlet.issue_bundle("phone", PeerKind::Device, DEFAULT_VALIDITY, None).expect("a revoked name can be given again");
    }

    #[test]
    fn key_files_are_private_whatever_happened_before() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // A first start interrupted after writing the old shared temporary name.
        std::fs::write(dir.path().join("ca.partial"), b"junk").unwrap();
        std::fs::set_permissions(dir.path().join("ca.partial"), std::fs::Permissions::from_mode(0o644)).unwrap();
        CloudletTrust::open_or_init(dir.path(), "c1").unwrap();
        for key in ["ca.key", "server.key"] {
            let mode = std::fs::metadata(dir.path().join(key)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{key} has mode {mode:o}");
        }
        assert!(!std::fs::read_dir(dir.path()).unwrap().flatten().any(|e| e.file_name().to_string_lossy().starts_with(".partial-")), "no temporary file left");
    }

    #[test]
    fn bundles_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let cloudlet = CloudletTrust::open_or_init(&dir.path().join("c"), "c1").unwrap();
        let b = cloudlet.issue_bundle("usb-phone", PeerKind::Device, DEFAULT_VALIDITY, Some("127.0.0.1:7878".parse().unwrap())).unwrap();
        let device = DeviceTrust::new(&dir.path().join("d"));
        let rec = device.import_bundle(&serde_json::to_vec(&b).unwrap()).unwrap();
        assert_eq!(rec.cloudlet, "c1");
        let peer = device.for_cloudlet("127.0.0.1:7878".parse().unwrap(), None).unwrap();
        assert!(handshake(peer.client_config().unwrap(), cloudlet.server_config().unwrap()).unwrap().is_some());
        assert!(device.import_bundle(b"{}").is_err());
        assert_eq!(cloudlet.issued().len(), 1);
    }
}
