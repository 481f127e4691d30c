//! The destination side of a handoff: accept (with or without the base), rebuild the
//! VM's memory and disk in a copy-on-write view of the base (or of an empty VM) served
//! by the instance's shim, and resume only after the commit, when every segment has
//! arrived and applied. Until then nothing runs, and any failure removes the session
//! folder with all it holds.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use forage_format::Space as FileSpace;
use forage_handoff::apply::{Applier, ChunkStore};
use forage_handoff::migration::MAX_RESIDUAL;
use forage_handoff::segment::{ChunkId, Space, CHUNK};
use forage_proto::asynchronous::write;
use forage_proto::{ErrorCode, HandoffBegin, PeerMessage};
use forage_shim::{ChunkBytes, ShimClient};
use forage_state::{NewSession, SessionMode};
use forage_vm::snapshot::{SnapshotManifest, StateRecord, MANIFEST_FILE};
use forage_vm::Snapshot;
use sha2::Digest;

use super::live::live;
use crate::error::{internal, next, refused, SessionError};
use crate::instance::{prepare, Lineage, Outcome, Place, Ports, Source};

/// Machine types a peer's VM may have: those forage builds.
const MACHINES: &[&str] = &["pc"];
/// Largest boot file (kernel, initramfs).
const MAX_BOOT_FILE: u64 = 512 << 20;
/// QEMU migration stream header: "QEVM", version 3.
const STREAM_MAGIC: [u8; 8] = [0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3];

fn bad(why: impl std::fmt::Display) -> SessionError {
    refused(ErrorCode::Handoff, why.to_string())
}

/// Receive the instance `begin` offers, from the cloudlet `peer`, then keep it running.
pub(crate) async fn receive(
    stream: &mut crate::DeviceStream,
    place: Place<'_>,
    from: &str,
    peer: &str,
    begin: HandoffBegin,
) -> Result<Outcome, SessionError> {
    let cloudlet = place.cloudlet;
    // Everything the peer describes is checked before anything is looked up or written:
    // file names plain, hardware this cloudlet builds, sizes within its limits.
    let vm: SnapshotManifest =
        serde_json::from_slice(&begin.vm).map_err(|e| bad(format!("the VM description: {e}")))?;
    vm.check_fits(&cloudlet.limits.vm, MACHINES).map_err(|e| bad(format!("the VM description: {e}")))?;
    forage_trust::check_peer_name(&begin.instance).map_err(|e| bad(format!("the instance's id: {e}")))?;
    if vm.disks.len() != 1 {
        return Err(bad("the VM must have exactly one disk"));
    }
    let token = match begin.service_token.as_str() {
        "" => None,
        t => Some(
            hex::decode(t)
                .ok()
                .and_then(|b| <[u8; forage_proto::service::TOKEN_BYTES]>::try_from(b).ok())
                .ok_or_else(|| bad("the service token is not 32 hex digits"))?,
        ),
    };
    tracing::info!(session = place.id, from = peer, instance = begin.instance, "handoff arriving");
    let record = NewSession {
        id: place.id.into(),
        device: peer.into(),
        base_digest: begin.base_state_sha256.clone(),
        overlay_digest: begin.instance.clone(),
        mode: SessionMode::Handoff,
    };
    if let Err(e) = cloudlet.state.session_started(&record) {
        tracing::warn!("session {} not recorded: {e}", place.id);
    }
    let want = (begin.base_state_sha256.clone(), vm.hardware_fingerprint.clone());
    // The saved VM the instance comes from: a service VM, or a base VM (a synthesized
    // instance's), if this cloudlet holds it.
    let (services, data) = (cloudlet.services.list(), cloudlet.data.clone());
    let base = tokio::task::spawn_blocking(move || {
        let bases =
            forage_synth::BaseVm::list(&data).into_iter().filter_map(|(_, b)| b.ok()).map(|b| b.snapshot().clone());
        services
            .into_iter()
            .filter_map(|s| s.snapshot().ok())
            .chain(bases)
            .find(|s| (&s.manifest().state.sha256, &s.manifest().hardware_fingerprint) == (&want.0, &want.1))
    })
    .await
    .expect("no panic");
    let has_base = base.is_some();
    write(stream, &PeerMessage::HandoffAccept { has_base }).await?;
    let base = match base {
        Some(b) => b,
        None => empty_vm(stream, place, vm).await?,
    };
    let ports = Ports { service: begin.service_port, extra: &begin.extra_ports, token };
    let source = Source::View { of: &base, lineage: Lineage::of(&base) };
    let prepared = prepare(place, source, &base.manifest().spec, ports).await?;
    let view = Snapshot::open(&prepared.view_snapshot().expect("a view")).map_err(internal)?;
    let received = match rebuild(stream, place, prepared.shim(), &view, &base, has_base).await {
        Ok(r) => r,
        Err(e) => {
            let _ = prepared.shim().shutdown().await;
            return Err(e);
        }
    };
    // The snapshot as opened before the rebuild wrote its final state (its description
    // still names the base's).
    crate::faults::probe_handoff(&begin.instance, "destination", &view.memory_path(), &view.disk_paths()[0]).await;
    if crate::faults::injected("handoff-commit-lost") {
        tracing::warn!(session = place.id, "fault injected: the commit is dropped");
        let _ = prepared.shim().shutdown().await;
        let _ = tokio::io::AsyncWriteExt::shutdown(stream).await;
        return Err(SessionError::Proto(forage_proto::ProtoError::Closed));
    }
    // Everything is here: from now on this copy runs, whatever becomes of the link; a
    // source that does not hear HandoffDone asks (HandoffQuery) and learns it.
    if let Err(e) = crate::handoff::arrival::note(place.dir, from, &begin.instance) {
        let _ = prepared.shim().shutdown().await;
        return Err(internal(format!("{}: {e}", place.dir.display())));
    }
    let instance = prepared.resume(Some(&view), false).await?;
    let done =
        PeerMessage::HandoffDone { service: instance.service.clone(), resumed_after_ms: instance.resumed_after_ms };
    let answered = match crate::faults::injected("handoff-done-lost") {
        true => {
            let _ = tokio::io::AsyncWriteExt::shutdown(stream).await;
            Err(forage_proto::ProtoError::Closed)
        }
        false => write(stream, &done).await,
    };
    match answered {
        Ok(()) => tracing::info!(session = place.id, endpoint = instance.endpoint, "handed-off instance running"),
        Err(e) => tracing::warn!(
            session = place.id,
            "handed-off instance running; the source did not hear it ({e}): it will ask"
        ),
    }
    instance.control.set_movable(true);
    let life = live(None, place, &instance).await;
    instance.finish(cloudlet).await;
    life.map(|_| Outcome { bytes: received })
}

