//! Early start: the launch VM resumes once the manifest and the device state are here.
//!
//! Its memory and disk are files of a FUSE mount assembled on demand (`forage-assembly`).
//! Three things run at once on the session's connection:
//! - the receiver reads segments (bulk, in the overlay's access order, and fetched ones)
//!   and hands them to the applier thread, and answers Checkpoints;
//! - the writer sends Fetch requests as soon as a read of the VM needs a missing segment,
//!   and the session's own messages (Ready, Complete, Usage);
//! - the launcher waits for the device state, resumes the VM from the mount, says Ready,
//!   and says Complete once every segment is applied.
//!
//! A device that stays silent for `peer_wait` while segments are still due, a corrupted
//! segment, or a disconnect before the end fail the session: the assembly fails every
//! waiting read, the VM is stopped, the mount and files removed. A complete overlay is
//! kept (written as it arrived, segments at their offsets) for the launch-VM cache.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use forage_assembly::{Assembly, Mount};
use forage_format::Manifest;
use forage_remote::RemoteOverlay;
use forage_proto::asynchronous::{read, write};
use forage_proto::{ErrorCode, Message, ProtoError};
use forage_vm::Snapshot;
use tokio::sync::mpsc;

use crate::residue::{send_residue, Ending, LaunchRef};
use crate::session::{internal, refused, resume, Ctx, Instance, Outcome, SessionError};

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

fn usage(assembly: &Assembly, label: String) -> Message {
    let s = assembly.stats();
    Message::Usage {
        label,
        blobs_accessed: s.blobs_accessed,
        blobs: s.blobs,
        demand_fetches: s.demand_fetches,
        segments_arrived: s.segments_arrived,
        segments: s.segments,
    }
}

