//! `forage-bench cluster --base NAME --overlay FILE`: real requests over the three nodes.
//! Each request is what a device does in a cloudlet of many hosts: it asks the node it
//! reached where to go (`POST /v1/cluster/placements` with `reserve`, round-robin over
//! the nodes' APIs: any node places), then synthesizes the overlay on the chosen node
//! (the device protocol, paired with every node), sends its service one request line and
//! holds the instance. All requests start together; once every one has answered (or
//! failed) every session is closed, and the bench waits until no node lists a running
//! instance: the VMs are gone before the nodes stop.
//!
//! Measured per request: the time to place (device side: HTTP and the node's etcd
//! transaction; node side: what the placement says) and the time to first response
//! (from the request's start, placement included, to the service's first answer).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use forage_api::client::ApiClient;
use forage_cluster::{Placement, PlacementRequest};
use forage_datadir::DataDir;

/// One real request's outcome.
pub struct Served {
    pub placement: Placement,
    /// Device side: HTTP, the node's etcd reads and reservation.
    pub place_ms: f64,
    /// From the start (placement included) to the service's first answer.
    pub first_response_ms: f64,
    /// Where the instance ran, by the synthesis report (the node's name).
    pub served_by: String,
    session: forage_client::Session,
}

/// Pair a device (data folder `device`) with each node (`dirs[i]`, devices connect at
/// `addrs[i]`), as over USB: a bundle written by the node and imported by the device.
pub fn pair_device(exe: &Path, dirs: &[PathBuf], addrs: &[SocketAddr], device: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(device)?;
    for (i, (dir, addr)) in dirs.iter().zip(addrs).enumerate() {
        let bundle = device.join(format!("n{i}.fpair"));
        let run = |data: &Path, args: &[&str]| -> anyhow::Result<()> {
            let out = Command::new(exe).arg("--data-dir").arg(data).args(args).output()?;
            anyhow::ensure!(
                out.status.success(),
                "forage {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            Ok(())
        };
        let b = bundle.to_string_lossy();
        run(
            dir,
            &["pair", "--bundle", &b, "--name", "bench-device", "--addr", &addr.to_string(), "--valid-days", "1"],
        )?;
        run(device, &["pair", "import", &b])?;
    }
    Ok(())
}

/// The tiny image's files and base `pkg` imported into node folder `dir`.
pub fn install_base(exe: &Path, data: &DataDir, image: &str, pkg: &Path, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("images"))?;
    // Hard links: the same file system, no copy of the kernel and initramfs.
    let copied = Command::new("cp").arg("-al").arg(data.images().join(image)).arg(dir.join("images")).status()?;
    anyhow::ensure!(copied.success(), "cp -al {}", data.images().join(image).display());
    let out = Command::new(exe).arg("--data-dir").arg(dir).args(["base", "import"]).arg(pkg).output()?;
    anyhow::ensure!(out.status.success(), "forage base import: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

/// `requests` real requests at once; request `k` reaches node `k % nodes` first.
pub async fn send(
    clients: &[Arc<ApiClient>],
    device: &Path,
    overlay: &Path,
    base_digest: &str,
    request_line: &str,
    requests: usize,
) -> anyhow::Result<Vec<anyhow::Result<Served>>> {
    let overlay_digest = forage_client::OverlayFile::open(overlay).await.context("the overlay (--overlay)")?.digest;
    let pairings = DataDir::at(device).trust_peers();
    let barrier = Arc::new(tokio::sync::Barrier::new(requests));
    let tasks: Vec<_> = (0..requests)
        .map(|k| {
            let api = clients[k % clients.len()].clone();
            let request = PlacementRequest {
                base_digest: Some(base_digest.to_string()),
                overlay_digest: Some(overlay_digest.clone()),
                service: None,
                reserve: true,
            };
            let (barrier, pairings, overlay) = (barrier.clone(), pairings.clone(), overlay.to_path_buf());
            let line = request_line.to_string();
            tokio::spawn(async move {
                barrier.wait().await;
                let started = Instant::now();
                let placement = tokio::task::spawn_blocking(move || api.place(&request)).await??;
                let place_ms = started.elapsed().as_secs_f64() * 1000.0;
                let credentials = forage_trust::DeviceTrust::new(&pairings).credentials(placement.device_addr, None)?;
                let opts = forage_client::SynthesisOptions {
                    device: format!("bench-{k}"),
                    early_start: true,
                    request: Some(line),
                    credentials: Some(credentials),
                    pairings: Some(pairings),
                    ..Default::default()
                };
                let (report, session) = forage_client::synthesize(&overlay, placement.device_addr, &opts)
                    .await
                    .with_context(|| format!("synthesis on {}", placement.node))?;
                anyhow::ensure!(!report.answer.is_empty(), "{}: the service did not answer", placement.node);
                let first_response_ms = started.elapsed().as_secs_f64() * 1000.0;
                Ok(Served { placement, place_ms, first_response_ms, served_by: report.cloudlet, session })
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.map_err(|e| anyhow::anyhow!("a request task failed: {e}")).and_then(|r| r));
    }
    Ok(out)
}

/// Close every held session, then wait until no node lists a running instance (at most
/// `wait`): how many are left running.
pub async fn stop_all(served: &mut [anyhow::Result<Served>], clients: &[Arc<ApiClient>], wait: Duration) -> usize {
    for s in served.iter_mut() {
        if let Ok(s) = std::mem::replace(s, Err(anyhow::anyhow!("closed"))) {
            s.session.close().await;
        }
    }
    let clients = clients.to_vec();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        loop {
            let left: usize = clients.iter().map(|c| c.instances(false).map(|l| l.instances.len()).unwrap_or(0)).sum();
            if left == 0 || started.elapsed() > wait {
                return left;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    })
    .await
    .unwrap_or(usize::MAX)
}