/// Receive segments until the commit, writing what they carry into the view; write the
/// final state. Returns the bytes received.
async fn rebuild(
    stream: &mut crate::DeviceStream,
    place: Place<'_>,
    shim: Arc<ShimClient>,
    view: &Snapshot,
    base: &Snapshot,
    has_base: bool,
) -> Result<u64, SessionError> {
    let files = if has_base {
        let open = |p: &Path| File::open(p).map_err(|e| internal(format!("{}: {e}", p.display())));
        Some((open(&base.memory_path())?, open(&base.disk_paths()[0])?))
    } else {
        None
    };
    let store = ViewStore { base: files, pending: Vec::new() };
    let m = base.manifest();
    let mut applier = Some(Applier::new(store, m.memory.size, m.disks[0].size));
    let mut received = 0u64;
    let t = Instant::now();
    loop {
        match next::<PeerMessage>(stream, place.cloudlet.peer_wait).await? {
            PeerMessage::HandoffSegment { seq, bytes } => {
                let n = bytes.len() as u64;
                received += n;
                let mut a = applier.take().expect("the applier is back");
                let (mut a, r) = tokio::task::spawn_blocking(move || {
                    let r = a.apply(seq, &bytes);
                    (a, r)
                })
                .await
                .expect("no panic");
                let writes = std::mem::take(&mut a.store().pending);
                applier = Some(a);
                r.map_err(|e| bad(forage_proto::one_line(&e)))?;
                // One call per space and segment, in order.
                for space in [Space::Memory, Space::Disk] {
                    let chunks: Vec<ChunkBytes> = writes
                        .iter()
                        .filter(|(id, _)| id.space == space)
                        .map(|(id, data)| ChunkBytes { index: id.index, bytes: data.clone() })
                        .collect();
                    if !chunks.is_empty() {
                        shim.write(file_space(space), chunks).await.map_err(internal)?;
                    }
                }
                write(stream, &PeerMessage::HandoffAck { seq, bytes: n }).await?;
            }
            PeerMessage::HandoffCommit { segments, state } => {
                let applied = applier.as_ref().expect("the applier is back").applied;
                if applied.segments != segments {
                    return Err(bad(format!("the source sent {segments} segments, {} arrived", applied.segments)));
                }
                received += state.len() as u64;
                let stream_bytes = unpack_state(&state)?;
                std::fs::write(view.state_path(), stream_bytes)
                    .map_err(|e| internal(format!("{}: {e}", view.state_path().display())))?;
                tracing::info!(
                    session = place.id,
                    segments,
                    chunks = applied.chunks,
                    written = applied.written,
                    received,
                    took_ms = t.elapsed().as_millis() as u64,
                    "handoff state complete"
                );
                return Ok(received);
            }
            other => {
                return Err(SessionError::Sequence { expected: "HandoffSegment or HandoffCommit", got: other.name() })
            }
        }
    }
}

