//! Pipelined synthesis: segments stream into the apply thread through a bounded pipe while
//! they arrive; the launch VM resumes once every segment is applied. Without pipelining
//! (the bench's baseline, "store and forward"), the whole overlay is received into a file
//! first and applied from it afterwards.

use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;

use forage_format::Manifest;
use forage_proto::asynchronous::write;
use forage_proto::{DeviceMessage, ErrorCode};
use forage_state::Timing;
use forage_vm::Snapshot;
use sha2::Digest;

use super::context::{overlay_digest, Ctx};
use super::pipe::SegmentPipe;
use super::residue::send_residue;
use crate::error::{internal, next, refused, SessionError};
use crate::handoff::live;
use crate::instance::{prepare, Ending, Lineage, Outcome, Ports, Source};

pub(crate) async fn run(
    stream: &mut crate::DeviceStream,
    ctx: &Ctx<'_>,
    manifest: Manifest,
    prefix: Vec<u8>,
    pipelined: bool,
) -> Result<Outcome, SessionError> {
    if !pipelined {
        return store_and_forward(stream, ctx, manifest, prefix).await;
    }
    let start = Instant::now();
    let digest = overlay_digest(&prefix);
    let applied = ctx.dir.join("launch");
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    tx.send(prefix).await.expect("pipe open");
    let (base, applied2, accel) = (ctx.base.clone(), applied.clone(), ctx.cloudlet.accel);
    let apply = tokio::task::spawn_blocking(move || {
        let label = PathBuf::from("from the device");
        forage_synth::apply::apply_into(SegmentPipe::new(rx), &label, &base, &applied2, accel)
    });
    let received = async {
        let mut bytes = 0u64;
        for i in 0..manifest.segments.len() {
            let data = next_segment(stream, ctx, &manifest, i).await?;
            bytes += data.len() as u64;
            if tx.send(data).await.is_err() {
                break; // the apply thread stopped: its error is reported below
            }
        }
        ctx.place().timing(Timing::Received(ctx.place().elapsed_ms()));
        Ok::<_, SessionError>(bytes)
    }
    .await;
    // Whatever happened, the apply thread ends before the session's files are removed.
    drop(tx);
    let applied_result = apply.await.expect("apply does not panic");
    let bytes = received?;
    let report = applied_result.map_err(|e| refused(ErrorCode::BadOverlay, e.to_string()))?;
    let apply_ms = start.elapsed().as_millis() as u64;
    tracing::debug!(?report, "overlay applied");

    finish(stream, ctx, &manifest, &digest, &applied, bytes, apply_ms, report.decompress).await
}

/// The overlay fetched from its URL by the cloudlet: applied while it downloads.
pub(crate) async fn run_remote(
    stream: &mut crate::DeviceStream,
    ctx: &Ctx<'_>,
    manifest: Manifest,
    remote: std::sync::Arc<forage_remote::RemoteOverlay>,
) -> Result<Outcome, SessionError> {
    let start = Instant::now();
    let digest = overlay_digest(&remote.prefix);
    let applied = ctx.dir.join("launch");
    let (base, applied2, accel) = (ctx.base.clone(), applied.clone(), ctx.cloudlet.accel);
    let report = tokio::task::spawn_blocking(move || {
        let body = remote.segments_stream().map_err(|e| e.to_string())?;
        let counted = CountingReader { inner: std::io::Cursor::new(remote.prefix.clone()).chain(body), bytes: 0 };
        let label = PathBuf::from(&remote.url);
        let mut reader = counted;
        let report =
            forage_synth::apply::apply_into(&mut reader, &label, &base, &applied2, accel).map_err(|e| e.to_string())?;
        Ok::<_, String>((report, reader.bytes.saturating_sub(remote.prefix.len() as u64)))
    })
    .await
    .expect("apply does not panic");
    let (report, bytes) = report.map_err(|e| refused(ErrorCode::BadOverlay, e))?;
    let apply_ms = start.elapsed().as_millis() as u64;
    finish(stream, ctx, &manifest, &digest, &applied, bytes, apply_ms, report.decompress).await
}

/// Counts what passes through.
struct CountingReader<R> {
    inner: R,
    bytes: u64,
}

impl<R: std::io::Read> std::io::Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Segment `i`, which must come next and be of the manifest's size.
async fn next_segment(
    stream: &mut crate::DeviceStream,
    ctx: &Ctx<'_>,
    manifest: &Manifest,
    i: usize,
) -> Result<Vec<u8>, SessionError> {
    let DeviceMessage::Segment { index, bytes } = next::<DeviceMessage>(stream, ctx.cloudlet.peer_wait).await? else {
        return Err(SessionError::Sequence { expected: "Segment", got: "another message" });
    };
    if index as usize != i || bytes.len() as u64 != manifest.segments[i].compressed_len {
        return Err(refused(
            ErrorCode::Protocol,
            format!("segment {index} out of order or of the wrong size (expected {i})"),
        ));
    }
    Ok(bytes)
}

