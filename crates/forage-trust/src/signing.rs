//! Signed artifacts. A builder's Ed25519 key (`DATA/trust/signing.pk8`, mode 0600) signs
//! an artifact's digest: for an overlay the SHA-256 of its manifest (which holds every
//! segment's SHA-256), for a base or service package the SHA-256 of its `package.json`
//! (which holds every file's SHA-256), so a signature covers every byte. The signature is
//! a small JSON file beside the artifact (`FILE.sig`); for overlays it also travels in the
//! device's offer. A cloudlet with a signers file (`DATA/trust/signers`: one public key in
//! hex per line, `#` comments) accepts only artifacts signed by a listed key, checked
//! before any VM starts or anything is imported; without the file it accepts any.

use std::path::Path;

use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};

use crate::{io, write_file, TrustError};

pub const SIGNATURE_KIND: &str = "forage-signature";
/// What can be signed.
pub const OVERLAY: &str = "overlay";
pub const BASE_PACKAGE: &str = "base-package";
pub const SERVICE_PACKAGE: &str = "service-package";

/// Domain separation: a signature is good for its kind of artifact and nothing else.
fn message(artifact: &str, digest: &str) -> Vec<u8> {
    format!("forage signature v1\0{artifact}\0{digest}").into_bytes()
}

/// `FILE.sig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    pub kind: String,
    pub format: u32,
    /// `overlay`, `base-package` or `service-package`.
    pub artifact: String,
    /// The artifact's digest (hex SHA-256 of its manifest or package.json).
    pub digest: String,
    /// The signer's Ed25519 public key, hex.
    pub signer: String,
    /// Ed25519 over the domain-separated artifact kind and digest, hex.
    pub signature: String,
}

impl Signature {
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let s: Signature = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if s.kind != SIGNATURE_KIND || s.format != 1 {
            return Err(format!("{:?} format {} is not a signature this forage reads", s.kind, s.format));
        }
        Ok(s)
    }

    /// Check the signature over `artifact` with `digest`, made by one of `allowed` (hex keys).
    pub fn verify(&self, artifact: &str, digest: &str, allowed: &[String]) -> Result<(), String> {
        if self.artifact != artifact || self.digest != digest {
            return Err(format!("the signature is for {} {}, not this one", self.artifact, crate::short(&self.digest)));
        }
        if !allowed.iter().any(|a| a.eq_ignore_ascii_case(&self.signer)) {
            return Err(format!("signer {} is not one this cloudlet accepts", crate::short(&self.signer)));
        }
        let key = hex::decode(&self.signer).map_err(|_| "the signer is not a hex key".to_string())?;
        let sig = hex::decode(&self.signature).map_err(|_| "the signature is not hex".to_string())?;
        UnparsedPublicKey::new(&ED25519, key)
            .verify(&message(artifact, digest), &sig)
            .map_err(|_| format!("the signature does not verify (tampered {artifact} or signature)"))
    }
}

/// This host's signing key, created the first time.
pub struct Signer {
    key: Ed25519KeyPair,
}

impl Signer {
    pub fn open_or_init(path: &Path) -> Result<Self, TrustError> {
        if !path.exists() {
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                .map_err(|_| TrustError::Code("cannot generate a signing key".into()))?;
            write_file(path, pkcs8.as_ref(), true)?;
        }
        let bytes = std::fs::read(path).map_err(io(path))?;
        let key = Ed25519KeyPair::from_pkcs8(&bytes)
            .map_err(|e| TrustError::Bad { path: path.to_path_buf(), detail: e.to_string() })?;
        Ok(Self { key })
    }

    pub fn public_hex(&self) -> String {
        hex::encode(self.key.public_key().as_ref())
    }

    pub fn sign(&self, artifact: &str, digest: &str) -> Signature {
        Signature {
            kind: SIGNATURE_KIND.into(),
            format: 1,
            artifact: artifact.into(),
            digest: digest.into(),
            signer: self.public_hex(),
            signature: hex::encode(self.key.sign(&message(artifact, digest)).as_ref()),
        }
    }
}

