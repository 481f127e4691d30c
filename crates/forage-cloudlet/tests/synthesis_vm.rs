//! VM synthesis with real guests against a cloudlet on loopback: pipelined, early start
//! with demand fetch (a device that sends nothing but what the VM asks for), the
//! launch-VM cache, concurrent sessions, and the faults: corrupted segment, unknown base,
//! a device that hangs up mid-stream, a device that stops answering demand fetches.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forage_client::{OverlayFile, SynthesisOptions};
use forage_proto::asynchronous::{read, write};
use forage_proto::{DeviceMessage as Message, ErrorCode};
use forage_synth::create::{CreateOptions, LaunchInput};
use forage_synth::launch::{self, LaunchOptions};
use forage_synth::BaseVm;
use forage_testkit::guest::*;

mod synthesis_device;
use synthesis_device::{serve_file, RawDevice};

fn opts(device: &str, early_start: bool) -> SynthesisOptions {
    SynthesisOptions {
        device: device.into(),
        early_start,
        credentials: Some(credentials().clone()),
        ..Default::default()
    }
}

struct Fixture {
    data: forage_datadir::DataDir,
    ovl: PathBuf,
    /// The same launch VM, its app's files named as blocks of `deb` (format 3).
    pkg_ovl: PathBuf,
    deb: PathBuf,
    work: PathBuf,
}

/// Remove `deb` from the data folder's package store (which other tests share).
fn forget_deb(data: &forage_datadir::DataDir, deb: &Path) {
    let sha = forage_synth::deb_volume::deb_ref(deb).unwrap().sha256;
    let _ = std::fs::remove_file(data.packages().join("debs").join(format!("{sha}.deb")));
}

/// A Debian package holding the app's files (as a packaged app would be).
fn app_deb(work: &Path, app: &forage_agent::app::AppPackage) -> PathBuf {
    let dir = forage_image::locate_guest_binary("apps/hashsearch").expect("run `make guest` first");
    let root = work.join("deb-root");
    let share = root.join("usr/share/forage-test-hashsearch");
    std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(
        root.join("DEBIAN/control"),
        "Package: forage-test-hashsearch\nVersion: 1.0\nArchitecture: amd64\nMaintainer: forage <forage@example.org>\nDescription: test\n",
    )
    .unwrap();
    for f in app.files().unwrap() {
        std::fs::copy(dir.join(&f), share.join(f.file_name().unwrap())).unwrap();
    }
    let deb = work.join("forage-test-hashsearch_1.0_amd64.deb");
    let out = std::process::Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&root)
        .arg(&deb)
        .output()
        .unwrap();
    assert!(out.status.success(), "dpkg-deb: {}", String::from_utf8_lossy(&out.stderr));
    deb
}

