//! Hostile peers and devices against a cloudlet on loopback, through the real protocol
//! (no VM: everything here is refused before a VM would start). One test per finding of
//! the security review (`docs/security.md`, "Findings and their tests"). After each
//! attack a good device is still served, and nothing is written outside the data folder.

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::*;
use forage_proto::asynchronous::{read, write};
use forage_proto::{DeviceMessage as Message, ErrorCode, HandoffBegin, PairingMessage, PeerMessage, Provision};
use forage_trust::{Grant, PeerKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Finding 1: a paired peer cloudlet names files and hardware in HandoffBegin. Each lie
/// is refused before anything is looked up or written; the file outside DATA is intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoff_destination_refuses_what_it_would_not_build() {
    let rig = Rig::new("dest", |_| {}).await;
    let victim = rig.dir.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let peer = rig.credentials("peer-cloudlet", PeerKind::Cloudlet);
    let good = forage_testkit::synthetic::describe_snapshot_of(&rig.dir.path().join("peer-vm")).manifest().clone();
    let before = rig.outside_data();
    type Lie<'a> = Box<dyn Fn(&mut forage_vm::snapshot::SnapshotManifest) + 'a>;
    let lies: Vec<(&str, Lie<'_>)> = vec![
        (
            "an absolute memory file",
            Box::new(|m: &mut forage_vm::snapshot::SnapshotManifest| m.memory.file = victim.to_string_lossy().into()),
        ),
        ("a disk file that climbs out", Box::new(|m| m.disks[0].file = "../../../victim".into())),
        (
            "a second disk only in the spec",
            Box::new(|m| {
                let mut d = m.spec.disks[0].clone();
                d.path = "/etc/shadow".into();
                m.spec.disks.push(d);
            }),
        ),
        ("a qcow2 disk", Box::new(|m| m.spec.disks[0].format = forage_vm::DiskFormat::Qcow2)),
        ("4096 vCPUs", Box::new(|m| m.spec.vcpus = 4096)),
        (
            "a terabyte of memory",
            Box::new(|m| {
                m.spec.memory_mib = 1 << 20;
                m.memory.size = 1 << 40;
            }),
        ),
        ("a 2 TiB disk", Box::new(|m| m.disks[0].size = 2 << 40)),
        ("another machine type", Box::new(|m| m.spec.machine = "microvm".into())),
        ("a CPU model", Box::new(|m| m.spec.cpu_model = Some("host".into()))),
        ("options hidden in the name", Box::new(|m| m.spec.name = "x,guest-agent=on".into())),
    ];
    for (what, lie) in lies {
        let mut m = good.clone();
        lie(&mut m);
        let mut s = forage_client::connect(rig.addr, &peer, None).await.unwrap();
        assert!(matches!(peer_hello(&mut s).await, PeerMessage::PeerWelcome { .. }));
        let begin = HandoffBegin {
            instance: "i".into(),
            base_state_sha256: m.state.sha256.clone(),
            vm: serde_json::to_vec(&m).unwrap(),
            service_port: Some(8080),
            extra_ports: vec![],
            service_token: String::new(),
        };
        write(&mut s, &PeerMessage::HandoffBegin(begin)).await.unwrap();
        match read::<PeerMessage>(&mut s).await.unwrap() {
            PeerMessage::Error { code: ErrorCode::Handoff, message } => {
                assert!(message.contains("VM description"), "{what}: {message}")
            }
            other => panic!("{what}: the destination answered {other:?}"),
        }
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert_eq!(rig.outside_data(), before, "something was written outside the data folder");
    rig.still_serves().await;
}

/// Finding 2: what a pairing code grants is the operator's choice. A device given a
/// device code that asks (as earlier clients could) for a ten-year cloudlet credential
/// gets a device credential of the code's lifetime, and may not hand VMs off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_code_cannot_make_a_cloudlet() {
    let rig = Rig::new("grant", |_| {}).await;
    let code = rig.cloudlet.trust.new_code(Grant::new(PeerKind::Device, Duration::from_secs(3600))).unwrap();
    let (prefix, secret) = forage_trust::PairingCode::parse(&code.text).unwrap();
    let (key, csr) = forage_trust::new_csr("sneaky").unwrap();
    // An earlier client's PairRequest, with the fields it used to choose.
    let payload = cbor_map(vec![
        ("m", ciborium::Value::Text("pair_request".into())),
        ("secret", ciborium::Value::Bytes(secret)),
        ("name", ciborium::Value::Text("sneaky".into())),
        ("kind", ciborium::Value::Text("cloudlet".into())),
        ("csr", ciborium::Value::Bytes(csr)),
        ("valid_s", ciborium::Value::Integer((10u64 * 365 * 24 * 3600).into())),
    ]);
    let mut s = pairing_connection(rig.addr, prefix, None).await;
    s.write_all(&frame(16, &payload)).await.unwrap();
    let granted = read::<PairingMessage>(&mut s).await.unwrap();
    let PairingMessage::PairGranted { ca, cert, not_after_unix, .. } = granted else { panic!("{granted:?}") };
    let issued = rig.cloudlet.trust.issued().into_iter().find(|i| i.name == "sneaky").unwrap();
    assert_eq!(issued.kind, PeerKind::Device);
    assert!(not_after_unix <= now() + 3600 + 120, "the code's lifetime, not the request's");
    // With it, a handoff is refused.
    let keep = forage_trust::DeviceTrust::new(&rig.dir.path().join("sneaky"));
    keep.save("grant", None, &ca, &cert, &key.serialize_pem(), not_after_unix).unwrap();
    let creds = keep.for_cloudlet(rig.addr, Some("grant")).unwrap().client_config().unwrap();
    let mut s = forage_client::connect(rig.addr, &creds, None).await.unwrap();
    assert!(
        matches!(peer_hello(&mut s).await, PeerMessage::Error { code: ErrorCode::Unpaired, .. }),
        "a device may not open the peer protocol"
    );
    rig.still_serves().await;
}

