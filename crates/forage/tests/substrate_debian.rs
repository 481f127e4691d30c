//! A Debian service VM as a substrate: debian-12 with the sample service (hashsearch)
//! docked public (one vCPU, ballooned down, its disk kept as a difference against the
//! image; its NIC stays: a Debian guest did not bring a plugged-in NIC up), then activated
//! twice at different sizes: the service answers in each, each guest sees the vCPUs and
//! memory it asked for, and each renewed its machine-id (the two differ). Slow under TCG (the image is built, or found cached, by
//! the same call as `debian_vm.rs`); `FORAGE_SKIP_VM_TESTS=1` skips it.

use std::time::Duration;

use forage_substrate::{ActivateRequest, DockRequest, DockSource, Pool};
use forage_testkit::guest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_service_substrate_activates_twice_at_the_sizes_asked() {
    if guest::skip_vm_tests() {
        return;
    }
    let data = guest::data_dir();
    let agent = forage_image::locate_guest_binary("forage-agent").expect("run `make guest` first");
    let image = forage_image::build(&data, forage_image::DEBIAN_12, &forage_image::BuildOptions::new(agent))
        .expect("debian-12 builds")
        .image;
    let root = data.root().join("substrate-debian-test");
    let mem = std::path::PathBuf::from(format!("/dev/shm/forage-substrate-debian-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let pool = Pool::at(root.clone(), mem.clone()).unwrap();
    let accel = forage_vm::accel::detect().accel;
    let app = guest::sample_app();
    let probe = app.manifest().probe.clone().unwrap();
    let req = DockRequest {
        name: "debian-web".into(),
        image,
        source: DockSource::Boot { app: Some(app), max_vcpus: 2, max_memory_mib: 1024 },
        public: true,
        detach_nic: false,
        zstd_level: forage_substrate::format::DEFAULT_LEVEL,
        accel,
        ready_timeout: Duration::from_secs(600),
    };
    let d = forage_substrate::dock(&data, &pool, req).await.expect("docks");
    eprintln!("{d:?}");
    assert!(d.docked_memory_bytes < d.memory_bytes / 2, "{d:?}");
    assert!(d.compressed_bytes < 64 << 20, "memory and a disk difference, not the whole disk: {d:?}");

    let mut vms = Vec::new();
    let mut machine_ids = Vec::new();
    for (vm, vcpus, mib) in [("deb-sub-a", 2u32, 768u64), ("deb-sub-b", 1, 512)] {
        let req = ActivateRequest {
            substrate: "debian-web".into(),
            vcpus,
            memory_mib: mib,
            accel,
            run: guest::run_paths(vm),
            vm_name: vm.into(),
            detached: false,
        };
        let a = forage_substrate::activate(&data, &pool, req).await.expect("activates");
        eprintln!("{:?}", a.report);
        assert!(a.report.renewed.iter().any(|r| r == "machine-id"), "{:?}", a.report.renewed);
        let agent = a.report.agent_port;
        let id = forage_substrate::dock::with_agent(agent, Duration::from_secs(30), |c| {
            c.exec_ok(&["cat", "/etc/machine-id"], Duration::from_secs(10))
        })
        .await
        .unwrap()
        .stdout;
        machine_ids.push(id.trim().to_string());
        let (_, port) = a.report.service_port.expect("the service's port is forwarded");
        let answer = guest::request(port, &probe);
        assert!(answer.contains("served="), "the service answers: {answer}");
        assert_eq!(a.report.guest_vcpus, vcpus);
        let total = a.report.guest_mem_total_bytes >> 20;
        assert!(total <= mib && total + 96 >= mib, "MemTotal {total} MiB for {mib} MiB asked");
        vms.push(a.vm);
    }
    assert_eq!(machine_ids[0].len(), 32, "{machine_ids:?}");
    assert_ne!(machine_ids[0], machine_ids[1], "each activation renewed the machine-id");
    for vm in vms {
        vm.shutdown().await.unwrap();
    }
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_dir_all(&mem);
}
