//! One-time pairing codes. A code is 14 bytes in base32 (23 characters, shown in groups
//! of five): the first 8 bytes of the SHA-256 of the cloudlet's CA certificate, which the
//! device checks against the certificate the cloudlet presents (a machine in the middle
//! would need a second preimage of 64 bits), then a 6-byte random secret, which the
//! cloudlet checks: only its hash is stored, it expires after [`crate::CODE_TTL`], it is
//! used once, and more than [`MAX_FAILURES`] wrong secrets void every pending code.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{now_unix, write_file, TrustError, CODE_TTL};

pub const MAX_FAILURES: u32 = 10;
const FP_LEN: usize = 8;
const SECRET_LEN: usize = 6;

/// A code as the operator reads it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairingCode {
    pub text: String,
    pub expires_unix: u64,
}

impl PairingCode {
    /// Split a typed code into the CA fingerprint prefix and the secret (case, spaces and
    /// dashes do not matter).
    pub fn parse(text: &str) -> Result<([u8; FP_LEN], Vec<u8>), TrustError> {
        let clean: String = text.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_uppercase()).collect();
        let bytes = data_encoding::BASE32_NOPAD.decode(clean.as_bytes()).map_err(|_| TrustError::Code("not a pairing code (23 letters and digits, as `forage pair` shows)".into()))?;
        if bytes.len() != FP_LEN + SECRET_LEN {
            return Err(TrustError::Code(format!("a pairing code has {} characters", (FP_LEN + SECRET_LEN) * 8 / 5 + 1)));
        }
        let mut fp = [0u8; FP_LEN];
        fp.copy_from_slice(&bytes[..FP_LEN]);
        Ok((fp, bytes[FP_LEN..].to_vec()))
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Pending {
    codes: Vec<PendingCode>,
    failures: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct PendingCode {
    secret_sha256: String,
    expires_unix: u64,
}

fn load(dir: &Path) -> Pending {
    std::fs::read(dir.join("codes.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

fn save(dir: &Path, p: &Pending) -> Result<(), TrustError> {
    write_file(&dir.join("codes.json"), &serde_json::to_vec(p).expect("serializes"), true)
}

pub(crate) fn create(dir: &Path, ca_der: &[u8]) -> Result<PairingCode, TrustError> {
    let mut secret = [0u8; SECRET_LEN];
    getrandom::fill(&mut secret).map_err(|e| TrustError::Code(format!("no randomness: {e}")))?;
    let mut raw = Sha256::digest(ca_der)[..FP_LEN].to_vec();
    raw.extend_from_slice(&secret);
    let text = data_encoding::BASE32_NOPAD.encode(&raw).as_bytes().chunks(5).map(|c| String::from_utf8_lossy(c).into_owned()).collect::<Vec<_>>().join("-");
    let now = now_unix();
    let mut p = load(dir);
    p.codes.retain(|c| c.expires_unix > now);
    p.codes.push(PendingCode { secret_sha256: hex::encode(Sha256::digest(secret)), expires_unix: now + CODE_TTL.as_secs() });
    save(dir, &p)?;
    Ok(PairingCode { text, expires_unix: now + CODE_TTL.as_secs() })
}

pub(crate) fn redeem(dir: &Path, secret: &[u8]) -> Result<(), TrustError> {
    let now = now_unix();
    let mut p = load(dir);
    p.codes.retain(|c| c.expires_unix > now);
    let want = hex::encode(Sha256::digest(secret));
    match p.codes.iter().position(|c| c.secret_sha256 == want) {
        Some(i) => {
            p.codes.remove(i);
            save(dir, &p)
        }
        None => {
            p.failures += 1;
            let voided = p.failures > MAX_FAILURES;
            if voided {
                p.codes.clear();
                p.failures = 0;
            }
            save(dir, &p)?;
            Err(TrustError::Code(if voided { "wrong code; too many wrong codes: every pending code is void, ask for a new one".into() } else { "wrong, used or expired code".into() }))
        }
    }
}