/// Finding 3: idle connections from one source take at most their share and are closed
/// when they do not finish a TLS handshake in time; other sources are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_starve_the_cloudlet() {
    let rig = Rig::new("flood", |c| {
        c.set_limits(forage_cloudlet::Limits {
            connections_per_source: 8,
            handshake: Duration::from_secs(1),
            ..Default::default()
        });
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..50 {
        idle.push(tokio::net::TcpStream::connect(rig.addr).await.unwrap());
    }
    // Beyond its share, a source's connections are closed at once.
    let mut closed = 0;
    for s in idle.iter_mut() {
        let mut b = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(300), s.read(&mut b)).await {
            closed += 1;
        }
    }
    assert!(closed >= 40, "only {closed} of the 42 connections over the share were closed");
    // Another source is served while they sit there.
    rig.serves_from("127.0.0.2".parse().unwrap()).await;
    // The ones let in are closed by the handshake timeout; then the first source is served.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for s in idle.iter_mut() {
        let mut b = [0u8; 1];
        assert!(
            matches!(tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await, Ok(Ok(0) | Err(_))),
            "an idle connection is still open"
        );
    }
    rig.still_serves().await;
}

/// Finding 4 (the part that needs no VM): the guest agent's port is never a service port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_port_is_never_a_service() {
    let rig = Rig::new("agent", |_| {}).await;
    let script = Provision::Script {
        os: "linux-x86_64".into(),
        port: forage_agent::AGENT_PORT,
        script: b"true".to_vec(),
        timeout_s: 10,
        components: vec![],
    };
    match forage_client::provision(rig.addr, &rig.device, "t", script, None).await {
        Err(forage_client::ClientError::Refused { code: ErrorCode::Provision, message, .. }) => {
            assert!(message.contains("guest agent"), "{message}")
        }
        other => panic!("{:?}", other.map(|r| r.0)),
    }
    rig.still_serves().await;
}

/// Finding 5: overlay URLs cannot reach loopback or private addresses, plain http, or be
/// redirected; a failed fetch tells the device nothing the server said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlay_urls_cannot_reach_inside() {
    let server = HttpServer::start().await;
    let rig = Rig::new("ssrf", |_| {}).await;
    let (_, ovl) = forage_testkit::synthetic::make_overlay(&rig.data, "ssrf-base", rig.dir.path());
    let offer = offer_for(&ovl);
    for url in [
        format!("http://127.0.0.1:{}/x.ovl", server.port),
        format!("https://127.0.0.1:{}/x.ovl", server.port),
        "https://169.254.169.254/latest".to_string(),
        "file:///etc/passwd".to_string(),
    ] {
        let message = url_refusal(&rig, &offer, &url).await;
        assert!(message.contains("https") || message.contains("not allowed"), "{url}: {message}");
    }
    assert_eq!(server.requests(), 0, "the cloudlet made a request it should not have");
    // An operator who lists loopback and allows http: still no redirects, and nothing of
    // what the server answered comes back.
    let rig = Rig::new("ssrf-listed", |c| {
        c.fetch_policy =
            forage_remote::FetchPolicy { allow_http: true, allow: vec!["127.0.0.1/32".parse().unwrap()], any: false };
    })
    .await;
    forage_testkit::synthetic::make_overlay(&rig.data, "ssrf-base", rig.dir.path());
    let redirect = url_refusal(&rig, &offer, &format!("http://127.0.0.1:{}/redirect", server.port)).await;
    assert!(!redirect.contains("SECRET"), "{redirect}");
    let failing = url_refusal(&rig, &offer, &format!("http://127.0.0.1:{}/fail", server.port)).await;
    assert!(!failing.contains("SECRET") && !failing.contains("500"), "{failing}");
    assert_eq!(server.followed(), 0, "a redirect was followed");
    rig.still_serves().await;
}

