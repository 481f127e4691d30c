//! A base VM from one cloudlet to another over the peer protocol (BaseWanted): the base
//! arrives with its digest, asked by name or by digest, a second fetch is refused, an unknown or badly named base
//! leaves nothing behind, and an unpaired address is refused before anything is sent.

mod common;

use common::Rig;
use forage_cloudlet::base_transfer::{fetch_base, BaseFetchError};
use forage_cloudlet::peer_link::PeerLinkError;
use forage_synth::BaseVm;
use forage_trust::PeerKind;

fn files(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_base_travels_between_paired_cloudlets() {
    let holder = Rig::new("holder", |_| {}).await;
    let asker = Rig::new("asker", |_| {}).await;
    let held = forage_testkit::synthetic::make_base(&holder.data, "b1", 7);
    // The asker is paired with the holder as a cloudlet, at the holder's address.
    let bundle = holder
        .cloudlet
        .trust
        .issue_bundle("asker", PeerKind::Cloudlet, forage_trust::DEFAULT_VALIDITY, Some(holder.addr))
        .unwrap();
    forage_trust::DeviceTrust::new(&asker.data.trust_peers())
        .import_bundle(&serde_json::to_vec(&bundle).unwrap())
        .unwrap();

    let report = fetch_base(&asker.data, "asker", holder.addr, "b1").await.expect("the base arrives");
    assert_eq!(report.digest, held.digest());
    assert!(report.package_bytes > 0, "{report:?}");
    let got = BaseVm::open(&asker.data, "b1").unwrap();
    assert_eq!(got.digest(), held.digest());
    assert_eq!(files(&asker.data.bases()), vec!["b1".to_string()], "only the base is left");
    assert!(!files(&holder.data.work()).iter().any(|f| f.starts_with("base-export")), "the holder's export is removed");

    let again = fetch_base(&asker.data, "asker", holder.addr, "b1").await;
    assert!(matches!(again, Err(BaseFetchError::Exists(_))), "{again:?}");
    let again = fetch_base(&asker.data, "asker", holder.addr, held.digest()).await;
    assert!(matches!(again, Err(BaseFetchError::Exists(_))), "by digest: {again:?}");

    // By digest (as a node of a cluster knows a base): it arrives under the holder's name.
    BaseVm::remove(&asker.data, "b1").unwrap();
    let report = fetch_base(&asker.data, "asker", holder.addr, held.digest()).await.expect("by digest");
    assert_eq!((report.base.as_str(), report.digest.as_str()), ("b1", held.digest()));
    let unknown = fetch_base(&asker.data, "asker", holder.addr, &"e".repeat(64)).await.unwrap_err();
    assert!(unknown.not_found(), "{unknown}");

    let unknown = fetch_base(&asker.data, "asker", holder.addr, "nope").await.unwrap_err();
    assert!(unknown.not_found(), "{unknown}");
    assert_eq!(files(&asker.data.bases()), vec!["b1".to_string()]);

    let bad = fetch_base(&asker.data, "asker", holder.addr, "../b1").await;
    assert!(matches!(bad, Err(BaseFetchError::BadName(_))), "{bad:?}");

    // No pairing recorded with this address: nothing is sent.
    let elsewhere: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let unpaired = fetch_base(&asker.data, "asker", elsewhere, "b2").await;
    assert!(matches!(unpaired, Err(BaseFetchError::Link(PeerLinkError::NotPaired { .. }))), "{unpaired:?}");
    holder.still_serves().await;
}

#[tokio::test]
async fn a_device_may_not_ask_for_a_base() {
    let holder = Rig::new("holder2", |_| {}).await;
    forage_testkit::synthetic::make_base(&holder.data, "b1", 7);
    let asker = Rig::new("asker2", |_| {}).await;
    // Paired as a device, not as a cloudlet: the peer protocol is refused.
    let bundle = holder
        .cloudlet
        .trust
        .issue_bundle("asker2", PeerKind::Device, forage_trust::DEFAULT_VALIDITY, Some(holder.addr))
        .unwrap();
    forage_trust::DeviceTrust::new(&asker.data.trust_peers())
        .import_bundle(&serde_json::to_vec(&bundle).unwrap())
        .unwrap();
    let refused = fetch_base(&asker.data, "asker2", holder.addr, "b1").await;
    assert!(
        matches!(
            refused,
            Err(BaseFetchError::Link(PeerLinkError::Refused { code: forage_proto::ErrorCode::Unpaired, .. }))
        ),
        "{refused:?}"
    );
    assert!(files(&asker.data.bases()).is_empty());
}
