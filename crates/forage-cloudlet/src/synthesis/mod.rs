//! VM synthesis, the cloudlet's half: the overlay a device offers becomes a running launch
//! VM. After Hello/Welcome (`session`), by the device's choice and the launch-VM cache:
//! - **cached** ([`cached`]): the cloudlet holds the launch VM: resume a copy of it;
//! - **pipelined** ([`pipelined`]): apply the overlay while its segments arrive (receive,
//!   verify, decompress and apply run concurrently through a bounded pipe), then resume;
//!   or store and forward (everything received, then applied: the bench's baseline);
//! - **early start** ([`early`]): resume as soon as the manifest and the device state are
//!   here, from files assembled on demand by the instance's shim; reads of chunks not yet
//!   here fetch their segment out of order while the bulk stream goes on.
//!
//! At the end a device may ask for the instance's residue ([`residue`]).

pub(crate) mod cached;
mod context;
mod early;
mod pipe;
mod pipelined;
pub(crate) mod residue;

use std::path::{Path, PathBuf};

use forage_format::OverlayReader;
use forage_proto::{DeviceMessage, ErrorCode, Offer};
use forage_synth::BaseVm;

use crate::cache::CachedLaunch;
use crate::error::{internal, next, refused, SessionError};
use crate::instance::Outcome;
use crate::Cloudlet;

pub(crate) use context::{overlay_digest, Ctx};

/// How the device asked for it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Asked {
    pub early_start: bool,
    pub store_and_forward: bool,
}

/// After Welcome: the launch VM from the cache, or the manifest (or the overlay's URL),
/// its checks, and the mode the device asked for.
pub(crate) async fn run(
    stream: &mut crate::DeviceStream,
    ctx: &Ctx<'_>,
    offer: &Offer,
    cached: Option<CachedLaunch>,
    asked: Asked,
) -> Result<Outcome, SessionError> {
    if let Some(launch) = cached {
        return cached::run(stream, ctx, launch).await;
    }
    let cloudlet = ctx.cloudlet;
    let base = &ctx.base;
    // Manifest (or where to fetch the overlay): check it before anything is written. Its
    // size is capped by what an overlay of this base can hold.
    let manifest_limit = forage_format::manifest::raw_limit_for(base.manifest().memory_size, base.manifest().disk_size);
    let (prefix, remote) = match next::<DeviceMessage>(stream, cloudlet.peer_wait).await? {
        DeviceMessage::Manifest { bytes } => (bytes, None),
        DeviceMessage::OverlayUrl { url } => {
            let policy = cloudlet.fetch_policy.clone();
            let remote =
                tokio::task::spawn_blocking(move || forage_remote::RemoteOverlay::open(&url, &policy, manifest_limit))
                    .await
                    .expect("no panic")
                    .map_err(|e| {
                        // The device learns that the fetch failed, not what the server (or the
                        // network behind the cloudlet) said: that stays in the cloudlet's log.
                        tracing::warn!(session = ctx.id, "overlay by URL: {e}");
                        let why = match e {
                            forage_remote::RemoteError::Refused { source, .. } => source.to_string(),
                            forage_remote::RemoteError::Overlay { source, .. } => {
                                format!("the fetched overlay: {source}")
                            }
                            _ => "the overlay URL could not be fetched (the cloudlet's log says why)".into(),
                        };
                        refused(ErrorCode::BadOverlay, why)
                    })?;
            if !offer.overlay_digest.is_empty() && remote.digest() != offer.overlay_digest {
                return Err(refused(
                    ErrorCode::BadOverlay,
                    format!("the overlay at {} is not the one offered (digest {})", remote.url, remote.digest()),
                ));
            }
            (remote.prefix.clone(), Some(std::sync::Arc::new(remote)))
        }
        other => return Err(SessionError::Sequence { expected: "Manifest or OverlayUrl", got: other.name() }),
    };
    let manifest = OverlayReader::open_limited(&prefix[..], manifest_limit)
        .map_err(|e| refused(ErrorCode::BadOverlay, e.to_string()))?
        .manifest()
        .clone();
    // The manifest (whose hashes cover every segment) must be the one offered: the cache
    // entry and the signature are for that digest.
    if overlay_digest(&prefix) != offer.overlay_digest {
        return Err(refused(ErrorCode::BadOverlay, "the manifest sent is not the overlay offered (digests differ)"));
    }
    if manifest.base.digest != base.digest() {
        return Err(refused(ErrorCode::BadOverlay, "the manifest names another base than the one agreed"));
    }
    if (manifest.memory_size, manifest.disk_size) != (base.manifest().memory_size, base.manifest().disk_size) {
        return Err(refused(ErrorCode::BadOverlay, "the manifest's memory and disk sizes are not its base's"));
    }
    crate::cpu::check_overlay(cloudlet, &manifest)?;
    check_space(&ctx.dir, &manifest, base)?;
    let packages = check_packages(&manifest, base).await?;
    if let Some(parent) = &manifest.parent {
        return Err(refused(
            ErrorCode::BadOverlay,
            format!("this is a residue of overlay {parent}: merge it into its overlay first"),
        ));
    }
    let early_start = asked.early_start && !asked.store_and_forward;
    match (early_start, remote) {
        (true, remote) => early::run(stream, ctx, manifest, prefix, remote, packages).await,
        (false, Some(remote)) => pipelined::run_remote(stream, ctx, manifest, remote).await,
        (false, None) => pipelined::run(stream, ctx, manifest, prefix, !asked.store_and_forward).await,
    }
}

