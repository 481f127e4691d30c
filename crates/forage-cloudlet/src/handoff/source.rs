//! The source side of a handoff: QEMU's migration into a local socket, the stream split
//! into chunks, the pipeline, the commit; and the recovery of the VM when anything fails.

use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forage_api::HandoffReport;
use forage_handoff::adapt::{parse_mode, LookupTable};
use forage_handoff::pipeline::{run, PipelineConfig};
use forage_handoff::segment::{Modified, CHUNK};
use forage_proto::asynchronous::{read, write};
use forage_proto::{HandoffBegin, PeerMessage, ProtoError, ServiceEndpoint};
use forage_vm::{Snapshot, Vm};
use serde_json::json;
use tokio::sync::mpsc;

use crate::instance::control::MoveOrder;
use crate::instance::{Instance, Place};
use crate::Cloudlet;

/// How long the destination may stay silent at a step (resume included): PEER_WAIT.
use crate::peer_link::PEER_WAIT;
/// How long a source asks a silent destination whether it resumed the VM, and how often.
const RESOLVE_FOR: Duration = Duration::from_secs(300);
const RESOLVE_EVERY: Duration = Duration::from_secs(3);
/// Longest the destination may leave sent segments unacknowledged (a cut link blocks
/// writes forever otherwise).
const ACK_WAIT: Duration = Duration::from_secs(20);
/// Pieces of boot files.
const FILE_PIECE: usize = 16 << 20;

use super::feed::{Bits, Feed};
use super::order::HandoffFailure;

type Failure = HandoffFailure;

fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Failure {
    let path = path.into();
    move |source| Failure::Io { path, source }
}

/// Move `instance` as `order` says: the report, and what the instance's devices are told.
/// On error the VM still runs here.
pub(super) async fn send(
    place: Place<'_>,
    instance: &Instance,
    order: &MoveOrder,
) -> Result<(HandoffReport, ServiceEndpoint), Failure> {
    let t0 = Instant::now();
    let cloudlet = place.cloudlet;
    let to = order.to;
    let lineage = instance.lineage.as_ref().ok_or(Failure::NotMovable)?;
    let base = &Snapshot::open(&lineage.base)
        .map_err(|source| Failure::Lineage { path: lineage.base.clone(), source: Box::new(source) })?;
    let mut stream = connect_peer(cloudlet, to).await?;
    let begin = HandoffBegin {
        instance: place.id.to_string(),
        base_state_sha256: base.manifest().state.sha256.clone(),
        vm: serde_json::to_vec(base.manifest()).expect("a manifest serializes"),
        service_port: instance.service_port,
        extra_ports: instance.extra_ports.clone(),
        service_token: instance.service.token.clone(),
    };
    write(&mut stream, &PeerMessage::HandoffBegin(begin)).await.map_err(Failure::Wire)?;
    let has_base = match next(&mut stream).await? {
        PeerMessage::HandoffAccept { has_base } => has_base,
        other => return Err(unexpected("HandoffAccept", &other)),
    };
    tracing::info!(instance = place.id, %to, has_base, "destination accepted the handoff");
    let boot_file_bytes = if has_base { 0 } else { send_boot_files(&mut stream, base).await? };
    // From here on QEMU is involved: whatever fails, the VM must go on running here.
    let result = migrate(place, instance, base, stream, has_base, order).await;
    match result {
        Ok((mut report, service)) => {
            report.total_s = t0.elapsed().as_secs_f64();
            report.to = to.to_string();
            report.boot_file_bytes = boot_file_bytes;
            report.bytes += boot_file_bytes;
            Ok((report, service))
        }
        Err(e) if e.vm_runs_here() => {
            recover(&instance.vm).await;
            Err(e)
        }
        // Asked and not answered: the VM stays stopped (at most one copy runs).
        Err(e) => Err(e),
    }
}

/// A connection to the cloudlet `to` in the peer protocol (PeerHello answered).
async fn connect_peer(cloudlet: &Cloudlet, to: SocketAddr) -> Result<forage_client::CloudletStream, Failure> {
    crate::peer_link::connect(&cloudlet.data, &cloudlet.name, to).await.map_err(Failure::Link)
}

