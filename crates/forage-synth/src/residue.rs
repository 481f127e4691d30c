//! VM residue (the paper's Figure 1): what an instance changed since it was synthesized,
//! sent back so the device can fold it into its overlay and the next offload session
//! starts from the adapted state.
//!
//! A residue is an overlay file of format 2 ([`forage_format::RESIDUE_FORMAT`]) whose
//! manifest names its parent overlay by digest (`parent`) and whose chunk map lists only
//! the chunks the instance changed since launch, referenced against the base like any
//! overlay's (zero, free, base chunk, blob), plus the instance's device state. It cannot
//! be applied alone ([`crate::apply::apply`] refuses it); [`merge`] turns parent + residue
//! into an ordinary overlay (format 1) that rebuilds the instance.
//!
//! Merge materializes: the parent is applied into a scratch folder beside the output, the
//! residue's chunks and device state are written over it, and an overlay is created from
//! that folder against the base, over the union of both chunk maps. Chunk data streams
//! through files (no whole-image buffers); the scratch folder is removed on every path.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::Instant;

use forage_format::{
    ChunkRef, Header, Manifest, Order, OverlayReader, Space, CHUNK_SIZE, OVERLAY_FORMAT, RESIDUE_FORMAT,
};
use forage_vm::snapshot::{MEMORY_FILE, STATE_FILE};
use forage_vm::{Accel, Snapshot};

use crate::apply::{apply_into, check_base, write_chunks};
use crate::base::BaseVm;
use crate::create::{CreateOptions, CreateReport, FsIntrospection};
use crate::ext4::Checkpoint;
use crate::pack::{self, differing, io_err, mark_ext4_free, mark_reported_free, FreeMap, Head, Source};
use crate::package::short;
use crate::SynthError;

/// Free-chunk source for chunks that were free in the parent or the residue.
pub const INHERITED_FREE: &str = "inherited";

/// Write the residue of `instance` (a saved instance of the launch VM that `parent`, the
/// overlay with digest `parent_digest`, rebuilds) at `out`: the chunks listed in
/// `changed_memory` / `changed_disk` (any order; repeats are ignored) and the instance's
/// device state. Listed chunks are carried whatever their content, so a list may be
/// conservative but must not miss a change. The semantic gap applies to listed chunks
/// (memory holes are reported free pages; ext4 free blocks). The residue keeps the
/// parent's `vm` and `service`. Written as `out.partial`, renamed when complete.
#[allow(clippy::too_many_arguments)]
pub fn create_residue(
    base: &BaseVm,
    parent: &Manifest,
    parent_digest: &str,
    instance: &Snapshot,
    changed_memory: &[u64],
    changed_disk: &[u64],
    opts: &CreateOptions,
    out: &Path,
) -> Result<CreateReport, SynthError> {
    let start = Instant::now();
    let bad = |detail: String| SynthError::BadFile { path: instance.dir().to_path_buf(), detail };
    if let Some(pp) = &parent.parent {
        return Err(bad(format!("its parent is itself a residue (of overlay {}): merge that first", short(pp))));
    }
    if parent.base.digest != base.digest() {
        return Err(bad(format!(
            "its parent overlay is for base {} ({}), not base {} ({})",
            short(&parent.base.digest),
            parent.base.name,
            short(base.digest()),
            base.manifest().name
        )));
    }
    if parent_digest.len() != 64 || !parent_digest.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(bad(format!("parent digest {parent_digest:?} is not 64 lowercase hex digits")));
    }
    let (i_mem, i_disk) = (instance.memory_path(), instance.disk_paths()[0].clone());
    let mem_size = std::fs::metadata(&i_mem).map_err(io_err(&i_mem))?.len();
    let disk_size = std::fs::metadata(&i_disk).map_err(io_err(&i_disk))?.len();
    if mem_size != base.manifest().memory_size
        || disk_size != base.manifest().disk_size
        || mem_size != parent.memory_size
        || disk_size != parent.disk_size
    {
        return Err(bad("instance memory or disk size differs from its base's".into()));
    }
    let list = |space: Space, given: &[u64], size: u64| -> Result<Vec<u64>, SynthError> {
        let mut v = given.to_vec();
        v.sort_unstable();
        v.dedup();
        match v.last() {
            Some(&last) if last >= size.div_ceil(CHUNK_SIZE as u64) => {
                Err(bad(format!("changed {} chunk {last} is past the end", space.name())))
            }
            _ => Ok(v),
        }
    };
    let memory = list(Space::Memory, changed_memory, mem_size)?;
    let disk = list(Space::Disk, changed_disk, disk_size)?;

    let mut free = FreeMap::new();
    if opts.semantic_memory {
        mark_reported_free(&i_mem, mem_size, &memory, &mut free)?;
    }
    // The instance was saved running, its file system mounted and not frozen: only an
    // image that shows itself checkpointed is introspected.
    let mut fs = FsIntrospection::Off;
    if opts.semantic_disk && !base.manifest().disk_introspection {
        fs = FsIntrospection::NoGuestAgent;
    } else if opts.semantic_disk {
        fs = mark_ext4_free(&i_disk, &disk, Checkpoint::Unknown, &mut free)?;
    }
    let state = instance.state_path();
    let src = Source { memory: &i_mem, disk: &i_disk, state: &state, label: instance.dir() };
    let classified = pack::classify(base, &src, &memory, &disk, &free, opts, None)?;
    let (order_ids, order) = pack::blob_order(&classified, None);
    let head = Head {
        format: RESIDUE_FORMAT,
        parent: Some(parent_digest.to_string()),
        memory_size: mem_size,
        disk_size,
        vm: parent.vm.clone(),
        service: parent.service.clone(),
    };
    let report = pack::write(base, &src, classified, order_ids, order, head, opts, out, start)?;
    Ok(CreateReport { fs, ..report })
}

