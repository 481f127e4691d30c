//! A saved VM that was truncated, corrupted, or belongs to other hardware is refused with an
//! error naming the file, and no QEMU is left running.

use std::path::Path;

use forage_testkit::guest::*;
use forage_vm::{RestoreError, Snapshot, SnapshotError, Vm};

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        forage_vm::sparse::copy_sparse(&e.path(), &to.join(e.file_name())).unwrap();
    }
}

fn edit_manifest(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("snapshot.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_saves_are_refused() {
    if skip_vm_tests() {
        return;
    }
    let (guest, run) = boot("badsnap", &[]).await;
    let vm = guest.vm;
    let good = run.dir.parent().unwrap().join("good");
    vm.save(&good).await.unwrap();
    drop(vm);
    let work = run.dir.parent().unwrap().join("work");
    let accel = forage_vm::accel::detect().accel;

    // No snapshot.json: an interrupted save is not a snapshot.
    copy_dir(&good, &work);
    std::fs::remove_file(work.join("snapshot.json")).unwrap();
    assert!(matches!(Snapshot::open(&work), Err(SnapshotError::Missing { .. })));

    // Truncated device state.
    copy_dir(&good, &work);
    let state = work.join("state");
    let len = std::fs::metadata(&state).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&state).unwrap().set_len(len / 2).unwrap();
    let err = Snapshot::open(&work).unwrap_err();
    assert!(matches!(err, SnapshotError::WrongSize { .. }), "{err}");
    assert!(err.to_string().contains("state"), "{err}");

    // One flipped byte in the device state.
    copy_dir(&good, &work);
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&state, &bytes).unwrap();
    assert!(matches!(Snapshot::open(&work), Err(SnapshotError::StateChecksum { .. })));

    // Not a QEMU stream at all.
    copy_dir(&good, &work);
    let mut bytes = std::fs::read(&state).unwrap();
    bytes[0] = b'X';
    std::fs::write(&state, &bytes).unwrap();
    assert!(matches!(Snapshot::open(&work), Err(SnapshotError::NotAStateStream { .. })));

    // Truncated memory file.
    copy_dir(&good, &work);
    std::fs::OpenOptions::new().write(true).open(work.join("memory.raw")).unwrap().set_len(1 << 20).unwrap();
    assert!(matches!(Snapshot::open(&work), Err(SnapshotError::WrongSize { .. })));

    // A newer format than this forage knows.
    copy_dir(&good, &work);
    edit_manifest(&work, |v| v["format"] = 99.into());
    assert!(matches!(Snapshot::open(&work), Err(SnapshotError::NewerFormat { found: 99, .. })));

    // A truncated stream whose description was made to match: QEMU itself refuses it, and
    // the failed restore leaves no QEMU and no copied files behind.
    copy_dir(&good, &work);
    let bytes = std::fs::read(&state).unwrap();
    std::fs::write(&state, &bytes[..bytes.len() / 2]).unwrap();
    let sha = forage_vm::snapshot::sha256_file(&state).unwrap();
    edit_manifest(&work, |v| {
        v["state"]["size"] = (bytes.len() / 2).into();
        v["state"]["sha256"] = sha.into();
    });
    let snap = Snapshot::open(&work).expect("consistent description");
    let rrun = run_paths("badsnap-restore");
    std::fs::create_dir_all(&rrun.dir).unwrap();
    let spec = snap.relocated_spec(&rrun.dir, &rrun.qmp_socket, None);
    let err = Vm::restore(&snap, spec.clone(), accel, &rrun.dir.join("qemu.log")).await.err().expect("refused");
    assert!(matches!(err, RestoreError::Incoming { .. }), "{err}");
    assert!(err.to_string().contains("state"), "{err}");
    assert_no_qemu_with(rrun.qmp_socket.to_str().unwrap()).await;
    assert!(!spec.memory_file.exists(), "copied memory left behind");

    // Restoring into different hardware is refused before QEMU starts.
    let snap = Snapshot::open(&good).unwrap();
    let mut other = snap.relocated_spec(&rrun.dir, &rrun.qmp_socket, None);
    other.memory_mib = 512;
    let err = Vm::restore(&snap, other, accel, &rrun.dir.join("qemu.log")).await.err().expect("refused");
    assert!(matches!(err, RestoreError::Snapshot(SnapshotError::HardwareMismatch { .. })), "{err}");
    assert!(err.to_string().contains("512 MiB"), "{err}");
}

#[test]
fn missing_image_says_how_to_build_it() {
    let dir = tempfile::tempdir().unwrap();
    let err = forage_image::GuestImage::open(&forage_datadir::DataDir::at(dir.path()), "tiny").unwrap_err();
    assert!(err.to_string().contains("forage image build tiny"), "{err}");
}

#[tokio::test]
async fn missing_kernel_is_named_before_qemu_starts() {
    let dir = tempfile::tempdir().unwrap();
    let run = forage_image::RunPaths { dir: dir.path().to_path_buf(), qmp_socket: dir.path().join("q.sock") };
    // A spec from a fake image folder whose kernel does not exist.
    let spec = forage_vm::VmSpec {
        name: "nokernel".into(),
        machine: "pc".into(),
        cpu_model: None,
        vcpus: 1,
        max_vcpus: None,
        memory_mib: 64,
        memory_tail_kib: forage_vm::spec::RAM_TAIL_KIB,
        memory_file: run.dir.join("memory.raw"),
        boot: Some(forage_vm::DirectBoot {
            kernel: dir.path().join("vmlinuz"),
            initrd: dir.path().join("initrd.img"),
            cmdline: String::new(),
        }),
        disks: vec![],
        nic: None,
        balloon: None,
        guest_agent: None,
        virtio_rng: false,
        virtio_blk_queues: None,
        cdrom: None,
        serial_log: run.dir.join("serial.log"),
        serial_socket: None,
        qmp_socket: run.qmp_socket.clone(),
        control_socket: None,
    };
    match Vm::boot(spec, forage_vm::Accel::Tcg, &run.dir.join("qemu.log")).await {
        Err(forage_vm::VmError::MissingInput { path }) => assert!(path.ends_with("vmlinuz")),
        Err(forage_vm::VmError::QemuNotFound) => {}
        other => panic!("unexpected: {:?}", other.err()),
    }
}