/// After a commit whose answer did not come: ask the destination, on new connections,
/// whether it runs the instance, until it says (or [`RESOLVE_FOR`] has passed). The VM
/// stays stopped here meanwhile: at most one copy runs.
async fn resolve(cloudlet: &Cloudlet, to: SocketAddr, instance: &str) -> Result<ServiceEndpoint, Failure> {
    let t = Instant::now();
    loop {
        let asked = async {
            let mut stream = connect_peer(cloudlet, to).await?;
            write(&mut stream, &PeerMessage::HandoffQuery { instance: instance.to_string() })
                .await
                .map_err(Failure::Wire)?;
            match tokio::time::timeout(PEER_WAIT, read::<PeerMessage>(&mut stream)).await {
                Err(_) => Err(Failure::Silent(PEER_WAIT)),
                Ok(r) => r.map_err(Failure::Wire),
            }
        };
        match asked.await {
            Ok(PeerMessage::HandoffDone { service, .. }) => {
                tracing::info!(instance, %to, "the destination runs the instance (asked after the commit)");
                return Ok(service);
            }
            Ok(PeerMessage::Error { code: forage_proto::ErrorCode::NotFound, message }) => {
                tracing::info!(instance, %to, "the destination never resumed the instance: {message}");
                return Err(Failure::NotThere(message));
            }
            Ok(other) => tracing::info!(instance, %to, "asked after the commit: {}", other.name()),
            Err(e) => tracing::info!(instance, %to, "asking after the commit: {e}"),
        }
        if t.elapsed() > RESOLVE_FOR {
            return Err(Failure::Unresolved { to, waited: t.elapsed() });
        }
        tokio::time::sleep(RESOLVE_EVERY).await;
    }
}

async fn next(stream: &mut forage_client::CloudletStream) -> Result<PeerMessage, Failure> {
    match tokio::time::timeout(PEER_WAIT, read::<PeerMessage>(stream)).await {
        Err(_) => Err(Failure::Silent(PEER_WAIT)),
        Ok(Err(e)) => Err(Failure::Wire(e)),
        Ok(Ok(PeerMessage::Error { message, .. })) => Err(Failure::Refused(message)),
        Ok(Ok(m)) => Ok(m),
    }
}

fn unexpected(expected: &'static str, got: &PeerMessage) -> Failure {
    Failure::Unexpected { expected, got: got.name() }
}

/// The direct-boot kernel and initramfs, for a destination that builds the VM from nothing.
async fn send_boot_files(stream: &mut forage_client::CloudletStream, base: &Snapshot) -> Result<u64, Failure> {
    let Some(boot) = &base.manifest().spec.boot else { return Ok(0) };
    let mut total = 0;
    for (name, path) in [("kernel", &boot.kernel), ("initrd", &boot.initrd)] {
        let bytes = tokio::fs::read(path).await.map_err(io(path))?;
        let pieces: Vec<&[u8]> = if bytes.is_empty() { vec![&[][..]] } else { bytes.chunks(FILE_PIECE).collect() };
        let n = pieces.len();
        for (i, piece) in pieces.into_iter().enumerate() {
            let m = PeerMessage::HandoffFile {
                name: name.into(),
                offset: (i * FILE_PIECE) as u64,
                bytes: piece.to_vec(),
                last: i + 1 == n,
            };
            write(stream, &m).await.map_err(Failure::Wire)?;
        }
        total += bytes.len() as u64;
    }
    Ok(total)
}

/// The adaptive run's mode until its first decision (when the table measured on the VM's
/// own pages arrives, under a second in, if the link to the destination is known from the
/// last handoff there, else after a second of this link's measures), for the first
/// adaptive handoff to a destination. Later ones start in the mode the last one there
/// ended in (on hashsearch at 10 Mbit/s, the first 0.3 s in none+zstd-1 sent 170 KB more
/// than none+bzip2-9, where the last one had ended). Cheap on every core and never far
/// from the smallest when the link is fast. No delta: against the base, xor made the Debian app's
/// pages larger (xor+zstd-3 sent 11.1 MB where none+zstd-1 sent 7.1 MB at 25 Mbit/s), and
/// the first decision had to undo it.
const START_MODE: &str = "none+zstd-1";

