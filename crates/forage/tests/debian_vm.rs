//! The debian-12 guest (Debian bookworm from Debian's packages, systemd, qemu-ga) under
//! QEMU (TCG here): it boots, is saved and restored with its state carried on; a launch VM
//! of an app made of Debian packages is built offline, its overlay applies bit-exactly
//! (the chunks it declares free aside), and the applied VM's service answers correctly.
//!
//! Slow under TCG (minutes): the image is built once into the shared test data dir and
//! cached there; `FORAGE_SKIP_VM_TESTS=1` skips both tests.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use forage_agent::AgentClient;
use forage_format::{ChunkRef, Space, CHUNK_SIZE};
use forage_image::GuestImage;
use forage_testkit::guest::*;
use forage_vm::qga::{FreezeStatus, GuestAgent};
use forage_vm::{Snapshot, Vm};

/// The debian-12 image, built (or found cached) once per test binary.
fn debian_image() -> GuestImage {
    static IMAGE: OnceLock<GuestImage> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let agent = forage_image::locate_guest_binary("forage-agent").expect("run `make guest` first");
            let t = Instant::now();
            let out =
                forage_image::build(&data_dir(), forage_image::DEBIAN_12, &forage_image::BuildOptions::new(agent))
                    .expect("debian-12 builds");
            eprintln!(
                "debian-12 image {} in {:.1} s",
                if out.cached { "cached" } else { "built" },
                t.elapsed().as_secs_f64()
            );
            out.image
        })
        .clone()
}

/// Chunks of `got` unequal to `want`'s, but those `skip` names, read a MiB at a time (a
/// Debian VM's memory and disk are GiBs).
fn differing_chunks(got: &std::path::Path, want: &std::path::Path, skip: impl Fn(u64) -> bool) -> usize {
    use std::io::Read;
    let (mut g, mut w) = (std::fs::File::open(got).unwrap(), std::fs::File::open(want).unwrap());
    assert_eq!(g.metadata().unwrap().len(), w.metadata().unwrap().len(), "{got:?} and {want:?}: sizes");
    let (mut gb, mut wb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let (mut index, mut differ) = (0u64, 0);
    let fill = |f: &mut std::fs::File, buf: &mut [u8]| {
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..]).unwrap() {
                0 => break,
                k => n += k,
            }
        }
        n
    };
    loop {
        let n = fill(&mut g, &mut gb);
        if n == 0 {
            return differ;
        }
        assert_eq!(fill(&mut w, &mut wb[..n]), n);
        for (a, b) in gb[..n].chunks(CHUNK_SIZE).zip(wb[..n].chunks(CHUNK_SIZE)) {
            differ += usize::from(a != b && !skip(index));
            index += 1;
        }
    }
}

