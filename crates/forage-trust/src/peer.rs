//! Peers (devices and cloudlets): their names, kinds, credentials' lifetimes.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::TrustError;

/// The name in every cloudlet's server certificate; devices connect with it as SNI.
pub const SERVER_NAME: &str = "forage-cloudlet";
/// Default lifetime of credentials given by pairing (tactical cloudlets are short-lived).
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);
/// The longest credentials a cloudlet gives.
pub const MAX_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long a pairing code can be redeemed.
pub const CODE_TTL: Duration = Duration::from_secs(10 * 60);

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