pub(crate) async fn run(stream: &mut crate::DeviceStream, ctx: &Ctx<'_>, manifest: Manifest, prefix: Vec<u8>, remote: Option<Arc<RemoteOverlay>>) -> Result<Outcome, SessionError> {
    let start = Instant::now();
    let cloudlet = ctx.cloudlet;
    let digest = crate::session::overlay_digest(&prefix);
    let (work, mnt) = (ctx.dir.join("assembly"), ctx.dir.join("mnt"));
    for d in [&work, &mnt] {
        std::fs::create_dir_all(d).map_err(internal)?;
    }
    let copy = OverlayCopy::create(ctx.dir.join("overlay"), &prefix, &manifest).map_err(internal)?;
    let (fetch_tx, fetch_rx) = mpsc::unbounded_channel::<u32>();
    let fetch = Box::new(move |s: u32| {
        let _ = fetch_tx.send(s);
    });
    let assembly = Arc::new(Assembly::new(manifest.clone(), &ctx.base.memory_path(), &ctx.base.disk_path(), &work, fetch).map_err(internal)?);
    let mount = Mount::new(assembly.clone(), &mnt, cloudlet.readahead).map_err(internal)?;

    // Fetches go to the device, or (overlay by URL) to the cloudlet's own fetcher.
    let (mut device_fetches, url_fetches) = match &remote {
        None => (Some(fetch_rx), None),
        Some(_) => (None, Some(fetch_rx)),
    };
    let (mut rd, mut wr) = tokio::io::split(&mut *stream);
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Message>();
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
                Some(s) = device_fetch => Message::Fetch { index: s },
                m = out_rx.recv() => match m { Some(m) => m, None => return Ok::<_, ProtoError>(()) },
            };
            write(&mut wr, &m).await?;
        }
    };

    // Segments go to the applier thread through a bounded queue (a few segments).
    let (seg_tx, mut seg_rx) = mpsc::channel::<(u32, Vec<u8>)>(4);
    let applier = {
        let assembly = assembly.clone();
        tokio::task::spawn_blocking(move || -> Result<Duration, String> {
            let mut busy = Duration::ZERO;
            while let Some((index, data)) = seg_rx.blocking_recv() {
                let t = Instant::now();
                if let Err(e) = assembly.add_segment(index, &data) {
                    assembly.fail(e.to_string());
                    return Err(e.to_string());
                }
                busy += t.elapsed();
                copy.file.write_all_at(&data, copy.offsets[index as usize]).map_err(|e| format!("{}: {e}", copy.path.display()))?;
            }
            Ok(busy)
        })
    };
    let n = manifest.segments.len();
    if let (Some(remote), Some(fetches)) = (remote.clone(), url_fetches) {
        tokio::spawn(fetch_from_url(remote, fetches, seg_tx.clone(), assembly.clone()));
    }
    let device_sends = remote.is_none();
    let receiver = {
        let (assembly, out_tx) = (assembly.clone(), out_tx.clone());
        let manifest = &manifest;
        async move {
            let mut got = vec![false; n];
            // With the overlay by URL the device sends no segments: it may say Bye at once.
            let (mut count, mut bytes) = (if device_sends { 0usize } else { n }, 0u64);
            loop {
                let m = if count < n {
                    match tokio::time::timeout(cloudlet.peer_wait, read(&mut rd)).await {
                        Ok(m) => m,
                        Err(_) => return Err(SessionError::Timeout(cloudlet.peer_wait)),
                    }
                } else {
                    read(&mut rd).await
                };
                match m {
                    Ok(Message::Segment { .. }) if !device_sends => {
                        return Err(refused(ErrorCode::Protocol, "segments sent for an overlay the cloudlet fetches itself"));
                    }
                    Ok(Message::Segment { index, bytes: data }) => {
                        let Some(seg) = manifest.segments.get(index as usize) else {
                            return Err(refused(ErrorCode::Protocol, format!("segment {index} does not exist")));
                        };
                        if data.len() as u64 != seg.compressed_len {
                            return Err(refused(ErrorCode::Protocol, format!("segment {index} has {} bytes, the manifest says {}", data.len(), seg.compressed_len)));
                        }
                        if !std::mem::replace(&mut got[index as usize], true) {
                            count += 1;
                            bytes += data.len() as u64;
                            if seg_tx.send((index, data)).await.is_err() {
                                // The applier stopped: its error is reported instead.
                                return Err(refused(ErrorCode::BadOverlay, "segment rejected"));
                            }
                        }
                    }
                    Ok(Message::Checkpoint { label }) => {
                        let _ = out_tx.send(usage(&assembly, label));
                    }
                    Ok(Message::Bye) | Err(ProtoError::Closed) if count == n => return Ok((bytes, Ending::Bye)),
                    Ok(Message::WantResidue) if count == n => return Ok((bytes, Ending::Residue)),
                    Err(ProtoError::Closed) => return Err(refused(ErrorCode::Protocol, format!("device hung up with {} of {n} segments sent", count))),
                    Ok(other) => return Err(SessionError::Sequence { expected: "Segment, Checkpoint or Bye", got: other.name() }),
                    Err(e) => return Err(e.into()),
                }
            }
        }
    };

    let ready_tx = out_tx.clone();
    let (mount_ref, manifest_ref, assembly_ref) = (&mount, &manifest, assembly.clone());
    let launcher = async move {
        let (mount, manifest, assembly) = (mount_ref, manifest_ref, assembly_ref);
        let a = assembly.clone();
        let state = tokio::task::spawn_blocking(move || a.wait_device_state(Duration::from_secs(3600))).await.expect("no panic").map_err(internal)?;
        let launch = ctx.dir.join("launch");
        std::fs::create_dir_all(&launch).map_err(internal)?;
        let spec = forage_synth::apply::launch_spec(manifest, &ctx.base, &PathBuf::from("from the device")).map_err(|e| refused(ErrorCode::BadOverlay, e.to_string()))?;
        // The snapshot names its files inside its folder: links to the mount's files.
        let (memory, disk) = (launch.join(forage_assembly::MEMORY_FILE), launch.join(forage_assembly::DISK_FILE));
        std::os::unix::fs::symlink(mount.memory_path(), &memory).map_err(internal)?;
        std::os::unix::fs::symlink(mount.disk_path(), &disk).map_err(internal)?;
        let state_copy = launch.join(forage_vm::snapshot::STATE_FILE);
        std::fs::copy(&state, &state_copy).map_err(internal)?;
        forage_synth::apply::write_launch_snapshot(&launch, manifest, spec, &memory, &disk, &state_copy, cloudlet.accel).map_err(internal)?;
        let snap = Snapshot::open(&launch).map_err(internal)?;
        let instance = resume(ctx.place(), &snap, manifest.service.as_ref().map(|s| s.port), &[], true).await?;
        let _ = ready_tx.send(instance.ready());
        tracing::info!(session = %ctx.id, after_ms = start.elapsed().as_millis() as u64, stats = ?assembly.stats(), "early start: VM resumed");
        Ok::<Instance, SessionError>(instance)
    };

    // The session: the launcher and then the instance's life, with the receiver going on
    // meanwhile; the writer runs until everything else is done.
    let session = async {
        tokio::pin!(receiver);
        let launched = tokio::select! {
            r = &mut receiver => Err(match r {
                Ok(_) => refused(ErrorCode::Protocol, "device said Bye before the VM was ready"),
                Err(e) => e,
            }),
            l = launcher => l,
        };
        let instance = match launched {
            Ok(i) => i,
            Err(e) => return (None, Err(e)),
        };
        // Complete once every segment is applied; the receiver goes on until Bye.
        let complete = async {
            loop {
                if let Some(why) = assembly.failure() {
                    return Err(refused(ErrorCode::BadOverlay, why));
                }
                if assembly.is_complete() {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::pin!(complete);
        let mut sent_complete = false;
        let result = loop {
            tokio::select! {
                r = &mut receiver => break r,
                c = &mut complete, if !sent_complete => {
                    if let Err(e) = c {
                        break Err(e);
                    }
                    sent_complete = true;
                    let apply_ms = start.elapsed().as_millis() as u64;
                    let s = assembly.stats();
                    let _ = out_tx.send(Message::Complete { segments: s.segments, bytes: s.bytes_arrived, apply_ms, decompress_ms: 0 });
                    tracing::info!(session = %ctx.id, apply_ms, stats = ?s, "early start: every segment applied");
                }
                _ = instance.stop.notified() => break Err(instance.stop.error()),
            }
        };
        drop(out_tx);
        (Some(instance), result)
    };
    let ((instance, result), written) = tokio::join!(session, writer);
    drop(wr); // the stream is whole again (for the residue; the read half went with the receiver)
    if let Err(e) = &result {
        assembly.fail(e.to_string());
    }
    let mut result = result;
    if let Some(i) = instance {
        match result {
            // The VM's writes reach the assembly when QEMU exits: save it, then diff.
            Ok((_, Ending::Residue)) => {
                if let Err(e) = send_residue(stream, ctx, i.vm, &manifest, &digest, LaunchRef::Assembly(&assembly)).await {
                    result = Err(e);
                }
            }
            _ => {
                let _ = i.vm.shutdown().await;
            }
        }
    }
    assembly.fail("session ended");
    let _ = tokio::task::spawn_blocking(move || drop(mount)).await;
    let applied = applier.await.expect("applier does not panic");
    let busy = applied.map_err(|e| refused(ErrorCode::BadOverlay, e))?;
    let (bytes, _) = result?;
    let bytes = if device_sends { bytes } else { assembly.stats().bytes_arrived };
    if let Err(e) = written {
        tracing::debug!("writing to the device: {e}");
    }
    tracing::debug!(?busy, "applier time");
    if assembly.is_complete() {
        let kept = ctx.cloudlet.data.launch_cache().join(format!(".overlay-{}", ctx.id));
        if std::fs::create_dir_all(ctx.cloudlet.data.launch_cache()).is_ok() && std::fs::rename(ctx.dir.join("overlay"), &kept).is_ok() {
            cloudlet.cache.store_overlay(digest.clone(), ctx.base.clone(), kept, manifest.clone(), cloudlet.accel);
        }
    }
    Ok(Outcome { bytes })
}

/// Overlay by URL: the cloudlet fetches segments itself, demand fetches first, then the
/// bulk in overlay order, one range request each. A failure fails the assembly (and with
/// it the session).
async fn fetch_from_url(remote: Arc<RemoteOverlay>, mut fetches: mpsc::UnboundedReceiver<u32>, segments: mpsc::Sender<(u32, Vec<u8>)>, assembly: Arc<Assembly>) {
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
            Err(e) => return assembly.fail(format!("fetching the overlay: {e}")),
        }
    }
}
