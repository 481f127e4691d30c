//! CPU compatibility: a base (and its overlays) record the CPU model and accelerator their
//! VMs need; a cloudlet that cannot provide them refuses at the offer, before the device
//! sends any of the overlay, with what is needed and what is missing. No VM is started.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use forage_client::{ClientError, SynthesisOptions};
use forage_proto::ErrorCode;
use forage_synth::base::BaseManifest;
use forage_vm::snapshot::SnapshotManifest;
use forage_vm::Accel;

/// Rewrite the snapshot description in `dir` as if it had been saved under `accel`.
fn saved_under(dir: &std::path::Path, accel: Accel) {
    let p = dir.join("snapshot.json");
    let mut m: SnapshotManifest = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    m.accel = accel;
    std::fs::write(&p, serde_json::to_vec(&m).unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_saved_under_another_accelerator_is_refused_before_any_segment() {
    // The cloudlet runs TCG; the base comes from a KVM host.
    let rig = Rig::new("tcg-cloudlet", |_| {}).await;
    let (base, ovl) = forage_testkit::synthetic::make_overlay(&rig.data, "from-kvm", rig.dir.path());
    let bdir = base.dir().to_path_buf();
    saved_under(&bdir.join("snapshot"), Accel::Kvm);
    let bpath = bdir.join("base.json");
    let mut bm: BaseManifest = serde_json::from_slice(&std::fs::read(&bpath).unwrap()).unwrap();
    bm.cpu.as_mut().expect("bases record their CPU").accel = Accel::Kvm;
    std::fs::write(&bpath, serde_json::to_vec(&bm).unwrap()).unwrap();
    let reopened = forage_synth::BaseVm::open(&rig.data, "from-kvm").unwrap();
    assert_eq!(reopened.cpu_needs().to_string(), "CPU model qemu64 under kvm");

    let sent = Arc::new(AtomicU64::new(0));
    let opts = SynthesisOptions {
        device: "tester".into(),
        early_start: true,
        credentials: Some(rig.device.clone()),
        sent: Some(sent.clone()),
        ..Default::default()
    };
    let err = forage_client::synthesize(&ovl, rig.addr, &opts).await.map(|r| r.0).unwrap_err();
    match &err {
        ClientError::Refused { code: ErrorCode::NoBase, message, .. } => {
            assert!(message.contains("needs CPU model qemu64 under kvm"), "{message}");
            assert!(message.contains("saved under kvm and this host runs tcg"), "{message}");
        }
        other => panic!("not refused for its CPU: {other}"),
    }
    assert_eq!(sent.load(Ordering::SeqCst), 0, "segment bytes were sent before the refusal");
    // Nothing of the session is left.
    let work: Vec<_> = std::fs::read_dir(rig.data.work()).map(|d| d.flatten().collect()).unwrap_or_default();
    assert!(work.is_empty(), "{work:?}");
    rig.still_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overlay_whose_launch_vm_needs_another_cpu_is_refused_at_its_manifest() {
    let rig = Rig::new("tcg-cloudlet-2", |_| {}).await;
    let base = forage_testkit::synthetic::make_base(&rig.data, "b", 0);
    // The launch VM was saved with a CPU model TCG cannot give in full.
    let launch = forage_testkit::synthetic::make_launch(&rig.dir.path().join("launch"));
    let p = launch.snap.dir().join("snapshot.json");
    let mut m: SnapshotManifest = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    m.accel = Accel::Kvm;
    std::fs::write(&p, serde_json::to_vec(&m).unwrap()).unwrap();
    let launch =
        forage_testkit::synthetic::Launch { snap: forage_vm::Snapshot::open(launch.snap.dir()).unwrap(), ..launch };
    let ovl = rig.dir.path().join("kvm.ovl");
    let input = forage_testkit::synthetic::input(&launch);
    forage_synth::create::create(&base, &input, &forage_testkit::synthetic::opts(), &ovl).unwrap();
    let opts = SynthesisOptions {
        device: "tester".into(),
        early_start: true,
        credentials: Some(rig.device.clone()),
        ..Default::default()
    };
    let err = forage_client::synthesize(&ovl, rig.addr, &opts).await.map(|r| r.0).unwrap_err();
    match &err {
        ClientError::Refused { code: ErrorCode::BadOverlay, message, .. } => {
            assert!(message.contains("launch VM needs CPU model qemu64 under kvm"), "{message}")
        }
        other => panic!("not refused for its CPU: {other}"),
    }
    rig.still_serves().await;
}
