//! Copy-on-write views of a saved VM: its memory and disk served through a
//! `forage-assembly` FUSE mount whose every chunk comes from the saved files, with the
//! VM's writes kept in the view's own sparse files. Starting an instance this way copies
//! nothing: every instance of a service VM starts from the same state, and the saved VM
//! is never written. Access profiling uses the same view with its reads recorded.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use forage_assembly::{Assembly, Mount};
use forage_format::manifest::{BaseRef, DeviceState, Stats};
use forage_format::{Manifest, Order, CHUNK_SIZE};
use forage_vm::Snapshot;

use crate::{DataDir, SynthError};

/// A mounted copy-on-write view of a snapshot. `snapshot` is a folder that looks like the
/// original (same `state` and description) with memory and disk linked to the mount:
/// restore it with `RestoreOptions { copy_disks: false, .. }` and the spec's memory and
/// disk set to its own paths. Dropping the view detaches the mount; remove `dir` after.
pub struct CowView {
    pub assembly: Arc<Assembly>,
    pub snapshot: Snapshot,
    /// The saved VM the view is of (its files are the view's unchanged chunks).
    pub base: Snapshot,
    pub dir: PathBuf,
    mount: Option<Mount>,
}

impl CowView {
    /// Mount a view of `saved` under `dir` (created; must not hold a previous view).
    /// `readahead` is the kernel's read-ahead on the view's files.
    pub fn mount(saved: &Snapshot, dir: &Path, readahead: u32) -> Result<Self, SynthError> {
        let (files, mnt, snap_dir) = (dir.join("assembly"), dir.join("mnt"), dir.join("snapshot"));
        for d in [&files, &mnt, &snap_dir] {
            DataDir::ensure(d)?;
        }
        let bad =
            |p: &Path, e: &dyn std::fmt::Display| SynthError::BadFile { path: p.to_path_buf(), detail: e.to_string() };
        let assembly = Arc::new(
            Assembly::new(
                identity_manifest(saved),
                &saved.memory_path(),
                &saved.disk_paths()[0],
                None,
                &files,
                Box::new(|_| {}),
            )
            .map_err(|e| bad(saved.dir(), &e))?,
        );
        let mount = Mount::new(assembly.clone(), &mnt, readahead).map_err(|e| bad(&mnt, &e))?;
        let m = saved.manifest();
        let io = |source| SynthError::Io { path: snap_dir.clone(), source };
        for (name, target) in [(&m.memory.file, mount.memory_path()), (&m.disks[0].file, mount.disk_path())] {
            std::os::unix::fs::symlink(&target, snap_dir.join(name)).map_err(io)?;
        }
        for name in [&m.state.file, &forage_vm::snapshot::MANIFEST_FILE.to_string()] {
            std::fs::copy(saved.dir().join(name), snap_dir.join(name)).map_err(io)?;
        }
        let snapshot = Snapshot::open(&snap_dir)?;
        Ok(Self { assembly, snapshot, base: saved.clone(), dir: dir.to_path_buf(), mount: Some(mount) })
    }

    /// Bytes the instance has written so far (its own copy-on-write data).
    pub fn written_bytes(&self) -> u64 {
        [forage_format::Space::Memory, forage_format::Space::Disk]
            .iter()
            .map(|s| self.assembly.written_chunks(*s).len() as u64 * CHUNK_SIZE as u64)
            .sum()
    }
}

impl Drop for CowView {
    fn drop(&mut self) {
        // Wake anything blocked on the view, then detach the mount (lazily: a QEMU being
        // killed may still hold the files).
        self.assembly.fail("view closed");
        drop(self.mount.take());
    }
}

/// A manifest that changes nothing: the assembly then serves the snapshot's own files.
pub(crate) fn identity_manifest(saved: &Snapshot) -> Manifest {
    let m = saved.manifest();
    Manifest {
        format: forage_format::OVERLAY_FORMAT,
        base: BaseRef { digest: String::new(), name: "saved VM".into() },
        parent: None,
        disk_size: m.disks[0].size,
        memory_size: m.memory.size,
        chunk_size: CHUNK_SIZE as u32,
        chunks: Vec::new(),
        blobs: Vec::new(),
        segments: Vec::new(),
        order: Order::Offset,
        device_state: DeviceState { segment: 0, size: 0, sha256: String::new() },
        vm: serde_json::Value::Null,
        service: None,
        stats: Stats::default(),
        created_unix: 0,
        creator: String::new(),
        packages: None,
    }
}
