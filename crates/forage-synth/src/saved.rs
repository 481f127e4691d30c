//! The overlay of a launch VM prepared by hand: a VM the operator resumed from the base
//! (`forage vm restore NAME --base B`), changed, and saved (`forage vm save NAME`), or a
//! VM imported from a QEMU or libvirt save (`forage vm import`).
//!
//! Disk changes: a VM resumed from the base runs on a qcow2 layer over the base's disk,
//! so the layer says which chunks it wrote or discarded (`qemu-img map`). An imported VM
//! (a raw disk) has no such record: every chunk is compared with the base's. Memory is
//! always compared chunk by chunk. ext4 introspection: nothing here froze the guest's file
//! system, so only a file system that shows itself clean is trusted (`ext4::Checkpoint::Unknown`).

use std::path::Path;
use std::process::Command;

use forage_format::manifest::Service;
use forage_format::CHUNK_SIZE;
use forage_vm::{DiskFormat, Snapshot};

use crate::create::{CreateOptions, CreateReport, LaunchInput};
use crate::ext4::Checkpoint;
use crate::{run_tool, BaseVm, SynthError};

/// How the disk's changes were known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskTracking {
    /// The VM ran on a qcow2 layer over the base's disk: its written and discarded chunks.
    Layer { written: usize, discarded: usize },
    /// Unknown (imported, or a raw copy of the disk): every chunk compared.
    EveryChunk { chunks: u64 },
}

impl std::fmt::Display for DiskTracking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskTracking::Layer { written, discarded } => {
                write!(f, "disk changes from the VM's qcow2 layer: {written} chunks written, {discarded} discarded")
            }
            DiskTracking::EveryChunk { chunks } => {
                write!(f, "disk changes unknown (no layer): all {chunks} chunks compared with the base")
            }
        }
    }
}

/// Write the overlay of the saved VM `snapshot` against `base` at `out` (scratch in
/// `work`, removed after). The VM must have the base's hardware.
pub fn overlay_of_saved_vm(
    base: &BaseVm,
    snapshot: &Snapshot,
    service: Option<Service>,
    opts: &CreateOptions,
    out: &Path,
    work: &Path,
) -> Result<(CreateReport, DiskTracking), SynthError> {
    let m = snapshot.manifest();
    let bad = |detail: String| SynthError::BadFile { path: snapshot.dir().to_path_buf(), detail };
    if m.hardware_fingerprint != base.snapshot().manifest().hardware_fingerprint {
        return Err(bad(format!(
            "the VM's hardware differs from base {}'s: it was not made from this base",
            base.manifest().name
        )));
    }
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work).map_err(|source| SynthError::Io { path: work.to_path_buf(), source })?;
    let r = (|| {
        let flat = flatten_saved_vm(snapshot, work)?;
        let input = LaunchInput {
            snapshot: &flat.snapshot,
            written_disk_chunks: &flat.written,
            discarded_disk_chunks: &flat.discarded,
            service,
            accessed: None,
            checkpoint: Checkpoint::Unknown,
        };
        let report = crate::create::create(base, &input, opts, out)?;
        Ok((report, flat.tracking))
    })();
    let _ = std::fs::remove_dir_all(work);
    r
}

/// A saved VM as overlay creation takes it.
#[derive(Debug)]
pub struct FlatSavedVm {
    /// With a raw disk: a copy in `work` (the qcow2 layer flattened), or the VM's own save.
    pub snapshot: Snapshot,
    /// Disk chunks to compare with the base's (sorted), and chunks discarded.
    pub written: Vec<u64>,
    pub discarded: Vec<u64>,
    pub tracking: DiskTracking,
}

/// The saved VM `snapshot` with a raw disk and its disk's changes: a qcow2 layer is
/// flattened into `work/snapshot/` (which must exist and be empty; the VM's save is left
/// as it is) and says which chunks were written; a raw disk is the save itself, every
/// chunk to compare.
pub fn flatten_saved_vm(snapshot: &Snapshot, work: &Path) -> Result<FlatSavedVm, SynthError> {
    let m = snapshot.manifest();
    if m.disks.len() != 1 || m.spec.disks.len() != 1 {
        return Err(SynthError::BadFile {
            path: snapshot.dir().to_path_buf(),
            detail: format!("a launch VM has one disk, this one has {}", m.disks.len()),
        });
    }
    Ok(match m.spec.disks[0].format {
        DiskFormat::Qcow2 => {
            let layer = snapshot.disk_paths()[0].clone();
            let (written, discarded) = crate::launch::layer_chunks(&layer)?;
            let tracking = DiskTracking::Layer { written: written.len(), discarded: discarded.len() };
            FlatSavedVm { snapshot: flat_copy(snapshot, &layer, work)?, written, discarded, tracking }
        }
        DiskFormat::Raw => {
            let chunks = m.disks[0].size.div_ceil(CHUNK_SIZE as u64);
            let tracking = DiskTracking::EveryChunk { chunks };
            FlatSavedVm { snapshot: snapshot.clone(), written: (0..chunks).collect(), discarded: Vec::new(), tracking }
        }
    })
}

/// A copy of `snapshot` in `work` with its qcow2 layer flattened to a raw disk (the VM's
/// own save is left as it is; the layer names its backing file absolutely).
fn flat_copy(snapshot: &Snapshot, layer: &Path, work: &Path) -> Result<Snapshot, SynthError> {
    let dir = work.join("snapshot");
    std::fs::create_dir_all(&dir).map_err(|source| SynthError::Io { path: dir.clone(), source })?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SynthError::Io { path, source }
    };
    let files = [snapshot.memory_path(), snapshot.state_path(), layer.to_path_buf()];
    for from in files.iter().chain([&snapshot.dir().join(forage_vm::snapshot::MANIFEST_FILE)]) {
        let to = dir.join(from.file_name().expect("a file"));
        forage_vm::sparse::copy_sparse(from, &to).map_err(io(from))?;
    }
    let flat = work.join("disk0.raw");
    run_tool(Command::new("qemu-img").args(["convert", "-q", "-f", "qcow2", "-O", "raw"]).arg(layer).arg(&flat))?;
    let mut s = Snapshot::open(&dir)?;
    s.replace_disk_with_raw(0, &flat)?;
    Ok(Snapshot::open(&dir)?)
}
