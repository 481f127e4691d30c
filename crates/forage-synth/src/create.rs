//! Overlay creation: compare the launch VM with its base, then
//! 1. drop free chunks (semantic gap: discarded disk chunks, ext4 free blocks, memory pages
//!    the guest reported free),
//! 2. deduplicate by the paper's five rules (base disk, base memory, within the same space,
//!    zero, across memory and disk), memory first so it holds the canonical copies,
//! 3. delta-encode each unique chunk against the base chunk at the same position, keeping
//!    the delta only when it packs smaller,
//! 4. pack blobs into ~1 MiB segments in offset or access order and compress each.
//!
//! Steps 2-4 and the writing are shared with residues and merges (`pack.rs`). Memory: the
//! base index, one map entry per unique blob (hash -> id), the chunk map, and one segment
//! buffer. Chunk data streams from the files.

use std::path::Path;
use std::time::Instant;

use forage_format::manifest::Service;
use forage_format::{Space, OVERLAY_FORMAT};
use forage_vm::Snapshot;

use crate::base::BaseVm;
use crate::ext4::Checkpoint;
pub use crate::options::{CreateOptions, CreateReport, FsIntrospection};
use crate::pack::{self, changed_chunks, differing, io_err, mark_ext4_free, mark_reported_free, FreeMap, Head, Source};
use crate::SynthError;

/// The launch VM as overlay creation needs it.
pub struct LaunchInput<'a> {
    pub snapshot: &'a Snapshot,
    /// Disk chunks written by the VM (from the disk layer), sorted.
    pub written_disk_chunks: &'a [u64],
    /// Disk chunks the VM discarded, sorted.
    pub discarded_disk_chunks: &'a [u64],
    pub service: Option<Service>,
    /// Chunks touched before the first response (access order), if profiled.
    pub accessed: Option<(&'a [u64], &'a [u64])>,
    /// What is known of the disk's file system at the save (ext4 introspection needs it
    /// checkpointed).
    pub checkpoint: Checkpoint,
}

/// The launch VM's modified chunks (memory, disk; sorted): memory by comparison with the
/// base; disk from the layer's record of writes and discards, less those that hold what
/// the base has (e.g. free space trimmed that was never used).
pub fn modified_chunks(base: &BaseVm, launch: &LaunchInput<'_>) -> Result<(Vec<u64>, Vec<u64>), SynthError> {
    let snap = launch.snapshot;
    let (l_mem, l_disk) = (snap.memory_path(), snap.disk_paths()[0].clone());
    let (b_mem, b_disk) = (base.memory_path(), base.disk_path());
    let memory = changed_chunks(&l_mem, &b_mem).map_err(io_err(&l_mem))?;
    let mut disk: Vec<u64> = launch.written_disk_chunks.iter().chain(launch.discarded_disk_chunks).copied().collect();
    disk.sort_unstable();
    disk.dedup();
    let disk = differing(&l_disk, &b_disk, &disk).map_err(io_err(&l_disk))?;
    Ok((memory, disk))
}

/// Create the overlay of `launch` against `base` at `out` (written as `out.partial` and
/// renamed when complete).
pub fn create(
    base: &BaseVm,
    launch: &LaunchInput<'_>,
    opts: &CreateOptions,
    out: &Path,
) -> Result<CreateReport, SynthError> {
    let start = Instant::now();
    let snap = launch.snapshot;
    let (l_mem, l_disk) = (snap.memory_path(), snap.disk_paths()[0].clone());
    let mem_size = std::fs::metadata(&l_mem).map_err(io_err(&l_mem))?.len();
    let disk_size = std::fs::metadata(&l_disk).map_err(io_err(&l_disk))?.len();
    if mem_size != base.manifest().memory_size || disk_size != base.manifest().disk_size {
        return Err(SynthError::BadFile {
            path: snap.dir().to_path_buf(),
            detail: "launch VM memory or disk size differs from its base".into(),
        });
    }

    let (modified_memory, modified_disk) = modified_chunks(base, launch)?;

    // Semantic gap.
    let mut free = FreeMap::new();
    if opts.semantic_memory {
        mark_reported_free(&l_mem, mem_size, &modified_memory, &mut free)?;
    }
    let mut fs = FsIntrospection::Off;
    if opts.semantic_disk {
        for &i in launch.discarded_disk_chunks {
            free.insert((Space::Disk, i), "trim");
        }
        if base.manifest().disk_introspection {
            fs = mark_ext4_free(&l_disk, &modified_disk, launch.checkpoint, &mut free)?;
        } else {
            fs = FsIntrospection::NoGuestAgent;
        }
    }

    let state = snap.state_path();
    let src = Source { memory: &l_mem, disk: &l_disk, state: &state, label: snap.dir() };
    let classified =
        pack::classify(base, &src, &modified_memory, &modified_disk, &free, opts, opts.packages.as_deref())?;
    let (order_ids, order) = pack::blob_order(&classified, launch.accessed);
    let head = Head {
        format: OVERLAY_FORMAT,
        parent: None,
        memory_size: mem_size,
        disk_size,
        vm: serde_json::json!({ "spec": snap.manifest().spec, "accel": snap.manifest().accel }),
        service: launch.service.clone(),
    };
    let report = pack::write(base, &src, classified, order_ids, order, head, opts, out, start)?;
    Ok(CreateReport { fs, ..report })
}

/// An overlay's chunk segments' bytes attributed to memory and disk: each segment's
/// compressed bytes shared out by the payload its memory and disk blobs hold (a blob
/// belongs to the space of its first occurrence).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpaceBytes {
    pub memory: u64,
    pub disk: u64,
}

pub fn bytes_by_space(m: &forage_format::Manifest) -> SpaceBytes {
    let mut blob_space = vec![Space::Memory; m.blobs.len()];
    for c in &m.chunks {
        if let forage_format::ChunkRef::New(b) = c.reference {
            blob_space[b as usize] = c.space;
        }
    }
    let mut payload = vec![[0u64; 2]; m.segments.len()];
    for (b, blob) in m.blobs.iter().enumerate() {
        payload[blob.segment as usize][(blob_space[b] == Space::Disk) as usize] += blob.len as u64;
    }
    let mut out = SpaceBytes::default();
    for (seg, [mem, disk]) in m.segments.iter().zip(payload) {
        if mem + disk == 0 {
            continue;
        }
        let to_mem = (seg.compressed_len as u128 * mem as u128 / (mem + disk) as u128) as u64;
        out.memory += to_mem;
        out.disk += seg.compressed_len - to_mem;
    }
    out
}
