//! One-time pairing codes. A code is 14 bytes in base32 (23 characters, shown in groups
//! of five): the first 8 bytes of the SHA-256 of the cloudlet's CA certificate, which the
//! device checks against the certificate the cloudlet presents (a machine in the middle
//! would need a second preimage of 64 bits), then a 6-byte random secret, which the
//! cloudlet checks: only its hash is stored, it expires after [`crate::CODE_TTL`], and it
//! is used once.
//!
//! What the code grants is fixed by the operator when the code is made ([`Grant`]: a
//! device or a cloudlet credential, and for how long); a pairing request cannot ask for
//! more. Wrong guesses are limited per source address ([`PairingGuard`]), not globally:
//! a 48-bit secret needs no lockout that one stranger could use to void everyone's codes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{now_unix, write_file, PeerKind, TrustError, CODE_TTL, DEFAULT_VALIDITY};

/// Wrong codes a source may try within [`FAILURE_WINDOW`] before it is refused unheard.
pub const MAX_FAILURES: u32 = 5;
pub const FAILURE_WINDOW: Duration = CODE_TTL;
const FP_LEN: usize = 8;
const SECRET_LEN: usize = 6;

/// A code as the operator reads it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairingCode {
    pub text: String,
    pub expires_unix: u64,
    pub grant: Grant,
}

/// What redeeming a code gives: chosen by the operator who made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub kind: PeerKind,
    /// Lifetime of the credential, in seconds.
    pub valid_s: u64,
}

impl Grant {
    pub fn new(kind: PeerKind, valid: Duration) -> Self {
        Self { kind, valid_s: valid.min(crate::MAX_VALIDITY).as_secs() }
    }

    pub fn valid(&self) -> Duration {
        Duration::from_secs(self.valid_s).min(crate::MAX_VALIDITY)
    }
}

impl Default for Grant {
    fn default() -> Self {
        Self::new(PeerKind::Device, DEFAULT_VALIDITY)
    }
}

impl PairingCode {
    /// Split a typed code into the CA fingerprint prefix and the secret (case, spaces and
    /// dashes do not matter).
    pub fn parse(text: &str) -> Result<([u8; FP_LEN], Vec<u8>), TrustError> {
        let clean: String =
            text.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_uppercase()).collect();
        let bytes = data_encoding::BASE32_NOPAD.decode(clean.as_bytes()).map_err(|_| {
            TrustError::Code("not a pairing code (23 letters and digits, as `forage pair` shows)".into())
        })?;
        if bytes.len() != FP_LEN + SECRET_LEN {
            return Err(TrustError::Code(format!(
                "a pairing code has {} characters",
                (FP_LEN + SECRET_LEN) * 8 / 5 + 1
            )));
        }
        let mut fp = [0u8; FP_LEN];
        fp.copy_from_slice(&bytes[..FP_LEN]);
        Ok((fp, bytes[FP_LEN..].to_vec()))
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Pending {
    codes: Vec<PendingCode>,
}

#[derive(Debug, Serialize, Deserialize)]
struct PendingCode {
    secret_sha256: String,
    expires_unix: u64,
    /// Codes written before grants were recorded grant a device credential of the
    /// default lifetime.
    #[serde(default)]
    grant: Grant,
}

/// Run `f` on the pending codes under an exclusive lock of `codes.lock` (the operator's
/// `forage pair` and the daemon change the file from two processes).
fn with_pending<T>(dir: &Path, f: impl FnOnce(&mut Pending) -> Result<T, TrustError>) -> Result<T, TrustError> {
    std::fs::create_dir_all(dir).map_err(crate::io(dir))?;
    let lock_path = dir.join("codes.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(crate::io(&lock_path))?;
    lock.lock().map_err(crate::io(&lock_path))?;
    let path = dir.join("codes.json");
    let mut p: Pending = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    let now = now_unix();
    p.codes.retain(|c| c.expires_unix > now);
    let out = f(&mut p)?;
    write_file(&path, &serde_json::to_vec(&p).expect("serializes"), true)?;
    Ok(out)
}

pub(crate) fn create(dir: &Path, ca_der: &[u8], grant: Grant) -> Result<PairingCode, TrustError> {
    let mut secret = [0u8; SECRET_LEN];
    getrandom::fill(&mut secret).map_err(|e| TrustError::Code(format!("no randomness: {e}")))?;
    let mut raw = Sha256::digest(ca_der)[..FP_LEN].to_vec();
    raw.extend_from_slice(&secret);
    let text = data_encoding::BASE32_NOPAD
        .encode(&raw)
        .as_bytes()
        .chunks(5)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join("-");
    let expires_unix = now_unix() + CODE_TTL.as_secs();
    with_pending(dir, |p| {
        p.codes.push(PendingCode { secret_sha256: hex::encode(Sha256::digest(secret)), expires_unix, grant });
        Ok(())
    })?;
    Ok(PairingCode { text, expires_unix, grant })
}

/// Use up the code whose secret this is; what it grants.
pub(crate) fn redeem(dir: &Path, secret: &[u8]) -> Result<Grant, TrustError> {
    let want = hex::encode(Sha256::digest(secret));
    with_pending(dir, |p| match p.codes.iter().position(|c| c.secret_sha256 == want) {
        Some(i) => Ok(p.codes.remove(i).grant),
        None => Err(TrustError::Code("wrong, used or expired code".into())),
    })
}

/// An IPv4 address, or the /64 of an IPv6 one: what one source can easily vary (the unit
/// of per-source limits).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut o = v6.octets();
                o[8..].fill(0);
                IpAddr::V6(o.into())
            }
        },
        v4 => v4,
    }
}

/// Wrong pairing codes counted per source (an IPv4 address, or an IPv6 /64), in memory:
/// a source that got [`MAX_FAILURES`] wrong within [`FAILURE_WINDOW`] is refused without
/// its code being looked at, until the window has passed. Others are not affected.
#[derive(Debug, Default)]
pub struct PairingGuard {
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl PairingGuard {
    fn key(source: IpAddr) -> IpAddr {
        source_key(source)
    }

    /// May `source` try a code now?
    pub fn check(&self, source: IpAddr) -> Result<(), TrustError> {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        f.retain(|_, (_, since)| since.elapsed() < FAILURE_WINDOW);
        match f.get(&Self::key(source)) {
            Some((n, since)) if *n >= MAX_FAILURES => {
                let wait = FAILURE_WINDOW.saturating_sub(since.elapsed()).as_secs() / 60 + 1;
                Err(TrustError::Code(format!("too many wrong codes from {source}: try again in {wait} min")))
            }
            _ => Ok(()),
        }
    }

    /// `source` sent a wrong code.
    pub fn failed(&self, source: IpAddr) {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let e = f.entry(Self::key(source)).or_insert((0, Instant::now()));
        e.0 += 1;
    }
}