/// Receive every segment into a file, then apply it: nothing overlaps. Each segment is
/// checked against the manifest's hash before it is written (the manifest, already
/// checked, bounds the total).
async fn store_and_forward(
    stream: &mut crate::DeviceStream,
    ctx: &Ctx<'_>,
    manifest: Manifest,
    prefix: Vec<u8>,
) -> Result<Outcome, SessionError> {
    use tokio::io::AsyncWriteExt;
    let start = Instant::now();
    let digest = overlay_digest(&prefix);
    let file = ctx.dir.join("overlay");
    let mut out = tokio::fs::File::create(&file).await.map_err(internal)?;
    out.write_all(&prefix).await.map_err(internal)?;
    let mut bytes = 0u64;
    for i in 0..manifest.segments.len() {
        let data = next_segment(stream, ctx, &manifest, i).await?;
        if hex::encode(sha2::Sha256::digest(&data)) != manifest.segments[i].sha256 {
            return Err(refused(ErrorCode::BadOverlay, format!("segment {i} fails its checksum")));
        }
        bytes += data.len() as u64;
        out.write_all(&data).await.map_err(internal)?;
    }
    ctx.place().timing(Timing::Received(ctx.place().elapsed_ms()));
    out.flush().await.map_err(internal)?;
    drop(out);
    let applied = ctx.dir.join("launch");
    let (base, applied2, accel, file2) = (ctx.base.clone(), applied.clone(), ctx.cloudlet.accel, file.clone());
    let report = tokio::task::spawn_blocking(move || forage_synth::apply::apply(&file2, &base, &applied2, accel))
        .await
        .expect("apply does not panic")
        .map_err(|e| refused(ErrorCode::BadOverlay, e.to_string()))?
        .1;
    let _ = std::fs::remove_file(&file);
    let apply_ms = start.elapsed().as_millis() as u64;
    finish(stream, ctx, &manifest, &digest, &applied, bytes, apply_ms, report.decompress).await
}

/// Resume the applied launch VM, keep it in the cache, say Ready and Complete, and hold
/// the instance until the device is done.
#[allow(clippy::too_many_arguments)]
async fn finish(
    stream: &mut crate::DeviceStream,
    ctx: &Ctx<'_>,
    manifest: &Manifest,
    digest: &str,
    applied: &std::path::Path,
    bytes: u64,
    apply_ms: u64,
    decompress: std::time::Duration,
) -> Result<Outcome, SessionError> {
    let decompress_ms = Some(decompress.as_millis() as u64);
    ctx.place().timing(Timing::Applied { at_ms: ctx.place().elapsed_ms(), decompress_ms });
    let snap = Snapshot::open(applied).map_err(internal)?;
    let ports = Ports { service: manifest.service.as_ref().map(|s| s.port), ..Default::default() };
    // A copy-on-write view of the launch VM: it stays as applied (for the cache), and the
    // shim tracks what the VM writes (residue, handoff).
    let source = Source::View { of: &snap, lineage: Lineage::overlay(&ctx.base, manifest) };
    let prepared = prepare(ctx.place(), source, &snap.manifest().spec, ports).await?;
    let instance = prepared.resume(None, true).await?;
    instance.control.set_movable(true);
    let served = async {
        write(stream, &instance.ready()).await?;
        let decompress_ms = decompress.as_millis() as u64;
        write(
            stream,
            &DeviceMessage::Complete { segments: manifest.segments.len() as u32, bytes, apply_ms, decompress_ms },
        )
        .await?;
        live(Some(stream), ctx.place(), &instance).await
    }
    .await;
    let result = match served {
        Ok(Ending::Residue) => send_residue(stream, ctx, instance, manifest, digest).await.map(|_| ()),
        Ok(Ending::Bye | Ending::Moving | Ending::Moved | Ending::Docking) => {
            instance.finish(ctx.cloudlet).await;
            Ok(())
        }
        Err(e) => {
            instance.finish(ctx.cloudlet).await;
            Err(e)
        }
    };
    // The VM ran on a view: the launch VM goes to the cache as it was applied.
    ctx.cloudlet.cache.store_dir(digest, &ctx.base, applied, manifest);
    result.map(|_| Outcome { bytes })
}
