//! The pairing protocol: the only thing a connection without a client certificate may
//! do. The device has the cloudlet's one-time code; the TLS handshake already checked the
//! cloudlet's CA against the code's fingerprint (see `forage-trust`).
//!
//! ```mermaid
//! sequenceDiagram
//!     participant D as device (no certificate yet)
//!     participant C as cloudlet
//!     D->>C: PairRequest {code's secret, name, CSR}
//!     C->>D: PairGranted {cloudlet, CA, certificate, not after} | Error {pairing}
//! ```
//!
//! What the credential grants (device or cloudlet, lifetime) is fixed by the code the
//! operator made; earlier devices sent `kind` and `valid_s` in PairRequest, now ignored.

use serde::{Deserialize, Serialize};

use crate::ErrorCode;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "m", rename_all = "snake_case")]
pub enum PairingMessage {
    /// Pair with the code's secret, asking for a certificate for the key of `csr` (DER),
    /// named `name`.
    PairRequest {
        #[serde(with = "serde_bytes")]
        secret: Vec<u8>,
        name: String,
        #[serde(with = "serde_bytes")]
        csr: Vec<u8>,
    },
    /// The credentials: the cloudlet's CA and the new certificate (DER).
    PairGranted {
        cloudlet: String,
        #[serde(with = "serde_bytes")]
        ca: Vec<u8>,
        #[serde(with = "serde_bytes")]
        cert: Vec<u8>,
        not_after_unix: u64,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

crate::protocol_kinds!(PairingMessage, "pairing", PairRequest = 16, PairGranted = 17, Error = 8);
