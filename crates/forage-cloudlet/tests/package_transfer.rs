//! A base VM and a service VM from one cloudlet to another over the peer protocol
//! (PackageWanted): the base arrives with its digest, asked by name or by digest, the
//! service with its files; a second fetch is refused, an unknown or badly named one
//! leaves nothing behind, and an unpaired address is refused before anything is sent.

mod common;

use common::Rig;
use forage_cloudlet::package_transfer::{fetch, PackageFetchError, PackageFetchReport};
use forage_cloudlet::peer_link::PeerLinkError;
use forage_datadir::DataDir;
use forage_proto::PackageKind;
use forage_synth::BaseVm;
use forage_trust::PeerKind;

async fn fetch_base(
    data: &DataDir,
    me: &str,
    from: std::net::SocketAddr,
    name: &str,
) -> Result<PackageFetchReport, PackageFetchError> {
    fetch(data, me, from, PackageKind::Base, name).await
}

/// A service VM of synthetic parts in `data`'s repository.
fn make_service(data: &DataDir, id: &str) -> forage_service::ServiceVm {
    let repo = forage_service::Repository::new(data);
    let staging = repo.staging(id).unwrap();
    forage_testkit::synthetic::describe_snapshot_of(&staging.join("snapshot"));
    let json = format!(
        r#"{{"kind":"forage-service","format":1,"id":"{id}","os":"linux-x86_64","image":"tiny","port":8080,"probe":"search forage 12","description":"","source":"a test","client_apps":[],"created_unix":1795000000}}"#
    );
    let manifest = forage_service::ServiceManifest::parse(json.as_bytes()).unwrap();
    repo.install(&staging, manifest, &[]).unwrap()
}

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
async fn a_base_and_a_service_travel_between_paired_cloudlets() {
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
    assert_eq!(report.base_digest.as_deref(), Some(held.digest()));
    assert!(report.package_bytes > 0, "{report:?}");
    let got = BaseVm::open(&asker.data, "b1").unwrap();
    assert_eq!(got.digest(), held.digest());
    assert_eq!(files(&asker.data.bases()), vec!["b1".to_string()], "only the base is left");
    assert!(files(&holder.data.work()).iter().all(|f| !f.starts_with("session-")), "the holder's export is removed");

    let again = fetch_base(&asker.data, "asker", holder.addr, "b1").await;
    assert!(matches!(again, Err(PackageFetchError::Exists { .. })), "{again:?}");
    let again = fetch_base(&asker.data, "asker", holder.addr, held.digest()).await;
    assert!(matches!(again, Err(PackageFetchError::Exists { .. })), "by digest: {again:?}");

    // By digest (as a node of a cluster knows a base): it arrives under the holder's name.
    BaseVm::remove(&asker.data, "b1").unwrap();
    let report = fetch_base(&asker.data, "asker", holder.addr, held.digest()).await.expect("by digest");
    assert_eq!((report.name.as_str(), report.base_digest.as_deref()), ("b1", Some(held.digest())));
    let unknown = fetch_base(&asker.data, "asker", holder.addr, &"e".repeat(64)).await.unwrap_err();
    assert!(unknown.not_found(), "{unknown}");

    let unknown = fetch_base(&asker.data, "asker", holder.addr, "nope").await.unwrap_err();
    assert!(unknown.not_found(), "{unknown}");
    assert_eq!(files(&asker.data.bases()), vec!["b1".to_string()]);

    let bad = fetch_base(&asker.data, "asker", holder.addr, "../b1").await;
    assert!(matches!(bad, Err(PackageFetchError::BadName { .. })), "{bad:?}");

    // A service VM: its package arrives and imports with its files (on the local guest
    // image of its name, which the asker must have: the tiny image, built once).
    let image = forage_testkit::guest::image();
    std::fs::create_dir_all(asker.data.images()).unwrap();
    let copied = std::process::Command::new("cp").arg("-r").arg(image.dir()).arg(asker.data.images()).status().unwrap();
    assert!(copied.success());
    let svc = make_service(&holder.data, "svc1");
    let report =
        fetch(&asker.data, "asker", holder.addr, PackageKind::Service, "svc1").await.expect("the service arrives");
    assert_eq!((report.name.as_str(), report.base_digest.as_deref()), ("svc1", None));
    let got = forage_service::Repository::new(&asker.data).open("svc1").unwrap();
    assert_eq!(got.manifest().probe, svc.manifest().probe);
    assert_eq!(files(&asker.data.services()), vec!["svc1".to_string()], "only the service is left");
    let unknown = fetch(&asker.data, "asker", holder.addr, PackageKind::Service, "nope").await.unwrap_err();
    assert!(unknown.not_found(), "{unknown}");
    let bad = fetch(&asker.data, "asker", holder.addr, PackageKind::Service, &"a".repeat(64).replace('a', "0")).await;
    assert!(matches!(bad, Err(ref e) if e.not_found()), "a digest is no service id: {bad:?}");

    // No pairing recorded with this address: nothing is sent.
    let elsewhere: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let unpaired = fetch_base(&asker.data, "asker", elsewhere, "b2").await;
    assert!(matches!(unpaired, Err(PackageFetchError::Link(PeerLinkError::NotPaired { .. }))), "{unpaired:?}");
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
            Err(PackageFetchError::Link(PeerLinkError::Refused { code: forage_proto::ErrorCode::Unpaired, .. }))
        ),
        "{refused:?}"
    );
    assert!(files(&asker.data.bases()).is_empty());
}
