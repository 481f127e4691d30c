//! A cloudlet's authority: its CA, the credentials it issued, its CRL, its server and
//! relay configurations.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};

use crate::certs::{fingerprint, pem_cert, private_key, provider, read_key, read_pem_cert};
use crate::code::{self, Grant, PairingCode};
use crate::error::TrustError;
use crate::files::{io, now_unix, offset, write_file};
use crate::pairing::{self, Bundle};
use crate::peer::{check_peer_name, Issued, PeerKind, MAX_VALIDITY, SERVER_NAME};

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
            p.key_usages =
                vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
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
    fn sign(
        &self,
        mut params: CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
        name: &str,
        kind: PeerKind,
        valid: Duration,
        via: &str,
    ) -> Result<(CertificateDer<'static>, Issued), TrustError> {
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
        let issued = Issued {
            serial,
            name: name.to_string(),
            kind,
            issued_unix: now,
            not_after_unix: now + valid.as_secs(),
            via: via.to_string(),
            revoked_unix: None,
        };
        all.push(issued.clone());
        self.save_issued(&all)?;
        tracing::info!(name, serial, via, "credential issued");
        Ok((cert.der().clone(), issued))
    }

    /// Issue a certificate for a certificate signing request (pairing by code).
    pub fn issue_for_csr(
        &self,
        csr_der: &[u8],
        name: &str,
        kind: PeerKind,
        valid: Duration,
    ) -> Result<(CertificateDer<'static>, Issued), TrustError> {
        let csr = rcgen::CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())?;
        self.sign(csr.params, &csr.public_key, name, kind, valid, "code")
    }

    /// A pairing bundle: a fresh key and its certificate, for carrying over USB.
    pub fn issue_bundle(
        &self,
        name: &str,
        kind: PeerKind,
        valid: Duration,
        addr: Option<std::net::SocketAddr>,
    ) -> Result<Bundle, TrustError> {
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
                .map(|s| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from(*s),
                    revocation_time: offset(now),
                    reason_code: None,
                    invalidity_date: None,
                })
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
