//! The tactical-cloudlet mechanisms with real guests, against a cloudlet on loopback:
//! the service VM repository from the CLI (create, baseline, component, export/import,
//! cold-boot import of a disk), then cached VM (fresh state per instance, one docked into
//! a substrate while it runs and activated from it, join), cloudlet
//! push, on-demand script and packed application, and the faults: a script that loops
//! forever, a package with a missing library or for another OS, unknown service, OS or
//! component, a cloudlet that is gone, an idle instance. After each, nothing is left.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use forage_client::{provision, ClientError};
use forage_proto::{ErrorCode, Provision};
use forage_service::appvirt::AppBundle;
use forage_testkit::guest::*;

fn forage(args: &[&str]) -> String {
    let out = Command::new(forage_exe()).arg("--data-dir").arg(data_dir().root()).args(args).output().unwrap();
    assert!(out.status.success(), "forage {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const SCRIPT: &str = "#!/bin/sh\nset -e\nmkdir -p /data/apps/hs\ncp /opt/components/hs/hashsearch /data/apps/hs/\ncd /data/apps/hs && chmod 755 hashsearch\nsetsid ./hashsearch 8080 >log 2>&1 </dev/null &\n";

fn refused(
    r: Result<(forage_client::ProvisionReport, forage_client::Provisioned), ClientError>,
) -> (ErrorCode, String) {
    match r {
        Err(ClientError::Refused { code, message, .. }) => (code, message),
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok((r, _)) => panic!("expected a refusal, got {r:?}"),
    }
}

async fn refuse(addr: SocketAddr, request: Provision) -> (ErrorCode, String) {
    refused(provision(addr, credentials(), "t", request, None).await)
}

fn mtime(p: &std::path::Path) -> std::time::SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_mechanisms_share_one_lifecycle() {
    if skip_vm_tests() {
        return;
    }
    let data = data_dir();
    image();
    logs();
    // A failed assertion must not leave the instances it started running.
    let _reaper = Reaper::new(&[data_dir().work()]);
    let app_dir = forage_image::locate_guest_binary("apps/hashsearch").expect("make guest");
    let work = data.work().join("provision-test");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let _ = forage_synth::BaseVm::remove(&data, "provtest");
    forage(&["base", "create", "provtest", "--image", "tiny", "--settle-s", "3"]);
    for id in ["prov-hs", "prov-baseline", "prov-cold", "prov-hs-copy"] {
        let _ = forage_service::Repository::new(&data).remove(id);
    }

    // The repository, from the CLI.
    let client = work.join("hs-client.sh");
    std::fs::write(&client, "#!/bin/sh\necho client\n").unwrap();
    forage(&[
        "service",
        "create",
        "prov-hs",
        "--base",
        "provtest",
        "--app",
        &app_dir.to_string_lossy(),
        "--client-app",
        &format!("prov-hs-client=any:{}", client.display()),
    ]);
    forage(&["service", "create", "prov-baseline", "--base", "provtest"]);
    forage(&["service", "component", "hs", &app_dir.join("hashsearch").to_string_lossy()]);
    let list: serde_json::Value = serde_json::from_str(&forage(&["service", "list", "--json"])).unwrap();
    assert!(list.as_array().unwrap().iter().any(|s| s["id"] == "prov-baseline" && s["baseline"] == true), "{list}");
    // Export, import under another id, and a cut package refused with nothing left.
    let pkg = work.join("hs.fsvc");
    forage(&["service", "export", "prov-hs", "-o", &pkg.to_string_lossy()]);
    // Exports are signed; a host with a signers list refuses a package of another signer.
    let signers = data.root().join("trust").join("signers");
    std::fs::write(&signers, format!("{} # someone else\n", "ab".repeat(32))).unwrap();
    let out = Command::new(forage_exe())
        .arg("--data-dir")
        .arg(data.root())
        .args(["service", "import", &pkg.to_string_lossy(), "--id", "prov-refused"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a package of an unlisted signer was imported");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not one this cloudlet accepts"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let me = forage(&["signer", "show"]);
    std::fs::write(&signers, format!("{} # this host\n", me.trim())).unwrap();
    forage(&["service", "import", &pkg.to_string_lossy(), "--id", "prov-hs-copy"]);
    std::fs::remove_file(&signers).unwrap();
    let cut = work.join("cut.fsvc");
    let bytes = std::fs::read(&pkg).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = Command::new(forage_exe())
        .arg("--data-dir")
        .arg(data.root())
        .args(["service", "import", &cut.to_string_lossy(), "--id", "prov-cut"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cut.fsvc"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(forage_service::Repository::new(&data).open("prov-cut").is_err());
    // Cold boot: the service's disk as a qcow2, booted with the image's kernel.
    let repo = forage_service::Repository::new(&data);
    let disk = work.join("hs.qcow2");
    let svc_disk = repo.open("prov-hs").unwrap().snapshot().unwrap().disk_paths()[0].clone();
    assert!(Command::new("qemu-img")
        .args(["convert", "-q", "-O", "qcow2"])
        .arg(&svc_disk)
        .arg(&disk)
        .status()
        .unwrap()
        .success());
    forage(&[
        "service",
        "import",
        "--disk",
        &disk.to_string_lossy(),
        "--id",
        "prov-cold",
        "--port",
        "8080",
        "--probe",
        "count",
    ]);

    let accel = forage_vm::accel::detect().accel;
    let mut c = forage_cloudlet::Cloudlet::open("prov-cloudlet".into(), data.clone(), accel, Ipv4Addr::LOCALHOST)
        .expect("cloudlet");
    c.idle_timeout = Some(Duration::from_secs(4));
    let cloudlet = Arc::new(c);
    pair_with(&cloudlet, "provision-tester");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(forage_cloudlet::serve(listener, cloudlet.clone()));
    let line = |s: &str| Some(s.to_string());
    let svc_files: Vec<_> = {
        let s = repo.open("prov-hs").unwrap().snapshot().unwrap();
        vec![s.memory_path(), s.disk_paths()[0].clone()]
    };
    let before: Vec<_> = svc_files.iter().map(|p| mtime(p)).collect();

    // Cached VM: every instance starts from the service VM's state.
    let (r, s) = provision(
        addr,
        credentials(),
        "t",
        Provision::CachedVm { service: "prov-hs".into(), join: false },
        line("search a 8"),
    )
    .await
    .expect("cached VM");
    assert!(r.answer.as_deref().unwrap().contains("served=2"), "{r:?}");
    assert!(r.payload_bytes < 1024, "{r:?}");
    s.close().await;
    let (r, s) = provision(
        addr,
        credentials(),
        "t",
        Provision::CachedVm { service: "prov-hs".into(), join: false },
        line("count"),
    )
    .await
    .expect("cached VM again");
    assert!(r.answer.as_deref().unwrap().contains("served=1"), "a fresh instance starts from the saved state: {r:?}");
    // Dock this running instance (on a copy-on-write view of the service VM): it ends,
    // its device hears why, and an activation of the substrate goes on from its state (a
    // search counted: a fresh instance's count says 1, the docked one's 2).
    let searched = forage_client::service::request_line(&r.service, "search d 8", Duration::from_secs(30)).unwrap();
    assert!(searched.contains("served=2"), "{searched}");
    let mut s = s;
    let pool = forage_substrate::Pool::open(&data).unwrap();
    let _ = pool.remove("prov-hs-inst");
    let running = cloudlet.state.list_instances(true).unwrap();
    let id = running.iter().find(|i| i.endpoint == r.endpoint).expect("the instance's record").id.clone();
    let (docked, ended) = tokio::join!(cloudlet.dock_instance(&id, "prov-hs-inst", false), s.ended());
    eprintln!("{:?}", docked.expect("the cached VM's instance docks"));
    match ended {
        forage_client::Ended::Stopped(ClientError::Refused { message, .. }) => {
            assert!(message.contains("docked this instance as substrate prov-hs-inst"), "{message}")
        }
        other => panic!("the device should hear its instance was docked, got {other:?}"),
    }
    assert!(cloudlet.state.list_instances(true).unwrap().iter().all(|i| i.id != id), "still listed");
    let spec =
        forage_substrate::format::read_manifest(&pool.entry("prov-hs-inst").unwrap().path).unwrap().snapshot.spec;
    let ask = forage_client::Ask::Activate {
        substrate: "prov-hs-inst".into(),
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
    };
    let (r, s) = provision(addr, credentials(), "t", ask, line("count")).await.expect("the docked instance activates");
    assert!(r.answer.as_deref().unwrap().contains("served=2"), "the docked instance's state goes on: {r:?}");
    s.close().await;
    assert_cleaned_up(&data).await;
    forage(&["substrate", "rm", "prov-hs-inst"]);

    // Join: a second device gets the same instance.
    let (r1, s1) = provision(
        addr,
        credentials(),
        "t",
        Provision::CachedVm { service: "prov-hs".into(), join: true },
        line("count"),
    )
    .await
    .expect("shared");
    let (r2, s2) = provision(
        addr,
        credentials(),
        "t",
        Provision::CachedVm { service: "prov-hs".into(), join: true },
        line("search b 8"),
    )
    .await
    .expect("joined");
    assert_eq!(r1.endpoint, r2.endpoint);
    s1.close().await;
    assert_eq!(r1.service, r2.service, "a device that joins is given the instance's token");
    let again = forage_client::service::request_line(&r2.service, "count", Duration::from_secs(30))
        .expect("the instance lives on while a device that joined holds it");
    assert!(again.contains("served=2"), "{again}");
    s2.close().await;
    assert_cleaned_up(&data).await;
    assert_eq!(svc_files.iter().map(|p| mtime(p)).collect::<Vec<_>>(), before, "the service VM's files were written");

    // With a substrate docked from the service in the pool, a cached VM starts from it
    // (the pool marks it used); without it, from the view.
    let _ = forage_substrate::Pool::open(&data).unwrap().remove("prov-hs-sub");
    forage(&["substrate", "dock", "prov-hs-sub", "--from", "service:prov-hs"]);
    let used = || {
        let s = forage_substrate::Pool::open(&data).unwrap().summary().unwrap();
        s.substrates.iter().find(|e| e.name == "prov-hs-sub").map(|e| e.last_used_unix_ms)
    };
    let docked = used().expect("docked into the pool");
    let (r, s) = provision(
        addr,
        credentials(),
        "t",
        Provision::CachedVm { service: "prov-hs".into(), join: false },
        line("search s 8"),
    )
    .await
    .expect("cached VM from the service's substrate");
    assert!(r.answer.as_deref().unwrap().starts_with("ok "), "the service answers: {r:?}");
    assert!(used().unwrap() > docked, "the substrate was activated (marked used)");
    s.close().await;
    assert_cleaned_up(&data).await;
    forage(&["substrate", "rm", "prov-hs-sub"]);

    // The imported ones.
    for id in ["prov-hs-copy", "prov-cold"] {
        let (r, s) = provision(
            addr,
            credentials(),
            "t",
            Provision::CachedVm { service: id.into(), join: false },
            line("search c 8"),
        )
        .await
        .unwrap_or_else(|e| panic!("{id}: {e}"));
        assert!(r.answer.as_deref().unwrap().starts_with("ok "), "{id}: {r:?}");
        s.close().await;
    }

    // Cloudlet push: the client app from the app store (over the paired channel), then its
    // service.
    let apps = forage_client::list_apps(addr, credentials(), Some("linux-x86_64")).await.expect("app store");
    assert!(apps.iter().any(|a| a.id == "prov-hs-client" && a.service == "prov-hs"), "{apps:?}");
    let (entry, file) = forage_client::get_app(addr, credentials(), "prov-hs-client").await.expect("client app");
    assert_eq!(file, std::fs::read(&client).unwrap());
    assert_eq!(entry.file, "hs-client.sh");
    assert!(forage_client::get_app(addr, credentials(), "no-such-app").await.is_err());
    let (r, s) =
        provision(addr, credentials(), "t", Provision::Push { app: "prov-hs-client".into() }, line("search d 8"))
            .await
            .expect("push");
    assert!(r.answer.as_deref().unwrap().starts_with("ok "), "{r:?}");
    s.close().await;

    // On-demand: the script installs the component in a copy of the baseline VM.
    let script = Provision::Script {
        os: forage_image::GUEST_OS.into(),
        port: 8080,
        script: SCRIPT.as_bytes().to_vec(),
        timeout_s: 60,
        components: vec!["hs".into()],
    };
    let (r, s) = provision(addr, credentials(), "t", script, line("search e 8")).await.expect("on-demand");
    assert!(r.answer.as_deref().unwrap().starts_with("ok "), "{r:?}");
    s.close().await;

    // Application virtualization: the dynamically linked build with its closure.
    let dynamic = forage_image::locate_guest_binary("apps/hashsearch-dynamic/hashsearch").expect("make guest");
    let package =
        forage_service::appvirt::pack(&[dynamic.to_string_lossy().into_owned(), "8080".into()], "hs", 8080, None, &[])
            .expect("pack");
    let (r, s) = provision(addr, credentials(), "t", Provision::App { package: package.clone() }, line("search f 8"))
        .await
        .expect("app virtualization");
    assert!(r.answer.as_deref().unwrap().starts_with("ok "), "{r:?}");
    assert!(r.payload_bytes > 100_000, "the package travels: {r:?}");
    s.close().await;
    assert_cleaned_up(&data).await;

    // Faults, each refused with a clear error and nothing left.
    let looping = Provision::Script {
        os: forage_image::GUEST_OS.into(),
        port: 8080,
        script: b"while true; do sleep 1; done\n".to_vec(),
        timeout_s: 2,
        components: vec![],
    };
    let (code, msg) = refuse(addr, looping).await;
    assert_eq!(code, ErrorCode::Provision);
    assert!(msg.contains("time limit"), "{msg}");
    let bundle = AppBundle::open(&package).unwrap();
    let mut no_libc = AppBundle { manifest: bundle.manifest.clone(), files: bundle.files.clone() };
    let i = no_libc.manifest.files.iter().position(|f| f.path.ends_with("libc.so.6")).unwrap();
    no_libc.manifest.files.remove(i);
    no_libc.files.remove(i);
    let (code, msg) = refuse(addr, Provision::App { package: no_libc.to_bytes().unwrap() }).await;
    assert_eq!(code, ErrorCode::Provision);
    assert!(msg.contains("libc.so.6"), "{msg}");
    let mut windows = AppBundle { manifest: bundle.manifest.clone(), files: bundle.files.clone() };
    windows.manifest.os = "windows-x86_64".into();
    let (code, msg) = refuse(addr, Provision::App { package: windows.to_bytes().unwrap() }).await;
    assert_eq!(code, ErrorCode::Provision);
    assert!(msg.contains("windows-x86_64") && msg.contains(forage_image::GUEST_OS), "{msg}");
    let (code, msg) = refuse(addr, Provision::CachedVm { service: "no-such-service".into(), join: false }).await;
    assert_eq!(code, ErrorCode::NotFound);
    assert!(msg.contains("no-such-service"), "{msg}");
    let other_os = Provision::Script {
        os: "plan9-mips".into(),
        port: 8080,
        script: SCRIPT.as_bytes().to_vec(),
        timeout_s: 10,
        components: vec![],
    };
    assert_eq!(refuse(addr, other_os).await.0, ErrorCode::NotFound);
    let no_component = Provision::Script {
        os: forage_image::GUEST_OS.into(),
        port: 8080,
        script: SCRIPT.as_bytes().to_vec(),
        timeout_s: 10,
        components: vec!["nope".into()],
    };
    assert_eq!(refuse(addr, no_component).await.0, ErrorCode::NotFound);
    // Idle: nobody uses the service for the idle timeout; the device is told.
    let (_, mut s) =
        provision(addr, credentials(), "t", Provision::CachedVm { service: "prov-hs".into(), join: false }, None)
            .await
            .expect("cached VM");
    let t = Instant::now();
    match tokio::time::timeout(Duration::from_secs(30), s.ended()).await.expect("the idle instance is ended") {
        forage_client::Ended::Stopped(ClientError::Refused { code: ErrorCode::Idle, .. }) => {}
        e => panic!("expected an idle stop, got {e:?}"),
    }
    assert!(t.elapsed() >= Duration::from_secs(3), "stopped before its idle timeout");
    assert_cleaned_up(&data).await;

    // A cloudlet that is gone between discovery and provisioning.
    server.abort();
    drop(cloudlet);
    let gone: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    match provision(gone, credentials(), "t", Provision::CachedVm { service: "prov-hs".into(), join: false }, None)
        .await
    {
        Err(ClientError::Proto { addr, .. }) => assert_eq!(addr, gone),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a closed port provisioned"),
    }
    let _ = std::fs::remove_dir_all(&work);
}