async fn fixture() -> Fixture {
    let data = data_dir();
    let accel = forage_vm::accel::detect().accel;
    let _ = BaseVm::remove(&data, "syntest");
    let base = BaseVm::create(&data, "syntest", &image(), accel, Duration::from_secs(3)).await.expect("base");
    let app = sample_app();
    let work = data.work().join("synthesis-test");
    let _ = std::fs::remove_dir_all(&work);
    let lv = launch::build(&data, &base, &app, accel, &LaunchOptions::default(), &work).await.expect("launch VM");
    let profile =
        forage_synth::profile::profile_access(&data, &lv.snapshot, &lv.app, accel, &work).await.expect("profiling");
    let input = LaunchInput {
        snapshot: &lv.snapshot,
        written_disk_chunks: &lv.written_disk_chunks,
        discarded_disk_chunks: &lv.discarded_disk_chunks,
        checkpoint: lv.checkpoint,
        service: Some(forage_format::manifest::Service {
            name: "hashsearch".into(),
            port: app.manifest().port,
            probe: app.manifest().probe.clone(),
        }),
        accessed: Some((&profile.memory, &profile.disk)),
    };
    let ovl = work.join("svc.ovl");
    // Small segments, so that the VM's first reads need only some of them.
    let create = CreateOptions { segment_bytes: 256 << 10, ..Default::default() };
    forage_synth::create::create(&base, &input, &create, &ovl).expect("overlay");
    let deb = app_deb(&work, &app);
    forget_deb(&data, &deb);
    let index = forage_synth::deb_volume::PackageIndex::build(std::slice::from_ref(&deb)).expect("package index");
    let pkg_ovl = work.join("svc-pkg.ovl");
    let create = CreateOptions { packages: Some(Arc::new(index)), ..create };
    let m = forage_synth::create::create(&base, &input, &create, &pkg_ovl).expect("format-3 overlay").manifest;
    assert!(m.ref_counts().get("package").is_some_and(|&n| n > 0), "{:?}", m.ref_counts());
    Fixture { data, ovl, pkg_ovl, deb, work }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synthesis_modes_cache_and_faults() {
    if skip_vm_tests() {
        return;
    }
    let f = fixture().await;
    let accel = forage_vm::accel::detect().accel;
    logs();
    // A failed assertion must not leave the instances it started running.
    let _reaper = Reaper::new(&[data_dir().work()]);
    let mut c =
        forage_cloudlet::Cloudlet::open("test-cloudlet".into(), f.data.clone(), accel, std::net::Ipv4Addr::LOCALHOST)
            .expect("cloudlet");
    c.peer_wait = Duration::from_secs(5);
    // The overlay-by-URL cases fetch from a plain-HTTP server on loopback, which the
    // default policy refuses (see tests/hostile.rs): allowed here explicitly.
    c.fetch_policy =
        forage_remote::FetchPolicy { allow_http: true, allow: vec!["127.0.0.1/32".parse().unwrap()], any: false };
    let cloudlet = Arc::new(c);
    pair_with(&cloudlet, "synthesis-tester");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(forage_cloudlet::serve(listener, cloudlet.clone()));
    let digest = OverlayFile::open(&f.ovl).await.unwrap().digest;
    cloudlet.cache.evict(&digest);
    cloudlet.cache.set_enabled(false);

    // Pipelined.
    let (report, session) =
        forage_client::synthesize(&f.ovl, addr, &opts("pipelined", false)).await.expect("pipelined synthesis");
    assert!(report.answer.starts_with("ok "), "{}", report.answer);
    assert_eq!(report.mode, "pipelined");
    assert!(report.first_response_s >= report.ready_s && report.ready_s > 0.0, "{report:?}");
    assert!(report.bytes_sent > 0 && report.usage.is_none());
    session.close().await;

    // Signed overlays: with a signers list, an unsigned overlay and one signed by another
    // key are refused before anything is received; the listed signer's synthesizes.
    let signers = f.data.root().join("trust").join("signers");
    let builder = forage_trust::signing::Signer::open_or_init(&f.work.join("builder.pk8")).unwrap();
    let stranger = forage_trust::signing::Signer::open_or_init(&f.work.join("stranger.pk8")).unwrap();
    std::fs::write(&signers, format!("{} # builder\n", builder.public_hex())).unwrap();
    let sig_path = format!("{}.sig", f.ovl.display());
    let _ = std::fs::remove_file(&sig_path);
    let err = forage_client::synthesize(&f.ovl, addr, &opts("unsigned", false))
        .await
        .err()
        .expect("unsigned refused")
        .to_string();
    assert!(err.contains("not signed"), "{err}");
    std::fs::write(&sig_path, serde_json::to_vec(&stranger.sign(forage_trust::signing::OVERLAY, &digest)).unwrap())
        .unwrap();
    let err = forage_client::synthesize(&f.ovl, addr, &opts("stranger", false))
        .await
        .err()
        .expect("stranger refused")
        .to_string();
    assert!(err.contains("not one this cloudlet accepts"), "{err}");
    std::fs::write(&sig_path, serde_json::to_vec(&builder.sign(forage_trust::signing::OVERLAY, &digest)).unwrap())
        .unwrap();
    let (report, session) =
        forage_client::synthesize(&f.ovl, addr, &opts("signed", false)).await.expect("signed overlay");
    assert!(report.answer.starts_with("ok "), "{}", report.answer);
    session.close().await;
    std::fs::remove_file(&signers).unwrap();
    std::fs::remove_file(&sig_path).unwrap();
    assert_cleaned_up(&f.data).await;

    // Early start with demand fetch: the device sends the device state and then only the
    // segments the cloudlet asks for. The VM resumes, its reads block and fetch, and the
    // service answers before the overlay is complete.
    let (mut dev, welcome) = RawDevice::start(addr, &f.ovl, None).await;
    assert!(matches!(welcome, Message::Welcome { chosen: Some(_), cached: false, .. }), "{welcome:?}");
    dev.send_manifest().await;
    let state_seg = dev.ov.manifest.device_state.segment;
    dev.send_segment(state_seg).await;
    let n = dev.ov.manifest.segments.len() as u32;
    let mut fetched = std::collections::BTreeSet::new();
    let endpoint = loop {
        match tokio::time::timeout(Duration::from_secs(60), read(&mut dev.stream))
            .await
            .expect("cloudlet answers")
            .unwrap()
        {
            Message::Fetch { index } => {
                if index != state_seg && fetched.insert(index) {
                    dev.send_segment(index).await;
                }
            }
            Message::Ready { service, .. } => break service,
            other => panic!("unexpected {other:?}"),
        }
    };
    // Serve fetches while the service is asked for its first answer.
    let ep = endpoint.clone();
    let answer = tokio::task::spawn_blocking(move || {
        forage_client::service::request_line(&ep, "search abc 8", Duration::from_secs(120))
    });
    tokio::pin!(answer);
    let answer = loop {
        tokio::select! {
            a = &mut answer => break a.unwrap().expect("the service answers"),
            m = read(&mut dev.stream) => match m.unwrap() {
                Message::Fetch { index } => {
                    if fetched.insert(index) {
                        dev.send_segment(index).await;
                    }
                }
                other => panic!("unexpected {other:?}"),
            },
        }
    };
    assert!(answer.starts_with("ok "), "{answer}");
    assert!(!fetched.is_empty(), "the resumed VM fetched segments on demand");
    assert!((fetched.len() as u32) < n - 1, "the VM answered with {} of {n} segments", fetched.len() + 1);
    write(&mut dev.stream, &Message::Checkpoint { label: "first".into() }).await.unwrap();
    let usage = loop {
        match read(&mut dev.stream).await.unwrap() {
            Message::Fetch { index } => {
                if fetched.insert(index) {
                    dev.send_segment(index).await;
                }
            }
            m @ Message::Usage { .. } => break m,
            other => panic!("unexpected {other:?}"),
        }
    };
    let Message::Usage { blobs_accessed, blobs, demand_fetches, .. } = usage else { unreachable!() };
    assert!(blobs_accessed > 0 && blobs_accessed < blobs, "{usage:?}");
    assert!(demand_fetches as usize >= fetched.len(), "{usage:?}");
    // The rest in bulk: Complete follows.
    for i in 0..n {
        if i != state_seg && !fetched.contains(&i) {
            dev.send_segment(i).await;
        }
    }
    loop {
        match read(&mut dev.stream).await.unwrap() {
            Message::Complete { segments, .. } => {
                assert_eq!(segments, n);
                break;
            }
            Message::Fetch { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    write(&mut dev.stream, &Message::Bye).await.unwrap();
    drop(dev);
    assert_cleaned_up(&f.data).await;

    // With the cache on, a complete early-start session leaves its launch VM there: the
    // next synthesis sends nothing.
    cloudlet.cache.set_enabled(true);
    let (report, session) = forage_client::synthesize(&f.ovl, addr, &opts("first", true)).await.expect("early start");
    assert_eq!(report.mode, "early_start");
    session.close().await;
    let t = Instant::now();
    while cloudlet.cache.lookup(&digest).is_none() && t.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (report, session) =
        forage_client::synthesize(&f.ovl, addr, &opts("again", true)).await.expect("cached synthesis");
    assert_eq!((report.mode.as_str(), report.bytes_sent), ("cached", 0));
    assert!(report.answer.starts_with("ok "), "{}", report.answer);
    session.close().await;
    cloudlet.cache.evict(&digest);
    cloudlet.cache.set_enabled(false);

    // An early-start instance docks once its overlay has arrived (until then its holder
    // refuses the order), its device hears why it ended, and the substrate activates with
    // the instance's state (the service's request counter goes on).
    let (report, mut session) =
        forage_client::synthesize(&f.ovl, addr, &opts("dock", true)).await.expect("early start");
    assert_eq!(report.mode, "early_start");
    let id =
        cloudlet.state.list_instances(true).unwrap().into_iter().find(|i| i.endpoint == report.endpoint).unwrap().id;
    let pool = forage_substrate::Pool::open(&f.data).unwrap();
    let _ = pool.remove("syn-early");
    let t = Instant::now();
    let docked = loop {
        match cloudlet.dock_instance(&id, "syn-early", false).await {
            Err(forage_cloudlet::DockInstanceError::NotDockable(_)) if t.elapsed() < Duration::from_secs(60) => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            d => break d,
        }
    };
    let ended = session.ended().await;
    eprintln!("{:?}", docked.expect("the early-start instance docks once its overlay is complete"));
    match ended {
        forage_client::Ended::Stopped(e) => {
            assert!(e.to_string().contains("docked this instance as substrate syn-early"), "{e}")
        }
        other => panic!("the device should hear its instance was docked, got {other:?}"),
    }
    let run = forage_testkit::guest::run_paths("syn-early-act");
    let req = forage_substrate::ActivateRequest {
        substrate: "syn-early".into(),
        vcpus: 1,
        memory_mib: forage_substrate::format::read_manifest(&pool.entry("syn-early").unwrap().path)
            .unwrap()
            .snapshot
            .spec
            .memory_mib,
        accel: forage_vm::accel::detect().accel,
        run,
        vm_name: "syn-early-act".into(),
        detached: false,
    };
    let act = forage_substrate::activate(&f.data, &pool, req).await.expect("the docked instance activates");
    let port = act.report.service_port.expect("the service's forward").1;
    let answer = tokio::task::spawn_blocking(move || forage_testkit::guest::request(port, "search d 8")).await.unwrap();
    // The synthesis's own requests were counted before the dock: a fresh VM would say 1.
    let served: u32 = answer.split("served=").nth(1).and_then(|v| v.split(' ').next()?.parse().ok()).unwrap_or(0);
    assert!(served >= 2, "the docked instance's state goes on: {answer}");
    act.vm.shutdown().await.unwrap();
    pool.remove("syn-early").unwrap();

    // Four devices at once with early start (the full client), each with its own instance.
    let runs: Vec<_> = (0..4)
        .map(|i| {
            let ovl = f.ovl.clone();
            tokio::spawn(
                async move { forage_client::synthesize(&ovl, addr, &opts(&format!("device-{i}"), true)).await },
            )
        })
        .collect();
    let mut sessions = Vec::new();
    for r in runs {
        let (report, session) = r.await.unwrap().expect("concurrent early-start synthesis");
        assert!(report.answer.starts_with("ok "), "{}", report.answer);
        assert_eq!(report.mode, "early_start");
        assert!(report.accessed_fraction.is_some_and(|a| a > 0.0 && a <= 1.0), "{report:?}");
        sessions.push((report.endpoint, session));
    }
    let endpoints: std::collections::HashSet<_> = sessions.iter().map(|(e, _)| e.clone()).collect();
    assert_eq!(endpoints.len(), 4, "each device has its own instance");
    for (_, s) in sessions {
        s.close().await;
    }
    assert_cleaned_up(&f.data).await;

    // Residue: the instance's changes come back as a residue; merged into the overlay, the
    // next synthesis starts where the last one ended (the service's counter carries on).
    for early in [true, false] {
        let (report, session) =
            forage_client::synthesize(&f.ovl, addr, &opts("residue", early)).await.expect("synthesis");
        let served = field(&report.answer, "served");
        for _ in 0..3 {
            let ep = report.service.clone();
            let a = tokio::task::spawn_blocking(move || {
                forage_client::service::request_line(&ep, "search more 8", Duration::from_secs(60))
            })
            .await
            .unwrap()
            .unwrap();
            assert!(a.starts_with("ok "), "{a}");
        }
        let residue = f.work.join(format!("residue-{early}.ovl"));
        let bytes = session.close_with_residue(&residue).await.expect("residue");
        assert!(bytes > 0 && std::fs::metadata(&residue).unwrap().len() == bytes);
        let err = forage_client::synthesize(&residue, addr, &opts("residue-alone", true))
            .await
            .err()
            .expect("a residue alone is refused")
            .to_string();
        assert!(err.contains("residue"), "{err}");
        let merged = f.work.join(format!("merged-{early}.ovl"));
        let base = BaseVm::open(&f.data, "syntest").unwrap();
        forage_synth::residue::merge(&base, &f.ovl, &residue, &CreateOptions::default(), &merged, accel)
            .expect("merge");
        let (report, session) = forage_client::synthesize(&merged, addr, &opts("merged", true))
            .await
            .expect("synthesis of the merged overlay");
        assert_eq!(
            field(&report.answer, "served"),
            served + 4,
            "the counter carried on: {} then {}",
            served,
            report.answer
        );
        session.close().await;
    }
    assert_cleaned_up(&f.data).await;

    // An overlay naming its app's files as blocks of a Debian package (format 3): refused
    // before any transfer while the cloudlet lacks the .deb; once it holds it, synthesized
    // with early start and pipelined.
    let err = forage_client::synthesize(&f.pkg_ovl, addr, &opts("packages-missing", true))
        .await
        .err()
        .expect("refused without the .deb")
        .to_string();
    assert!(err.contains("forage-test-hashsearch=1.0"), "{err}");
    forage_synth::deb_volume::PackageStore::open(&f.data).add(&f.deb).unwrap();
    for early in [true, false] {
        let (report, session) = forage_client::synthesize(&f.pkg_ovl, addr, &opts("packages", early))
            .await
            .expect("synthesis of a format-3 overlay");
        assert!(report.answer.starts_with("ok "), "{}", report.answer);
        session.close().await;
    }
    forget_deb(&f.data, &f.deb);
    assert_cleaned_up(&f.data).await;

    // Overlay by URL: the cloudlet fetches it itself with range requests.
    let ranged = serve_file(f.ovl.clone(), true);
    for early in [true, false] {
        let url = format!("http://{ranged}/svc.ovl");
        let (report, session) =
            forage_client::synthesize_url(&url, addr, &opts("by-url", early)).await.expect("synthesis by URL");
        assert!(report.answer.starts_with("ok "), "{}", report.answer);
        assert_eq!(report.bytes_sent, 0, "the device sent no segment");
        session.close().await;
    }
    let plain = serve_file(f.ovl.clone(), false);
    let err = forage_client::synthesize_url(&format!("http://{plain}/svc.ovl"), addr, &opts("no-ranges", true))
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("does not serve byte ranges"), "{err}");
    assert_cleaned_up(&f.data).await;

    // A corrupted segment, with early start and pipelined: refused with the reason.
    let mut bytes = std::fs::read(&f.ovl).unwrap();
    let len = bytes.len();
    bytes[len - 50] ^= 1;
    let bad = f.work.join("bad.ovl");
    std::fs::write(&bad, &bytes).unwrap();
    for early in [true, false] {
        let err =
            forage_client::synthesize(&bad, addr, &opts("corrupt", early)).await.err().expect("refused").to_string();
        assert!(err.contains("checksum"), "{err}");
    }
    assert_cleaned_up(&f.data).await;

    // A base the cloudlet does not hold: Welcome names it missing.
    let (_dev, welcome) = RawDevice::start(addr, &f.ovl, Some(&"ab".repeat(32))).await;
    assert!(
        matches!(&welcome, Message::Welcome { chosen: None, missing, .. } if missing == &vec!["ab".repeat(32)]),
        "{welcome:?}"
    );

    // A device that hangs up mid-stream (pipelined and early start).
    for early in [false, true] {
        let (mut dev, _) = RawDevice::start_with(addr, &f.ovl, None, early).await;
        dev.send_manifest().await;
        dev.send_segment(0).await;
        dev.send_segment(1).await;
        drop(dev);
        assert_cleaned_up(&f.data).await;
    }

    // A device that stops answering demand fetches: the session fails within peer_wait,
    // the VM is stopped, everything removed.
    let (mut dev, _) = RawDevice::start(addr, &f.ovl, None).await;
    dev.send_manifest().await;
    dev.send_segment(state_seg).await;
    let t = Instant::now();
    let err = loop {
        match tokio::time::timeout(Duration::from_secs(60), read(&mut dev.stream))
            .await
            .expect("the cloudlet gives up")
            .unwrap()
        {
            Message::Error { code, message } => break (code, message),
            Message::Fetch { .. } | Message::Ready { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(err.0, ErrorCode::Timeout, "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(30), "gave up after {:?}", t.elapsed());
    drop(dev);
    assert_cleaned_up(&f.data).await;

    // The daemon recorded it all and keeps serving.
    let recorded = cloudlet.state.list_sessions(100).unwrap();
    assert!(recorded.iter().any(|s| s.error.as_deref().is_some_and(|e| e.contains("silent"))), "{recorded:?}");
    let (report, session) = forage_client::synthesize(&f.ovl, addr, &opts("after", true)).await.expect("still serving");
    assert!(report.answer.starts_with("ok "));
    session.close().await;
    server.abort();
    let _ = std::fs::remove_dir_all(&f.work);
    BaseVm::remove(&f.data, "syntest").unwrap();
}
