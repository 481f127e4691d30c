//! The device's side of pairing: the TLS configuration for a pairing connection (the
//! server is checked against the code's CA fingerprint, not against a stored CA, since
//! there is none yet), the certificate signing request, and bundles.

use std::sync::Arc;

use rcgen::{CertificateParams, KeyPair};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{provider, TrustError};

pub const BUNDLE_KIND: &str = "forage-pairing-bundle";

/// Credentials carried over USB (`forage pair --bundle`): JSON with PEM inside.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    pub kind: String,
    pub format: u32,
    pub cloudlet: String,
    #[serde(default)]
    pub addr: Option<String>,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after_unix: u64,
}

impl Bundle {
    pub fn parse(bytes: &[u8]) -> Result<Self, TrustError> {
        let bad = |d: String| TrustError::Code(format!("pairing bundle: {d}"));
        let b: Bundle = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if b.kind != BUNDLE_KIND || b.format != 1 {
            return Err(bad(format!("{:?} format {} is not a pairing bundle this forage reads", b.kind, b.format)));
        }
        Ok(b)
    }
}

/// A new key and a certificate signing request for it, named `name`.
pub fn new_csr(name: &str) -> Result<(KeyPair, Vec<u8>), TrustError> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    let csr = p.serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}

/// TLS for a pairing connection: no client certificate; the server's chain must end in a
/// CA whose SHA-256 starts with `ca_prefix` (from the code) and verify against it.
pub fn pairing_client_config(ca_prefix: [u8; 8]) -> Result<Arc<rustls::ClientConfig>, TrustError> {
    pinned_client_config(&ca_prefix)
}

/// TLS to a cloudlet known by (a prefix of) its CA certificate's SHA-256, without a client
/// certificate: pairing (8 bytes, from the code) and a service relay (the whole 32 bytes,
/// from Ready or Moved).
pub fn pinned_client_config(ca_prefix: &[u8]) -> Result<Arc<rustls::ClientConfig>, TrustError> {
    if ca_prefix.len() < 8 || ca_prefix.len() > 32 {
        return Err(TrustError::Code(format!("a CA fingerprint of {} bytes", ca_prefix.len())));
    }
    let verifier = Arc::new(CodeVerifier { ca_prefix: ca_prefix.to_vec(), provider: provider() });
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct CodeVerifier {
    ca_prefix: Vec<u8>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for CodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca =
            intermediates.last().ok_or_else(|| rustls::Error::General("the cloudlet sent no CA certificate".into()))?;
        if Sha256::digest(ca.as_ref())[..self.ca_prefix.len()] != self.ca_prefix[..] {
            return Err(rustls::Error::General(
                "the cloudlet's certificate does not match the pairing code: this is not the cloudlet that showed it"
                    .into(),
            ));
        }
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        v.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
