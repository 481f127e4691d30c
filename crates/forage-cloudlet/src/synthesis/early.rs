//! Early start: the launch VM resumes once the manifest and the device state are here.
//!
//! Its memory and disk are files of a FUSE mount that the instance's shim assembles on
//! demand (`forage-assembly`). Four things run at once on the session's connection:
//! - the receiver reads segments (bulk, in the overlay's access order, and fetched ones)
//!   and queues them for the shim, and answers Checkpoints;
//! - the feeder hands them to the shim in order (a few at a time: a bounded queue) and
//!   keeps a copy of the overlay for the launch-VM cache;
//! - the writer sends Fetch requests as soon as a read of the VM needs a missing segment
//!   (the shim tells), and the session's own messages (Ready, Complete, Usage);
//! - the launcher waits for the device state, resumes the VM from the mount, says Ready,
//!   and says Complete once every segment is applied.
//!
//! A device that stays silent for `peer_wait` while segments are still due, a corrupted
//! segment, or a disconnect before the end fail the session: the view fails every waiting
//! read, the VM is stopped, the shim ends, the files are removed. A complete overlay is
//! kept (written as it arrived, segments at their offsets) for the launch-VM cache.
//! Until the overlay is complete the instance depends on this daemon for its segments:
//! if the daemon goes away, the shim stops it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use forage_format::Manifest;
use forage_proto::asynchronous::{read, write};
use forage_proto::{DeviceMessage, ErrorCode, ProtoError};
use forage_remote::RemoteOverlay;
use forage_shim::ShimClient;
use forage_state::Timing;
use forage_vm::Snapshot;
use tokio::sync::mpsc;

use super::context::{overlay_digest, Ctx};
use super::residue::send_residue;
use crate::error::{internal, refused, SessionError};
use crate::handoff::{carry_out, Carried};
use crate::instance::{prepare, Ending, Instance, Lineage, Outcome, Ports, Source};

/// The overlay as it arrives, each segment written at its place: a complete copy feeds
/// the launch-VM cache.
struct OverlayCopy {
    file: File,
    path: PathBuf,
    offsets: Vec<u64>,
}

impl OverlayCopy {
    fn create(path: PathBuf, prefix: &[u8], m: &Manifest) -> std::io::Result<Self> {
        let file = File::create(&path)?;
        file.write_all_at(prefix, 0)?;
        let mut offsets = Vec::with_capacity(m.segments.len());
        let mut at = prefix.len() as u64;
        for s in &m.segments {
            offsets.push(at);
            at += s.compressed_len;
        }
        file.set_len(at)?;
        Ok(Self { file, path, offsets })
    }
}

async fn usage(shim: &ShimClient, label: String) -> DeviceMessage {
    let s = shim.status().await.map(|s| s.stats).unwrap_or_default();
    DeviceMessage::Usage {
        label,
        blobs_accessed: s.blobs_accessed,
        blobs: s.blobs,
        demand_fetches: s.demand_fetches,
        segments_arrived: s.segments_arrived,
        segments: s.segments,
    }
}

