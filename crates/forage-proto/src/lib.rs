//! forage-proto: the wire protocols of forage, version 2, on one framing ([`frame`]).
//!
//! | protocol | between | first message | module |
//! |---|---|---|---|
//! | device | a paired device and a cloudlet (synthesis, provisioning, app store) | Hello | [`device`] |
//! | pairing | a device without credentials and a cloudlet | PairRequest | [`pairing`] |
//! | peer | two cloudlets paired as cloudlets (VM handoff) | PeerHello | [`peer`] |
//! | service | a device and its instance's service relay | a preamble line | [`service`] |
//!
//! Every connection is TLS 1.3 (`forage-trust`); one without a client certificate may
//! only pair. The first message of a connection says which protocol it speaks (kind
//! numbers are unique across protocols); the first message of the device and peer
//! protocols says which versions the sender speaks, and both sides use the highest
//! common one ("accept N and N-1", [`negotiate`]).

pub mod device;
mod error;
pub mod frame;
pub mod pairing;
pub mod peer;
pub mod service;

pub use device::{AppInfo, DeviceMessage, Offer, Provision, Whereabouts};
pub use error::{one_line, ErrorCode};
pub use frame::{asynchronous, blocking, decode, encode, ProtoError, Protocol, MAX_FRAME};
pub use pairing::PairingMessage;
pub use peer::{HandoffBegin, PackageKind, PeerMessage, PACKAGE_PIECE};
pub use service::ServiceEndpoint;

/// Versions this build speaks. Version 2: services are reached through the cloudlet's
/// TLS relay with the instance's token ([`service`]); Ready, Moved and HandoffDone carry
/// a [`ServiceEndpoint`] instead of a bare address; PairRequest no longer asks for a kind
/// or lifetime; cloudlets open the peer protocol with PeerHello.
pub const VERSION_MIN: u16 = 2;
pub const VERSION_MAX: u16 = 2;