/// Finding 6: a small manifest that decompresses to a lot is refused before it is
/// parsed, within what an overlay of the base can hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_bomb_is_refused_early() {
    let rig = Rig::new("bomb", |_| {}).await;
    let (_, ovl) = forage_testkit::synthetic::make_overlay(&rig.data, "bomb-base", rig.dir.path());
    let mut offer = offer_for(&ovl);
    let body = zstd::bulk::compress(&vec![0u8; 64 << 20], 19).unwrap();
    assert!(body.len() < 64 << 10);
    let prefix = prefix_with(&body);
    offer.overlay_digest = hex::encode(&prefix[24..56]);
    let t = Instant::now();
    let mut s = forage_client::connect(rig.addr, &rig.device, None).await.unwrap();
    assert!(matches!(hello(&mut s, vec![offer]).await, Message::Welcome { chosen: Some(_), .. }));
    write(&mut s, &Message::Manifest { bytes: prefix }).await.unwrap();
    match read::<Message>(&mut s).await.unwrap() {
        Message::Error { code: ErrorCode::BadOverlay, message } => {
            assert!(message.contains("over the limit"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(5));
    rig.still_serves().await;
}

/// Finding 7: a segment is checked before it is written (store and forward), and a
/// session that would not fit in the free space is refused with the numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_is_not_filled_by_a_device() {
    let rig = Rig::new("fill", |_| {}).await;
    let (_, ovl) = forage_testkit::synthetic::make_overlay(&rig.data, "fill-base", rig.dir.path());
    let reader = forage_format::OverlayReader::open(std::fs::File::open(&ovl).unwrap()).unwrap();
    let manifest = reader.manifest().clone();
    let prefix = std::fs::read(&ovl).unwrap()
        [..forage_format::container::HEADER_LEN + reader.header().manifest_len as usize]
        .to_vec();
    let mut s = forage_client::connect(rig.addr, &rig.device, None).await.unwrap();
    let hello_msg = Message::Hello {
        versions: (2, 2),
        device: "d".into(),
        offers: vec![offer_for(&ovl)],
        early_start: false,
        store_and_forward: true,
    };
    write(&mut s, &hello_msg).await.unwrap();
    assert!(matches!(read::<Message>(&mut s).await.unwrap(), Message::Welcome { chosen: Some(_), .. }));
    write(&mut s, &Message::Manifest { bytes: prefix }).await.unwrap();
    let bad = vec![0x5a; manifest.segments[0].compressed_len as usize];
    write(&mut s, &Message::Segment { index: 0, bytes: bad }).await.unwrap();
    match read::<Message>(&mut s).await.unwrap() {
        Message::Error { code: ErrorCode::BadOverlay, message } => assert!(message.contains("checksum"), "{message}"),
        other => panic!("{other:?}"),
    }
    wait_no_sessions(&rig.data).await;

    // A work folder on a small file system: refused with what it needs and what is free.
    let tiny = rig.data.work();
    std::fs::create_dir_all(&tiny).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&tiny)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped the free-space part: cannot mount a tmpfs (needs root)");
        return;
    }
    let mut s = forage_client::connect(rig.addr, &rig.device, None).await.unwrap();
    hello(&mut s, vec![offer_for(&ovl)]).await;
    let prefix = std::fs::read(&ovl).unwrap()
        [..forage_format::container::HEADER_LEN + reader.header().manifest_len as usize]
        .to_vec();
    write(&mut s, &Message::Manifest { bytes: prefix }).await.unwrap();
    let answer = read::<Message>(&mut s).await.unwrap();
    let _ = std::process::Command::new("umount").arg(&tiny).status();
    match answer {
        Message::Error { code: ErrorCode::Busy, message } => assert!(message.contains("MiB are free"), "{message}"),
        other => panic!("{other:?}"),
    }
    rig.still_serves().await;
}

