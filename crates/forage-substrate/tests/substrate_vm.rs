//! A tiny-guest substrate, for real: docked (one vCPU, ballooned down, NIC unplugged),
//! spilled out of a small pool and read back, activated twice at different sizes (each
//! gets a NIC plugged in and answers through it, each guest sees what it asked for,
//! neither sees the other's writes), and a corrupted copy refused before any file or QEMU
//! exists for it. A saved VM docked as it was saved, public: its activation renews the
//! guest's host name.

use forage_image::RunPaths;
use forage_substrate::{ActivateError, ActivateRequest, DockRequest, DockSource, Pool, Tier};
use forage_testkit::guest;

fn run(test: &str) -> RunPaths {
    guest::run_paths(test)
}

#[tokio::test(flavor = "multi_thread")]
async fn dock_spill_activate_twice_and_refuse_corruption() {
    if guest::skip_vm_tests() {
        return;
    }
    let data = guest::data_dir();
    let image = guest::image();
    let root = data.root().join("substrate-test");
    let mem = std::path::PathBuf::from(format!("/dev/shm/forage-substrate-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let pool = Pool::at(root.clone(), mem.clone()).unwrap();
    let accel = forage_vm::accel::detect().accel;

    let req = DockRequest {
        name: "tiny-sub".into(),
        image: image.clone(),
        source: DockSource::Boot { app: None, max_vcpus: 2, max_memory_mib: 256 },
        public: false,
        detach_nic: true,
        zstd_level: forage_substrate::format::DEFAULT_LEVEL,
        accel,
        ready_timeout: guest::READY,
    };
    let d = forage_substrate::dock(&data, &pool, req).await.expect("docks");
    eprintln!("{d:?}");
    assert!(d.docked_memory_bytes < d.memory_bytes / 2, "the balloon shrank the guest: {d:?}");
    assert!(d.memory_data_bytes < d.memory_bytes / 2, "the memory file keeps only used pages: {d:?}");
    assert!(d.compressed_bytes < d.raw_bytes / 4, "{d:?}");
    assert!(d.nic_detached, "the substrate holds no NIC: {d:?}");
    let m = forage_substrate::format::verify(&pool.entry("tiny-sub").unwrap().path).unwrap();
    assert!(m.snapshot.spec.nic.is_none() && m.nic.is_some(), "{:?} {:?}", m.snapshot.spec.nic, m.nic);
    assert_eq!(pool.entry("tiny-sub").unwrap().tier, Tier::Memory);

    // A budget smaller than the substrate spills it; activation reads it back.
    assert_eq!(pool.set_budget(1 << 20).unwrap(), ["tiny-sub"]);
    assert_eq!(pool.entry("tiny-sub").unwrap().tier, Tier::Disk);
    pool.set_budget(1 << 30).unwrap();

    let activate = |vm: &str, vcpus, memory_mib| ActivateRequest {
        substrate: "tiny-sub".into(),
        vcpus,
        memory_mib,
        accel,
        run: run(vm),
        vm_name: vm.into(),
        detached: false,
    };
    let a = forage_substrate::activate(&data, &pool, activate("sub-a", 2, 200)).await.expect("activates");
    eprintln!("{:?}", a.report);
    assert!(a.report.reloaded_from_disk);
    assert_eq!(pool.entry("tiny-sub").unwrap().tier, Tier::Memory);
    let b = forage_substrate::activate(&data, &pool, activate("sub-b", 1, 128)).await.expect("activates again");
    eprintln!("{:?}", b.report);
    for (x, vcpus, mib) in [(&a, 2, 200u64), (&b, 1, 128)] {
        let port = x.report.agent_port;
        assert!(x.report.nic_plugged);
        // The agent answers through the NIC plugged in on the substrate's slot (0x10).
        let nic = guest::guest_sh(port, "readlink -f /sys/class/net/eth0/device").await;
        assert!(nic.contains("/0000:00:10.0/"), "eth0 is {nic}");
        assert_eq!(guest::guest_sh(port, "nproc").await.trim(), vcpus.to_string(), "online vCPUs");
        let total = forage_substrate::dock::meminfo(&guest::guest_sh(port, "cat /proc/meminfo").await).0 >> 20;
        assert!(total <= mib && total + 48 >= mib, "MemTotal {total} MiB for {mib} MiB asked");
    }
    // Independent: memory (tmpfs) and disk (copy-on-write layer) writes stay in one VM.
    guest::guest_sh(a.report.agent_port, "echo a > /tmp/mark && echo a > /data/mark && sync").await;
    assert_eq!(
        guest::guest_sh(b.report.agent_port, "cat /tmp/mark /data/mark 2>/dev/null; echo end").await.trim(),
        "end"
    );
    a.vm.shutdown().await.unwrap();
    assert_eq!(guest::guest_sh(b.report.agent_port, "echo alive").await.trim(), "alive", "b runs on alone");
    b.vm.shutdown().await.unwrap();

    // A corrupted substrate is refused before anything is written or started.
    let good = pool.entry("tiny-sub").unwrap().path;
    let mut bytes = std::fs::read(&good).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    let staged = pool.staging("tiny-bad").unwrap();
    std::fs::write(&staged, &bytes).unwrap();
    pool.insert("tiny-bad", &staged).unwrap();
    let bad_run = run("sub-bad");
    let _ = std::fs::remove_dir_all(&bad_run.dir);
    let mut req = activate("sub-bad", 1, 128);
    req.substrate = "tiny-bad".into();
    let e = forage_substrate::activate(&data, &pool, req).await.err().expect("refused");
    assert!(matches!(e, ActivateError::Refused { .. }), "{e}");
    assert!(!bad_run.dir.exists(), "nothing written for a refused substrate");
    assert!(!pool.disks_dir("tiny-bad").unwrap().exists());
    // The one pass that verifies also decodes: its partial folders are gone too.
    let disks = pool.disks_dir("tiny-bad").unwrap().parent().unwrap().to_path_buf();
    let left: Vec<_> = std::fs::read_dir(&disks).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.iter().all(|n| !n.to_string_lossy().contains("tiny-bad")), "left behind: {left:?}");
    guest::assert_no_qemu_with("sub-bad").await;

    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_dir_all(&mem);
}

/// A saved VM (what a service of the repository or a base VM is) docked as it was saved:
/// restored, shrunk, saved, encoded; its NIC (on an automatic PCI slot) stays. Docked
/// public, so the activation renews the guest's host name; what the guest held in memory
/// when it was saved is still there.
#[tokio::test(flavor = "multi_thread")]
async fn dock_a_saved_vm_public() {
    if guest::skip_vm_tests() {
        return;
    }
    let data = guest::data_dir();
    let image = guest::image();
    let root = data.root().join("substrate-saved-test");
    let mem = std::path::PathBuf::from(format!("/dev/shm/forage-substrate-saved-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let pool = Pool::at(root.clone(), mem.clone()).unwrap();
    let accel = forage_vm::accel::detect().accel;

    let saved_run = run("sub-saved");
    let _ = std::fs::remove_dir_all(&saved_run.dir);
    let (spec, ports) = image.fresh_run("sub-saved", &saved_run, &[]).unwrap();
    let vm = forage_vm::Vm::boot(spec, accel, &saved_run.dir.join("qemu.log")).await.unwrap();
    vm.wait_for_serial(&image.manifest().ready_marker, guest::READY).await.unwrap();
    guest::guest_sh(ports[0], "echo saved > /tmp/mark; cat /proc/sys/kernel/hostname > /tmp/name").await;
    let snapshot = vm.save(&saved_run.dir.join("snapshot")).await.unwrap();
    vm.shutdown().await.unwrap();

    let req = DockRequest {
        name: "tiny-saved".into(),
        image: image.clone(),
        source: DockSource::Saved {
            snapshot: Box::new(snapshot),
            service_port: None,
            label: "service:tiny-saved".into(),
        },
        public: true,
        detach_nic: true,
        zstd_level: forage_substrate::format::DEFAULT_LEVEL,
        accel,
        ready_timeout: guest::READY,
    };
    let d = forage_substrate::dock(&data, &pool, req).await.expect("docks");
    eprintln!("{d:?}");
    assert!(!d.nic_detached, "a NIC on an automatic slot stays");
    assert!(d.docked_memory_bytes < d.memory_bytes / 2, "the balloon shrank the guest: {d:?}");

    let req = ActivateRequest {
        substrate: "tiny-saved".into(),
        vcpus: 1,
        memory_mib: 128,
        accel,
        run: run("sub-saved-a"),
        vm_name: "sub-saved-a".into(),
        detached: false,
    };
    let a = forage_substrate::activate(&data, &pool, req).await.expect("activates");
    eprintln!("{:?}", a.report);
    assert_eq!(a.report.renewed, ["hostname"], "the tiny guest has a host name, no machine-id or SSH keys");
    let port = a.report.agent_port;
    assert_eq!(guest::guest_sh(port, "cat /tmp/mark").await.trim(), "saved");
    let (old, new) =
        (guest::guest_sh(port, "cat /tmp/name").await, guest::guest_sh(port, "cat /proc/sys/kernel/hostname").await);
    assert!(new.starts_with("forage-") && new != old, "host name {old:?} renewed to {new:?}");
    a.vm.shutdown().await.unwrap();

    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_dir_all(&mem);
}
