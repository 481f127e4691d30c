//! forage-trust: who may talk to whom.
//!
//! - Every cloudlet is its own small certificate authority ([`CloudletTrust`]): a CA key
//!   and certificate, and a server certificate it signs, kept in `DATA/trust/cloudlet/`.
//! - A device (or another cloudlet, for handoff) gets a client certificate from the CA by
//!   **pairing**, which works offline: a one-time code the cloudlet's operator reads out
//!   ([`PairingCode`]: the CA's fingerprint prefix, so the device can tell it talks to the
//!   right cloudlet, plus a single-use secret, so the cloudlet can tell the device was
//!   given the code), or a bundle file carried over USB. Credentials expire; the cloudlet
//!   can revoke them (a CRL it signs and checks at every handshake).
//! - Every connection is TLS 1.3 with mutual authentication ([`CloudletTrust::server_config`],
//!   [`Peer::client_config`]). A connection without a client certificate may only pair.
//!
//! Files are PEM and JSON; private keys are written with mode 0600. `docs/security.md`
//! has the threat model.

mod certs;
mod cloudlet;
mod code;
mod device;
mod error;
mod files;
mod pairing;
mod peer;
pub mod signing;

pub use certs::{fingerprint, short};
pub(crate) use certs::{pem_cert, private_key, provider, read_key, read_pem_cert};
pub use cloudlet::{peer_identity, CloudletTrust};
pub use code::{source_key, Grant, PairingCode, PairingGuard, MAX_FAILURES as MAX_PAIRING_FAILURES};
pub use device::{date, DeviceTrust, Peer, PeerRecord};
pub use error::TrustError;
pub(crate) use files::{io, now_unix, offset, write_file};
pub use pairing::{new_csr, pairing_client_config, pinned_client_config, Bundle};
pub use peer::{check_peer_name, Issued, PeerKind, CODE_TTL, DEFAULT_VALIDITY, MAX_VALIDITY, SERVER_NAME};

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use sha2::{Digest, Sha256};

    use super::*;

    /// Run a TLS handshake in memory; the server's view of the client on success.
    fn handshake(
        client: Arc<rustls::ClientConfig>,
        server: Arc<rustls::ServerConfig>,
    ) -> Result<Option<(String, u64)>, String> {
        let name = rustls::pki_types::ServerName::try_from(SERVER_NAME).unwrap();
        let mut c = rustls::ClientConnection::new(client, name).unwrap();
        let mut s = rustls::ServerConnection::new(server).unwrap();
        for _ in 0..20 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
            }
            s.process_new_packets().map_err(|e| format!("server: {e}"))?;
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
            }
            c.process_new_packets().map_err(|e| format!("client: {e}"))?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(s.peer_certificates().and_then(|p| p.first()).and_then(peer_identity));
            }
        }
        Err("handshake did not finish".into())
    }

    fn paired(cloudlet: &CloudletTrust, device: &DeviceTrust, name: &str, valid: Duration) -> Peer {
        let (key, csr) = pairing::new_csr(name).unwrap();
        let (cert, issued) = cloudlet.issue_for_csr(&csr, name, PeerKind::Device, valid).unwrap();
        device
            .save(&cloudlet.name, None, cloudlet.ca_der(), &cert, &key.serialize_pem(), issued.not_after_unix)
            .unwrap();
        device.for_cloudlet("127.0.0.1:1".parse().unwrap(), Some(&cloudlet.name)).unwrap()
    }

    #[test]
    fn paired_devices_get_in_and_the_rest_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cloudlet = CloudletTrust::open_or_init(&dir.path().join("c"), "c1").unwrap();
        let device = DeviceTrust::new(&dir.path().join("d"));
        let peer = paired(&cloudlet, &device, "phone", DEFAULT_VALIDITY);
        let who = handshake(peer.client_config().unwrap(), cloudlet.server_config().unwrap()).unwrap();
        assert_eq!(who.as_ref().map(|w| w.0.as_str()), Some("phone"));

        // Reopened from its files, the cloudlet still knows the device.
        let cloudlet = CloudletTrust::open_or_init(&dir.path().join("c"), "c1").unwrap();
        assert!(handshake(peer.client_config().unwrap(), cloudlet.server_config().unwrap()).unwrap().is_some());

        // Revoked: refused at the next handshake.
        assert_eq!(cloudlet.revoke("phone").unwrap(), 1);
        let e = handshake(peer.client_config().unwrap(), cloudlet.server_config().unwrap()).unwrap_err();
        assert!(e.to_lowercase().contains("revoked"), "{e}");
        assert!(matches!(cloudlet.revoke("nobody"), Err(TrustError::NoCredential(_))));

        // Expired.
        let short = paired(&cloudlet, &DeviceTrust::new(&dir.path().join("d2")), "tablet", Duration::ZERO);
        std::thread::sleep(Duration::from_millis(1100));
        assert!(short.expired());
        let e = handshake(short.client_config().unwrap(), cloudlet.server_config().unwrap()).unwrap_err();
        assert!(e.to_lowercase().contains("expired"), "{e}");

        // A device of another cloudlet: unknown issuer.
        let other = CloudletTrust::open_or_init(&dir.path().join("o"), "c2").unwrap();
        let stranger = paired(&other, &DeviceTrust::new(&dir.path().join("d3")), "phone", DEFAULT_VALIDITY);
        let e = handshake(stranger.client_config().unwrap(), cloudlet.server_config().unwrap()).unwrap_err();
        assert!(e.to_lowercase().contains("unknown issuer") || e.to_lowercase().contains("unknownissuer"), "{e}");

        // Someone else's certificate with one's own key: the handshake's proof fails.
        let d4 = DeviceTrust::new(&dir.path().join("d4"));
        let owner = paired(&cloudlet, &d4, "laptop", DEFAULT_VALIDITY);
        let thief_dir = dir.path().join("d4").join("c1");
        let (thief_key, _) = pairing::new_csr("thief").unwrap();
        write_file(&thief_dir.join("key.pem"), thief_key.serialize_pem().as_bytes(), true).unwrap();
        let e = owner.client_config().map(|c| handshake(c, cloudlet.server_config().unwrap()));
        match e {
            Err(err) => assert!(err.to_string().contains("key"), "{err}"),
            Ok(r) => assert!(r.is_err(), "a stolen certificate got in"),
        }

        // A client with no certificate gets through the handshake, unidentified.
        let anon = pairing::pairing_client_config(Sha256::digest(cloudlet.ca_der().as_ref())[..8].try_into().unwrap())
            .unwrap();
        assert_eq!(handshake(anon, cloudlet.server_config().unwrap()).unwrap(), None);
        // ... but not if the code names another cloudlet's CA.
        let wrong =
            pairing::pairing_client_config(Sha256::digest(other.ca_der().as_ref())[..8].try_into().unwrap()).unwrap();
        let e = handshake(wrong, cloudlet.server_config().unwrap()).unwrap_err();
        assert!(e.contains("does not match the pairing code"), "{e}");
    }

    #[test]
    fn codes_are_single_use_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let cloudlet = CloudletTrust::open_or_init(dir.path(), "c1").unwrap();
        let grant = Grant::new(PeerKind::Cloudlet, Duration::from_secs(3600));
        let code = cloudlet.new_code(grant).unwrap();
        assert_eq!(code.text.chars().filter(|c| c.is_ascii_alphanumeric()).count(), 23);
        let (fp, secret) = PairingCode::parse(&code.text.to_lowercase().replace('-', " ")).unwrap();
        assert_eq!(hex::encode(fp), cloudlet.ca_fingerprint()[..16]);
        assert_eq!(cloudlet.redeem(&secret).unwrap(), grant, "the code grants what its maker chose");
        assert!(cloudlet.redeem(&secret).is_err(), "a code works once");
        assert!(PairingCode::parse("ABC").is_err());
        // Wrong guesses do not void the pending codes.
        let code = cloudlet.new_code(Grant::default()).unwrap();
        let (_, secret) = PairingCode::parse(&code.text).unwrap();
        for _ in 0..=code::MAX_FAILURES * 3 {
            assert!(cloudlet.redeem(b"nope!!").is_err());
        }
        assert_eq!(cloudlet.redeem(&secret).unwrap().kind, PeerKind::Device);
    }

    #[test]
    fn wrong_codes_are_limited_per_source() {
        let guard = PairingGuard::default();
        let (a, b): (std::net::IpAddr, std::net::IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..code::MAX_FAILURES {
            guard.check(a).unwrap();
            guard.failed(a);
        }
        assert!(guard.check(a).is_err(), "a source that guessed too often is refused");
        guard.check(b).expect("others are not affected");
        // An IPv6 /64 counts as one source.
        let (c, d): (std::net::IpAddr, std::net::IpAddr) =
            ("2001:db8::1".parse().unwrap(), "2001:db8::2".parse().unwrap());
        for _ in 0..code::MAX_FAILURES {
            guard.failed(c);
        }
        assert!(guard.check(d).is_err());
    }

    #[test]
    fn names_are_plain_and_held_once() {
        let dir = tempfile::tempdir().unwrap();
        let cloudlet = CloudletTrust::open_or_init(dir.path(), "c1").unwrap();
        for bad in ["", "a b", "evil\u{1b}[2J", "-x", "a/b", &"x".repeat(65)] {
            assert!(
                matches!(
                    cloudlet.issue_bundle(bad, PeerKind::Device, DEFAULT_VALIDITY, None),
                    Err(TrustError::BadName { .. })
                ),
                "{bad:?} accepted"
            );
        }
        cloudlet.issue_bundle("phone", PeerKind::Device, DEFAULT_VALIDITY, None).unwrap();
        assert!(matches!(
            cloudlet.issue_bundle("phone", PeerKind::Device, DEFAULT_VALIDITY, None),
            Err(TrustError::NameTaken { .. })
        ));
        assert_eq!(cloudlet.revoke("phone").unwrap(), 1);
        cloudlet
            .issue_bundle("phone", PeerKind::Device, DEFAULT_VALIDITY, None)
            .expect("a revoked name can be given again");
    }

    #[test]
    fn key_files_are_private_whatever_happened_before() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // A first start interrupted after writing the old shared temporary name.
        std::fs::write(dir.path().join("ca.partial"), b"junk").unwrap();
        std::fs::set_permissions(dir.path().join("ca.partial"), std::fs::Permissions::from_mode(0o644)).unwrap();
        CloudletTrust::open_or_init(dir.path(), "c1").unwrap();
        for key in ["ca.key", "server.key"] {
            let mode = std::fs::metadata(dir.path().join(key)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{key} has mode {mode:o}");
        }
        assert!(
            !std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".partial-")),
            "no temporary file left"
        );
    }

    #[test]
    fn bundles_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let cloudlet = CloudletTrust::open_or_init(&dir.path().join("c"), "c1").unwrap();
        let b = cloudlet
            .issue_bundle("usb-phone", PeerKind::Device, DEFAULT_VALIDITY, Some("127.0.0.1:7878".parse().unwrap()))
            .unwrap();
        let device = DeviceTrust::new(&dir.path().join("d"));
        let rec = device.import_bundle(&serde_json::to_vec(&b).unwrap()).unwrap();
        assert_eq!(rec.cloudlet, "c1");
        let peer = device.for_cloudlet("127.0.0.1:7878".parse().unwrap(), None).unwrap();
        assert!(handshake(peer.client_config().unwrap(), cloudlet.server_config().unwrap()).unwrap().is_some());
        assert!(device.import_bundle(b"{}").is_err());
        assert_eq!(cloudlet.issued().len(), 1);
    }
}
