//! A cloudlet of many hosts, with real processes: three hosts (network namespaces on one
//! bridge, started by the test) each run an etcd member (Debian's etcd-server) and a
//! `forage serve --cluster`; nothing system-wide. Checked:
//! 1. every node sees the three within a heartbeat, with capacity; `/metrics` shows them;
//! 2. a request reaching node A is placed by A on the best node; one that no node can
//!    serve is refused (409) with what it needs;
//! 3. one etcd member killed, the leader (the hard case: the others elect a new one
//!    while the request waits), changes nothing: heartbeats and placements go on;
//! 4. a node killed (SIGKILL: no goodbye) is seen gone within its lease;
//! 5. a second etcd member killed (no quorum): placement refuses with a clear error (503),
//!    the nodes keep running and say so in `forage cluster status`.
//!
//!
//! With real guests (the tiny image; two boots to build a base and an overlay):
//! 6. a device's synthesis reaching node A, which lacks the base, is redirected by A to
//!    node B, which holds it, and served there; A fetches the base from B meanwhile (it
//!    is paired with B as a cloudlet), and node C fetches it by hand (`forage base
//!    fetch`), both over the peer protocol; the cluster sees them hold it;
//! 7. node B drained (`forage node drain`): its running instance is handed off (the VM
//!    handoff, mutual TLS with the cloudlet pairing) to another node, the device is told
//!    where it went and the service's request counter moved with it;
//! 8. the node now holding it killed: its instance is reported Lost within its lease, and
//!    the device asking a surviving node after it (WhereIs) is told it is lost.

use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use forage_cluster::ClusterStatus;
use forage_testkit::lan::Lan;
use forage_testkit::wan::Netns;

const EXE: &str = env!("CARGO_BIN_EXE_forage");
/// The nodes' lease: a killed node must be gone within it (plus one heartbeat's read).
const LEASE_S: u64 = 3;

struct Kill(Child);

impl Kill {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Kill {
    fn drop(&mut self) {
        self.kill();
    }
}

fn root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")))
}