async fn migrate(
    place: Place<'_>,
    instance: &Instance,
    base: &Snapshot,
    stream: forage_client::CloudletStream,
    has_base: bool,
    order: &MoveOrder,
) -> Result<(HandoffReport, ServiceEndpoint), Failure> {
    let (mode, table) = match &order.options.mode {
        Some(m) => (parse_mode(m).map_err(Failure::Residual)?, None),
        None => {
            let start = place.cloudlet.handoffs.ended_in(order.to);
            (start.unwrap_or_else(|| parse_mode(START_MODE).expect("a mode")), Some(load_table(place.cloudlet)))
        }
    };
    // The app's pages were sampled on the way to this destination a moment ago: the
    // table measured then stands (the sample would take 0.3-0.5 s of every core while the
    // encoders need them); else a sample runs beside the migration's start.
    let app = format!("{}/{}", base.dir().display(), instance.vm.spec().name);
    let known = table
        .as_ref()
        .and_then(|_| place.cloudlet.handoffs.own_table(order.to, &app))
        .filter(|(t, _)| t.get(&mode).is_some());
    let (adapt_later, sampled) = match (&table, known) {
        (None, _) => (None, None),
        (Some(_), Some((own, age))) => {
            tracing::info!(
                instance = place.id,
                age_s = age.as_secs(),
                "adaptation table from this app's pages as the last handoff here measured them: no sample"
            );
            (Some(Arc::new(std::sync::OnceLock::from(own))), None)
        }
        (Some(t), None) => {
            let slot =
                super::sampling::start(instance.vm.spec().memory_file.clone(), base.memory_path(), has_base, t, mode);
            (Some(slot.clone()), Some(slot))
        }
    };
    let vm = &instance.vm;
    let qmp = vm.qmp();
    let sock = place
        .cloudlet
        .data
        .runtime_dir()
        .map_err(|e| Failure::Io { path: "runtime folder".into(), source: std::io::Error::other(e) })?
        .join(format!("handoff-{}.sock", place.id));
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock).map_err(io(&sock))?;
    // A restored instance has x-ignore-shared on (its RAM came from a file): off, so that
    // QEMU sends guest RAM, which is what we want to see.
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": false }] })),
    )
    .await
    .map_err(Failure::Qemu)?;
    // Where QEMU tracks every write across its rounds, forage ends the iterations
    // (`steering`); elsewhere QEMU does, at its downtime limit, and tends to stop the VM
    // after its first pass.
    let steer = vm.spec().dirty_tracking_exact(vm.accel());
    let iterating = if steer {
        super::steering::iterating()
    } else {
        json!({ "downtime-limit": order.options.downtime_limit_ms, "max-bandwidth": UNLIMITED })
    };
    if !steer {
        tracing::info!(
            instance = place.id,
            "QEMU ends the iterations itself: this VM's RAM takes QEMU 7.2's fast dirty sync, which loses writes under TCG when steered"
        );
    }
    qmp.execute("migrate-set-parameters", Some(iterating)).await.map_err(Failure::Qemu)?;
    let stopped: Arc<Mutex<Option<Instant>>> = Arc::default();
    let watch = {
        let mut events = qmp.events();
        let stopped = stopped.clone();
        tokio::spawn(async move {
            while let Ok(e) = events.recv().await {
                if e.name == "STOP" {
                    *stopped.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                }
            }
        })
    };
    let result = async {
        qmp.execute("migrate", Some(json!({ "uri": format!("unix:{}", sock.display()) })))
            .await
            .map_err(Failure::Qemu)?;
        let (conn, _) = tokio::time::timeout(Duration::from_secs(20), listener.accept())
            .await
            .map_err(|_| Failure::NoStream)?
            .map_err(io(&sock))?;
        let conn = conn.into_std().map_err(io(&sock))?;
        conn.set_nonblocking(false).map_err(io(&sock))?;
        let sink = order.sink.clone();
        let adapt = (table, adapt_later);
        let steer = steer.then(|| Duration::from_millis(order.options.downtime_limit_ms));
        stream_state(place, instance, base, stream, conn, has_base, mode, adapt, sink, &stopped, order.to, steer).await
    }
    .await;
    watch.abort();
    let _ = std::fs::remove_file(&sock);
    if let (Ok(_), Some(own)) = (&result, sampled.as_ref().and_then(|s| s.get())) {
        place.cloudlet.handoffs.remember_table(order.to, &app, own.clone());
    }
    result
}

