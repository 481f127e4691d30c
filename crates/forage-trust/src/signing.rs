//! Signed overlays. A builder's Ed25519 key (`DATA/trust/signing.pk8`, mode 0600) signs an
//! overlay's digest (the SHA-256 of its manifest, which holds every segment's SHA-256, so
//! the signature covers every byte the overlay will place). The signature travels beside
//! the overlay (`APP.ovl.sig`) and in the device's offer. A cloudlet with a signers file
//! (`DATA/trust/signers`: one public key in hex per line, `#` comments) accepts only
//! overlays signed by a listed key, checked before any VM starts; without the file it
//! accepts any overlay of a paired device.

use std::path::Path;

use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};

use crate::{io, write_file, TrustError};

pub const SIGNATURE_KIND: &str = "forage-overlay-signature";
/// Domain separation: a signature of an overlay is good for nothing else.
const CONTEXT: &[u8] = b"forage overlay v1\0";

/// `APP.ovl.sig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlaySignature {
    pub kind: String,
    pub format: u32,
    /// The overlay's digest (hex SHA-256 of its manifest).
    pub overlay_digest: String,
    /// The signer's Ed25519 public key, hex.
    pub signer: String,
    /// Ed25519 over `CONTEXT || overlay_digest`, hex.
    pub signature: String,
}

impl OverlaySignature {
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let s: OverlaySignature = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if s.kind != SIGNATURE_KIND || s.format != 1 {
            return Err(format!("{:?} format {} is not an overlay signature this forage reads", s.kind, s.format));
        }
        Ok(s)
    }

    /// Check the signature over `overlay_digest`, made by one of `allowed` (hex keys).
    pub fn verify(&self, overlay_digest: &str, allowed: &[String]) -> Result<(), String> {
        if self.overlay_digest != overlay_digest {
            return Err(format!("the signature is for overlay {}, not this one", crate::short(&self.overlay_digest)));
        }
        if !allowed.iter().any(|a| a.eq_ignore_ascii_case(&self.signer)) {
            return Err(format!("signer {} is not one this cloudlet accepts", crate::short(&self.signer)));
        }
        let key = hex::decode(&self.signer).map_err(|_| "the signer is not a hex key".to_string())?;
        let sig = hex::decode(&self.signature).map_err(|_| "the signature is not hex".to_string())?;
        let mut msg = CONTEXT.to_vec();
        msg.extend_from_slice(overlay_digest.as_bytes());
        UnparsedPublicKey::new(&ED25519, key).verify(&msg, &sig).map_err(|_| "the signature does not verify (tampered overlay or signature)".to_string())
    }
}

/// This host's signing key, created the first time.
pub struct Signer {
    key: Ed25519KeyPair,
}

impl Signer {
    pub fn open_or_init(path: &Path) -> Result<Self, TrustError> {
        if !path.exists() {
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).map_err(|_| TrustError::Code("cannot generate a signing key".into()))?;
            write_file(path, pkcs8.as_ref(), true)?;
        }
        let bytes = std::fs::read(path).map_err(io(path))?;
        let key = Ed25519KeyPair::from_pkcs8(&bytes).map_err(|e| TrustError::Bad { path: path.to_path_buf(), detail: e.to_string() })?;
        Ok(Self { key })
    }

    pub fn public_hex(&self) -> String {
        hex::encode(self.key.public_key().as_ref())
    }

    pub fn sign(&self, overlay_digest: &str) -> OverlaySignature {
        let mut msg = CONTEXT.to_vec();
        msg.extend_from_slice(overlay_digest.as_bytes());
        OverlaySignature {
            kind: SIGNATURE_KIND.into(),
            format: 1,
            overlay_digest: overlay_digest.into(),
            signer: self.public_hex(),
            signature: hex::encode(self.key.sign(&msg).as_ref()),
        }
    }
}

/// The signers a cloudlet accepts; `None` when it has no signers file (any overlay).
pub fn allowed_signers(path: &Path) -> Result<Option<Vec<String>>, TrustError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(TrustError::Io { path: path.to_path_buf(), source: e }),
    };
    let keys: Vec<String> = text.lines().map(|l| l.split('#').next().unwrap_or("").trim()).filter(|l| !l.is_empty()).map(|l| l.split_whitespace().next().unwrap_or("").to_lowercase()).collect();
    for k in &keys {
        if k.len() != 64 || hex::decode(k).is_err() {
            return Err(TrustError::Bad { path: path.to_path_buf(), detail: format!("{k:?} is not an Ed25519 public key in hex (64 digits)") });
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
        assert_eq!(Signer::open_or_init(&dir.path().join("a.pk8")).unwrap().public_hex(), a.public_hex(), "the key is kept");
        let digest = "ab".repeat(32);
        let sig = a.sign(&digest);
        let parsed = OverlaySignature::parse(&serde_json::to_vec(&sig).unwrap()).unwrap();
        parsed.verify(&digest, &[a.public_hex()]).unwrap();
        assert!(parsed.verify(&digest, &[b.public_hex()]).unwrap_err().contains("not one this cloudlet accepts"));
        assert!(parsed.verify(&"cd".repeat(32), &[a.public_hex()]).unwrap_err().contains("not this one"));
        let mut forged = parsed.clone();
        forged.signer = b.public_hex();
        assert!(forged.verify(&digest, &[b.public_hex()]).unwrap_err().contains("does not verify"));
        let mut tampered = parsed;
        tampered.signature.replace_range(0..2, "00");
        assert!(tampered.verify(&digest, &[a.public_hex()]).is_err());

        let list = dir.path().join("signers");
        assert_eq!(allowed_signers(&list).unwrap(), None);
        std::fs::write(&list, format!("# builders\n{} alice\n\n", a.public_hex().to_uppercase())).unwrap();
        assert_eq!(allowed_signers(&list).unwrap(), Some(vec![a.public_hex()]));
        std::fs::write(&list, "nothex\n").unwrap();
        assert!(allowed_signers(&list).is_err());
    }
}
