//! A (hostile) holder's messages against the asker's receiving side.

use std::path::PathBuf;

use forage_proto::asynchronous::write;
use forage_proto::{PackageKind, PeerMessage};
use sha2::{Digest, Sha256};

use super::{receive, PackageFetchError};

const FROM: &str = "127.0.0.1:4000";

/// Receive what a holder sends as `msgs` into a fresh folder, asking for `name`; the
/// result and what is left in the folder.
async fn from_holder(
    msgs: Vec<PeerMessage>,
    name: &str,
    limit: u64,
) -> (Result<(u64, String, String), PackageFetchError>, Vec<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(".fetch-b.pkg");
    let (mut ours, mut theirs) = tokio::io::duplex(4 << 20);
    tokio::spawn(async move {
        for m in msgs {
            if write(&mut theirs, &m).await.is_err() {
                return;
            }
        }
    });
    let by_digest = super::names::is_digest(name);
    let accept = |n: &str| match n {
        "held" => Err(PackageFetchError::Exists { what: PackageKind::Base, name: n.into() }),
        _ => Ok(()),
    };
    let limit = (limit, "the test's limit");
    let got = receive(&mut ours, FROM.parse().unwrap(), name, by_digest, &file, limit, &accept).await;
    if got.is_err() {
        // As fetch does whatever happens.
        let _ = std::fs::remove_file(&file);
    }
    let left = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.path()).collect();
    (got, left)
}

fn offer(name: &str, bytes: u64) -> PeerMessage {
    PeerMessage::PackageOffer { name: name.into(), package_bytes: bytes }
}

fn piece(b: &[u8]) -> PeerMessage {
    PeerMessage::PackagePiece { bytes: b.to_vec() }
}

fn end(data: &[u8]) -> PeerMessage {
    PeerMessage::PackageEnd { sha256: hex::encode(Sha256::digest(data)), signature: vec![] }
}

#[tokio::test]
async fn a_good_package_is_received_whole() {
    let (got, left) = from_holder(vec![offer("b", 7), piece(b"package"), end(b"package")], "b", 100).await;
    let (size, sha, name) = got.unwrap();
    assert_eq!((size, sha.as_str(), name.as_str()), (7, hex::encode(Sha256::digest(b"package")).as_str(), "b"));
    assert_eq!(left.len(), 1);
    // Asked by digest, it arrives under the holder's (plain) name.
    let digest = "ab".repeat(32);
    let (got, _) = from_holder(vec![offer("tiny-base", 1), piece(b"x"), end(b"x")], &digest, 100).await;
    assert_eq!(got.unwrap().2, "tiny-base");
}

#[tokio::test]
async fn hostile_holders_are_refused() {
    let digest = "ab".repeat(32);
    let cases: Vec<(Vec<PeerMessage>, &str, &str)> = vec![
        (vec![offer("b", 1 << 40)], "b", "TooLarge"),
        (vec![offer("other", 1)], "b", "Wrong"),
        (vec![offer("../x", 1)], &digest, "Wrong"),
        (vec![offer("held", 1), piece(b"x"), end(b"x")], &digest, "Exists"),
        (vec![offer("b", 3), piece(b"abcd")], "b", "Overrun"),
        (vec![offer("b", 4), piece(b"abc"), end(b"abc")], "b", "Short"),
        (vec![offer("b", 3), piece(b"abc"), end(b"abd")], "b", "Checksum"),
        (
            vec![
                offer("b", 3),
                piece(b"abc"),
                PeerMessage::PackageEnd { sha256: hex::encode(Sha256::digest(b"abc")), signature: vec![0; 1 << 20] },
            ],
            "b",
            "BadSignature",
        ),
        (vec![offer("b", 3), piece(b"ab")], "b", "Wire"),
        (vec![PeerMessage::PackageWanted { what: PackageKind::Base, name: "b".into() }], "b", "Unexpected"),
    ];
    for (msgs, name, want) in cases {
        let (got, left) = from_holder(msgs, name, 1 << 20).await;
        let e = got.expect_err(want);
        assert!(format!("{e:?}").starts_with(want) || format!("{e:?}").contains(want), "{want}: {e:?}");
        assert!(left.is_empty(), "{want}: {left:?} left behind");
    }
}