fn load_table(cloudlet: &Cloudlet) -> LookupTable {
    let path = cloudlet.data.root().join("handoff-lookup.json");
    match std::fs::read(&path).ok().map(|b| serde_json::from_slice::<LookupTable>(&b)) {
        Some(Ok(t)) if !t.modes.is_empty() => t,
        Some(Err(e)) => {
            tracing::warn!("{}: {e}; using the reference table", path.display());
            LookupTable::reference()
        }
        _ => LookupTable::reference(),
    }
}

#[allow(clippy::too_many_arguments)]
async fn stream_state(
    place: Place<'_>,
    instance: &Instance,
    base: &Snapshot,
    stream: forage_client::CloudletStream,
    conn: std::os::unix::net::UnixStream,
    has_base: bool,
    mode: forage_handoff::adapt::Mode,
    (table, adapt_later): (Option<LookupTable>, Option<Arc<std::sync::OnceLock<LookupTable>>>),
    sink: Option<forage_handoff::pipeline::TraceSink>,
    stopped: &Mutex<Option<Instant>>,
    to: SocketAddr,
    steer: Option<Duration>,
) -> Result<(HandoffReport, ServiceEndpoint), Failure> {
    let adapting = table.is_some();
    let (mut rh, mut wh) = tokio::io::split(stream);
    let (frames, mut frames_rx) = mpsc::channel::<PeerMessage>(2);
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let written = written.clone();
        tokio::spawn(async move {
            while let Some(m) = frames_rx.recv().await {
                let n = match &m {
                    PeerMessage::HandoffSegment { bytes, .. } => bytes.len() as u64,
                    _ => 0,
                };
                written.fetch_add(n, Ordering::Relaxed);
                write(&mut wh, &m).await?;
            }
            Ok::<_, ProtoError>(wh)
        })
    };
    let acked = Arc::new(AtomicU64::new(0));
    let reader = {
        let (acked, written) = (acked.clone(), written.clone());
        tokio::spawn(async move {
            loop {
                match read::<PeerMessage>(&mut rh).await {
                    Ok(PeerMessage::HandoffAck { bytes, .. }) => {
                        // No more than was sent: the acknowledged rate sets the pace, the
                        // adaptation's link and the rate remembered for the next handoff.
                        let unacked = written.load(Ordering::Relaxed).saturating_sub(acked.load(Ordering::Relaxed));
                        acked.fetch_add(bytes.min(unacked), Ordering::Relaxed);
                    }
                    Ok(PeerMessage::HandoffDone { service, resumed_after_ms }) => {
                        return Ok((service, resumed_after_ms))
                    }
                    Ok(PeerMessage::Error { message, .. }) => return Err(Failure::Refused(message)),
                    Ok(other) => return Err(unexpected("HandoffAck or HandoffDone", &other)),
                    Err(e) => return Err(Failure::Wire(e)),
                }
            }
        })
    };
    let feed = Feed {
        shim: instance.shim.clone(),
        disk_changed: instance.lineage.as_ref().map(|l| l.disk_changed.clone()).unwrap_or_default(),
        runtime: tokio::runtime::Handle::current(),
        base_memory: File::open(base.memory_path()).map_err(io(base.memory_path()))?,
        base_disk: File::open(&base.disk_paths()[0]).map_err(io(&base.disk_paths()[0]))?,
        has_base,
        modified: [Bits::new(base.manifest().memory.size), Bits::new(base.manifest().disks[0].size)],
        sent: [Bits::new(base.manifest().memory.size), Bits::new(base.manifest().disks[0].size)],
        memory_pages: 0,
        disk_chunks: 0,
        fed: Arc::new(AtomicU64::new(0)),
    };
    let fed = feed.fed.clone();
    let progress = Arc::new(forage_handoff::pipeline::Progress::default());
    let (chunk_tx, chunk_rx) = std::sync::mpsc::sync_channel::<Modified>(64);
    let feeder = tokio::task::spawn_blocking(move || feed.run(conn, chunk_tx));
    let prior = place.cloudlet.handoffs.prior(to);
    let config = PipelineConfig {
        workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
        start: mode,
        adapt: table,
        adapt_later,
        // Short queues: what is gathered when QEMU stops the VM is downtime.
        segment_chunks: 128,
        depth: 1,
        on_trace: sink,
        progress: Some(progress.clone()),
        prior,
        pace: true,
        ..Default::default()
    };
    let segments_out = frames.clone();
    let acked_by_peer = acked.clone();
    // The trace's clock (the pipeline starts its own within microseconds).
    let stream_start = Instant::now();
    let pipeline = tokio::task::spawn_blocking(move || {
        run(
            &config,
            quiet_marks(chunk_rx),
            |seq, bytes| {
                segments_out.blocking_send(PeerMessage::HandoffSegment { seq, bytes }).map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the connection to the destination closed")
                })
            },
            acked_by_peer,
        )
    });
    // Steering that ends well leaves the rest to the feeder and the pipeline; one that
    // fails ends the handoff (the caller's `migrate_cancel`).
    let steering = async {
        if let Some(limit) = steer {
            let s = super::steering::Steering { fed: &fed, progress: &progress, acked: &acked, limit };
            if let Err(e) = s.run(&instance.vm).await {
                return e;
            }
        }
        std::future::pending().await
    };
    let joined = async { tokio::join!(feeder, pipeline) };
    tokio::pin!(joined);
    tokio::pin!(steering);
    let mut reader = reader;
    // On failure nothing waits for the feeder and the pipeline: closing the connection
    // stops the pipeline, and the caller's `migrate_cancel` closes QEMU's stream, which
    // stops the feeder.
    let (fed, piped) = tokio::select! {
        r = &mut joined => r,
        e = &mut steering => {
            writer.abort();
            reader.abort();
            return Err(Failure::Qemu(e));
        }
        _ = stalled(&written, &acked) => {
            writer.abort();
            reader.abort();
            return Err(Failure::Stalled(ACK_WAIT));
        }
        said = &mut reader => {
            writer.abort();
            return Err(match said {
                Ok(Err(e)) => e,
                Ok(Ok(_)) => Failure::EarlyDone,
                Err(e) => Failure::Wire(ProtoError::Io(std::io::Error::other(e))),
            });
        }
    };
    let fed = fed.expect("no panic");
    let piped = piped.expect("no panic");
    let ((residual, feed), report) = match (fed, piped) {
        (Ok(f), Ok(p)) => {
            let ended_in = adapting.then(|| p.trace.last().and_then(|t| parse_mode(&t.mode).ok())).flatten();
            place.cloudlet.handoffs.remember(to, p.link_bps, p.cpu_scale, ended_in);
            (f, p)
        }
        (fed, piped) => {
            // The destination's own words, if it said why.
            drop(frames);
            let said = match tokio::time::timeout(Duration::from_secs(2), reader).await {
                Ok(Ok(Err(e))) => Some(e),
                _ => None,
            };
            return Err(said.or(fed.err()).or(piped.err().map(Failure::Pipeline)).unwrap_or(Failure::Stopped));
        }
    };
    let (rounds, status) = migration_status(&instance.vm).await;
    if status != "completed" {
        return Err(Failure::Migration(status));
    }
    let spec = instance.vm.spec();
    crate::faults::probe_handoff(place.id, "source", &spec.memory_file, &spec.disks[0].path).await;
    let state = residual
        .to_stream()
        .and_then(|s| zstd::encode_all(&s[..], 3).map_err(|e| e.to_string()))
        .map_err(Failure::Residual)?;
    let state_bytes = state.len() as u64;
    frames.send(PeerMessage::HandoffCommit { segments: report.segments, state }).await.map_err(|_| Failure::Stopped)?;
    drop(frames);
    let resumed = tokio::time::timeout(PEER_WAIT, reader).await;
    writer.abort();
    let service = match resumed {
        Ok(Ok(Ok((service, _resumed_ms)))) => service,
        // The destination said it failed: it does not run the VM.
        Ok(Ok(Err(Failure::Refused(why)))) => return Err(Failure::Refused(why)),
        // No answer: it may run the VM, or not. Ask it.
        other => {
            let why = match other {
                Err(_) => format!("no answer in {}s", PEER_WAIT.as_secs()),
                Ok(Err(e)) => e.to_string(),
                Ok(Ok(Err(e))) => e.to_string(),
                Ok(Ok(Ok(_))) => unreachable!("handled above"),
            };
            tracing::warn!(instance = place.id, "no answer to the commit ({why}): asking the destination");
            resolve(place.cloudlet, to, place.id).await?
        }
    };
    let done = Instant::now();
    let stopped_at = *stopped.lock().unwrap_or_else(|p| p.into_inner());
    let downtime_s = stopped_at.map_or(0.0, |t| done.duration_since(t).as_secs_f64());
    let report = HandoffReport {
        instance: place.id.to_string(),
        to: String::new(),
        endpoint: service.addr.clone(),
        ca_sha256: service.ca_sha256.clone(),
        has_base: feed.has_base,
        total_s: 0.0,
        downtime_s,
        bytes: report.output_bytes + state_bytes,
        modified_bytes: (feed.modified[0].count + feed.modified[1].count) * CHUNK as u64,
        memory_pages: feed.memory_pages,
        disk_chunks: feed.disk_chunks,
        segments: report.segments,
        state_bytes,
        boot_file_bytes: 0,
        qemu_rounds: rounds,
        mode: report.trace.last().map(|t| t.mode.clone()).unwrap_or_else(|| mode.to_string()),
        switches: report.switches,
        prior,
        trace: report.trace,
        stopped_at_s: stopped_at.map(|t| t.saturating_duration_since(stream_start).as_secs_f64()),
    };
    Ok((report, service))
}

