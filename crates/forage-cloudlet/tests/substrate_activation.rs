//! A device asks a cloudlet to activate a VM substrate (`DeviceMessage::Activate`), for
//! real: the tiny guest with the sample service docked into the cloudlet's pool, then
//! requests the cloudlet must refuse (unknown substrate, a hostile name, more vCPUs or
//! memory than the host or the substrate allows) each answered with its code and leaving
//! the pool, the work folder and the processes as they were; then an activation at
//! 2 vCPUs / 200 MiB whose service answers through the cloudlet's relay and whose guest
//! (asked through its agent, not the activation's report) sees 2 vCPUs and about 200 MiB.
//! That running instance is then docked into a substrate of its own (what
//! `POST /v1/instances/{id}/dock` asks of the cloudlet), after refusals that leave it
//! running: it leaves the instance list, its device is told why, and an activation of the
//! new substrate answers with what the instance had written to its memory and its disk.

use std::net::Ipv4Addr;
use std::sync::Arc;

use forage_client::{provision, Ask, ClientError};
use forage_proto::ErrorCode;
use forage_substrate::{DockRequest, DockSource, Pool};
use forage_testkit::guest::*;

const NAME: &str = "act-hs";
/// The substrate the running instance is docked into.
const DOCKED: &str = "act-hs-docked";

async fn refused(addr: std::net::SocketAddr, substrate: &str, vcpus: u32, memory_mib: u64) -> (ErrorCode, String) {
    let ask = Ask::Activate { substrate: substrate.into(), vcpus, memory_mib };
    match provision(addr, credentials(), "t", ask, None).await {
        Err(ClientError::Refused { code, message, .. }) => (code, message),
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok((r, _)) => panic!("expected a refusal, got {r:?}"),
    }
}

