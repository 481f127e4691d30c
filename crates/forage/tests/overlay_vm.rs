//! VM overlays with real guests: base VM, launch VM with the sample app, overlay in access
//! order, apply, bit-exact comparison with the launch VM, resume, and the app answers.

use std::time::Duration;

use forage_format::{ChunkRef, Space, CHUNK_SIZE};
use forage_synth::create::{CreateOptions, LaunchInput};
use forage_synth::launch::{self, LaunchOptions};
use forage_synth::BaseVm;
use forage_testkit::guest::*;
use forage_vm::Vm;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlay_create_apply_resume() {
    if skip_vm_tests() {
        return;
    }
    let data = data_dir();
    let accel = forage_vm::accel::detect().accel;
    let _ = BaseVm::remove(&data, "ovtest");
    let base = BaseVm::create(&data, "ovtest", &image(), accel, Duration::from_secs(3)).await.expect("base");
    assert_eq!(base.digest().len(), 64);

    let app = sample_app();
    let work = data.work().join("overlay-test");
    let _ = std::fs::remove_dir_all(&work);
    let lv = launch::build(&data, &base, &app, accel, &LaunchOptions::default(), &work).await.expect("launch VM");
    assert!(!lv.written_disk_chunks.is_empty(), "installing the app wrote to the disk");
    let profile =
        forage_synth::profile::profile_access(&data, &lv.snapshot, &lv.app, accel, &work).await.expect("profiling");
    assert!(profile.answer.starts_with("ok "), "{}", profile.answer);
    assert!(!profile.memory.is_empty());

    let input = LaunchInput {
        snapshot: &lv.snapshot,
        written_disk_chunks: &lv.written_disk_chunks,
        discarded_disk_chunks: &lv.discarded_disk_chunks,
        checkpoint: lv.checkpoint,
        service: None,
        accessed: Some((&profile.memory, &profile.disk)),
    };
    let ovl = work.join("app.ovl");
    let report = forage_synth::create::create(&base, &input, &CreateOptions::default(), &ovl).expect("overlay");
    let m = &report.manifest;
    assert!(
        report.bytes < m.stats.modified_bytes / 2,
        "overlay {} vs modified {}",
        report.bytes,
        m.stats.modified_bytes
    );
    assert!(m.stats.modified_memory_chunks > 0 && m.stats.modified_disk_chunks > 0);
    assert!(matches!(m.order, forage_format::Order::Access { .. }));

    let out = work.join("applied");
    let (snap, _) = forage_synth::apply::apply(&ovl, &base, &out, accel).expect("apply");
    let free: std::collections::HashSet<(Space, u64)> =
        m.chunks.iter().filter(|c| c.reference == ChunkRef::Free).map(|c| (c.space, c.index)).collect();
    for (space, got, want) in [
        (Space::Memory, snap.memory_path(), lv.snapshot.memory_path()),
        (Space::Disk, snap.disk_paths()[0].clone(), lv.snapshot.disk_paths()[0].clone()),
    ] {
        let (got, want) = (std::fs::read(&got).unwrap(), std::fs::read(&want).unwrap());
        let differ = got
            .chunks(CHUNK_SIZE)
            .zip(want.chunks(CHUNK_SIZE))
            .enumerate()
            .filter(|(i, (g, w))| g != w && !free.contains(&(space, *i as u64)))
            .count();
        assert_eq!(differ, 0, "{space:?}: {differ} chunks differ from the launch VM");
    }

    // Resume the rebuilt launch VM: the app is already running and answers.
    let run = run_paths("overlay-resume");
    std::fs::create_dir_all(&run.dir).unwrap();
    let fw = forage_image::loopback_forwards([forage_agent::AGENT_PORT, app.manifest().port]).unwrap();
    let port = fw[1].host_port;
    let spec = snap.relocated_spec(&run.dir, &run.qmp_socket, Some(fw));
    let vm = Vm::restore(&snap, spec, accel, &run.dir.join("qemu.log")).await.expect("resume");
    let answer = request(port, "count");
    assert!(field(&answer, "served") >= 1, "the launch VM's probe was counted: {answer}");
    vm.shutdown().await.unwrap();

    let _ = std::fs::remove_dir_all(&work);
    BaseVm::remove(&data, "ovtest").unwrap();
}