/// Check `FILE.sig` of an artifact against the signers list at `signers` (nothing to do
/// without a list). `digest` is the artifact's own digest, computed by the caller.
pub fn check_detached(signers: &Path, artifact: &str, digest: &str, file: &Path) -> Result<(), String> {
    let Some(allowed) = allowed_signers(signers).map_err(|e| e.to_string())? else { return Ok(()) };
    let sig_path = std::path::PathBuf::from(format!("{}.sig", file.display()));
    let bytes = std::fs::read(&sig_path).map_err(|_| {
        format!(
            "{} is not signed ({} missing), and this host accepts only its listed signers",
            file.display(),
            sig_path.display()
        )
    })?;
    Signature::parse(&bytes)
        .and_then(|s| s.verify(artifact, digest, &allowed))
        .map_err(|e| format!("{}: {e}", sig_path.display()))
}

/// Write `FILE.sig` for an artifact (through a temporary name).
pub fn write_detached(signer: &Signer, artifact: &str, digest: &str, file: &Path) -> Result<(), TrustError> {
    let sig = signer.sign(artifact, digest);
    write_file(
        &std::path::PathBuf::from(format!("{}.sig", file.display())),
        &serde_json::to_vec_pretty(&sig).expect("serializes"),
        false,
    )
}

/// The signers a cloudlet accepts; `None` when it has no signers file (any overlay).
pub fn allowed_signers(path: &Path) -> Result<Option<Vec<String>>, TrustError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(TrustError::Io { path: path.to_path_buf(), source: e }),
    };
    let keys: Vec<String> = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(|l| l.split_whitespace().next().unwrap_or("").to_lowercase())
        .collect();
    for k in &keys {
        if k.len() != 64 || hex::decode(k).is_err() {
            return Err(TrustError::Bad {
                path: path.to_path_buf(),
                detail: format!("{k:?} is not an Ed25519 public key in hex (64 digits)"),
            });
        }
    }
    Ok(Some(keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_bind_signer_and_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let a = Signer::open_or_init(&dir.path().join("a.pk8")).unwrap();
        let b = Signer::open_or_init(&dir.path().join("b.pk8")).unwrap();
        assert_eq!(
            Signer::open_or_init(&dir.path().join("a.pk8")).unwrap().public_hex(),
            a.public_hex(),
            "the key is kept"
        );
        let digest = "ab".repeat(32);
        let sig = a.sign(OVERLAY, &digest);
        let parsed = Signature::parse(&serde_json::to_vec(&sig).unwrap()).unwrap();
        parsed.verify(OVERLAY, &digest, &[a.public_hex()]).unwrap();
        assert!(parsed
            .verify(OVERLAY, &digest, &[b.public_hex()])
            .unwrap_err()
            .contains("not one this cloudlet accepts"));
        assert!(parsed.verify(OVERLAY, &"cd".repeat(32), &[a.public_hex()]).unwrap_err().contains("not this one"));
        assert!(
            parsed.verify(BASE_PACKAGE, &digest, &[a.public_hex()]).unwrap_err().contains("not this one"),
            "an overlay's signature is no package's"
        );
        let mut relabelled = parsed.clone();
        relabelled.artifact = BASE_PACKAGE.into();
        assert!(relabelled.verify(BASE_PACKAGE, &digest, &[a.public_hex()]).unwrap_err().contains("does not verify"));
        let mut forged = parsed.clone();
        forged.signer = b.public_hex();
        assert!(forged.verify(OVERLAY, &digest, &[b.public_hex()]).unwrap_err().contains("does not verify"));
        let mut tampered = parsed;
        // Flip the first byte (setting it to a fixed value fails one run in 256, when it already was that value).
        let first = u8::from_str_radix(&tampered.signature[0..2], 16).unwrap();
        tampered.signature.replace_range(0..2, &format!("{:02x}", first ^ 0xff));
        assert!(tampered.verify(OVERLAY, &digest, &[a.public_hex()]).is_err());

        let list = dir.path().join("signers");
        assert_eq!(allowed_signers(&list).unwrap(), None);
        std::fs::write(&list, format!("# builders\n{} alice\n\n", a.public_hex().to_uppercase())).unwrap();
        assert_eq!(allowed_signers(&list).unwrap(), Some(vec![a.public_hex()]));
        std::fs::write(&list, "nothex\n").unwrap();
        assert!(allowed_signers(&list).is_err());
    }
}
