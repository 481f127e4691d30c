//! `forage-bench cluster`: placement in a cloudlet of many hosts (`docs/cluster.md`).
//! Three etcd members (Debian's etcd-server) and three `forage serve --cluster` nodes run
//! as real processes on loopback (distinct ports, a fresh data folder each); then
//! `--requests` placement requests (`POST /v1/cluster/placements`, the shapes of
//! `forage_cluster`) go out at once, spread round-robin over the three nodes' APIs (any
//! node accepts a request and places it). Reported: where they were placed (the spread
//! per node), the time to place each as the client saw it (HTTP included) and as the
//! node measured it (its linearizable etcd read and the ranking), median and p95.
//!
//! Each placement reserves room on the node it chose (an etcd transaction,
//! `forage_cluster::reservation`), so requests that arrive together spread over equal
//! nodes; here nothing starts, so the reservations are released only when they expire.
//! With `--base NAME` half of the requests ask for that base VM, which only nodes n1 and
//! n2 hold (its package imported there), and placement must send them there.
//!
//! With `--base NAME --overlay FILE` the requests are real: the base is imported into
//! all three nodes and each request synthesizes the overlay on the node it was placed on
//! ([`crate::cluster_requests`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::Context;
use forage_api::client::ApiClient;
use forage_cluster::{Placement, PlacementRequest};
use forage_datadir::DataDir;
use serde::{Deserialize, Serialize};

use crate::cli::BenchClusterArgs;

/// Ports below the ephemeral range, distinct from the tests' (7878/7879, 2379/2380).
const ETCD_PORT: u16 = 23379;
const NODE_PORT: u16 = 23878;
const NODES: usize = 3;