fn etcd_member(ns: &Netns, i: usize, lan: &Lan, dir: &Path) -> Kill {
    let cluster: Vec<String> =
        lan.hosts.iter().take(3).enumerate().map(|(j, h)| format!("e{j}=http://{}:2380", h.addr)).collect();
    let log = std::fs::File::create(dir.join(format!("etcd{i}.log"))).unwrap();
    let child = ns
        .command("etcd")
        .args(["--name", &format!("e{i}"), "--data-dir"])
        .arg(dir.join(format!("etcd{i}")))
        .args(["--listen-client-urls", &format!("http://{}:2379", ns.addr)])
        .args(["--advertise-client-urls", &format!("http://{}:2379", ns.addr)])
        .args(["--listen-peer-urls", &format!("http://{}:2380", ns.addr)])
        .args(["--initial-advertise-peer-urls", &format!("http://{}:2380", ns.addr)])
        .args(["--initial-cluster", &cluster.join(","), "--initial-cluster-state", "new"])
        .args(["--initial-cluster-token", "forage-test"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("etcd (scripts/deps.sh installs etcd-server)");
    Kill(child)
}

/// Three etcd members on hosts 0..3 of `lan`, healthy; their client URLs.
fn etcd_cluster(lan: &Lan, dir: &Path) -> (Vec<Kill>, String) {
    let etcd: Vec<Kill> = (0..3).map(|i| etcd_member(&lan.hosts[i], i, lan, dir)).collect();
    let urls: Vec<String> = lan.hosts.iter().take(3).map(|h| format!("http://{}:2379", h.addr)).collect();
    let urls = urls.join(",");
    // The members elect a leader.
    let started = Instant::now();
    let healthy = || lan.hosts[0].command("etcdctl").args(["--endpoints", &urls, "endpoint", "health"]).output();
    while !healthy().unwrap().status.success() {
        assert!(started.elapsed() < Duration::from_secs(30), "etcd did not become healthy: see {}", dir.display());
        std::thread::sleep(Duration::from_millis(300));
    }
    (etcd, urls)
}

/// Which of the three members leads now (`etcdctl endpoint status`: the fifth field).
fn etcd_leader(lan: &Lan, urls: &str) -> usize {
    let out =
        lan.hosts[0].command("etcdctl").args(["--endpoints", urls, "endpoint", "status", "-w", "simple"]).output();
    let out = String::from_utf8(out.unwrap().stdout).unwrap();
    let leader =
        out.lines().find(|l| l.split(", ").nth(4) == Some("true")).unwrap_or_else(|| panic!("no leader: {out}"));
    let url = leader.split(", ").next().unwrap();
    (0..3)
        .find(|&i| url == format!("http://{}:2379", lan.hosts[i].addr))
        .unwrap_or_else(|| panic!("{url}: not a member"))
}

fn node(ns: &Netns, data: &Path, name: &str, urls: &str) -> Kill {
    std::fs::create_dir_all(data).unwrap();
    let log = std::fs::File::create(data.join("serve.log")).unwrap();
    let child = ns
        .command(EXE)
        .arg("--data-dir")
        .arg(data)
        .args(["serve", "--listen", &format!("{}:7878", ns.addr), "--api", "127.0.0.1:7879", "--name", name])
        .args(["--cluster", urls, "--cluster-lease-s", &LEASE_S.to_string()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Kill(child)
}

fn forage_in(ns: &Netns, data: &Path, args: &[&str]) -> Output {
    ns.command(EXE).arg("--data-dir").arg(data).args(args).output().unwrap()
}

/// `forage cluster status --json` on the node at `data`, once it answers.
fn status(ns: &Netns, data: &Path) -> ClusterStatus {
    let started = Instant::now();
    loop {
        let out = forage_in(ns, data, &["cluster", "status", "--json"]);
        if out.status.success() {
            return serde_json::from_slice(&out.stdout).unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "forage cluster status: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(data.join("serve.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn names(s: &ClusterStatus) -> Vec<&str> {
    s.nodes.iter().map(|n| n.name()).collect()
}

/// Wait until `ok` holds of node `data`'s view; how long it took.
fn until(ns: &Netns, data: &Path, limit: Duration, what: &str, ok: impl Fn(&ClusterStatus) -> bool) -> Duration {
    let started = Instant::now();
    loop {
        let s = status(ns, data);
        if ok(&s) {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}; last view {s:#?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn nodes_in_namespaces_share_one_cluster_through_etcd() {
    if !root() {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    let lan = Lan::create(3).expect("namespaces");
    let t = tempfile::tempdir().unwrap();
    let (mut etcd, urls) = etcd_cluster(&lan, t.path());
    let data: Vec<_> = (0..3).map(|i| t.path().join(format!("node{i}"))).collect();
    let mut nodes: Vec<Kill> = (0..3).map(|i| node(&lan.hosts[i], &data[i], &format!("n{i}"), &urls)).collect();
    let (a, ns_a) = (&data[0], &lan.hosts[0]);

    // 1. Every node sees all three.
    let took = until(ns_a, a, Duration::from_secs(20), "three nodes", |s| s.quorum && s.nodes.len() == 3);
    eprintln!("node n0 saw 3 nodes {took:?} after its status first answered");
    let s = status(ns_a, a);
    assert_eq!(names(&s), ["n0", "n1", "n2"]);
    for (i, n) in s.nodes.iter().enumerate() {
        assert_eq!(n.api_version, "forage.dev/v1alpha1");
        assert_eq!(n.kind, "Node");
        assert_eq!(n.metadata.generation, 1);
        assert_eq!(n.spec.device_addr, format!("{}:7878", lan.hosts[i].addr).parse().unwrap());
        assert!(n.spec.cores >= 1 && n.spec.memory_mib > 0 && n.status.heartbeat_unix_ms > 0, "{n:?}");
    }
    until(&lan.hosts[2], &data[2], Duration::from_secs(10), "n2 sees three", |s| s.nodes.len() == 3);
    let text = forage_in(ns_a, a, &["cluster", "status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.starts_with("cluster forage (this node: n0), 3 nodes live, etcd quorum"), "{text}");
    let metrics =
        ns_a.run(|| ureq::get("http://127.0.0.1:7879/metrics").call().unwrap().into_string().unwrap()).unwrap();
    assert!(metrics.lines().any(|l| l == "forage_cluster_nodes 3"), "{metrics}");
    assert!(metrics.lines().any(|l| l == "forage_cluster_quorum 1"), "{metrics}");

    // 2. Placement from A.
    let place = |args: &[&str]| -> Output {
        let mut all = vec!["cluster", "place", "--json"];
        all.extend_from_slice(args);
        forage_in(ns_a, a, &all)
    };
    let out = place(&[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let p: forage_cluster::Placement = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((p.considered, p.able, p.utility.as_str()), (3, 3, "holds-then-least-loaded"));
    eprintln!("placed a request on {} in {:.1} ms", p.node, p.place_ms);
    let out = place(&["--base", &"e".repeat(64)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("409") && err.contains("none of the 3 live nodes can serve it (it needs base eeeeeeeeeeeeeeee)"),
        "{err}"
    );

    // 3. The leading etcd member killed: nothing changes (the request waits out the
    // election of a new leader).
    let leader = etcd_leader(&lan, &urls);
    etcd[leader].kill();
    let killed = Instant::now();
    let out = place(&[]);
    assert!(out.status.success(), "the leader of three down: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("placed a request {:?} after etcd's leader e{leader} was killed", killed.elapsed());
    std::thread::sleep(Duration::from_secs(LEASE_S));
    let s = status(ns_a, a);
    assert!(s.quorum && s.nodes.len() == 3, "one member of three down: {s:#?}");
    assert!(s.read_unix_ms > 0);
    eprintln!("etcd member e{leader} down for {:?}: 3 nodes, quorum", killed.elapsed());

    // 4. Node n1 killed: gone within its lease.
    nodes[1].kill();
    let killed = Instant::now();
    until(ns_a, a, Duration::from_secs(LEASE_S * 3), "n1 gone", |s| names(s) == ["n0", "n2"]);
    let gone = killed.elapsed();
    eprintln!("node n1 killed: seen gone after {gone:?} (lease {LEASE_S} s)");
    assert!(gone <= Duration::from_secs(LEASE_S + LEASE_S), "n1 seen gone after {gone:?}, lease {LEASE_S} s");

    // 5. A second member killed: no quorum, no placement; the nodes run on and say so.
    etcd[(leader + 1) % 3].kill();
    let out = place(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("503") && err.contains("no placement: etcd has no quorum (running instances keep running)"),
        "{err}"
    );
    until(ns_a, a, Duration::from_secs(20), "quorum lost", |s| !s.quorum && s.error.is_some());
    let text = forage_in(ns_a, a, &["cluster", "status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("NO etcd quorum: etcd unavailable"), "{text}");
    for (i, n) in nodes.iter_mut().enumerate().filter(|(i, _)| *i != 1) {
        assert!(n.0.try_wait().unwrap().is_none(), "node n{i} stopped without quorum");
    }
    drop(nodes);
    drop(etcd);
}

/// `forage` with `args` on the data folder `data`, which must succeed: its stdout.
fn forage_at(data: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(EXE).arg("--data-dir").arg(data).args(args).output().unwrap();
    assert!(out.status.success(), "forage {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_device_reaching_a_node_without_the_base_is_served_by_the_node_holding_it() {
    use forage_testkit::guest::*;
    if skip_vm_tests() || !root() {
        eprintln!("skipped: needs QEMU and root (network namespaces)");
        return;
    }
    // The base and the overlay, built in the test data folder (two boots of the tiny image).
    let data = data_dir();
    image();
    let builder = data.root().to_path_buf();
    let app_dir = forage_image::locate_guest_binary("apps/hashsearch").expect("make guest");
    let _ = forage_synth::BaseVm::remove(&data, "cltest");
    forage_at(&builder, &["base", "create", "cltest", "--image", "tiny", "--settle-s", "3"]);
    let work = data.root().join("cluster-test");
    let _reaper = Reaper::new(std::slice::from_ref(&work));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let ovl = work.join("cl.ovl");
    let app = app_dir.to_string_lossy();
    forage_at(&builder, &["overlay", "create", "--base", "cltest", "--app", &app, "-o", &ovl.to_string_lossy()]);
    let base_pkg = work.join("cltest.fbase");
    forage_at(&builder, &["base", "export", "cltest", &base_pkg.to_string_lossy()]);

    // Hosts 0..3: an etcd member and a node each; host 3: the device. Only n1 holds the base.
    let lan = Lan::create(4).expect("namespaces");
    let (etcd, urls) = etcd_cluster(&lan, &work);
    let dirs: Vec<_> = (0..3).map(|i| work.join(format!("n{i}"))).collect();
    let device = work.join("device");
    for d in dirs.iter().chain([&device]) {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::create_dir_all(dirs[1].join("images")).unwrap();
    let copied = std::process::Command::new("cp")
        .arg("-r")
        .arg(data.images().join("tiny"))
        .arg(dirs[1].join("images"))
        .status()
        .unwrap();
    assert!(copied.success());
    forage_at(&dirs[1], &["base", "import", &base_pkg.to_string_lossy()]);
    let mut nodes: Vec<Kill> = (0..3).map(|i| node(&lan.hosts[i], &dirs[i], &format!("n{i}"), &urls)).collect();
    let (a, ns_a) = (&dirs[0], &lan.hosts[0]);
    until(ns_a, a, Duration::from_secs(20), "three nodes", |s| s.nodes.len() == 3 && s.announcer.is_some());

    // The device browsing the LAN (mDNS) sees one cloudlet: the cluster, at the address
    // of the node that holds the announcement, with the base that only n1 holds.
    let announcer = status(ns_a, a).announcer.expect("an announcer");
    let at = (0..3).find(|&i| format!("n{i}") == announcer).expect("a node");
    let started = Instant::now();
    let found = loop {
        let out = forage_in(&lan.hosts[3], &device, &["discover", "--json", "--timeout", "3"]);
        assert!(out.status.success(), "forage discover: {}", String::from_utf8_lossy(&out.stderr));
        let found: Vec<forage_discovery::Found> = serde_json::from_slice(&out.stdout).unwrap();
        if !found.is_empty() || started.elapsed() > Duration::from_secs(20) {
            break found;
        }
    };
    let seen: Vec<(String, String)> = found.iter().map(|f| (f.ad.name.clone(), f.ad.addr.to_string())).collect();
    assert_eq!(seen, [("forage".to_string(), format!("{}:7878", lan.hosts[at].addr))], "one announcement");
    let short = forage_synth::package::short(forage_synth::BaseVm::open(&data, "cltest").unwrap().digest()).to_string();
    assert!(found[0].ad.bases.contains(&short), "the cluster's bases: {:?}", found[0].ad.bases);
    eprintln!("the device found one cloudlet over mDNS: the cluster, announced by {announcer}");
    // The device is paired with every node (once they run: each node's credentials name
    // it): it reaches n0, is served by n1, asks after its instance wherever it goes.
    for (i, dir) in dirs.iter().enumerate() {
        let bundle = work.join(format!("device-n{i}.json"));
        let addr = format!("{}:7878", lan.hosts[i].addr);
        forage_at(dir, &["pair", "--bundle", &bundle.to_string_lossy(), "--name", "phone", "--addr", &addr]);
        forage_at(&device, &["pair", "import", &bundle.to_string_lossy()]);
    }
    // n1 is paired as a cloudlet with n0 and n2 (each issues n1 a credential for its
    // address): the handoffs of a drain of n1 use them.
    for i in [0, 2] {
        let bundle = work.join(format!("n1-for-n{i}.json"));
        let addr = format!("{}:7878", lan.hosts[i].addr);
        forage_at(
            &dirs[i],
            &["pair", "--bundle", &bundle.to_string_lossy(), "--name", "n1", "--as-cloudlet", "--addr", &addr],
        );
        forage_at(&dirs[1], &["pair", "import", &bundle.to_string_lossy()]);
    }
    // n0 is paired as a cloudlet with n1: redirecting a device there, it fetches the base.
    let addr_n1 = format!("{}:7878", lan.hosts[1].addr);
    let bundle = work.join("n0-for-n1.json");
    forage_at(
        &dirs[1],
        &["pair", "--bundle", &bundle.to_string_lossy(), "--name", "n0", "--as-cloudlet", "--addr", &addr_n1],
    );
    forage_at(&dirs[0], &["pair", "import", &bundle.to_string_lossy()]);

    // 6. The device reaches n0; n1 serves it; n0 fetches the base from n1 meanwhile.
    let addr_a = format!("{}:7878", lan.hosts[0].addr);
    let dev_ns = &lan.hosts[3];
    let started = Instant::now();
    let mut child = dev_ns
        .command(EXE)
        .arg("--data-dir")
        .arg(&device)
        .arg("synthesize")
        .arg(&ovl)
        .args(["--cloudlet", &addr_a, "--hold", "--json"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(work.join("device.log")).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut device_out = std::io::BufReader::new(child.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut device_out, &mut line).unwrap();
    let mut device_process = Kill(child);
    let report: forage_client::SynthesisReport = serde_json::from_str(&line).unwrap_or_else(|e| {
        let log = std::fs::read_to_string(work.join("device.log")).unwrap_or_default();
        panic!("synthesize printed {line:?}: {e}; {log}")
    });
    eprintln!("synthesis through n0 served by {} in {:?} ({})", report.cloudlet, started.elapsed(), report.mode);
    assert_eq!(report.cloudlet, "n1", "{report:?}");
    assert!(report.service.addr.starts_with(&format!("{}:", lan.hosts[1].addr)), "{:?}", report.service);
    let ep = report.service.clone();
    let answer = dev_ns
        .run(move || forage_client::service::request_line(&ep, "search cluster 8", Duration::from_secs(60)))
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("ok "), "{answer}");
    let log = std::fs::read_to_string(a.join("serve.log")).unwrap();
    assert!(log.contains("redirected"), "n0 says it redirected the device: {log}");
    until(ns_a, a, Duration::from_secs(10), "n1's instance listed", |s| {
        s.instances.iter().any(|i| i.spec.node == "n1" && i.status.phase == forage_cluster::InstancePhase::Running)
    });
    let digest = forage_synth::BaseVm::open(&data, "cltest").unwrap().digest().to_string();
    let took = until(ns_a, a, Duration::from_secs(240), "n0 holds the base it fetched", |s| {
        s.nodes.iter().any(|n| n.metadata.name == "n0" && n.holds_base(&digest))
    });
    let log = std::fs::read_to_string(a.join("serve.log")).unwrap();
    assert!(log.contains("fetched the base this node lacked"), "n0 says it fetched the base: {log}");
    eprintln!("n0 fetched base cltest from n1 after the redirect, published {took:?} after the instance");
    // n2, which lacks it too, fetches it by hand (`forage base fetch`, paired with n1 as a
    // cloudlet); the cluster sees it hold the base.
    let bundle = work.join("n2-for-n1.json");
    forage_at(
        &dirs[1],
        &["pair", "--bundle", &bundle.to_string_lossy(), "--name", "n2", "--as-cloudlet", "--addr", &addr_n1],
    );
    forage_at(&dirs[2], &["pair", "import", &bundle.to_string_lossy()]);
    let out = forage_in(&lan.hosts[2], &dirs[2], &["base", "fetch", "cltest", "--from", &addr_n1, "--json"]);
    assert!(out.status.success(), "forage base fetch: {}", String::from_utf8_lossy(&out.stderr));
    let fetched: forage_cloudlet::package_transfer::PackageFetchReport = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(fetched.base_digest.as_deref(), Some(digest.as_str()));
    until(ns_a, a, Duration::from_secs(LEASE_S * 2), "n2's fetched base published", |s| {
        s.nodes.iter().any(|n| n.metadata.name == "n2" && n.holds_base(&digest))
    });
    eprintln!(
        "n2 fetched base cltest from n1 by hand: {} KiB in {:.1} s",
        fetched.package_bytes >> 10,
        fetched.seconds
    );

    // 7. n1 drained: the instance moves to another node with its state; the device is told.
    let ep = report.service.clone();
    let before = dev_ns
        .run(move || forage_client::service::request_line(&ep, "count", Duration::from_secs(60)))
        .unwrap()
        .unwrap();
    let served = field(&before, "served");
    let started = Instant::now();
    let out = forage_in(ns_a, a, &["node", "drain", "n1", "--wait-s", "300"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.starts_with("node n1 drained in "),
        "forage node drain n1: {said}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(dirs[1].join("serve.log")).unwrap_or_default()
    );
    let drained = started.elapsed();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut device_out, &mut line).unwrap();
    let moved: forage_client::MovedNotice =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("the device printed {line:?}: {e}"));
    let to = (0..3).find(|&i| moved.moved_to == format!("{}:7878", lan.hosts[i].addr));
    let to = to.unwrap_or_else(|| panic!("moved to {moved:?}, not a node"));
    assert_ne!(to, 1, "{moved:?}");
    let holder = format!("n{to}");
    until(ns_a, a, Duration::from_secs(10), "the instance listed on its new node only", |s| {
        let held: Vec<_> = s.instances.iter().map(|i| (i.spec.node.as_str(), i.status.phase)).collect();
        held == [(holder.as_str(), forage_cluster::InstancePhase::Running)] && !s.draining.iter().any(|n| n == "n1")
    });
    let ep = moved.service.clone();
    let after = dev_ns
        .run(move || forage_client::service::request_line(&ep, "count", Duration::from_secs(60)))
        .unwrap()
        .unwrap();
    assert_eq!(field(&after, "served"), served, "the counter moved: {before} -> {after}");
    let where_at = |i: usize| {
        let node = format!("{}:7878", lan.hosts[i].addr);
        let out = forage_in(dev_ns, &device, &["cluster", "where", &moved.service.addr, "--cloudlet", &node]);
        assert!(out.status.success(), "forage cluster where: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(where_at(0), format!("instance at {} runs on node {holder}", moved.service.addr));
    let ep = moved.service.clone();
    let again = dev_ns
        .run(move || forage_client::service::request_line(&ep, "search drained 8", Duration::from_secs(60)))
        .unwrap()
        .unwrap();
    assert!(again.contains(&format!("served={}", served + 1)), "{again}");
    eprintln!("node n1 drained in {drained:?}: its instance runs on {holder}, counter {served} kept");

    // 8. The node holding it killed: its instance is reported lost within its lease, seen
    //    from a node that stays.
    let (watch, ns_watch) = match to {
        0 => (&dirs[2], &lan.hosts[2]),
        _ => (&dirs[0], &lan.hosts[0]),
    };
    nodes[to].kill();
    let killed = Instant::now();
    let reason = format!("node {holder}'s lease expired");
    // The device, its instance gone quiet, asks the cloudlets it is paired with until one
    // says the instance is lost (what `--hold` does when its session breaks).
    let (pairings, endpoint) = (forage_datadir::DataDir::at(device.clone()).trust_peers(), moved.service.addr.clone());
    let asking = std::thread::spawn({
        let ns = lan.hosts[3].clone();
        move || {
            ns.run(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                let every = Duration::from_millis(500);
                rt.block_on(forage_client::ask_after(&pairings, &endpoint, every, Duration::from_secs(60)))
            })
            .unwrap()
        }
    });
    until(ns_watch, watch, Duration::from_secs(LEASE_S * 3), "the instance lost", |s| {
        s.instances.iter().any(|i| {
            i.spec.node == holder
                && i.status.phase == forage_cluster::InstancePhase::Lost
                && i.status.reason.as_deref() == Some(reason.as_str())
        })
    });
    let lost = killed.elapsed();
    eprintln!("node {holder} killed: its instance reported lost after {lost:?} (lease {LEASE_S} s)");
    assert!(lost <= Duration::from_secs(2 * LEASE_S), "lost after {lost:?}");
    // The device asking after it (WhereIs, device protocol) hears that it is lost.
    let (_, answer) = asking.join().unwrap().unwrap_or_else(|| {
        let logs: Vec<String> = (0..3)
            .filter(|&i| i != to)
            .map(|i| std::fs::read_to_string(dirs[i].join("serve.log")).unwrap_or_default())
            .map(|log| log.lines().rev().take(30).collect::<Vec<_>>().join("\n"))
            .collect();
        panic!("no paired node answered where the instance is; the live nodes' logs (last lines first):\n{logs:#?}")
    });
    let asked = killed.elapsed();
    assert_eq!(answer.lost.as_deref(), Some(reason.as_str()), "{answer:?}");
    eprintln!("the device asking by itself heard {answer} after {asked:?}");
    let told = where_at(if to == 0 { 2 } else { 0 });
    assert_eq!(told, format!("instance lost: node {holder} gone ({reason})"));
    eprintln!("the device asking after its instance was told: {told}");

    device_process.kill();
    drop(nodes);
    drop(etcd);
}
