//! The QEMU baselines of `forage bench handoff`: QEMU's own live migration of a forage
//! instance over the bench's link, to a QEMU started with `-incoming` in the
//! destination's namespace.
//!
//! - Disk already there: the destination QEMU gets a copy of the instance's base disk
//!   (the bench app writes nothing to disk), so only RAM and devices move.
//! - Copy storage (libvirt's `virsh migrate --live --copy-storage-all`): the destination
//!   gets an empty disk of the same size and serves it over NBD (`nbd-server-start`,
//!   `block-export-add`); the source adds it (`blockdev-add` driver nbd) and mirrors its
//!   disk into it (`blockdev-mirror sync=full`); once the job is ready (the copy caught
//!   up, writes are mirrored), the RAM migrates; when QEMU completes, `block-job-cancel`
//!   ends the mirror with the target in sync (a ready mirror cancelled completes without
//!   pivoting), the NBD server stops, the destination runs. The NBD node on the source
//!   has `detect-zeroes`: forage's copy-on-write view of the disk reports no holes, so
//!   without it the mirror sends every zero of the virtual disk as data (the Debian
//!   guest's 4 GiB disk holds 0.35 GB), where libvirt's mirror of a sparse image skips
//!   the holes; with it, a zero range crosses the link as one NBD write-zeroes request.
//!
//! Both streams cross the link through relays in the destination's namespace (QEMU
//! listens on unix sockets), which count the bytes they carry in both directions.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use forage_datadir::DataDir;
use forage_testkit::wan::Netns;
use forage_vm::qmp::Qmp;
use serde::Deserialize;
use serde_json::json as j;

use crate::cli::BenchHandoffArgs;
use crate::handoff_workload::{Run, Workload, SERVICE};

/// Where QEMU's live migration enters the destination namespace, and its NBD server.
const MIGRATION_PORT: u16 = 7900;
const NBD_PORT: u16 = 7901;
/// The NBD export and the node the source adds for it.
const EXPORT: &str = "disk0";
const MIRROR_TARGET: &str = "bench-mirror-target";
const MIRROR_JOB: &str = "bench-copy-storage";

/// What QEMU's `query-migrate` says of a completed migration (the fields the bench uses).
#[derive(Debug, Deserialize)]
struct MigrationInfo {
    status: String,
    #[serde(default)]
    downtime: Option<u64>,
    #[serde(default)]
    ram: Option<MigrationRam>,
    #[serde(rename = "error-desc", default)]
    error_desc: Option<String>,
}

#[derive(Debug, Deserialize)]
struct MigrationRam {
    #[serde(rename = "dirty-sync-count")]
    dirty_sync_count: u64,
}

/// One entry of `query-block-jobs` (the fields the bench uses).
#[derive(Debug, Deserialize)]
struct BlockJob {
    device: String,
    ready: bool,
    offset: u64,
    len: u64,
}

