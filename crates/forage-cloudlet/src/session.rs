//! One synthesis session (see the crate doc for the sequence).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use forage_format::OverlayReader;
use forage_proto::asynchronous::{read, write};
use forage_proto::{negotiate, ErrorCode, Message, ProtoError, VERSION_MAX, VERSION_MIN};
use forage_synth::BaseVm;
use forage_vm::{Snapshot, Vm};
use tokio::net::TcpStream;

use crate::pipe::SegmentPipe;
use crate::Cloudlet;

/// How long the device may stay silent mid-transfer.
const PEER_WAIT: Duration = Duration::from_secs(60);
static NEXT: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("device: {0}")]
    Proto(#[from] ProtoError),
    #[error("device broke the sequence: expected {expected}, got {got}")]
    Sequence { expected: &'static str, got: &'static str },
    #[error("device went silent for {0:?}")]
    Timeout(Duration),
    #[error("{code:?}: {message}")]
    Refused { code: ErrorCode, message: String },
}

fn refused(code: ErrorCode, message: impl Into<String>) -> SessionError {
    SessionError::Refused { code, message: message.into() }
}

async fn next(stream: &mut TcpStream) -> Result<Message, SessionError> {
    match tokio::time::timeout(PEER_WAIT, read(stream)).await {
        Ok(m) => Ok(m?),
        Err(_) => Err(SessionError::Timeout(PEER_WAIT)),
    }
}

/// Run one session on `stream`. On any failure the device is told why (if it still
/// listens), and nothing of the session is left: no VM, no files.
pub async fn session(mut stream: TcpStream, cloudlet: &Cloudlet) -> Result<(), SessionError> {
    let dir = cloudlet.data.work().join(format!("session-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
    let result = run(&mut stream, cloudlet, &dir).await;
    if let Err(e) = &result {
        let (code, message) = match e {
            SessionError::Refused { code, message } => (*code, message.clone()),
            SessionError::Timeout(_) => (ErrorCode::Timeout, e.to_string()),
            other => (ErrorCode::Protocol, other.to_string()),
        };
        let _ = write(&mut stream, &Message::Error { code, message }).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run(stream: &mut TcpStream, cloudlet: &Cloudlet, dir: &Path) -> Result<(), SessionError> {
    // Hello -> Welcome: pick a base we hold.
    let Message::Hello { versions, device, offers, early_start } = next(stream).await? else {
        return Err(SessionError::Sequence { expected: "Hello", got: "another message" });
    };
    let version = negotiate(versions).ok_or_else(|| refused(ErrorCode::Version, format!("device speaks {versions:?}, cloudlet {VERSION_MIN}..={VERSION_MAX}")))?;
    let held: Vec<BaseVm> = BaseVm::list(&cloudlet.data).into_iter().filter_map(|(_, b)| b.ok()).collect();
    let chosen = offers.iter().find_map(|o| held.iter().find(|b| b.digest() == o.base_digest));
    let missing = offers.iter().filter(|o| !held.iter().any(|b| b.digest() == o.base_digest)).map(|o| o.base_digest.clone()).collect();
    write(stream, &Message::Welcome { version, cloudlet: cloudlet.name.clone(), chosen: chosen.map(|b| b.digest().to_string()), missing }).await?;
    let Some(base) = chosen.cloned() else {
        return Err(refused(ErrorCode::NoBase, "none of the offered bases is held here"));
    };
    tracing::info!(device, base = %base.manifest().name, early_start, "synthesis session");

    // Manifest: check it before anything is written.
    let Message::Manifest { bytes: prefix } = next(stream).await? else {
        return Err(SessionError::Sequence { expected: "Manifest", got: "another message" });
    };
    let start = Instant::now();
    let manifest = OverlayReader::open(&prefix[..]).map_err(|e| refused(ErrorCode::BadOverlay, e.to_string()))?.manifest().clone();
    if manifest.base.digest != base.digest() {
        return Err(refused(ErrorCode::BadOverlay, "the manifest names another base than the one agreed"));
    }
    let service = manifest.service.clone();

    // Segments stream into the apply thread through a bounded pipe.
    std::fs::create_dir_all(dir).map_err(|e| refused(ErrorCode::Internal, format!("{}: {e}", dir.display())))?;
    let applied = dir.join("launch");
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    tx.send(prefix).await.expect("pipe open");
    let (base2, applied2, accel) = (base.clone(), applied.clone(), cloudlet.accel);
    let apply = tokio::task::spawn_blocking(move || {
        let label = PathBuf::from("from the device");
        forage_synth::apply::apply_into(SegmentPipe::new(rx), &label, &base2, &applied2, accel)
    });
    let received = async {
        let mut bytes = 0u64;
        for (i, seg) in manifest.segments.iter().enumerate() {
            let Message::Segment { index, bytes: data } = next(stream).await? else {
                return Err(SessionError::Sequence { expected: "Segment", got: "another message" });
            };
            if index as usize != i || data.len() as u64 != seg.compressed_len {
                return Err(refused(ErrorCode::Protocol, format!("segment {index} out of order or of the wrong size (expected {i})")));
            }
            bytes += data.len() as u64;
            if tx.send(data).await.is_err() {
                break; // the apply thread stopped: its error is reported below
            }
        }
        Ok(bytes)
    }
    .await;
    // Whatever happened, the apply thread ends before the session's files are removed.
    drop(tx);
    let applied_result = apply.await.expect("apply does not panic");
    let bytes = received?;
    let report = applied_result.map_err(|e| refused(ErrorCode::BadOverlay, e.to_string()))?;
    let apply_ms = start.elapsed().as_millis() as u64;
    tracing::debug!(?report, "overlay applied");

    // Resume the launch VM with its service forwarded.
    let snap = Snapshot::open(&applied).map_err(|e| refused(ErrorCode::Internal, e.to_string()))?;
    let run = dir.join("run");
    std::fs::create_dir_all(&run).map_err(|e| refused(ErrorCode::Internal, e.to_string()))?;
    let guest_ports: Vec<u16> = snap.manifest().spec.nic.iter().flat_map(|n| n.forwards.iter().map(|f| f.guest_port)).collect();
    let forwards = forage_image::forwards_on(cloudlet.service_addr, guest_ports).map_err(|e| refused(ErrorCode::Internal, e.to_string()))?;
    let qmp = cloudlet.data.runtime_dir().join(format!("{}.qmp", dir.file_name().unwrap_or_default().to_string_lossy()));
    let spec = snap.relocated_spec(&run, &qmp, Some(forwards.clone()));
    let t = Instant::now();
    let vm = Vm::restore(&snap, spec, cloudlet.accel, &run.join("qemu.log")).await.map_err(|e| refused(ErrorCode::Internal, e.to_string()))?;
    let resumed_after_ms = t.elapsed().as_millis() as u64;
    let endpoint = service
        .as_ref()
        .and_then(|s| forwards.iter().find(|f| f.guest_port == s.port))
        .map(|f| format!("{}:{}", f.host_addr, f.host_port))
        .unwrap_or_default();
    let served = async {
        write(stream, &Message::Ready { endpoint, resumed_after_ms }).await?;
        write(stream, &Message::Complete { segments: manifest.segments.len() as u32, bytes, apply_ms }).await?;
        // The instance lives until the device says Bye or goes away.
        loop {
            match read(stream).await {
                Ok(Message::Bye) | Err(_) => return Ok::<_, SessionError>(()),
                Ok(_) => continue,
            }
        }
    }
    .await;
    let _ = vm.shutdown().await;
    served
}
