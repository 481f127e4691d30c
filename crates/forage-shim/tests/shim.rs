//! A real shim process (no VM): a copy-on-write view of a synthetic saved VM over FUSE
//! and a service relay to a local echo service; its daemon disconnects and comes back,
//! and everything it held is still there.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::time::Duration;

use forage_format::{Space, CHUNK_SIZE};
use forage_shim::{ChunkBytes, RelaySpec, ShimClient, ShimSpec, ViewSpec};

fn fuse_ok() -> bool {
    std::path::Path::new("/dev/fuse").exists() && std::process::Command::new("fusermount3").arg("-V").output().is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shim_outlives_its_daemon() {
    if !fuse_ok() {
        eprintln!("skipped: needs FUSE");
        return;
    }
    std::env::set_var("FORAGE_SHIM", env!("CARGO_BIN_EXE_forage-shim"));
    let t = tempfile::tempdir().unwrap();
    let saved = t.path().join("saved");
    forage_testkit::synthetic::snapshot_dir(&saved, b"QEVM\0\0\0\x03saved");
    forage_testkit::synthetic::put(&saved.join("memory.raw"), 3, &forage_testkit::synthetic::pattern(3));
    forage_testkit::synthetic::describe_snapshot(&saved);
    let trust = t.path().join("trust");
    let ca = forage_trust::CloudletTrust::open_or_init(&trust, "c").unwrap().ca_fingerprint();
    // A guest service: answers each line with itself.
    let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = echo.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in echo.incoming().flatten() {
            let mut buf = [0u8; 64];
            if let Ok(n) = s.read(&mut buf) {
                let _ = s.write_all(&buf[..n]);
            }
        }
    });
    let token = "0123456789abcdef0123456789abcdef".to_string();
    let spec = ShimSpec {
        format: 1,
        instance: "test-1".into(),
        dir: t.path().join("instance"),
        control: t.path().join("ctl.sock"),
        view: Some(ViewSpec::Cow { saved: saved.clone(), readahead: 16 << 10 }),
        relay: Some(RelaySpec { listen: "127.0.0.1".parse().unwrap(), port: 0, target, token: token.clone(), trust }),
    };
    let shim = ShimClient::spawn(&spec).await.expect("the shim starts");
    let memory = shim.hello.memory.clone().expect("a view");
    let relay = shim.hello.relay.clone().expect("a relay");
    assert_eq!(shim.hello.ca_sha256.as_deref(), Some(ca.as_str()));
    // The view reads the saved VM; writes stay in the view.
    let mut c = vec![0u8; CHUNK_SIZE];
    std::fs::File::open(&memory).unwrap().read_exact_at(&mut c, 3 * CHUNK_SIZE as u64).unwrap();
    assert_eq!(c, forage_testkit::synthetic::pattern(3));
    shim.write(Space::Memory, vec![ChunkBytes { index: 5, bytes: vec![7; CHUNK_SIZE] }]).await.unwrap();
    assert_eq!(shim.written_chunks(Space::Memory).await.unwrap(), vec![5]);
    let mark = shim.mark().await.unwrap();
    let endpoint = forage_proto::ServiceEndpoint { addr: relay.clone(), token, ca_sha256: ca };
    let ep = endpoint.clone();
    assert_eq!(
        tokio::task::spawn_blocking(move || forage_client::service::request_line(
            &ep,
            "hello",
            Duration::from_secs(10)
        ))
        .await
        .unwrap()
        .unwrap(),
        "hello"
    );

    // The instance's process (a stand-in for QEMU): a shim with no process to serve
    // would end with its daemon.
    let mut vm = std::process::Command::new("sleep").arg("600").spawn().unwrap();
    shim.watch_qemu(vm.id()).await.unwrap();

    // The daemon goes away; the view and the relay go on.
    drop(shim);
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::File::open(&memory).unwrap().read_exact_at(&mut c, 5 * CHUNK_SIZE as u64).unwrap();
    assert_eq!(c, vec![7; CHUNK_SIZE], "the view is still served");
    let ep = endpoint.clone();
    assert_eq!(
        tokio::task::spawn_blocking(move || forage_client::service::request_line(
            &ep,
            "again",
            Duration::from_secs(10)
        ))
        .await
        .unwrap()
        .unwrap(),
        "again"
    );

    // A new daemon adopts it: same files, same relay, same history.
    let shim = ShimClient::connect(&spec.control).await.expect("the shim is still there");
    assert_eq!(shim.hello.relay.as_deref(), Some(relay.as_str()));
    assert!(shim.written_since(Space::Memory, mark).await.unwrap().is_empty());
    let data = shim.read(Space::Memory, vec![3, 5]).await.unwrap();
    assert_eq!(
        (data[0].bytes.clone(), data[1].bytes.clone()),
        (forage_testkit::synthetic::pattern(3), vec![7; CHUNK_SIZE])
    );
    let status = shim.status().await.unwrap();
    assert_eq!(status.relay_connections, 2);
    shim.shutdown().await.unwrap();
    let _ = vm.kill();
    let _ = vm.wait();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!spec.control.exists(), "the shim removed its socket");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(&t.path().to_string_lossy().to_string()), "the view is unmounted");
}

/// A shim that was never handed a QEMU (the session failed before) ends with its daemon
/// instead of lingering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shim_without_a_vm_ends_with_its_daemon() {
    std::env::set_var("FORAGE_SHIM", env!("CARGO_BIN_EXE_forage-shim"));
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(t.path().join("instance")).unwrap();
    let spec = ShimSpec {
        format: 1,
        instance: "test-2".into(),
        dir: t.path().join("instance"),
        control: t.path().join("ctl.sock"),
        view: None,
        relay: None,
    };
    let shim = ShimClient::spawn(&spec).await.expect("the shim starts");
    let pid = shim.hello.pid;
    drop(shim);
    for _ in 0..50 {
        if !forage_vm::process::alive(pid) {
            assert!(!spec.control.exists(), "the shim removed its socket");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the shim {pid} outlived its daemon with nothing to serve");
}