/// Fold `residue` into `parent` (the overlay it was made from): write at `out` an ordinary
/// overlay against `base` that rebuilds the instance the residue was taken from: the
/// parent's chunks overridden by the residue's, the residue's device state, the parent's
/// `vm` and `service`; access order is kept for the parent's profiled blobs. Chunks free in
/// either stay free (source [`INHERITED_FREE`]) unless that space's semantic gap is off.
pub fn merge(
    base: &BaseVm,
    parent: &Path,
    residue: &Path,
    opts: &CreateOptions,
    out: &Path,
    accel: Accel,
) -> Result<CreateReport, SynthError> {
    let start = Instant::now();
    let (p_header, p) = read_prefix(parent)?;
    let (_, r) = read_prefix(residue)?;
    if let Some(pp) = &p.parent {
        return Err(SynthError::Residue { path: parent.to_path_buf(), parent: short(pp).into() });
    }
    let Some(wanted) = &r.parent else {
        return Err(SynthError::BadFile {
            path: residue.to_path_buf(),
            detail: "is not a residue (it names no parent overlay): apply it as an overlay".into(),
        });
    };
    if *wanted != p_header.digest() {
        return Err(SynthError::NotParent {
            residue: residue.to_path_buf(),
            parent: parent.to_path_buf(),
            wanted: short(wanted).into(),
            have: short(&p_header.digest()).into(),
        });
    }
    check_base(&p, parent, base)?;
    check_base(&r, residue, base)?;

    // The merged chunk map: the parent's, overridden by the residue's.
    let mut effective: BTreeMap<(Space, u64), bool> = BTreeMap::new();
    for c in p.chunks.iter().chain(&r.chunks) {
        effective.insert((c.space, c.index), c.reference == ChunkRef::Free);
    }
    let accessed = parent_accessed(&p);
    let head = Head {
        format: OVERLAY_FORMAT,
        parent: None,
        memory_size: p.memory_size,
        disk_size: p.disk_size,
        vm: p.vm.clone(),
        service: p.service.clone(),
    };
    let profiled = match p.order {
        Order::Access { profiled_chunks, .. } => profiled_chunks,
        Order::Offset => 0,
    };
    drop((p, r));

    let scratch = Scratch::new(out)?;
    let dir = scratch.0.as_path();
    let file = File::open(parent).map_err(io_err(parent))?;
    apply_into(BufReader::with_capacity(1 << 20, file), parent, base, dir, accel)?;
    let (mem, disk, state) = (dir.join(MEMORY_FILE), dir.join("disk0.raw"), dir.join(STATE_FILE));
    let outs = [open_rw(&mem)?, open_rw(&disk)?];
    let file = File::open(residue).map_err(io_err(residue))?;
    let reader = OverlayReader::open(BufReader::with_capacity(1 << 20, file))
        .map_err(|source| SynthError::Overlay { path: residue.to_path_buf(), source })?;
    // A residue names no packages (format 2).
    write_chunks(reader, residue, base, None, &outs, dir)?;
    drop(outs);

    // Chunks of the union that now equal the base need no entry.
    let in_space = |s: Space| effective.keys().filter(move |k| k.0 == s).map(|k| k.1).collect::<Vec<u64>>();
    let memory = differing(&mem, &base.memory_path(), &in_space(Space::Memory)).map_err(io_err(&mem))?;
    let disk_chunks = differing(&disk, &base.disk_path(), &in_space(Space::Disk)).map_err(io_err(&disk))?;
    let mut free = FreeMap::new();
    for (space, list, on) in
        [(Space::Memory, &memory, opts.semantic_memory), (Space::Disk, &disk_chunks, opts.semantic_disk)]
    {
        for &i in list.iter().filter(|_| on) {
            if effective.get(&(space, i)) == Some(&true) {
                free.insert((space, i), INHERITED_FREE);
            }
        }
    }
    drop(effective);
    let src = Source { memory: &mem, disk: &disk, state: &state, label: dir };
    let classified = pack::classify(base, &src, &memory, &disk_chunks, &free, opts, opts.packages.as_deref())?;
    let (order_ids, mut order) = pack::blob_order(&classified, accessed.as_ref().map(|(m, d)| (&m[..], &d[..])));
    if let Order::Access { profiled_chunks, .. } = &mut order {
        *profiled_chunks = profiled;
    }
    pack::write(base, &src, classified, order_ids, order, head, opts, out, start)
}