fn guest_app(name: &str) -> forage_agent::app::AppPackage {
    let dir = forage_image::locate_guest_binary(&format!("apps/{name}")).expect("run `make guest` first");
    forage_agent::app::AppPackage::open(&dir).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_guest_boots_saves_restores_and_carries_on() {
    if skip_vm_tests() {
        return;
    }
    let t0 = Instant::now();
    let image = debian_image();
    let m = image.manifest();
    assert_eq!((m.root, m.guest_agent, m.disk_mount.as_str()), (forage_image::RootFs::Disk, true, "/"));
    let app = sample_app(); // hashsearch: static, runs on any Linux guest
    let port = app.manifest().port;
    let run = run_paths("debian-lifecycle");
    let accel = forage_vm::accel::detect().accel;
    let guest =
        image.boot("debian-lifecycle", &run, &[port], accel, READY).await.expect("debian-12 boots to its ready marker");
    eprintln!("debian-12 ready in {:.1} s", guest.boot_time.as_secs_f64());

    // qemu-ga answers on its virtio-serial channel.
    let qga_socket = guest.vm.spec().guest_agent.clone().expect("a qemu-ga channel").socket;
    let mut ga = GuestAgent::connect(&qga_socket, Duration::from_secs(120)).await.expect("qemu-ga answers");
    ga.ping().await.unwrap();
    assert_eq!(ga.fsfreeze_status().await.unwrap(), FreezeStatus::Thawed);
    let out = ga
        .run(
            "/bin/sh",
            &["-c", ". /etc/os-release; echo $VERSION_CODENAME; systemctl is-system-running"],
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.starts_with("bookworm\n"), "{text}");
    assert!(text.contains("running"), "systemd is not settled: {text}");
    assert!(ga.fstrim(None).await.unwrap().iter().any(|p| p.path == "/" && p.error.is_none()));
    let frozen = ga.fsfreeze_freeze().await.unwrap();
    assert!(frozen >= 1);
    assert_eq!(ga.fsfreeze_status().await.unwrap(), FreezeStatus::Frozen);
    ga.fsfreeze_thaw().await.unwrap();
    drop(ga);

    // The forage agent (a systemd service) installs an app; apt is there, pointing at Debian.
    let agent_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, guest.agent_port));
    let app2 = app.clone();
    tokio::task::spawn_blocking(move || {
        let mut agent = AgentClient::connect(agent_addr, Duration::from_secs(60)).unwrap();
        app2.install(&mut agent).unwrap();
        let apt = agent
            .exec(&["sh", "-c", "apt-config dump | grep -c . && cat /etc/apt/sources.list"], Duration::from_secs(60))
            .unwrap();
        assert!(apt.stdout.contains("deb http://deb.debian.org/debian bookworm main"), "{}", apt.stdout);
        let order = agent
            .exec(&["cat", "/sys/module/page_reporting/parameters/page_reporting_order"], Duration::from_secs(10))
            .unwrap();
        assert_eq!(order.stdout.trim(), "0", "free pages are reported from 4 KiB");
    })
    .await
    .unwrap();
    let first = request(guest.ports[0], "search debian 12");
    assert_eq!(field(&first, "served"), 1, "{first}");
    let serial = guest.vm.spec().serial_log.clone();
    wait_ticks(&serial, 2).await;

    // Save, then restore into a new QEMU: the service's counter and the heartbeat go on.
    let vm = guest.vm;
    let snap_dir = run.dir.parent().unwrap().join("snapshot");
    let snap = vm.save(&snap_dir).await.expect("save works");
    let last_before = *ticks(&serial).last().unwrap();
    assert_eq!(snap.manifest().memory.size, (1 << 30) + forage_vm::spec::RAM_TAIL_KIB * 1024);
    eprintln!(
        "saved: memory {} MiB in use of 1024, disk {} MiB allocated, device state {} KiB",
        forage_vm::sparse::allocated_bytes(&snap.memory_path()).unwrap() >> 20,
        forage_vm::sparse::allocated_bytes(&snap.disk_paths()[0]).unwrap() >> 20,
        snap.manifest().state.size >> 10
    );
    drop(vm);
    let rrun = run_paths("debian-lifecycle-r");
    std::fs::create_dir_all(&rrun.dir).unwrap();
    let fw = forage_image::loopback_forwards([forage_image::AGENT_PORT, port]).unwrap();
    let spec = snap.relocated_spec(&rrun.dir, &rrun.qmp_socket, Some(fw.clone()));
    assert_eq!(spec.guest_agent.as_ref().unwrap().socket, rrun.guest_agent_socket());
    let t = Instant::now();
    let vm2 = Vm::restore(&Snapshot::open(&snap_dir).unwrap(), spec, accel, &rrun.dir.join("qemu.log"))
        .await
        .expect("restore works");
    let again = request(fw[1].host_port, "search debian-2 12");
    eprintln!("restored; first answer after {:.2} s", t.elapsed().as_secs_f64());
    assert_eq!(field(&again, "served"), 2, "{again}");
    let after = wait_ticks(&vm2.spec().serial_log, 1).await;
    assert!(after[0] > last_before && after[0] <= last_before + 3, "tick {last_before} -> {}", after[0]);
    // qemu-ga is reachable through the restored VM's own socket (a new connection syncs).
    let mut ga =
        GuestAgent::connect(&rrun.guest_agent_socket(), Duration::from_secs(60)).await.expect("qemu-ga after restore");
    ga.ping().await.unwrap();
    drop(ga);
    vm2.shutdown().await.unwrap();
    assert_no_qemu_with(rrun.qmp_socket.to_str().unwrap()).await;
    eprintln!("debian lifecycle test: {:.1} s", t0.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_vm_of_an_app_from_debian_packages_answers_offline() {
    if skip_vm_tests() {
        return;
    }
    let t0 = Instant::now();
    let data = data_dir();
    let image = debian_image();
    let app = guest_app("ocr");
    assert!(!app.manifest().debs.is_empty());
    let name = "debian-launch-test";
    let _ = forage_synth::BaseVm::remove(&data, name);
    let accel = forage_vm::accel::detect().accel;
    let base = forage_synth::BaseVm::create(&data, name, &image, accel, Duration::from_secs(3))
        .await
        .expect("base of debian-12");
    eprintln!("base created after {:.1} s", t0.elapsed().as_secs_f64());

    // The guest has no network (restricted user networking): the packages come from the host.
    let work = data.work().join("debian-launch-test");
    let _ = std::fs::remove_dir_all(&work);
    let opts = forage_synth::launch::LaunchOptions { app_ready: Duration::from_secs(300), ..Default::default() };
    let launch = forage_synth::launch::build(&data, &base, &app, accel, &opts, &work).await.expect("launch VM builds");
    let debs = launch.debs.as_ref().expect("the app's packages were installed");
    assert!(debs.installed.iter().any(|p| p.starts_with("tesseract-ocr=")), "{:?}", debs.installed);
    eprintln!(
        "launch VM built after {:.1} s: {} packages, {} MiB of .debs, guest disk +{} MiB, install {:.1} s",
        t0.elapsed().as_secs_f64(),
        debs.installed.len(),
        debs.download_bytes >> 20,
        debs.disk_growth_bytes >> 20,
        debs.took.as_secs_f64()
    );
    // A second resolution for the same guest finds everything in the host's cache.
    let archives = forage_image::apt::GuestApt::new(&data).archives();
    assert!(std::fs::read_dir(&archives)
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("tesseract-ocr_")));

    // Its overlay (semantic gap on the checkpointed ext4, dedup; zstd -1 and no delta to
    // keep a debug build quick) applies to a launch VM equal to this one, chunk for chunk,
    // but for the chunks the overlay declared free.
    let input = forage_synth::create::LaunchInput {
        snapshot: &launch.snapshot,
        written_disk_chunks: &launch.written_disk_chunks,
        discarded_disk_chunks: &launch.discarded_disk_chunks,
        checkpoint: launch.checkpoint,
        service: None,
        accessed: None,
    };
    let create = forage_synth::create::CreateOptions {
        codec: forage_format::SegmentCodec::Zstd { level: 1 },
        delta: None,
        ..Default::default()
    };
    let t = Instant::now();
    let ovl = work.join("ocr.ovl");
    let report = forage_synth::create::create(&base, &input, &create, &ovl).expect("overlay of the Debian app");
    let m = &report.manifest;
    let free: std::collections::HashSet<(Space, u64)> =
        m.chunks.iter().filter(|c| c.reference == ChunkRef::Free).map(|c| (c.space, c.index)).collect();
    assert!(m.chunks.iter().any(|c| c.reference == ChunkRef::Free), "the semantic gap dropped free ext4 blocks");
    eprintln!(
        "overlay {} MiB of {} MiB modified ({} free chunks) in {:.1} s",
        report.bytes >> 20,
        m.stats.modified_bytes >> 20,
        free.len(),
        t.elapsed().as_secs_f64()
    );
    let (snap, _) = forage_synth::apply::apply(&ovl, &base, &work.join("applied"), accel).expect("the overlay applies");
    for (space, got, want) in [
        (Space::Memory, snap.memory_path(), launch.snapshot.memory_path()),
        (Space::Disk, snap.disk_paths()[0].clone(), launch.snapshot.disk_paths()[0].clone()),
    ] {
        let differ = differing_chunks(&got, &want, |i| free.contains(&(space, i)));
        assert_eq!(differ, 0, "{space:?}: {differ} chunks differ from the launch VM");
    }

    // Resume the applied launch VM: its service answers the request with the image's words.
    let run = run_paths("debian-launch-r");
    std::fs::create_dir_all(&run.dir).unwrap();
    let fw = forage_image::loopback_forwards([forage_image::AGENT_PORT, app.manifest().port]).unwrap();
    let spec = snap.relocated_spec(&run.dir, &run.qmp_socket, Some(fw.clone()));
    let t = Instant::now();
    let vm = Vm::restore(&snap, spec, accel, &run.dir.join("qemu.log")).await.expect("launch VM resumes");
    let probe = app.manifest().probe.clone().unwrap();
    let answer = request(fw[1].host_port, &probe);
    eprintln!("first response after resume in {:.2} s: {answer}", t.elapsed().as_secs_f64());
    assert!(answer.starts_with("ok words=HELLO,FORAGE,CLOUDLET "), "{answer}");
    assert_eq!(field(&answer, "served"), 2, "the launch build's probe was the first: {answer}");
    // No .debs or apt caches were left in the guest for the overlay to carry.
    let agent_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, fw[0].host_port));
    tokio::task::spawn_blocking(move || {
        let mut agent = AgentClient::connect(agent_addr, Duration::from_secs(60)).unwrap();
        let left = agent
            .exec(
                &["sh", "-c", "ls /var/cache/forage-debs /var/cache/apt/archives/*.deb 2>/dev/null | wc -l"],
                Duration::from_secs(30),
            )
            .unwrap();
        assert_eq!(left.stdout.trim(), "0");
    })
    .await
    .unwrap();
    vm.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&work);
    forage_synth::BaseVm::remove(&data, name).unwrap();
    eprintln!("debian launch test: {:.1} s", t0.elapsed().as_secs_f64());
}

#[test]
fn an_app_naming_a_bad_package_is_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("app.json"),
        r#"{"format":1,"name":"x","port":80,"start":["./x"],"debs":["tesseract-ocr; rm -rf /"]}"#,
    )
    .unwrap();
    let err = forage_agent::app::AppPackage::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("not a Debian package name"), "{err}");
}
