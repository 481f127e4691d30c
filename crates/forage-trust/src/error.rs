//! What can go wrong with keys, certificates, codes and credentials.

use std::path::PathBuf;

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