/// An overlay naming Debian packages (format 3) needs them on this cloudlet: their volume
/// is found or built from its .debs now, before any segment is transferred: the session
/// is refused if a .deb is missing (not found) or the .debs do not make the volume the
/// overlay describes (bad overlay). Returns the volume's path.
async fn check_packages(manifest: &forage_format::Manifest, base: &BaseVm) -> Result<Option<PathBuf>, SessionError> {
    use forage_synth::SynthError;
    let Some(set) = manifest.packages.clone() else { return Ok(None) };
    let store = base.packages();
    match tokio::task::spawn_blocking(move || store.volume(&set)).await.expect("no panic") {
        Ok(p) => Ok(Some(p)),
        Err(e @ SynthError::MissingPackages { .. }) => Err(refused(ErrorCode::NotFound, e.to_string())),
        Err(e @ SynthError::VolumeMismatch { .. }) => Err(refused(ErrorCode::BadOverlay, e.to_string())),
        Err(e) => Err(internal(format!("the overlay's package volume: {e}"))),
    }
}

/// Refuse a session whose files would not fit in the free space of the session folder's
/// file system (with 64 MiB to spare): the overlay as sent, its chunks decompressed, and
/// a launch VM the size of the base as allocated.
fn check_space(dir: &Path, manifest: &forage_format::Manifest, base: &BaseVm) -> Result<(), SessionError> {
    use std::os::unix::fs::MetadataExt;
    let allocated = |p: PathBuf| std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0);
    let raw: u64 = manifest.segments.iter().map(|s| s.raw_len).sum();
    // A package volume still to build (format 3).
    let volume = match &manifest.packages {
        Some(p) if !base.packages().has_volume(p) => p.blocks * forage_format::CHUNK_SIZE as u64,
        _ => 0,
    };
    let needed = manifest.segments_bytes()
        + raw
        + allocated(base.memory_path())
        + allocated(base.disk_path())
        + volume
        + (64 << 20);
    let free = match rustix::fs::statvfs(dir.parent().unwrap_or(dir)) {
        Ok(s) => s.f_bavail.saturating_mul(s.f_frsize),
        Err(e) => return Err(internal(format!("free space of {}: {e}", dir.display()))),
    };
    if free < needed {
        return Err(refused(
            ErrorCode::Busy,
            format!(
                "not enough disk space on the cloudlet for this overlay: it needs {} MiB, {} MiB are free",
                needed >> 20,
                free >> 20
            ),
        ));
    }
    Ok(())
}

/// With a signers list (`DATA/trust/signers`), the offered overlay must carry a good
/// signature by one of them; checked before anything is received, looked up or started.
pub(crate) fn check_signature(cloudlet: &Cloudlet, offer: &Offer) -> Result<(), SessionError> {
    let path = cloudlet.data.root().join("trust").join("signers");
    let Some(allowed) = forage_trust::signing::allowed_signers(&path).map_err(internal)? else { return Ok(()) };
    let short = forage_trust::short(&offer.overlay_digest);
    if offer.signature.is_empty() {
        return Err(refused(
            ErrorCode::BadOverlay,
            format!(
                "overlay {short} is not signed, and this cloudlet accepts only overlays signed by its listed signers"
            ),
        ));
    }
    let sig = forage_trust::signing::Signature::parse(&offer.signature)
        .map_err(|e| refused(ErrorCode::BadOverlay, format!("overlay {short}: signature: {e}")))?;
    sig.verify(forage_trust::signing::OVERLAY, &offer.overlay_digest, &allowed)
        .map_err(|e| refused(ErrorCode::BadOverlay, format!("overlay {short}: {e}")))?;
    tracing::info!(overlay = short, signer = forage_trust::short(&sig.signer), "signature verified");
    Ok(())
}