/// What `forage-bench cluster --json` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterBench {
    pub etcd_members: usize,
    pub nodes: usize,
    pub requests: usize,
    /// Requests that asked for the base VM only n1 and n2 hold.
    pub base_requests: usize,
    /// How many requests each node was chosen for, by node name.
    pub spread: Vec<NodeShare>,
    /// Client side: from sending the request to the answer (HTTP, etcd read, ranking).
    pub place_ms: Quantiles,
    /// Node side: the `place_ms` each answer carries (etcd read and ranking).
    pub node_place_ms: Quantiles,
    /// Reservations lost to concurrent placements, in all (each: read again, chose again).
    pub conflicts: u32,
    /// Real requests (`--overlay`): from the start, placement included, to the service's
    /// first answer; and VMs still listed once every session was closed (30 s allowed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_response_ms: Option<Quantiles>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub left_running: Option<usize>,
    /// Requests refused (with the first refusal's words).
    pub failed: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// Which build ran (`debug` or `release`).
    pub build: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeShare {
    pub node: String,
    pub placed: usize,
    /// Of which requests for the base VM.
    pub base_placed: usize,
    /// Real requests: how many the node answered (its synthesis report names it).
    pub served: usize,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Quantiles {
    pub median: f64,
    pub p95: f64,
    pub max: f64,
}

impl Quantiles {
    fn of(mut v: Vec<f64>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Quantiles { median: at(0.5), p95: at(0.95), max: v[v.len() - 1] }
    }
}

/// A child process killed (and reaped) when dropped.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn etcd_members(dir: &Path) -> anyhow::Result<(Vec<Kill>, String)> {
    let peer = |i: usize| format!("http://127.0.0.1:{}", ETCD_PORT + 1 + 10 * i as u16);
    let client = |i: usize| format!("http://127.0.0.1:{}", ETCD_PORT + 10 * i as u16);
    let initial: Vec<String> = (0..NODES).map(|i| format!("e{i}={}", peer(i))).collect();
    let mut members = Vec::new();
    for i in 0..NODES {
        let log = std::fs::File::create(dir.join(format!("etcd{i}.log")))?;
        let child = Command::new("etcd")
            .args(["--name", &format!("e{i}"), "--data-dir"])
            .arg(dir.join(format!("etcd{i}")))
            .args(["--listen-client-urls", &client(i), "--advertise-client-urls", &client(i)])
            .args(["--listen-peer-urls", &peer(i), "--initial-advertise-peer-urls", &peer(i)])
            .args(["--initial-cluster", &initial.join(","), "--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "forage-bench"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting etcd (scripts/deps.sh installs etcd-server)")?;
        members.push(Kill(child));
    }
    let urls: Vec<String> = (0..NODES).map(client).collect();
    let urls = urls.join(",");
    let started = Instant::now();
    loop {
        let health = Command::new("etcdctl").args(["--endpoints", &urls, "endpoint", "health"]).output()?;
        if health.status.success() {
            return Ok((members, urls));
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "etcd did not become healthy in 30 s (logs in {})",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn api_addr(i: usize) -> std::net::SocketAddr {
    ([127, 0, 0, 1], NODE_PORT + 1 + 10 * i as u16).into()
}

fn device_addr(i: usize) -> std::net::SocketAddr {
    ([127, 0, 0, 1], NODE_PORT + 10 * i as u16).into()
}

fn start_node(exe: &Path, data: &Path, i: usize, urls: &str) -> anyhow::Result<Kill> {
    let log = std::fs::File::create(data.join("serve.log"))?;
    let child = Command::new(exe)
        .arg("--data-dir")
        .arg(data)
        .args(["serve", "--listen", &device_addr(i).to_string()])
        .args(["--api", &api_addr(i).to_string(), "--name", &format!("n{i}"), "--no-advertise"])
        // One device sends every request: all of them may land on one node.
        .args(["--max-sessions-per-peer", "64"])
        .args(["--cluster", urls, "--cluster-lease-s", "6"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting forage serve")?;
    Ok(Kill(child))
}

/// The node's API client, once its token is written and it sees all three nodes.
fn ready_client(data: &Path, i: usize, want_bases: usize) -> anyhow::Result<ApiClient> {
    let started = Instant::now();
    let token_path = data.join("trust").join("api-token");
    loop {
        if let Ok(token) = forage_api::token::read(&token_path) {
            let api = ApiClient::new(api_addr(i), &token);
            if let Ok(s) = api.cluster() {
                let bases = s.nodes.iter().filter(|n| !n.status.bases.is_empty()).count();
                if s.quorum && s.nodes.len() == NODES && bases >= want_bases {
                    return Ok(api);
                }
            }
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "node n{i} did not see the {NODES} nodes in 60 s (log: {})",
            data.join("serve.log").display()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Export base `name` of the bench's data folder into `work`, for the nodes to import:
/// the package, the base's digest and its guest image's name.
fn base_package(exe: &Path, data: &DataDir, name: &str, work: &Path) -> anyhow::Result<(PathBuf, String, String)> {
    let base = forage_synth::BaseVm::open(data, name).with_context(|| format!("base {name} (--base)"))?;
    let digest = base.manifest().digest.clone();
    let image = base.manifest().image.clone();
    let pkg = work.join("base.fbase");
    let out = Command::new(exe).arg("--data-dir").arg(data.root()).args(["base", "export", name]).arg(&pkg).output()?;
    anyhow::ensure!(out.status.success(), "forage base export {name}: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok((pkg, digest, image))
}

pub async fn run(data: &DataDir, a: BenchClusterArgs) -> anyhow::Result<()> {
    let json = a.json;
    let report = measure(data, &a).await?;
    if json {
        crate::common::print_json(&report);
    } else {
        print_table(&report);
    }
    Ok(())
}

async fn measure(data: &DataDir, a: &BenchClusterArgs) -> anyhow::Result<ClusterBench> {
    let exe = crate::common::forage_exe()?;
    let work = tempfile_dir(data)?;
    let (etcd, urls) = etcd_members(&work)?;
    let dirs: Vec<PathBuf> = (0..NODES).map(|i| work.join(format!("n{i}"))).collect();
    let mut digest = None;
    for d in &dirs {
        std::fs::create_dir_all(d)?;
    }
    let real = a.overlay.is_some();
    if let Some(name) = &a.base {
        let (pkg, d, image) = base_package(&exe, data, name, &work)?;
        // Placement only: n1 and n2 hold the base; real requests: all three.
        for dir in &dirs[if real { 0 } else { 1 }..] {
            crate::cluster_requests::install_base(&exe, data, &image, &pkg, dir)?;
        }
        digest = Some(d);
    }
    let nodes: Vec<Kill> = (0..NODES).map(|i| start_node(&exe, &dirs[i], i, &urls)).collect::<Result<_, _>>()?;
    let want_bases = match (&digest, real) {
        (None, _) => 0,
        (Some(_), false) => NODES - 1,
        (Some(_), true) => NODES,
    };
    let clients: Vec<Arc<ApiClient>> = {
        let dirs = dirs.clone();
        tokio::task::spawn_blocking(move || {
            (0..NODES).map(|i| ready_client(&dirs[i], i, want_bases).map(Arc::new)).collect::<Result<Vec<_>, _>>()
        })
        .await??
    };
    if let (Some(overlay), Some(digest)) = (&a.overlay, &digest) {
        let device = work.join("device");
        let addrs: Vec<_> = (0..NODES).map(device_addr).collect();
        crate::cluster_requests::pair_device(&exe, &dirs, &addrs, &device)?;
        let mut served =
            crate::cluster_requests::send(&clients, &device, overlay, digest, &a.request_line, a.requests).await?;
        let report = real_report(a, &served);
        let left = crate::cluster_requests::stop_all(&mut served, &clients, Duration::from_secs(30)).await;
        stop_nodes(nodes);
        drop(etcd);
        let _ = std::fs::remove_dir_all(&work);
        return Ok(ClusterBench { left_running: Some(left), ..report });
    }

    let barrier = Arc::new(Barrier::new(a.requests));
    let threads: Vec<_> = (0..a.requests)
        .map(|k| {
            let (api, barrier) = (clients[k % NODES].clone(), barrier.clone());
            let for_base = digest.is_some() && k % 2 == 1;
            let request = PlacementRequest { base_digest: digest.clone().filter(|_| for_base), ..Default::default() };
            let request = PlacementRequest { reserve: true, ..request };
            std::thread::spawn(move || {
                barrier.wait();
                let started = Instant::now();
                let placed = api.place(&request);
                (for_base, placed.map(|p| (p, started.elapsed().as_secs_f64() * 1000.0)))
            })
        })
        .collect();
    let mut answers: Vec<(bool, Placement, f64)> = Vec::new();
    let (mut failed, mut first_error) = (0, None);
    for t in threads {
        match t.join().map_err(|_| anyhow::anyhow!("a request thread panicked"))? {
            (for_base, Ok((p, ms))) => answers.push((for_base, p, ms)),
            (_, Err(e)) => {
                failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    let spread = (0..NODES)
        .map(|i| {
            let node = format!("n{i}");
            let mine = answers.iter().filter(|(_, p, _)| p.node == node);
            NodeShare {
                placed: mine.clone().count(),
                base_placed: mine.filter(|(b, _, _)| *b).count(),
                served: 0,
                node,
            }
        })
        .collect();
    drop(nodes);
    drop(etcd);
    let _ = std::fs::remove_dir_all(&work);
    Ok(ClusterBench {
        etcd_members: NODES,
        nodes: NODES,
        requests: a.requests,
        base_requests: answers.iter().filter(|(b, _, _)| *b).count(),
        spread,
        place_ms: Quantiles::of(answers.iter().map(|(_, _, ms)| *ms).collect()),
        node_place_ms: Quantiles::of(answers.iter().map(|(_, p, _)| p.place_ms).collect()),
        conflicts: answers.iter().map(|(_, p, _)| p.conflicts).sum(),
        first_response_ms: None,
        left_running: None,
        failed,
        first_error,
        build: if cfg!(debug_assertions) { "debug" } else { "release" }.into(),
    })
}

/// A fresh folder for this run under DATA/bench/cluster.
fn tempfile_dir(data: &DataDir) -> anyhow::Result<PathBuf> {
    let dir = data.root().join("bench").join("cluster");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn print_table(r: &ClusterBench) {
    let what = match r.first_response_ms {
        Some(_) => "real requests (placement with a reservation, then synthesis on the node chosen)",
        None => "placement requests (each with a reservation)",
    };
    println!(
        "cluster: {} etcd members, {} nodes on loopback, {} concurrent {what} ({} for the base), {} build",
        r.etcd_members, r.nodes, r.requests, r.base_requests, r.build
    );
    match r.first_response_ms {
        Some(_) => {
            println!("| node | placed | served |");
            println!("|---|---:|---:|");
            for s in &r.spread {
                println!("| {} | {} | {} |", s.node, s.placed, s.served);
            }
        }
        None => {
            println!("| node | placed | of which base requests |");
            println!("|---|---:|---:|");
            for s in &r.spread {
                println!("| {} | {} | {} |", s.node, s.placed, s.base_placed);
            }
        }
    }
    println!();
    println!("| time (ms) | median | p95 | max |");
    println!("|---|---:|---:|---:|");
    let (c, n) = (r.place_ms, r.node_place_ms);
    println!("| to place, device side (HTTP + node) | {:.1} | {:.1} | {:.1} |", c.median, c.p95, c.max);
    println!("| to place, node side (etcd reads + reservation) | {:.1} | {:.1} | {:.1} |", n.median, n.p95, n.max);
    if let Some(f) = r.first_response_ms {
        println!("| to first response (placement included) | {:.1} | {:.1} | {:.1} |", f.median, f.p95, f.max);
    }
    println!();
    println!("reservations lost to concurrent placements (read again, chose again): {}", r.conflicts);
    if let Some(left) = r.left_running {
        println!("instances still running once every session was closed: {left}");
    }
    if r.failed > 0 {
        println!("{} request(s) failed: {}", r.failed, r.first_error.as_deref().unwrap_or(""));
    }
}

/// The report of real requests (`--overlay`), before the VMs are stopped.
fn real_report(a: &BenchClusterArgs, served: &[anyhow::Result<crate::cluster_requests::Served>]) -> ClusterBench {
    let ok: Vec<_> = served.iter().filter_map(|s| s.as_ref().ok()).collect();
    let spread = (0..NODES)
        .map(|i| {
            let node = format!("n{i}");
            let placed = ok.iter().filter(|s| s.placement.node == node).count();
            let served = ok.iter().filter(|s| s.served_by == node).count();
            NodeShare { placed, base_placed: placed, served, node }
        })
        .collect();
    let first_error = served.iter().find_map(|s| s.as_ref().err()).map(|e| format!("{e:#}"));
    ClusterBench {
        etcd_members: NODES,
        nodes: NODES,
        requests: a.requests,
        base_requests: a.requests,
        spread,
        place_ms: Quantiles::of(ok.iter().map(|s| s.place_ms).collect()),
        node_place_ms: Quantiles::of(ok.iter().map(|s| s.placement.place_ms).collect()),
        conflicts: ok.iter().map(|s| s.placement.conflicts).sum(),
        first_response_ms: Some(Quantiles::of(ok.iter().map(|s| s.first_response_ms).collect())),
        left_running: None,
        failed: served.len() - ok.len(),
        first_error,
        build: if cfg!(debug_assertions) { "debug" } else { "release" }.into(),
    }
}

/// SIGTERM each node (it stops what it runs), SIGKILL after 20 s.
fn stop_nodes(nodes: Vec<Kill>) {
    for n in &nodes {
        // SAFETY: kill(2) on a child process this bench started and has not reaped.
        unsafe { libc::kill(n.0.id() as libc::pid_t, libc::SIGTERM) };
    }
    let started = Instant::now();
    for mut n in nodes {
        while started.elapsed() < Duration::from_secs(20) && matches!(n.0.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(100));
        }
        drop(n);
    }
}