/// Finding 8: wrong codes from one source lock out that source only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_codes_lock_out_their_source_only() {
    let rig = Rig::new("guess", |_| {}).await;
    let code = rig.cloudlet.trust.new_code(Grant::default()).unwrap();
    let (prefix, secret) = forage_trust::PairingCode::parse(&code.text).unwrap();
    let guesser: IpAddr = "127.0.0.1".parse().unwrap();
    for i in 0..forage_trust::MAX_PAIRING_FAILURES {
        let m = pair_from(rig.addr, prefix, guesser, b"wrong!".to_vec(), &format!("guess{i}")).await;
        assert!(matches!(m, PairingMessage::Error { code: ErrorCode::Pairing, .. }), "{m:?}");
    }
    // The right code, from the guesser: refused unheard.
    let m = pair_from(rig.addr, prefix, guesser, secret.clone(), "late").await;
    match m {
        PairingMessage::Error { code: ErrorCode::Pairing, message } => {
            assert!(message.contains("too many"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    // From elsewhere: the code still works (nobody else's codes were voided).
    let m = pair_from(rig.addr, prefix, "127.0.0.2".parse().unwrap(), secret, "honest").await;
    assert!(matches!(m, PairingMessage::PairGranted { .. }), "{m:?}");
}

/// Finding 9: names are plain and held once; a device's self-description too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_are_plain_and_held_once() {
    let rig = Rig::new("names", |_| {}).await;
    for (name, want) in [("evil\u{1b}[2J", "cannot name"), ("tester", "is held by")] {
        let code = rig.cloudlet.trust.new_code(Grant::default()).unwrap();
        let (prefix, secret) = forage_trust::PairingCode::parse(&code.text).unwrap();
        match pair_from(rig.addr, prefix, "127.0.0.1".parse().unwrap(), secret, name).await {
            PairingMessage::Error { code: ErrorCode::Pairing, message } => {
                assert!(message.contains(want), "{name:?}: {message}")
            }
            other => panic!("{name:?}: {other:?}"),
        }
    }
    let mut s = forage_client::connect(rig.addr, &rig.device, None).await.unwrap();
    let h = Message::Hello {
        versions: (2, 2),
        device: "line\nbreak".into(),
        offers: vec![],
        early_start: false,
        store_and_forward: false,
    };
    write(&mut s, &h).await.unwrap();
    assert!(matches!(read::<Message>(&mut s).await.unwrap(), Message::Error { code: ErrorCode::Protocol, .. }));
    rig.still_serves().await;
}

/// Finding 11: the data folder is private.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_folder_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let rig = Rig::new("private", |_| {}).await;
    assert_eq!(std::fs::metadata(rig.data.root()).unwrap().permissions().mode() & 0o777, 0o700);
    for key in ["ca.key", "server.key"] {
        let mode = std::fs::metadata(rig.data.trust_cloudlet().join(key)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
}

/// Finding 12: the signature is checked before the cache is looked at: whether a
/// cloudlet holds an overlay's launch VM is not told for an overlay it refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_is_not_revealed_before_the_signature() {
    let rig = Rig::new("sigcache", |_| {}).await;
    let (base, ovl) = forage_testkit::synthetic::make_overlay(&rig.data, "sig-base", rig.dir.path());
    let offer = offer_for(&ovl);
    let launch = rig.dir.path().join("cached-launch");
    forage_testkit::synthetic::describe_snapshot_of(&launch);
    let manifest = forage_format::OverlayReader::open(std::fs::File::open(&ovl).unwrap()).unwrap().manifest().clone();
    rig.cloudlet.cache.store_dir(&offer.overlay_digest, &base, &launch, &manifest);
    assert!(rig.cloudlet.cache.lookup(&offer.overlay_digest).is_some());
    std::fs::write(rig.data.root().join("trust").join("signers"), format!("{} # someone\n", "ab".repeat(32))).unwrap();
    let mut s = forage_client::connect(rig.addr, &rig.device, None).await.unwrap();
    match hello(&mut s, vec![offer]).await {
        Message::Error { code: ErrorCode::BadOverlay, message } => assert!(message.contains("not signed"), "{message}"),
        other => panic!("the cloudlet answered {other:?} before checking the signature"),
    }
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}