pub(crate) async fn run(
    stream: &mut crate::DeviceStream,
    ctx: &Ctx<'_>,
    manifest: Manifest,
    prefix: Vec<u8>,
    remote: Option<Arc<RemoteOverlay>>,
    packages: Option<PathBuf>,
) -> Result<Outcome, SessionError> {
    let start = Instant::now();
    let cloudlet = ctx.cloudlet;
    let digest = overlay_digest(&prefix);
    let copy = OverlayCopy::create(ctx.dir.join("overlay"), &prefix, &manifest).map_err(internal)?;
    let spec = forage_synth::apply::launch_spec(&manifest, &ctx.base, &PathBuf::from("from the device"))
        .map_err(|e| refused(ErrorCode::BadOverlay, e.to_string()))?;
    let ports = Ports { service: manifest.service.as_ref().map(|s| s.port), ..Default::default() };
    let source = Source::Overlay {
        manifest: &manifest,
        base_memory: ctx.base.memory_path(),
        base_disk: ctx.base.disk_path(),
        packages,
        lineage: Lineage::overlay(&ctx.base, &manifest),
    };
    let prepared = prepare(ctx.place(), source, &spec, ports).await?;
    let shim = prepared.shim();
    let fetch_rx = shim.take_fetches().expect("a new shim's fetches");

    // Fetches go to the device, or (overlay by URL) to the cloudlet's own fetcher.
    let (mut device_fetches, url_fetches) = match &remote {
        None => (Some(fetch_rx), None),
        Some(_) => (None, Some(fetch_rx)),
    };
    let (mut rd, mut wr) = tokio::io::split(&mut *stream);
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<DeviceMessage>();
    // Follow requests go from the receiver to the instance's life (the instance is not
    // there yet when the receiver starts).
    let (follow_tx, mut follow_rx) = mpsc::unbounded_channel::<String>();
    let writer = async {
        loop {
            let device_fetch = async {
                match device_fetches.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            let m = tokio::select! {
                biased;
                Some(s) = device_fetch => DeviceMessage::Fetch { index: s },
                m = out_rx.recv() => match m { Some(m) => m, None => return Ok::<_, ProtoError>(()) },
            };
            write(&mut wr, &m).await?;
        }
    };

    // Segments go to the shim through a bounded queue (a few segments), in order.
    let (seg_tx, mut seg_rx) = mpsc::channel::<(u32, Vec<u8>)>(4);
    let feeder = {
        let shim = shim.clone();
        async move {
            while let Some((index, data)) = seg_rx.recv().await {
                if let Err(e) = shim.add_segment(index, data.clone()).await {
                    return Err(e.to_string());
                }
                let (file, at, path) = (
                    copy.file.try_clone().map_err(|e| e.to_string())?,
                    copy.offsets[index as usize],
                    copy.path.clone(),
                );
                tokio::task::spawn_blocking(move || {
                    file.write_all_at(&data, at).map_err(|e| format!("{}: {e}", path.display()))
                })
                .await
                .expect("no panic")?;
            }
            Ok::<(), String>(())
        }
    };
    let n = manifest.segments.len();
    if let (Some(remote), Some(fetches)) = (remote.clone(), url_fetches) {
        tokio::spawn(fetch_from_url(remote, fetches, seg_tx.clone(), shim.clone()));
    }
    let device_sends = remote.is_none();
    let receiver = {
        let (shim, out_tx) = (shim.clone(), out_tx.clone());
        let manifest = &manifest;
        async move {
            let mut got = vec![false; n];
            // With the overlay by URL the device sends no segments: it may say Bye at once.
            let (mut count, mut bytes) = (if device_sends { 0usize } else { n }, 0u64);
            loop {
                let m = if count < n {
                    match tokio::time::timeout(cloudlet.peer_wait, read::<DeviceMessage>(&mut rd)).await {
                        Ok(m) => m,
                        Err(_) => return Err(SessionError::Timeout(cloudlet.peer_wait)),
                    }
                } else {
                    read::<DeviceMessage>(&mut rd).await
                };
                match m {
                    Ok(DeviceMessage::Segment { .. }) if !device_sends => {
                        return Err(refused(
                            ErrorCode::Protocol,
                            "segments sent for an overlay the cloudlet fetches itself",
                        ));
                    }
                    Ok(DeviceMessage::Segment { index, bytes: data }) => {
                        let Some(seg) = manifest.segments.get(index as usize) else {
                            return Err(refused(ErrorCode::Protocol, format!("segment {index} does not exist")));
                        };
                        if data.len() as u64 != seg.compressed_len {
                            return Err(refused(
                                ErrorCode::Protocol,
                                format!(
                                    "segment {index} has {} bytes, the manifest says {}",
                                    data.len(),
                                    seg.compressed_len
                                ),
                            ));
                        }
                        if !std::mem::replace(&mut got[index as usize], true) {
                            count += 1;
                            bytes += data.len() as u64;
                            if count == n {
                                ctx.place().timing(Timing::Received(ctx.place().elapsed_ms()));
                            }
                            if seg_tx.send((index, data)).await.is_err() {
                                // The feeder stopped: its error is reported instead.
                                return Err(refused(ErrorCode::BadOverlay, "segment rejected"));
                            }
                        }
                    }
                    Ok(DeviceMessage::Checkpoint { label }) => {
                        ctx.place().checkpoint(&label);
                        let _ = out_tx.send(usage(&shim, label).await);
                    }
                    Ok(DeviceMessage::Follow { to }) => {
                        let _ = follow_tx.send(to);
                    }
                    Ok(DeviceMessage::Bye) | Err(ProtoError::Closed) if count == n => return Ok((bytes, Ending::Bye)),
                    Ok(DeviceMessage::WantResidue) if count == n => return Ok((bytes, Ending::Residue)),
                    Err(ProtoError::Closed) => {
                        return Err(refused(
                            ErrorCode::Protocol,
                            format!("device hung up with {count} of {n} segments sent"),
                        ))
                    }
                    Ok(other) => {
                        return Err(SessionError::Sequence {
                            expected: "Segment, Checkpoint or Bye",
                            got: other.name(),
                        })
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
    };

    let ready_tx = out_tx.clone();
    let launcher = {
        let (shim, manifest) = (shim.clone(), &manifest);
        async move {
            let state = shim
                .wait_device_state(Duration::from_secs(3600))
                .await
                .map_err(|e| refused(ErrorCode::BadOverlay, e.to_string()))?;
            let launch = ctx.dir.join("launch");
            std::fs::create_dir_all(&launch).map_err(internal)?;
            // The snapshot names its files inside its folder: links to the mount's files.
            let (memory, disk) = (launch.join(forage_assembly::MEMORY_FILE), launch.join(forage_assembly::DISK_FILE));
            let (mounted_memory, mounted_disk) = (
                shim.hello.memory.clone().ok_or_else(|| internal("the shim serves no view"))?,
                shim.hello.disk.clone().ok_or_else(|| internal("the shim serves no view"))?,
            );
            std::os::unix::fs::symlink(mounted_memory, &memory).map_err(internal)?;
            std::os::unix::fs::symlink(mounted_disk, &disk).map_err(internal)?;
            let state_copy = launch.join(forage_vm::snapshot::STATE_FILE);
            std::fs::copy(&state, &state_copy).map_err(internal)?;
            forage_synth::apply::write_launch_snapshot(
                &launch,
                manifest,
                spec,
                &memory,
                &disk,
                &state_copy,
                cloudlet.accel,
            )
            .map_err(internal)?;
            let snap = Snapshot::open(&launch).map_err(internal)?;
            let instance = prepared.resume(Some(&snap), true).await?;
            let _ = ready_tx.send(instance.ready());
            tracing::info!(session = %ctx.id, after_ms = start.elapsed().as_millis() as u64, "early start: VM resumed");
            Ok::<Instance, SessionError>(instance)
        }
    };

    // The session: the launcher and then the instance's life, with the receiver going on
    // meanwhile; the writer and the feeder run until everything else is done.
    let session = async {
        tokio::pin!(receiver);
        // A view that fails while the VM is being resumed (a corrupt segment) ends the
        // launch with its reason: a QEMU whose reads of the view fail may never answer
        // (dropping the launcher kills it).
        let view_failed = async {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                match shim.status().await {
                    Ok(s) if s.failure.is_some() => {
                        return refused(ErrorCode::BadOverlay, s.failure.unwrap_or_default())
                    }
                    Ok(_) => {}
                    Err(e) => return internal(e),
                }
            }
        };
        let launched = tokio::select! {
            r = &mut receiver => Err(match r {
                Ok(_) => refused(ErrorCode::Protocol, "device said Bye before the VM was ready"),
                Err(e) => e,
            }),
            l = launcher => l,
            e = view_failed => Err(e),
        };
        let instance = match launched {
            Ok(i) => i,
            // A launch that failed on a failed view (QEMU could not read it): the view's
            // reason is the one to tell.
            Err(e) => {
                let e = match shim.status().await {
                    Ok(s) if s.failure.is_some() => refused(ErrorCode::BadOverlay, s.failure.unwrap_or_default()),
                    _ => e,
                };
                return (None, Err(e));
            }
        };
        // Complete once every segment is applied; the receiver goes on until Bye.
        let complete = async {
            loop {
                match shim.status().await {
                    Ok(s) if s.failure.is_some() => {
                        return Err(refused(ErrorCode::BadOverlay, s.failure.unwrap_or_default()))
                    }
                    Ok(s) if s.complete => return Ok(s.stats),
                    Ok(_) => {}
                    Err(e) => return Err(internal(e)),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::pin!(complete);
        let mut sent_complete = false;
        let mut arrived = 0;
        let result = loop {
            tokio::select! {
                r = &mut receiver => break r,
                c = &mut complete, if !sent_complete => {
                    let s = match c {
                        Ok(s) => s,
                        Err(e) => break Err(e),
                    };
                    sent_complete = true;
                    ctx.place().timing(Timing::Applied { at_ms: ctx.place().elapsed_ms(), decompress_ms: None });
                    arrived = s.bytes_arrived;
                    // Everything is here: the instance no longer needs its device's
                    // segments, and may move.
                    instance.control.set_movable(true);
                    instance.control.set_dockable(true);
                    let apply_ms = start.elapsed().as_millis() as u64;
                    let _ = out_tx.send(DeviceMessage::Complete { segments: s.segments, bytes: s.bytes_arrived, apply_ms, decompress_ms: 0 });
                    tracing::info!(session = %ctx.id, apply_ms, stats = ?s, "early start: every segment applied");
                }
                _ = instance.control.notified() => break Err(instance.control.error()),
                _ = instance.control.ordered(), if sent_complete => {
                    match carry_out(ctx.place(), &instance).await {
                        Carried::Moved(moved) => {
                            let _ = out_tx.send(moved);
                            break Ok((arrived, Ending::Moved));
                        }
                        Carried::Stayed => {
                            if let Some(message) = instance.control.not_followed() {
                                let _ = out_tx.send(DeviceMessage::NotFollowed { message });
                            }
                        }
                        Carried::Stopped(e) => break Err(e),
                    }
                }
                _ = instance.control.dock_ordered(), if sent_complete => {
                    // Docked like any running instance (`instance::dock`): its VM is
                    // saved out of the view, whose segments have all arrived.
                    match crate::instance::dock::carry_out(ctx.place(), &instance).await {
                        crate::instance::dock::Docked::Stayed => {}
                        crate::instance::dock::Docked::Ended(e) => break Err(e),
                    }
                }
                Some(to) = follow_rx.recv() => {
                    if let Err(message) = instance.control.follow(&to) {
                        let _ = out_tx.send(DeviceMessage::NotFollowed { message });
                    }
                }
                _ = instance.gone() => {
                    // A view that failed (a corrupt segment) stops the VM: say why.
                    break Err(match shim.status().await {
                        Ok(s) if s.failure.is_some() => refused(ErrorCode::BadOverlay, s.failure.unwrap_or_default()),
                        _ => refused(ErrorCode::Internal, "the instance's VM stopped"),
                    });
                }
            }
        };
        instance.control.set_dockable(false);
        drop(out_tx);
        (Some(instance), result)
    };
    let feeding = async {
        let r = feeder.await;
        if let Err(e) = &r {
            let _ = shim.fail(e.clone()).await;
        }
        r
    };
    let ((instance, result), written, fed) = tokio::join!(session, writer, feeding);
    drop(wr); // the stream is whole again (for the residue; the read half went with the receiver)
    let mut result = match (result, fed) {
        (Err(e), _) => Err(e),
        (Ok(_), Err(e)) => Err(refused(ErrorCode::BadOverlay, e)),
        (Ok(r), Ok(())) => Ok(r),
    };
    if let Err(e) = &result {
        let _ = shim.fail(e.to_string()).await;
    }
    let complete = shim.status().await.is_ok_and(|s| s.complete);
    match (instance, &result) {
        // The VM's writes reach the view when QEMU exits: save it, then diff.
        (Some(i), Ok((_, Ending::Residue))) => {
            if let Err(e) = send_residue(stream, ctx, i, &manifest, &digest).await {
                result = Err(e);
            }
        }
        (Some(i), _) => i.finish(cloudlet).await,
        (None, _) => {
            let _ = shim.shutdown().await;
        }
    }
    let (bytes, _) = result?;
    let bytes = if device_sends { bytes } else { shim.status().await.map(|s| s.stats.bytes_arrived).unwrap_or(bytes) };
    if let Err(e) = written {
        tracing::debug!("writing to the device: {e}");
    }
    if complete {
        let kept = ctx.cloudlet.data.launch_cache().join(format!(".overlay-{}", ctx.id));
        if std::fs::create_dir_all(ctx.cloudlet.data.launch_cache()).is_ok()
            && std::fs::rename(ctx.dir.join("overlay"), &kept).is_ok()
        {
            cloudlet.cache.store_overlay(digest.clone(), ctx.base.clone(), kept, manifest.clone(), cloudlet.accel);
        }
    }
    Ok(Outcome { bytes })
}

/// Overlay by URL: the cloudlet fetches segments itself, demand fetches first, then the
/// bulk in overlay order, one range request each. A failure fails the view (and with it
/// the session).
async fn fetch_from_url(
    remote: Arc<RemoteOverlay>,
    mut fetches: mpsc::UnboundedReceiver<u32>,
    segments: mpsc::Sender<(u32, Vec<u8>)>,
    shim: Arc<ShimClient>,
) {
    let n = remote.manifest.segments.len();
    let mut done = vec![false; n];
    let mut next_bulk = 0;
    loop {
        let i = match fetches.try_recv() {
            Ok(i) => i as usize,
            Err(_) if next_bulk < n => {
                next_bulk += 1;
                next_bulk - 1
            }
            Err(_) => return,
        };
        if i >= n || std::mem::replace(&mut done[i], true) {
            continue;
        }
        let r = remote.clone();
        match tokio::task::spawn_blocking(move || r.segment(i)).await.expect("no panic") {
            Ok(data) => {
                if segments.send((i as u32, data)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!("fetching the overlay: {e}");
                let _ = shim.fail("the overlay URL could not be fetched (the cloudlet's log says why)").await;
                return;
            }
        }
    }
}