/// The feeder's chunks, with a `None` whenever none came for [`QUIET`]: the pipeline
/// then sends what it gathered instead of waiting for a full segment (QEMU may be held).
fn quiet_marks(rx: std::sync::mpsc::Receiver<Modified>) -> impl Iterator<Item = Option<Modified>> {
    std::iter::from_fn(move || match rx.recv_timeout(QUIET) {
        Ok(m) => Some(Some(m)),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Some(None),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => None,
    })
}

const QUIET: Duration = Duration::from_millis(50);

/// No limit (QEMU's `max-bandwidth`, bytes/s; its default is 32 MiB/s).
const UNLIMITED: u64 = 1 << 40;

/// Returns once segments have been written and none acknowledged for [`ACK_WAIT`].
async fn stalled(written: &AtomicU64, acked: &AtomicU64) {
    let mut last = (acked.load(Ordering::Relaxed), Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let a = acked.load(Ordering::Relaxed);
        if a != last.0 || written.load(Ordering::Relaxed) <= a {
            last = (a, Instant::now());
        } else if last.1.elapsed() > ACK_WAIT {
            return;
        }
    }
}

/// QEMU's `query-migrate`: dirty-sync count and status (waits for a final status).
async fn migration_status(vm: &Vm) -> (u64, String) {
    let mut last = (0, "unknown".to_string());
    for _ in 0..100 {
        if let Ok(v) = vm.qmp().execute("query-migrate", None).await {
            let status = v["status"].as_str().unwrap_or("unknown").to_string();
            last = (v["ram"]["dirty-sync-count"].as_u64().unwrap_or(0), status.clone());
            if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    last
}

/// After a failed handoff: cancel QEMU's migration and run the VM again if QEMU had
/// stopped it for the last round.
async fn recover(vm: &Vm) {
    let qmp = vm.qmp();
    let _ = qmp.execute("migrate_cancel", None).await;
    let (_, status) = migration_status(vm).await;
    match vm.status().await.as_deref() {
        Ok("postmigrate" | "paused" | "finish-migrate") => match qmp.execute("cont", None).await {
            Ok(_) => tracing::info!(migration = status, "the VM runs again after the failed handoff"),
            Err(e) => tracing::error!("the VM could not be resumed after the failed handoff: {e}"),
        },
        Ok(s) => tracing::info!(vm = s, migration = status, "the VM ran on during the failed handoff"),
        Err(e) => tracing::error!("after the failed handoff: {e}"),
    }
}
