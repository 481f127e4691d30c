//! Membership against a real etcd (Debian's etcd-server, one member on loopback started
//! by the test): two nodes join, see each other, place a request on the one holding the
//! base; a node asked to drain sees it and takes no placement; one stops renewing and is gone within its lease, its instance marked lost; a
//! hostile object in the cluster's keys is refused and counted, and changes nothing.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use forage_cluster::*;

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Two distinct free ports (both held while the second is chosen, so they differ).
fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    (a.local_addr().unwrap().port(), b.local_addr().unwrap().port())
}

fn etcd(dir: &std::path::Path) -> (Kill, String) {
    let (client, peer) = free_ports();
    let url = format!("http://127.0.0.1:{client}");
    let child = Command::new("etcd")
        .args(["--name", "t0", "--data-dir"])
        .arg(dir)
        .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args(["--initial-cluster", &format!("t0=http://127.0.0.1:{peer}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd (scripts/deps.sh installs etcd-server)");
    (Kill(child), url)
}

fn view(port: u16, bases: &[&str], instances: &[&str]) -> LocalView {
    LocalView {
        spec: NodeSpec { device_addr: format!("127.0.0.1:{port}").parse().unwrap(), cores: 2, memory_mib: 4096 },
        status: NodeStatus {
            bases: bases.iter().map(|s| s.to_string()).collect(),
            free_memory_mib: 2048,
            ..Default::default()
        },
        instances: instances
            .iter()
            .map(|id| LocalInstance { id: id.to_string(), name: "svc".into(), endpoint: "127.0.0.1:9".into() })
            .collect(),
        sessions_failed: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_place_and_are_lost_with_their_lease() {
    let t = tempfile::tempdir().unwrap();
    let (_etcd, url) = etcd(&t.path().join("etcd"));
    let config =
        ClusterConfig { endpoints: vec![url.clone()], cluster: "t".into(), lease_ttl_s: 2, ..Default::default() };
    let base = "d".repeat(64);
    // etcd takes a moment to elect itself.
    let started = Instant::now();
    let a = loop {
        match Member::join(config.clone(), "a", view(1, &[], &[]), Box::new(HoldsThenLeastLoaded)).await {
            Ok(m) => break m,
            Err(e) if started.elapsed() < Duration::from_secs(20) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("{}", chain(&e)),
        }
    };
    let b =
        Member::join(config.clone(), "b", view(2, &[&base], &["i1"]), Box::new(HoldsThenLeastLoaded)).await.unwrap();
    a.heartbeat(view(1, &[], &[])).await.unwrap();
    let s = a.status();
    assert!(s.quorum);
    assert_eq!(s.nodes.iter().map(|n| n.name()).collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(s.nodes[0].metadata.generation, 1);
    assert_eq!(s.instances.len(), 1);
    assert_eq!(s.instances[0].status.phase, InstancePhase::Running);

    let p = a.place(&PlacementRequest { base_digest: Some(base.clone()), ..Default::default() }).await.unwrap();
    assert_eq!((p.node.as_str(), p.device_addr.port(), p.considered, p.able), ("b", 2, 2, 1));
    let e = a.place(&PlacementRequest { service: Some("nowhere".into()), ..Default::default() }).await.unwrap_err();
    assert!(matches!(e, PlacementError::Unplaceable(PlaceError::NoneAble { .. })), "{e}");

    // b asked to drain: it sees it, and takes no new placement until done.
    a.request_drain("b").await.unwrap();
    assert!(matches!(a.request_drain("nobody").await, Err(DrainError::NoSuchNode(_))));
    b.heartbeat(view(2, &[&base], &["i1"])).await.unwrap();
    assert!(b.drain_requested() && !a.drain_requested());
    let e = a.place(&PlacementRequest { base_digest: Some(base.clone()), ..Default::default() }).await.unwrap_err();
    assert!(matches!(e, PlacementError::Unplaceable(_)), "the only holder drains: {e}");
    b.drain_done().await.unwrap();
    b.heartbeat(view(2, &[&base], &["i1"])).await.unwrap();
    assert!(!b.drain_requested());
    assert_eq!(
        a.place(&PlacementRequest { base_digest: Some(base.clone()), ..Default::default() }).await.unwrap().node,
        "b"
    );

    // A hostile object among the nodes is refused and counted; the view stays whole.
    let etcd = Etcd::new(vec![url.clone()]);
    etcd.put("/forage/v1/t/nodes/evil", &vec![b'['; 70_000], 0).await.unwrap();
    a.heartbeat(view(1, &[], &[])).await.unwrap();
    assert_eq!(a.status().nodes.len(), 2);
    assert!(a.status().refused_objects >= 1);
    etcd.delete("/forage/v1/t/nodes/evil").await.unwrap();

    // b stops renewing: gone within its lease, its instance lost.
    drop(b);
    let stopped = Instant::now();
    loop {
        a.heartbeat(view(1, &[], &[])).await.unwrap();
        let s = a.status();
        if s.nodes.len() == 1 {
            let i = &s.instances[0];
            assert_eq!(i.status.phase, InstancePhase::Lost, "{i:?}");
            assert!(i.status.reason.as_deref().unwrap().contains("node b"));
            break;
        }
        assert!(stopped.elapsed() < Duration::from_secs(5), "b still listed {:?} after it stopped", stopped.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let gone_after = stopped.elapsed();
    assert!(gone_after <= Duration::from_secs(4), "lease 2 s, seen gone after {gone_after:?}");

    // A clean stop leaves at once.
    let c = Member::join(config.clone(), "c", view(3, &[], &[]), Box::new(HoldsThenLeastLoaded)).await.unwrap();
    c.leave().await.unwrap();
    a.heartbeat(view(1, &[], &[])).await.unwrap();
    assert_eq!(a.status().nodes.len(), 1);

    // etcd gone: heartbeats and placement fail with a clear error.
    drop(_etcd);
    let e = a.place(&PlacementRequest::default()).await.unwrap_err();
    assert!(matches!(e, PlacementError::NoQuorum(EtcdError::Unavailable { .. })), "{}", chain(&e));
    assert!(chain(&e).contains("no quorum"), "{}", chain(&e));
}

async fn joined(config: &ClusterConfig, name: &str, v: LocalView) -> std::sync::Arc<Member> {
    let started = Instant::now();
    loop {
        match Member::join(config.clone(), name, v.clone(), Box::new(HoldsThenLeastLoaded)).await {
            Ok(m) => return m,
            Err(e) if started.elapsed() < Duration::from_secs(20) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("{}", chain(&e)),
        }
    }
}

/// Placements racing from two nodes: each takes a reservation in a transaction, so the
/// twenty spread over the three equal nodes (none sees a stale load), and the last slot
/// of a node goes to one placer only; a node's heartbeat releases one reservation per
/// instance that appeared on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_placements_reserve_and_spread() {
    let t = tempfile::tempdir().unwrap();
    let (_etcd, url) = etcd(&t.path().join("etcd"));
    let config =
        ClusterConfig { endpoints: vec![url.clone()], cluster: "r".into(), lease_ttl_s: 30, ..Default::default() };
    let a = joined(&config, "a", view(1, &[], &[])).await;
    let b = joined(&config, "b", view(2, &[], &[])).await;
    let c = joined(&config, "c", view(3, &[], &[])).await;
    let reserve = PlacementRequest { reserve: true, ..Default::default() };
    let tasks: Vec<_> = (0..20)
        .map(|k| {
            let (m, r) = (if k % 2 == 0 { a.clone() } else { b.clone() }, reserve.clone());
            tokio::spawn(async move { m.place(&r).await })
        })
        .collect();
    let mut placed = Vec::new();
    for t in tasks {
        placed.push(t.await.unwrap().unwrap_or_else(|e| panic!("{}", chain(&e))));
    }
    let on = |n: &str| placed.iter().filter(|p| p.node == n).count();
    let spread = (on("a"), on("b"), on("c"));
    eprintln!("spread {spread:?}, conflicts {}", placed.iter().map(|p| p.conflicts).sum::<u32>());
    assert_eq!(spread.0 + spread.1 + spread.2, 20);
    assert!([spread.0, spread.1, spread.2].iter().all(|&n| (6..=7).contains(&n)), "{spread:?}");
    assert!(placed.iter().all(|p| p.reservation.is_some()));
    let etcd = Etcd::new(vec![url.clone()]);
    assert_eq!(etcd.range_prefix("/forage/v1/r/reservations/").await.unwrap().len(), 20);
    // An asked (not reserved) placement takes nothing.
    let asked = a.place(&PlacementRequest::default()).await.unwrap();
    assert!(asked.reservation.is_none());
    assert_eq!(etcd.range_prefix("/forage/v1/r/reservations/").await.unwrap().len(), 20);

    // Three instances appear on c: its heartbeat releases three of its reservations.
    let on_c = on("c");
    c.heartbeat(view(3, &[], &["i1", "i2", "i3"])).await.unwrap();
    let left = etcd.range_prefix("/forage/v1/r/reservations/c/").await.unwrap().len();
    assert_eq!(left, on_c - 3);

    // The last slot: d has room for one instance; two placers race for it.
    let mut tight = view(4, &["f".repeat(64).as_str()], &[]);
    tight.status.free_memory_mib = RESERVED_MIB;
    let d = joined(&config, "d", tight).await;
    let for_d = PlacementRequest { base_digest: Some("f".repeat(64)), reserve: true, ..Default::default() };
    let (x, y) = tokio::join!(a.place(&for_d), b.place(&for_d));
    let won = [&x, &y].iter().filter(|r| r.as_ref().is_ok_and(|p| p.node == "d")).count();
    assert_eq!(won, 1, "{x:?} {y:?}");
    let lost = if x.is_ok() { y } else { x };
    assert!(matches!(lost, Err(PlacementError::Unplaceable(PlaceError::NoneAble { .. }))), "{lost:?}");
    drop(d);
}

/// The cluster's one announcement: the first node to claim it holds it while its lease
/// lives; after it leaves, the next heartbeat of another node takes it over, and never
/// two at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_announces_the_cluster_and_another_takes_over() {
    let t = tempfile::tempdir().unwrap();
    let (_etcd, url) = etcd(&t.path().join("etcd"));
    let config =
        ClusterConfig { endpoints: vec![url.clone()], cluster: "m".into(), lease_ttl_s: 30, ..Default::default() };
    let a = joined(&config, "a", view(1, &[], &[])).await;
    let b = joined(&config, "b", view(2, &[], &[])).await;
    let c = joined(&config, "c", view(3, &[], &[])).await;
    for (m, port) in [(&a, 1), (&b, 2), (&c, 3)] {
        m.heartbeat(view(port, &[], &[])).await.unwrap();
    }
    let announcing = |ms: &[&std::sync::Arc<Member>]| ms.iter().filter(|m| m.announces()).count();
    assert_eq!(announcing(&[&a, &b, &c]), 1, "exactly one node announces");
    assert!(a.announces(), "the first to join claimed it");
    assert_eq!(b.status().announcer.as_deref(), Some("a"), "the others know who");

    // a leaves: its claim goes with its lease, and the next heartbeat takes it over.
    a.leave().await.unwrap();
    b.heartbeat(view(2, &[], &[])).await.unwrap();
    c.heartbeat(view(3, &[], &[])).await.unwrap();
    assert_eq!(announcing(&[&b, &c]), 1, "one node announces again");
    assert!(b.announces(), "b's heartbeat came first");
    assert_eq!(c.status().announcer.as_deref(), Some("b"));
}

/// PEM files of a CA, an etcd server certificate for 127.0.0.1 (server and client use:
/// etcd's JSON gateway dials the member with it) and a node's client certificate.
fn tls_files(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "test etcd CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf = |name: &str, usages: Vec<ExtendedKeyUsagePurpose>| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = usages;
        let cert = p.signed_by(&key, &ca_cert, &ca_key).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    };
    leaf("server", vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]);
    leaf("node", vec![ExtendedKeyUsagePurpose::ClientAuth]);
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    (dir.join("ca.pem"), dir.join("node.pem"), dir.join("node.key"))
}

/// etcd with TLS and client certificates (`--client-cert-auth`): a node with the CA and
/// its certificate joins and announces; without its certificate, or trusting no CA, it
/// is refused with a clear error; an unreadable CA file is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_etcd_over_tls_with_its_certificate_only() {
    let t = tempfile::tempdir().unwrap();
    let (ca, cert, key) = tls_files(t.path());
    let (client, peer) = free_ports();
    let url = format!("https://127.0.0.1:{client}");
    let _etcd = Kill(
        Command::new("etcd")
            .args(["--name", "t0", "--data-dir"])
            .arg(t.path().join("etcd"))
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-cluster", &format!("t0=http://127.0.0.1:{peer}")])
            .arg("--cert-file")
            .arg(t.path().join("server.pem"))
            .arg("--key-file")
            .arg(t.path().join("server.key"))
            .arg("--trusted-ca-file")
            .arg(&ca)
            .arg("--client-cert-auth")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd (scripts/deps.sh installs etcd-server)"),
    );
    let tls = EtcdTls { ca: ca.clone(), cert: Some(cert), key: Some(key) };
    let config =
        ClusterConfig { endpoints: vec![url.clone()], cluster: "s".into(), lease_ttl_s: 30, tls: Some(tls.clone()) };
    let a = joined(&config, "a", view(1, &[], &[])).await;
    assert!(a.status().quorum && a.announces(), "{:?}", a.status());

    // Without its certificate, or trusting no CA: refused, and the error says where.
    let no_cert = Etcd::with_tls(vec![url.clone()], Some(&EtcdTls { ca: ca.clone(), cert: None, key: None })).unwrap();
    let e = no_cert.range_prefix("/forage/").await.unwrap_err();
    assert!(chain(&e).contains(&url), "{}", chain(&e));
    let plain = Etcd::new(vec![url.clone()]);
    assert!(plain.range_prefix("/forage/").await.is_err());

    // An unreadable CA file is named.
    let bad =
        ClusterConfig { tls: Some(EtcdTls { ca: t.path().join("missing.pem"), ..tls.clone() }), ..config.clone() };
    let e = Member::join(bad, "b", view(2, &[], &[]), Box::new(HoldsThenLeastLoaded)).await.err().unwrap();
    assert!(chain(&e).contains("missing.pem"), "{}", chain(&e));
}
