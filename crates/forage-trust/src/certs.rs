//! Certificates and keys as PEM and DER; fingerprints; the TLS crypto provider.

use std::path::Path;
use std::sync::Arc;

use rcgen::KeyPair;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

use crate::error::TrustError;
use crate::files::io;

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