/// Start the destination QEMU (the service VM's hardware, fresh RAM, the base disk or an
/// empty one), relay the link's ports to it, migrate the source over them, run the
/// destination and check the service's working set.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn qemu_migrate(
    dst: &Path,
    run: &Path,
    ctl: &Path,
    accel: forage_vm::Accel,
    ns_b: &Netns,
    args: &BenchHandoffArgs,
    copy_storage: bool,
    workload: &Workload,
) -> anyhow::Result<Run> {
    let svc = forage_service::Repository::new(&DataDir::at(dst.to_path_buf())).open(SERVICE)?;
    let snap = svc.snapshot()?;
    let port = svc.manifest().port.context("the bench service has a port")?;
    let forwards = forage_image::loopback_forwards([port])?;
    let qmp_path = DataDir::at(dst.to_path_buf()).runtime_dir()?.join("bench-qemu-live.qmp");
    let mut spec = snap.relocated_spec(run, &qmp_path, Some(forwards.clone()));
    std::fs::File::create(&spec.memory_file)?.set_len(snap.manifest().memory.size)?;
    let base_disk = &snap.disk_paths()[0];
    if copy_storage {
        std::fs::File::create(&spec.disks[0].path)?.set_len(std::fs::metadata(base_disk)?.len())?;
    } else {
        forage_vm::sparse::copy_sparse(base_disk, &spec.disks[0].path)?;
    }
    spec.control_socket = None;
    let sock = run.join("incoming.sock");
    let vm = forage_vm::Vm::incoming(spec, accel, &run.join("qemu.log"), &format!("unix:{}", sock.display())).await?;
    let carried = Arc::new(AtomicU64::new(0));
    let migration_addr = SocketAddr::from((ns_b.addr, MIGRATION_PORT));
    relay(ns_b, migration_addr, &sock, carried.clone())?;
    let src = Qmp::connect(ctl, Duration::from_secs(10)).await?;
    let t0 = Instant::now();
    if copy_storage {
        let nbd_sock = run.join("nbd.sock");
        vm.qmp()
            .execute(
                "nbd-server-start",
                Some(j!({ "addr": { "type": "unix", "data": { "path": nbd_sock.to_string_lossy() } } })),
            )
            .await?;
        vm.qmp()
            .execute(
                "block-export-add",
                Some(j!({ "type": "nbd", "id": EXPORT, "node-name": "disk0", "name": EXPORT, "writable": true })),
            )
            .await?;
        let nbd_addr = SocketAddr::from((ns_b.addr, NBD_PORT));
        relay(ns_b, nbd_addr, &nbd_sock, carried.clone())?;
        mirror_disk(&src, nbd_addr).await?;
    }
    src.execute(
        "migrate-set-capabilities",
        Some(j!({ "capabilities": [
            { "capability": "x-ignore-shared", "state": false },
            { "capability": "auto-converge", "state": args.qemu_auto_converge },
        ] })),
    )
    .await?;
    src.execute(
        "migrate-set-parameters",
        Some(j!({ "downtime-limit": args.downtime_ms, "max-bandwidth": 1u64 << 40 })),
    )
    .await?;
    src.execute("migrate", Some(j!({ "uri": format!("tcp:{migration_addr}") }))).await?;
    let mode = match (copy_storage, args.qemu_auto_converge) {
        (false, false) => "qemu",
        (true, false) => "qemu+nbd-mirror",
        (false, true) => "qemu+auto-converge",
        (true, true) => "qemu+nbd-mirror+auto-converge",
    };
    let give_up = Duration::from_secs(args.qemu_give_up_s);
    let info = loop {
        let v: MigrationInfo =
            serde_json::from_value(src.execute("query-migrate", None).await?).context("QEMU's query-migrate")?;
        match v.status.as_str() {
            "completed" => break v,
            "failed" | "cancelled" => bail!("QEMU's migration {}: {}", v.status, v.error_desc.unwrap_or_default()),
            _ => {}
        }
        if t0.elapsed() > give_up {
            return gave_up(&src, vm, &carried, t0, copy_storage, mode).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // From here the source is stopped: what follows is downtime too.
    let completed = Instant::now();
    if copy_storage {
        src.execute("block-job-cancel", Some(j!({ "device": MIRROR_JOB }))).await?;
        while !block_jobs(&src).await?.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        vm.qmp().execute("nbd-server-stop", None).await?;
    }
    loop {
        if vm.status().await? != "inmigrate" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    vm.resume().await?;
    let total_s = t0.elapsed().as_secs_f64();
    let after_completion = completed.elapsed().as_secs_f64();
    let local = SocketAddr::from((forwards[0].host_addr, forwards[0].host_port));
    let answer = forage_agent::app::request_line(local, &workload.check_line(), Duration::from_secs(300))?;
    let _ = vm.shutdown().await;
    if !workload.answer_ok(args, &answer) {
        bail!("after QEMU's migration the service says {answer:?}");
    }
    let ram = info.ram.context("QEMU's completed migration reports no RAM figures")?;
    Ok(Run {
        total_s,
        downtime_s: info.downtime.unwrap_or(0) as f64 / 1000.0 + after_completion,
        bytes: carried.load(Ordering::Relaxed),
        mode: mode.into(),
        switches: Vec::new(),
        qemu_rounds: ram.dirty_sync_count,
        disk_chunks: None,
        converged: true,
        time: None,
    })
}

/// QEMU's migration did not converge in the time given: cancelled (the source VM runs
/// on, as it did throughout: no downtime), the destination stopped, and reported so.
async fn gave_up(
    src: &Qmp,
    vm: forage_vm::Vm,
    carried: &AtomicU64,
    t0: Instant,
    copy_storage: bool,
    mode: &str,
) -> anyhow::Result<Run> {
    let total_s = t0.elapsed().as_secs_f64();
    let last: MigrationInfo =
        serde_json::from_value(src.execute("query-migrate", None).await?).context("QEMU's query-migrate")?;
    src.execute("migrate_cancel", None).await?;
    let cancelled = Instant::now();
    loop {
        let v: MigrationInfo =
            serde_json::from_value(src.execute("query-migrate", None).await?).context("QEMU's query-migrate")?;
        if v.status != "cancelling" && v.status != "active" {
            break;
        }
        if cancelled.elapsed() > Duration::from_secs(60) {
            bail!("QEMU's migration was given up and did not cancel in 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if copy_storage {
        let _ = src.execute("block-job-cancel", Some(j!({ "device": MIRROR_JOB, "force": true }))).await;
    }
    let _ = vm.shutdown().await;
    Ok(Run {
        total_s,
        downtime_s: 0.0,
        bytes: carried.load(Ordering::Relaxed),
        mode: format!("{mode}: did not converge"),
        switches: Vec::new(),
        qemu_rounds: last.ram.map_or(0, |r| r.dirty_sync_count),
        disk_chunks: None,
        converged: false,
        time: None,
    })
}

/// The source's disk mirrored into the destination's NBD export; returns once the job
/// is ready (the copy caught up; from then on every write goes to both).
async fn mirror_disk(src: &Qmp, nbd: SocketAddr) -> anyhow::Result<()> {
    src.execute(
        "blockdev-add",
        Some(j!({
            "driver": "nbd", "node-name": MIRROR_TARGET, "export": EXPORT, "detect-zeroes": "on",
            "server": { "type": "inet", "host": nbd.ip().to_string(), "port": nbd.port().to_string() },
        })),
    )
    .await
    .context("the source QEMU connecting to the destination's NBD export")?;
    src.execute(
        "blockdev-mirror",
        Some(j!({ "job-id": MIRROR_JOB, "device": "disk0", "target": MIRROR_TARGET, "sync": "full" })),
    )
    .await?;
    let t0 = Instant::now();
    loop {
        let jobs = block_jobs(src).await?;
        match jobs.iter().find(|j| j.device == MIRROR_JOB) {
            Some(j) if j.ready => return Ok(()),
            Some(_) => {}
            None => bail!("the disk mirror ended before it was ready (see the source QEMU's log)"),
        }
        if t0.elapsed() > Duration::from_secs(3600) {
            let j = jobs.iter().find(|j| j.device == MIRROR_JOB);
            bail!(
                "the disk mirror is not ready after an hour ({:?} of {:?} bytes)",
                j.map(|j| j.offset),
                j.map(|j| j.len)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn block_jobs(q: &Qmp) -> anyhow::Result<Vec<BlockJob>> {
    serde_json::from_value(q.execute("query-block-jobs", None).await?).context("QEMU's query-block-jobs")
}

/// Relay one TCP connection at `addr` (in `ns`) to the unix socket `to`, both ways,
/// adding the bytes carried to `carried`.
fn relay(ns: &Netns, addr: SocketAddr, to: &Path, carried: Arc<AtomicU64>) -> anyhow::Result<()> {
    let listener = ns.run(move || std::net::TcpListener::bind(addr))??;
    let to = to.to_path_buf();
    std::thread::spawn(move || {
        let Ok((tcp, _)) = listener.accept() else { return };
        let Ok(unix) = std::os::unix::net::UnixStream::connect(&to) else { return };
        let (Ok(tcp2), Ok(unix2)) = (tcp.try_clone(), unix.try_clone()) else { return };
        let back = carried.clone();
        std::thread::spawn(move || {
            copy_counting(&unix2, &tcp2, &back);
            let _ = tcp2.shutdown(std::net::Shutdown::Write);
        });
        copy_counting(&tcp, &unix, &carried);
        let _ = unix.shutdown(std::net::Shutdown::Write);
    });
    Ok(())
}

fn copy_counting(mut from: impl std::io::Read, mut to: impl std::io::Write, carried: &AtomicU64) {
    // (`&TcpStream` and `&UnixStream` read and write.)
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
                carried.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
}