/// Header and manifest of the overlay file at `path` (segments are not read).
pub fn read_prefix(path: &Path) -> Result<(Header, Manifest), SynthError> {
    let file = File::open(path).map_err(io_err(path))?;
    let r = OverlayReader::open(BufReader::new(file))
        .map_err(|source| SynthError::Overlay { path: path.to_path_buf(), source })?;
    Ok((r.header().clone(), r.manifest().clone()))
}

/// With access order: the chunks (memory, disk) whose blobs were profiled as touched, i.e.
/// the first `accessed_blobs` blobs in file order.
fn parent_accessed(m: &Manifest) -> Option<(Vec<u64>, Vec<u64>)> {
    let Order::Access { accessed_blobs, .. } = m.order else {
        return None;
    };
    let mut ids: Vec<u32> = (0..m.blobs.len() as u32).collect();
    ids.sort_unstable_by_key(|&i| (m.blobs[i as usize].segment, m.blobs[i as usize].offset));
    let touched: HashSet<u32> = ids.into_iter().take(accessed_blobs as usize).collect();
    let (mut mem, mut disk) = (Vec::new(), Vec::new());
    for c in &m.chunks {
        if c.reference.blob().is_some_and(|b| touched.contains(&b)) {
            match c.space {
                Space::Memory => mem.push(c.index),
                Space::Disk => disk.push(c.index),
            }
        }
    }
    Some((mem, disk))
}

/// A scratch folder beside `out`, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(out: &Path) -> Result<Self, SynthError> {
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| SynthError::BadFile { path: out.to_path_buf(), detail: "is not a file name".into() })?;
        let dir = out.with_file_name(format!(".{name}.merge-{}.partial", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.0.display(), error = %e, "cannot remove the merge scratch folder");
            }
        }
    }
}

fn open_rw(p: &Path) -> Result<File, SynthError> {
    OpenOptions::new().read(true).write(true).open(p).map_err(io_err(p))
}