/// What a refusal must leave as it was.
fn pool_state(pool: &Pool) -> Vec<(String, u64, String, u64)> {
    let s = pool.summary().unwrap();
    s.substrates.into_iter().map(|e| (e.name, e.bytes, format!("{:?}", e.tier), e.last_used_unix_ms)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_activates_a_substrate_and_bad_requests_change_nothing() {
    if skip_vm_tests() {
        return;
    }
    let data = data_dir();
    let image = image();
    logs();
    let _reaper = Reaper::new(&[data.work()]);
    let pool = Pool::open(&data).unwrap();
    let _ = pool.remove(NAME);
    let _ = pool.remove(DOCKED);
    let accel = forage_vm::accel::detect().accel;
    let req = DockRequest {
        name: NAME.into(),
        image,
        source: DockSource::Boot { app: Some(sample_app()), max_vcpus: 2, max_memory_mib: 256 },
        public: false,
        detach_nic: false,
        zstd_level: forage_substrate::format::DEFAULT_LEVEL,
        accel,
        ready_timeout: READY,
    };
    let d = forage_substrate::dock(&data, &pool, req).await.expect("docks");
    eprintln!("{d:?}");

    let c = forage_cloudlet::Cloudlet::open("act-cloudlet".into(), data.clone(), accel, Ipv4Addr::LOCALHOST)
        .expect("cloudlet");
    let cloudlet = Arc::new(c);
    pair_with(&cloudlet, "activation-tester");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(forage_cloudlet::serve(listener, cloudlet.clone()));

    // Refusals: each with its code, nothing changed.
    let before = pool_state(&pool);
    let host_vcpus = cloudlet.limits.vm.vcpus;
    let cases: Vec<(&str, u32, u64, ErrorCode, &str)> = vec![
        ("no-such-substrate", 1, 128, ErrorCode::NotFound, "no substrate no-such-substrate"),
        ("../../etc", 1, 128, ErrorCode::Protocol, "not a substrate name"),
        (NAME, host_vcpus + 1, 128, ErrorCode::Provision, "over this cloudlet's limit"),
        (NAME, 1, 1 << 40, ErrorCode::Provision, "over this cloudlet's limit"),
        (NAME, 1, 512, ErrorCode::Provision, "docked for"),
        (NAME, 0, 128, ErrorCode::Provision, "docked for"),
    ];
    for (name, vcpus, mib, code, says) in cases {
        let (got, message) = refused(addr, name, vcpus, mib).await;
        assert_eq!(got, code, "{name} {vcpus} {mib}: {message}");
        assert!(message.contains(says), "{name} {vcpus} {mib}: {message:?} should say {says:?}");
        assert!(!message.contains('\n'), "one line: {message:?}");
    }
    assert_cleaned_up(&data).await;
    assert_eq!(pool_state(&pool), before, "a refused activation changed the pool");
    assert!(!pool.disks_dir("no-such-substrate").unwrap().exists());

    // The activation a device asks for: the service answers through the relay, the
    // guest sees what was asked.
    let ask = Ask::Activate { substrate: NAME.into(), vcpus: 2, memory_mib: 200 };
    let (r, session) =
        provision(addr, credentials(), "t", ask, Some("search a 8".into())).await.expect("activated for the device");
    eprintln!("{r:?}");
    assert_eq!(r.mechanism, "substrate");
    assert!(r.answer.as_deref().unwrap_or("").starts_with("ok "), "{r:?}");
    assert!(!r.service.token.is_empty() && !r.endpoint.is_empty(), "{r:?}");
    // The instance the cloudlet runs for it (the test data folder's state may hold
    // records of other tests' instances).
    let running = cloudlet.state.list_instances(true).unwrap();
    let mine: Vec<_> = running.iter().filter(|i| i.name.starts_with("substrate-")).collect();
    assert_eq!(mine.len(), 1, "{running:?}");
    let agent = agent_port(&mine[0].dir);
    assert_eq!(guest_sh(agent, "nproc").await.trim(), "2", "online vCPUs in the guest");
    let total = forage_substrate::dock::meminfo(&guest_sh(agent, "cat /proc/meminfo").await).0 >> 20;
    assert!(total <= 200 && total + 48 >= 200, "MemTotal {total} MiB in the guest for 200 MiB asked");

    // Dock the running instance. What it wrote, in memory (/tmp) and on its disk (/data),
    // must be in what runs from the substrate.
    let marks = "echo in-memory > /tmp/dock-mark && echo on-disk > /data/dock-mark && sync";
    guest_sh(agent, marks).await;
    let id = mine[0].id.clone();
    let before = pool_state(&pool);
    for (name, instance, says) in [
        ("../x", id.as_str(), "not a substrate name"),
        (NAME, id.as_str(), "exists already"),
        (DOCKED, "no-such-instance", "no running instance"),
    ] {
        let e = cloudlet.dock_instance(instance, name, false).await.expect_err("refused");
        assert!(e.to_string().contains(says), "{name} {instance}: {e} should say {says:?}");
    }
    assert_eq!(pool_state(&pool), before, "a refused dock changed the pool");
    assert_eq!(guest_sh(agent, "cat /tmp/dock-mark").await.trim(), "in-memory", "the instance runs on");
    let mut session = session;
    let (docked, ended) = tokio::join!(cloudlet.dock_instance(&id, DOCKED, false), session.ended());
    let docked = docked.expect("the running instance docks");
    eprintln!("{docked:?}");
    match ended {
        forage_client::Ended::Stopped(ClientError::Refused { message, .. }) => {
            assert!(message.contains(&format!("docked this instance as substrate {DOCKED}")), "{message}")
        }
        other => panic!("the device should hear its instance was docked, got {other:?}"),
    }
    let running = cloudlet.state.list_instances(true).unwrap();
    assert!(running.iter().all(|i| i.id != id), "the docked instance is still listed: {running:?}");
    assert_cleaned_up(&data).await;
    let m = forage_substrate::format::read_manifest(&pool.entry(DOCKED).unwrap().path).unwrap();
    let service_port = forage_substrate::format::read_manifest(&pool.entry(NAME).unwrap().path).unwrap().service_port;
    assert_eq!((m.source.as_str(), m.service_port), (format!("instance:{id}").as_str(), service_port));

    // A device activates it: a new instance, its service answers, the marks are there.
    let ask = Ask::Activate { substrate: DOCKED.into(), vcpus: 2, memory_mib: 200 };
    let (r, session) =
        provision(addr, credentials(), "t", ask, Some("search a 8".into())).await.expect("the docked one activates");
    assert!(r.answer.as_deref().unwrap_or("").starts_with("ok "), "{r:?}");
    let running = cloudlet.state.list_instances(true).unwrap();
    let mine: Vec<_> = running.iter().filter(|i| i.name.starts_with("substrate-")).collect();
    assert_eq!(mine.len(), 1, "{running:?}");
    assert_ne!(mine[0].id, id, "a new instance");
    let agent = agent_port(&mine[0].dir);
    assert_eq!(guest_sh(agent, "cat /tmp/dock-mark /data/dock-mark").await, "in-memory\non-disk\n");
    session.close().await;
    assert_cleaned_up(&data).await;
    server.abort();
    let _ = pool.remove(NAME);
    let _ = pool.remove(DOCKED);
}

/// The host port of the guest agent's forward of the instance in `dir`.
fn agent_port(dir: &std::path::Path) -> u16 {
    let file: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("instance.json")).unwrap()).unwrap();
    file["forwards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["guest_port"] == forage_agent::AGENT_PORT)
        .and_then(|f| f["host_port"].as_u64())
        .expect("the agent's forward") as u16
}