/// The version two sides agree on, if any.
pub fn negotiate(theirs: (u16, u16)) -> Option<u16> {
    let hi = theirs.1.min(VERSION_MAX);
    (hi >= theirs.0.max(VERSION_MIN)).then_some(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> Vec<DeviceMessage> {
        vec![
            DeviceMessage::Hello {
                versions: (2, 2),
                device: "phone".into(),
                offers: vec![Offer {
                    base_digest: "ab".repeat(32),
                    manifest_bytes: 10,
                    overlay_bytes: 99,
                    overlay_digest: "cd".repeat(32),
                    signature: b"{}".to_vec(),
                }],
                early_start: true,
                store_and_forward: false,
            },
            DeviceMessage::Welcome {
                version: 1,
                cloudlet: "c".into(),
                chosen: Some("ab".into()),
                missing: vec![],
                cached: true,
                redirect: None,
            },
            DeviceMessage::Welcome {
                version: 2,
                cloudlet: "c".into(),
                chosen: None,
                missing: vec!["ab".into()],
                cached: false,
                redirect: Some("10.0.0.2:7878".into()),
            },
            DeviceMessage::Checkpoint { label: "first-response".into() },
            DeviceMessage::WantResidue,
            DeviceMessage::OverlayUrl { url: "https://example.org/app.ovl".into() },
            DeviceMessage::Residue { offset: 4096, bytes: vec![1; 100], last: true },
            DeviceMessage::Usage {
                label: "first-response".into(),
                blobs_accessed: 3,
                blobs: 10,
                demand_fetches: 2,
                segments_arrived: 4,
                segments: 9,
            },
            DeviceMessage::Manifest { bytes: b"FORAGEOV".to_vec() },
            DeviceMessage::Segment { index: 3, bytes: vec![7; 1000] },
            DeviceMessage::Fetch { index: 9 },
            DeviceMessage::Ready {
                service: ServiceEndpoint {
                    addr: "127.0.0.1:4000".into(),
                    token: "00".repeat(16),
                    ca_sha256: "ab".repeat(32),
                },
                resumed_after_ms: 1500,
            },
            DeviceMessage::Complete { segments: 10, bytes: 12345, apply_ms: 80, decompress_ms: 20 },
            DeviceMessage::Error { code: ErrorCode::NoBase, message: "no base".into() },
            DeviceMessage::Provision { request: Provision::CachedVm { service: "hashsearch".into(), join: true } },
            DeviceMessage::Provision { request: Provision::Push { app: "hashsearch-client".into() } },
            DeviceMessage::Provision {
                request: Provision::Script {
                    os: "linux-x86_64".into(),
                    port: 8080,
                    script: b"echo hi".to_vec(),
                    timeout_s: 30,
                    components: vec!["hashsearch".into()],
                },
            },
            DeviceMessage::Provision { request: Provision::App { package: vec![0x28, 0xb5, 0x2f, 0xfd] } },
            DeviceMessage::Error { code: ErrorCode::Idle, message: "idle".into() },
            DeviceMessage::ListApps { platform: Some("linux-x86_64".into()) },
            DeviceMessage::Apps {
                apps: vec![AppInfo {
                    id: "a".into(),
                    service: "s".into(),
                    platform: "any".into(),
                    file: "a.sh".into(),
                    size: 3,
                    sha256: "00".into(),
                }],
            },
            DeviceMessage::GetApp { id: "a".into() },
            DeviceMessage::AppFile { id: "a".into(), file: "a.sh".into(), bytes: b"abc".to_vec() },
            DeviceMessage::Moved {
                cloudlet: "10.0.0.2:7878".into(),
                service: ServiceEndpoint { addr: "10.0.0.2:4000".into(), ..Default::default() },
            },
            DeviceMessage::Follow { to: "10.0.0.2:7878".into() },
            DeviceMessage::NotFollowed { message: "not paired".into() },
            DeviceMessage::WhereIs { endpoint: "10.0.0.2:40123".into() },
            DeviceMessage::Whereabouts(Whereabouts {
                endpoint: "10.0.0.2:40123".into(),
                node: "n1".into(),
                lost: Some("node n1's lease expired".into()),
            }),
            DeviceMessage::Activate { substrate: "web".into(), vcpus: 2, memory_mib: 200 },
            DeviceMessage::Bye,
        ]
    }

    fn pairing() -> Vec<PairingMessage> {
        vec![
            PairingMessage::PairRequest { secret: vec![1, 2, 3], name: "phone".into(), csr: vec![0x30, 0x82] },
            PairingMessage::PairGranted { cloudlet: "c".into(), ca: vec![0x30], cert: vec![0x30], not_after_unix: 1 },
            PairingMessage::Error { code: ErrorCode::Pairing, message: "wrong".into() },
        ]
    }

    fn peer() -> Vec<PeerMessage> {
        vec![
            PeerMessage::PeerHello { versions: (2, 2), cloudlet: "a".into() },
            PeerMessage::PeerWelcome { version: 2, cloudlet: "b".into() },
            PeerMessage::HandoffBegin(HandoffBegin {
                instance: "7-1".into(),
                base_state_sha256: "ab".into(),
                vm: b"{}".to_vec(),
                service_port: Some(7000),
                extra_ports: vec![7001],
                service_token: "00".repeat(16),
            }),
            PeerMessage::HandoffAccept { has_base: true },
            PeerMessage::HandoffFile { name: "kernel".into(), offset: 0, bytes: vec![1; 10], last: true },
            PeerMessage::HandoffSegment { seq: 3, bytes: vec![9; 1000] },
            PeerMessage::HandoffAck { seq: 3, bytes: 1000 },
            PeerMessage::HandoffCommit { segments: 4, state: vec![0x28, 0xb5] },
            PeerMessage::HandoffQuery { instance: "7-1".into() },
            PeerMessage::PackageWanted { what: PackageKind::Base, name: "debian".into() },
            PeerMessage::PackageWanted { what: PackageKind::Service, name: "ocr".into() },
            PeerMessage::PackageOffer { name: "debian".into(), package_bytes: 1 << 30 },
            PeerMessage::PackagePiece { bytes: vec![7; 100] },
            PeerMessage::PackageEnd { sha256: "ab".into(), signature: b"{}".to_vec() },
            PeerMessage::HandoffDone {
                service: ServiceEndpoint { addr: "10.0.0.2:4000".into(), ..Default::default() },
                resumed_after_ms: 300,
            },
            PeerMessage::Error { code: ErrorCode::Handoff, message: "no".into() },
        ]
    }

    fn round_trip<P: Protocol + PartialEq + std::fmt::Debug>(all: Vec<P>) {
        let mut wire = Vec::new();
        for m in &all {
            blocking::write(&mut wire, m).unwrap();
        }
        let mut r = &wire[..];
        for m in &all {
            assert_eq!(&blocking::read::<P>(&mut r).unwrap(), m);
        }
        assert!(matches!(blocking::read::<P>(&mut r), Err(ProtoError::Closed)));
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let mut r = &wire[..];
            for m in &all {
                assert_eq!(&asynchronous::read::<P>(&mut r).await.unwrap(), m);
            }
        });
    }

    #[test]
    fn every_message_round_trips_through_both_io_flavours() {
        round_trip(device());
        round_trip(pairing());
        round_trip(peer());
    }

    #[test]
    fn the_first_frame_tells_the_protocol() {
        let hello = encode(&PeerMessage::PeerHello { versions: (2, 2), cloudlet: "a".into() });
        assert!(decode::<PeerMessage>(&hello[4..]).is_ok());
        assert!(matches!(decode::<DeviceMessage>(&hello[4..]), Err(ProtoError::UnknownKind { kind: 30, .. })));
        let pair = encode(&PairingMessage::PairRequest { secret: vec![1], name: "p".into(), csr: vec![2] });
        assert!(matches!(decode::<DeviceMessage>(&pair[4..]), Err(ProtoError::UnknownKind { .. })));
        // Kinds are unique across protocols, but for Error.
        for k in 0..=255u8 {
            let n = [DeviceMessage::has_kind(k), PairingMessage::has_kind(k), PeerMessage::has_kind(k)]
                .iter()
                .filter(|x| **x)
                .count();
            assert!(n <= 1 || k == 8, "kind {k} is in {n} protocols");
        }
    }

    #[test]
    fn segment_bytes_are_carried_as_bytes() {
        let frame = encode(&DeviceMessage::Segment { index: 0, bytes: vec![0xab; 100_000] });
        assert!(frame.len() < 100_100, "{} bytes on the wire for 100000", frame.len());
    }

    #[test]
    fn bad_frames_are_errors() {
        assert!(matches!(frame::check_len(0), Err(ProtoError::Empty)));
        assert!(matches!(frame::check_len(MAX_FRAME + 1), Err(ProtoError::TooLarge(_))));
        assert!(matches!(decode::<DeviceMessage>(&[0]), Err(ProtoError::UnknownKind { kind: 0, .. })));
        assert!(matches!(decode::<DeviceMessage>(&[4, 0xff]), Err(ProtoError::Payload { .. })));
        // A Fetch payload under the Segment kind byte.
        let mut f = encode(&DeviceMessage::Fetch { index: 1 });
        f[4] = 4;
        assert!(matches!(decode::<DeviceMessage>(&f[4..]), Err(ProtoError::KindMismatch { .. })));
        // Cut mid-frame.
        let f = encode(&DeviceMessage::Bye);
        assert!(matches!(blocking::read::<DeviceMessage>(&mut &f[..f.len() - 1]), Err(ProtoError::Closed)));
    }

    #[test]
    fn versions() {
        assert_eq!(negotiate((1, 3)), Some(2));
        assert_eq!(negotiate((3, 4)), None);
        assert_eq!(negotiate((0, 1)), None, "version 1 devices reach services without a token");
        assert_eq!(negotiate((1, 2)), Some(2));
    }
}