/// The final state (untrusted): zstd, bounded, a QEMU stream.
fn unpack_state(packed: &[u8]) -> Result<Vec<u8>, SessionError> {
    let mut out = Vec::new();
    zstd::stream::Decoder::new(packed)
        .and_then(|d| d.take(MAX_RESIDUAL as u64 + 1).read_to_end(&mut out))
        .map_err(|e| bad(format!("the VM's final state: {e}")))?;
    if out.len() > MAX_RESIDUAL {
        return Err(bad("the VM's final state is too large"));
    }
    if !out.starts_with(&STREAM_MAGIC) {
        return Err(bad("the VM's final state is not a QEMU migration stream"));
    }
    Ok(out)
}

/// Without the base: an empty VM of the same hardware (sparse zero memory and disk),
/// with the boot files the source sends.
async fn empty_vm(
    stream: &mut crate::DeviceStream,
    place: Place<'_>,
    mut vm: SnapshotManifest,
) -> Result<Snapshot, SessionError> {
    let dir = place.dir.join("empty-vm");
    std::fs::create_dir_all(&dir).map_err(internal)?;
    let io = |e: std::io::Error| internal(format!("{}: {e}", dir.display()));
    if let Some(boot) = vm.spec.boot.as_mut() {
        let (kernel, initrd) = (dir.join("kernel"), dir.join("initrd"));
        let open = [File::create(&kernel).map_err(io)?, File::create(&initrd).map_err(io)?];
        let mut sizes = [0u64; 2];
        let mut done = [false; 2];
        while !done.iter().all(|d| *d) {
            let PeerMessage::HandoffFile { name, offset, bytes, last } =
                next::<PeerMessage>(stream, place.cloudlet.peer_wait).await?
            else {
                return Err(SessionError::Sequence { expected: "HandoffFile", got: "another message" });
            };
            let i = match name.as_str() {
                "kernel" => 0,
                "initrd" => 1,
                other => return Err(bad(format!("boot file {other:?} is neither kernel nor initrd"))),
            };
            if done[i] || offset != sizes[i] || sizes[i] + bytes.len() as u64 > MAX_BOOT_FILE {
                return Err(bad(format!("boot file {name}: piece at {offset} out of order or too large")));
            }
            open[i].write_all_at(&bytes, offset).map_err(io)?;
            sizes[i] += bytes.len() as u64;
            done[i] = last;
        }
        boot.kernel = kernel;
        boot.initrd = initrd;
    }
    for rec in std::iter::once(&vm.memory).chain(&vm.disks) {
        File::create(dir.join(&rec.file)).and_then(|f| f.set_len(rec.size)).map_err(io)?;
    }
    // A placeholder state: the real one arrives with the commit.
    std::fs::write(dir.join(&vm.state.file), STREAM_MAGIC).map_err(io)?;
    vm.state = StateRecord {
        file: vm.state.file.clone(),
        size: STREAM_MAGIC.len() as u64,
        sha256: hex::encode(sha2::Sha256::digest(STREAM_MAGIC)),
    };
    std::fs::write(dir.join(MANIFEST_FILE), serde_json::to_vec_pretty(&vm).expect("serializes")).map_err(io)?;
    Snapshot::open(&dir).map_err(|e| bad(format!("the VM description: {e}")))
}

/// The base's chunks (for deltas); what a segment writes is gathered and handed to the
/// shim after the segment applied.
struct ViewStore {
    base: Option<(File, File)>,
    pending: Vec<(ChunkId, Vec<u8>)>,
}

fn file_space(space: Space) -> FileSpace {
    match space {
        Space::Memory => FileSpace::Memory,
        Space::Disk => FileSpace::Disk,
    }
}

impl ChunkStore for ViewStore {
    fn base(&mut self, id: ChunkId) -> Option<Vec<u8>> {
        let (memory, disk) = self.base.as_ref()?;
        let file = if id.space == Space::Memory { memory } else { disk };
        let mut buf = vec![0u8; CHUNK];
        file.read_exact_at(&mut buf, id.index * CHUNK as u64).ok()?;
        Some(buf)
    }

    fn write(&mut self, id: ChunkId, data: &[u8]) -> std::io::Result<()> {
        self.pending.push((id, data.to_vec()));
        Ok(())
    }
}
