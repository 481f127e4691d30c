//! The launch-VM cache: a second synthesis of the same overlay on this cloudlet resumes a
//! copy of the launch VM the first one built, and the device sends nothing but its Hello.
//!
//! Entries are snapshot folders under `DATA/cache/launch/DIGEST/` (the digest is the
//! overlay's manifest SHA-256, which covers every segment's hash), recorded in the state
//! database; the least recently used go beyond `max_entries`. An entry is only ever
//! written complete: it is built aside and renamed into place.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use forage_format::manifest::Service;
use forage_format::Manifest;
use forage_state::{NewCacheEntry, State};
use forage_synth::BaseVm;
use forage_vm::Snapshot;

/// The overlay's manifest (zstd CBOR, as in the overlay): service, and the parent of
/// residues made from this launch VM.
const MANIFEST_FILE: &str = "overlay-manifest.zst";

pub struct LaunchCache {
    dir: PathBuf,
    state: State,
    pub max_entries: usize,
    enabled: AtomicBool,
}

/// A cached launch VM.
pub struct CachedLaunch {
    pub snapshot: Snapshot,
    pub manifest: Option<Manifest>,
    pub digest: String,
}

impl CachedLaunch {
    pub fn service(&self) -> Option<&Service> {
        self.manifest.as_ref().and_then(|m| m.service.as_ref())
    }
}

impl LaunchCache {
    pub fn new(dir: PathBuf, state: State) -> Self {
        Self { dir, state, max_entries: 16, enabled: AtomicBool::new(true) }
    }

    /// Turn the cache on or off (off: no lookups, nothing stored; entries are kept).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::SeqCst);
    }

    fn enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    fn entry_dir(&self, digest: &str) -> Option<PathBuf> {
        (digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit())).then(|| self.dir.join(digest))
    }

    /// The launch VM of overlay `digest`, if cached and intact (a damaged entry is dropped).
    pub fn lookup(&self, digest: &str) -> Option<CachedLaunch> {
        if !self.enabled() {
            return None;
        }
        let dir = self.entry_dir(digest)?;
        self.state.cache_entry(digest).ok()??;
        match Snapshot::open(&dir.join("snapshot")) {
            Ok(snapshot) => {
                let _ = self.state.cache_get(digest); // counts the hit
                let manifest = std::fs::read(dir.join(MANIFEST_FILE)).ok().and_then(|b| Manifest::decode(&b).ok());
                Some(CachedLaunch { snapshot, manifest, digest: digest.into() })
            }
            Err(e) => {
                tracing::warn!("dropping damaged cache entry {digest}: {e}");
                self.evict(digest);
                None
            }
        }
    }

    /// Remove an entry (files and record).
    pub fn evict(&self, digest: &str) {
        if let Some(dir) = self.entry_dir(digest) {
            let _ = std::fs::remove_dir_all(dir);
        }
        let _ = self.state.cache_remove(digest);
    }

    /// Keep the finished launch VM folder `launch` (moved, not copied).
    pub fn store_dir(&self, digest: &str, base: &BaseVm, launch: &Path, manifest: &Manifest) {
        if let Err(e) = self
            .try_store(digest, base, manifest, |snapshot| std::fs::rename(launch, snapshot).map_err(|e| e.to_string()))
        {
            tracing::warn!("launch VM {digest} not cached: {e}");
        }
    }

    /// Build the launch VM from a complete overlay file (an early-start session's copy of
    /// what arrived) in the background, then keep it; the overlay file is removed.
    pub fn store_overlay(
        self: &std::sync::Arc<Self>,
        digest: String,
        base: BaseVm,
        overlay: PathBuf,
        manifest: Manifest,
        accel: forage_vm::Accel,
    ) {
        let cache = self.clone();
        tokio::task::spawn_blocking(move || {
            let result = cache.try_store(&digest, &base, &manifest, |snapshot| {
                forage_synth::apply::apply(&overlay, &base, snapshot, accel).map(|_| ()).map_err(|e| e.to_string())
            });
            if let Err(e) = result {
                tracing::warn!("launch VM {digest} not cached: {e}");
            }
            let _ = std::fs::remove_file(&overlay);
        });
    }

    fn try_store(
        &self,
        digest: &str,
        base: &BaseVm,
        manifest: &Manifest,
        build: impl FnOnce(&Path) -> Result<(), String>,
    ) -> Result<(), String> {
        if !self.enabled() {
            return Ok(());
        }
        let Some(target) = self.entry_dir(digest) else { return Err("no overlay digest".into()) };
        if target.exists() {
            return Ok(());
        }
        let partial = self.dir.join(format!(".{digest}.partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial).map_err(|e| format!("{}: {e}", partial.display()))?;
        let built = build(&partial.join("snapshot")).and_then(|()| {
            std::fs::write(partial.join(MANIFEST_FILE), manifest.encode()).map_err(|e| e.to_string())?;
            std::fs::rename(&partial, &target).map_err(|e| e.to_string())
        });
        if let Err(e) = built {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
        let bytes = allocated_bytes(&target);
        self.state
            .cache_put(&NewCacheEntry {
                overlay_digest: digest.into(),
                base_digest: base.digest().into(),
                dir: target,
                bytes,
            })
            .map_err(|e| e.to_string())?;
        tracing::info!(digest, bytes, "launch VM cached");
        self.trim();
        Ok(())
    }

    /// Drop the least recently used entries beyond `max_entries`.
    fn trim(&self) {
        let Ok(entries) = self.state.cache_list() else { return };
        for e in entries.iter().take(entries.len().saturating_sub(self.max_entries)) {
            self.evict(&e.overlay_digest);
        }
    }
}

fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        match entry.metadata() {
            Ok(m) if m.is_dir() => total += allocated_bytes(&entry.path()),
            Ok(m) => total += m.blocks() * 512,
            Err(_) => {}
        }
    }
    total
}
