//! The half of overlay writing that overlays, residues and merges share: given the VM's
//! files and the chunks to describe,
//! 1. classify each chunk against the base: free (semantic gap, decided by the caller),
//!    zero, equal to a base chunk, or a blob (deduplicated within and across spaces),
//!    memory first so it holds the canonical copies;
//! 2. delta-encode each blob against the base chunk at the same position when that packs
//!    smaller, pack blobs into ~1 MiB segments in the chosen order, compress each;
//! 3. write header + manifest + segments to `OUT.partial`, renamed to `OUT` only when
//!    complete (segments are staged in `OUT.segments.partial`, removed on every path).
//!
//! Memory: the base index, one map entry per unique blob (hash -> id), the chunk map, and
//! one segment buffer. Chunk data streams from the files.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use forage_format::chunk::is_zero;
use forage_format::codec::packed_size;
use forage_format::manifest::{BaseRef, DeviceState, Service};
use forage_format::{
    Blob, BlobEncoding, ChunkEntry, ChunkRef, Manifest, Order, PackageSet, Segment, SegmentCodec, SegmentKind, Space,
    Stats, CHUNK_SIZE, PACKAGES_FORMAT,
};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::base::BaseVm;
use crate::deb_volume::PackageIndex;
use crate::ext4::{Checkpoint, Introspection};
use crate::index::{for_each_chunk, sha256};
use crate::options::{CreateOptions, CreateReport, FsIntrospection};
use crate::SynthError;

/// Where free chunks were found, by the semantic gap (`trim`, `ext4`, `reported`, ...).
pub(crate) type FreeMap = HashMap<(Space, u64), &'static str>;

/// The VM whose chunks are described: its memory, disk and device state files.
pub(crate) struct Source<'a> {
    pub memory: &'a Path,
    pub disk: &'a Path,
    pub state: &'a Path,
    /// Named in errors reading the VM's chunks.
    pub label: &'a Path,
}

/// What goes in the manifest besides the chunks.
pub(crate) struct Head {
    pub format: u32,
    pub parent: Option<String>,
    pub memory_size: u64,
    pub disk_size: u64,
    pub vm: serde_json::Value,
    pub service: Option<Service>,
}

struct PendingBlob {
    space: Space,
    index: u64,
}

/// The chunk map, the blobs still to encode (by id), and the statistics so far.
pub(crate) struct Classified {
    pub chunks: Vec<ChunkEntry>,
    pending: Vec<PendingBlob>,
    pub stats: Stats,
    /// The Debian packages that chunks were found in (overlay format 3), if any was.
    packages: Option<PackageSet>,
}

pub(crate) fn io_err(p: &Path) -> impl FnOnce(std::io::Error) -> SynthError {
    let p = p.to_path_buf();
    move |source| SynthError::Io { path: p, source }
}

/// Classify the chunks `memory` and `disk` (sorted, each once) of `src` against `base`
/// and, after the base, the blocks of `packages`.
pub(crate) fn classify(
    base: &BaseVm,
    src: &Source<'_>,
    memory: &[u64],
    disk: &[u64],
    free: &FreeMap,
    opts: &CreateOptions,
    packages: Option<&PackageIndex>,
) -> Result<Classified, SynthError> {
    let packages = packages.filter(|_| opts.dedup);
    let index = if opts.dedup { Some(base.index()?) } else { None };
    let files = [File::open(src.memory).map_err(io_err(src.memory))?, File::open(src.disk).map_err(io_err(src.disk))?];
    let mut seen: HashMap<[u8; 32], (u32, Space)> = HashMap::new();
    let mut pending: Vec<PendingBlob> = Vec::new();
    let mut chunks: Vec<ChunkEntry> = Vec::with_capacity(memory.len() + disk.len());
    let mut stats = Stats {
        modified_memory_chunks: memory.len() as u64,
        modified_disk_chunks: disk.len() as u64,
        ..Stats::default()
    };
    let mut buf = vec![0u8; CHUNK_SIZE];
    for (space, list) in [(Space::Memory, memory), (Space::Disk, disk)] {
        let file = &files[slot(space)];
        for &i in list {
            let reference = if let Some(src) = free.get(&(space, i)) {
                *stats.free_by_source.entry(src.to_string()).or_insert(0) += 1;
                ChunkRef::Free
            } else {
                read_chunk(file, i, &mut buf).map_err(io_err(src.label))?;
                if !opts.dedup {
                    pending.push(PendingBlob { space, index: i });
                    ChunkRef::New(pending.len() as u32 - 1)
                } else if is_zero(&buf) {
                    ChunkRef::Zero
                } else {
                    let hash = sha256(&buf);
                    match index.as_ref().and_then(|ix| ix.lookup(&hash)) {
                        Some((Space::Disk, b)) => ChunkRef::BaseDisk(b),
                        Some((Space::Memory, b)) => ChunkRef::BaseMemory(b),
                        None => match (packages.and_then(|p| p.lookup(&hash)), seen.get(&hash)) {
                            (Some(block), _) => ChunkRef::Package(block),
                            (None, Some(&(blob, first))) if first == space => ChunkRef::SameSpace(blob),
                            (None, Some(&(blob, _))) => ChunkRef::CrossSpace(blob),
                            (None, None) => {
                                let id = pending.len() as u32;
                                seen.insert(hash, (id, space));
                                pending.push(PendingBlob { space, index: i });
                                ChunkRef::New(id)
                            }
                        },
                    }
                }
            };
            *stats.refs.entry(reference.kind().to_string()).or_insert(0) += 1;
            chunks.push(ChunkEntry { space, index: i, reference });
        }
    }
    // Classified memory first (its copies are canonical); stored sorted by (space, index).
    chunks.sort_unstable_by_key(|c| (c.space, c.index));
    let packages = packages.filter(|_| stats.refs.contains_key("package")).map(|p| p.set.clone());
    Ok(Classified { chunks, pending, stats, packages })
}

/// Blob order: blobs of chunks in `accessed` (memory, disk) first, then the rest; without
/// `accessed`, blob id order (chunk order).
pub(crate) fn blob_order(c: &Classified, accessed: Option<(&[u64], &[u64])>) -> (Vec<u32>, Order) {
    let n = c.pending.len() as u32;
    let Some((mem, disk)) = accessed else {
        return ((0..n).collect(), Order::Offset);
    };
    let touched: HashSet<(Space, u64)> =
        mem.iter().map(|&i| (Space::Memory, i)).chain(disk.iter().map(|&i| (Space::Disk, i))).collect();
    let mut first = Vec::new();
    let mut first_set = HashSet::new();
    for ch in &c.chunks {
        if let Some(b) = ch.reference.blob() {
            if touched.contains(&(ch.space, ch.index)) && first_set.insert(b) {
                first.push(b);
            }
        }
    }
    first.sort_unstable();
    let accessed_blobs = first.len() as u64;
    let rest = (0..n).filter(|b| !first_set.contains(b));
    let ids = first.iter().copied().chain(rest).collect();
    (ids, Order::Access { profiled_chunks: (mem.len() + disk.len()) as u64, accessed_blobs })
}

/// Encode, pack and write the overlay at `out` (via `out.partial`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn write(
    base: &BaseVm,
    src: &Source<'_>,
    c: Classified,
    order_ids: Vec<u32>,
    order: Order,
    head: Head,
    opts: &CreateOptions,
    out: &Path,
    start: Instant,
) -> Result<CreateReport, SynthError> {
    let partial = out.with_extension("partial");
    let seg_tmp = out.with_extension("segments.partial");
    let result = write_partial(base, src, c, order_ids, order, head, opts, out, &partial, &seg_tmp);
    let _ = std::fs::remove_file(&seg_tmp);
    match result {
        Ok((manifest, bytes)) => {
            std::fs::rename(&partial, out).map_err(io_err(out))?;
            Ok(CreateReport { manifest, bytes, took: start.elapsed(), fs: FsIntrospection::Off })
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn write_partial(
    base: &BaseVm,
    src: &Source<'_>,
    c: Classified,
    order_ids: Vec<u32>,
    order: Order,
    head: Head,
    opts: &CreateOptions,
    out: &Path,
    partial: &PathBuf,
    seg_tmp: &PathBuf,
) -> Result<(Manifest, u64), SynthError> {
    let Classified { chunks, pending, mut stats, packages } = c;
    let mut seg_file = BufWriter::new(File::create(seg_tmp).map_err(io_err(seg_tmp))?);
    let mut segments = Vec::new();
    let state = std::fs::read(src.state).map_err(io_err(src.state))?;
    push_segment(&mut seg_file, &mut segments, SegmentKind::DeviceState, opts.codec, &state)
        .map_err(io_err(seg_tmp))?;
    let device_state =
        DeviceState { segment: 0, size: state.len() as u64, sha256: hex::encode(Sha256::digest(&state)) };
    drop(state);
    let (b_mem, b_disk) = (base.memory_path(), base.disk_path());
    let files = [File::open(src.memory).map_err(io_err(src.memory))?, File::open(src.disk).map_err(io_err(src.disk))?];
    let base_files = [File::open(&b_mem).map_err(io_err(&b_mem))?, File::open(&b_disk).map_err(io_err(&b_disk))?];
    let mut blobs = vec![Blob { segment: 0, offset: 0, len: 0, encoding: BlobEncoding::Raw }; pending.len()];
    // Blobs are encoded (read, delta) and segments compressed on every core, a batch at a
    // time: a batch is a few segments' worth of blobs, so memory stays a few segments.
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let batch = (2 * cores * opts.segment_bytes / CHUNK_SIZE).max(1);
    let encode = |id: u32| -> Result<(Vec<u8>, BlobEncoding), SynthError> {
        let p = &pending[id as usize];
        let si = slot(p.space);
        let mut buf = vec![0u8; CHUNK_SIZE];
        read_chunk(&files[si], p.index, &mut buf).map_err(io_err(src.label))?;
        let Some(codec) = opts.delta else { return Ok((buf, BlobEncoding::Raw)) };
        let mut base_buf = vec![0u8; CHUNK_SIZE];
        read_chunk(&base_files[si], p.index, &mut base_buf).map_err(io_err(base.dir()))?;
        let d = codec.encode(&base_buf, &buf);
        Ok(if packed_size(&d) < packed_size(&buf) {
            (d, BlobEncoding::Delta { codec, space: p.space, index: p.index })
        } else {
            (buf, BlobEncoding::Raw)
        })
    };
    let mut seg_buf: Vec<u8> = Vec::with_capacity(opts.segment_bytes + CHUNK_SIZE);
    let mut full: Vec<Vec<u8>> = Vec::new();
    let mut ids = order_ids.into_iter().peekable();
    while ids.peek().is_some() {
        let todo: Vec<u32> = ids.by_ref().take(batch).collect();
        let encoded: Vec<(Vec<u8>, BlobEncoding)> = todo.par_iter().map(|&id| encode(id)).collect::<Result<_, _>>()?;
        for (&id, (payload, encoding)) in todo.iter().zip(encoded) {
            match encoding {
                BlobEncoding::Raw => stats.blobs_raw += 1,
                BlobEncoding::Delta { .. } => stats.blobs_delta += 1,
            }
            let segment = (segments.len() + full.len()) as u32;
            blobs[id as usize] = Blob { segment, offset: seg_buf.len() as u32, len: payload.len() as u32, encoding };
            seg_buf.extend_from_slice(&payload);
            stats.delta_bytes += payload.len() as u64;
            if seg_buf.len() >= opts.segment_bytes {
                full.push(std::mem::replace(&mut seg_buf, Vec::with_capacity(opts.segment_bytes + CHUNK_SIZE)));
            }
        }
        if ids.peek().is_none() && !seg_buf.is_empty() {
            full.push(std::mem::take(&mut seg_buf));
        }
        push_segments(&mut seg_file, &mut segments, opts.codec, &mut full).map_err(io_err(seg_tmp))?;
    }
    seg_file.flush().map_err(io_err(seg_tmp))?;
    drop(seg_file);
    stats.modified_bytes = (stats.modified_memory_chunks + stats.modified_disk_chunks) * CHUNK_SIZE as u64;
    stats.dedup_bytes = pending.len() as u64 * CHUNK_SIZE as u64;
    stats.compressed_bytes = segments.iter().filter(|s| s.kind == SegmentKind::Chunks).map(|s| s.compressed_len).sum();
    let manifest = Manifest {
        format: if packages.is_some() { PACKAGES_FORMAT } else { head.format },
        base: BaseRef { digest: base.digest().to_string(), name: base.manifest().name.clone() },
        parent: head.parent,
        disk_size: head.disk_size,
        memory_size: head.memory_size,
        chunk_size: CHUNK_SIZE as u32,
        chunks,
        blobs,
        segments,
        order,
        device_state,
        vm: head.vm,
        service: head.service,
        stats,
        created_unix: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        creator: format!("forage {}", env!("CARGO_PKG_VERSION")),
        packages,
    };
    manifest.validate().map_err(|source| SynthError::Overlay { path: out.to_path_buf(), source })?;
    let mut w = BufWriter::new(File::create(partial).map_err(io_err(partial))?);
    let mut segs = File::open(seg_tmp).map_err(io_err(seg_tmp))?;
    let bytes = forage_format::container::write_overlay(&mut w, &manifest, &mut segs).map_err(io_err(partial))?;
    w.into_inner()
        .map_err(|e| SynthError::Io { path: partial.clone(), source: e.into_error() })?
        .sync_all()
        .map_err(io_err(partial))?;
    Ok((manifest, bytes))
}

/// Compress the chunk segments `raw` (in parallel), append them to `out` in order, and
/// empty `raw`.
fn push_segments(
    out: &mut impl Write,
    segments: &mut Vec<Segment>,
    codec: SegmentCodec,
    raw: &mut Vec<Vec<u8>>,
) -> std::io::Result<()> {
    let compressed: Vec<Vec<u8>> = raw.par_iter().map(|r| codec.compress(r)).collect();
    for (r, c) in raw.drain(..).zip(compressed) {
        out.write_all(&c)?;
        segments.push(Segment {
            kind: SegmentKind::Chunks,
            codec,
            compressed_len: c.len() as u64,
            raw_len: r.len() as u64,
            sha256: hex::encode(Sha256::digest(&c)),
        });
    }
    Ok(())
}

fn push_segment(
    out: &mut impl Write,
    segments: &mut Vec<Segment>,
    kind: SegmentKind,
    codec: SegmentCodec,
    raw: &[u8],
) -> std::io::Result<()> {
    let compressed = codec.compress(raw);
    out.write_all(&compressed)?;
    segments.push(Segment {
        kind,
        codec,
        compressed_len: compressed.len() as u64,
        raw_len: raw.len() as u64,
        sha256: hex::encode(Sha256::digest(&compressed)),
    });
    Ok(())
}

pub(crate) fn slot(s: Space) -> usize {
    if s == Space::Memory {
        0
    } else {
        1
    }
}

/// Read chunk `i` (zero-filled past the end of the file).
pub(crate) fn read_chunk(f: &File, i: u64, buf: &mut [u8]) -> std::io::Result<()> {
    buf.fill(0);
    let off = i * CHUNK_SIZE as u64;
    let mut done = 0;
    while done < buf.len() {
        let n = f.read_at(&mut buf[done..], off + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(())
}

/// Chunks whose contents differ between two files of the same size.
pub(crate) fn changed_chunks(a: &Path, b: &Path) -> std::io::Result<Vec<u64>> {
    let bf = File::open(b)?;
    let mut other = vec![0u8; CHUNK_SIZE];
    let mut out = Vec::new();
    let mut err = None;
    for_each_chunk(a, |i, chunk| {
        if err.is_some() {
            return;
        }
        if let Err(e) = read_chunk(&bf, i, &mut other) {
            err = Some(e);
        } else if chunk != &other[..chunk.len()] {
            out.push(i);
        }
    })?;
    match err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// Those of `candidates` whose contents differ between two files.
pub(crate) fn differing(a: &Path, b: &Path, candidates: &[u64]) -> std::io::Result<Vec<u64>> {
    let (fa, fb) = (File::open(a)?, File::open(b)?);
    let (mut x, mut y) = (vec![0u8; CHUNK_SIZE], vec![0u8; CHUNK_SIZE]);
    let mut out = Vec::new();
    for &i in candidates {
        read_chunk(&fa, i, &mut x)?;
        read_chunk(&fb, i, &mut y)?;
        if x != y {
            out.push(i);
        }
    }
    Ok(out)
}

/// Semantic gap, memory: those of `candidates` that are wholly holes in the memory file
/// (pages the guest reported free, punched out) are free, `reported`.
pub(crate) fn mark_reported_free(
    memory: &Path,
    size: u64,
    candidates: &[u64],
    free: &mut FreeMap,
) -> Result<(), SynthError> {
    let f = File::open(memory).map_err(io_err(memory))?;
    let holes = hole_chunks(&f, size).map_err(io_err(memory))?;
    for &i in candidates {
        if holes.contains(&i) {
            free.insert((Space::Memory, i), "reported");
        }
    }
    Ok(())
}

/// Semantic gap, disk: those of `candidates` in blocks the disk's ext4 file system has
/// free are free, `ext4`, and those in its empty journal `journal` (unless already known
/// free otherwise) - only when the file system is known checkpointed (`checkpoint`).
pub(crate) fn mark_ext4_free(
    disk: &Path,
    candidates: &[u64],
    checkpoint: Checkpoint,
    free: &mut FreeMap,
) -> Result<FsIntrospection, SynthError> {
    let found = crate::ext4::introspect(disk, CHUNK_SIZE as u64, checkpoint).map_err(io_err(disk))?;
    let fs = match found {
        Introspection::NotExt4 => return Ok(FsIntrospection::NotExt4),
        Introspection::Skipped(why) => {
            tracing::warn!("ext4 introspection skipped: {why}");
            return Ok(FsIntrospection::Skipped(why));
        }
        Introspection::Known(fs) => fs,
    };
    let (mut free_chunks, mut journal_chunks) = (0, 0);
    for &i in candidates {
        if fs.is_free(i) {
            free.entry((Space::Disk, i)).or_insert("ext4");
            free_chunks += 1;
        } else if fs.is_dead_journal(i) {
            free.entry((Space::Disk, i)).or_insert("journal");
            journal_chunks += 1;
        }
    }
    Ok(FsIntrospection::Used { free_chunks, journal_chunks })
}

/// Chunks that are wholly holes in `f`.
fn hole_chunks(f: &File, len: u64) -> std::io::Result<HashSet<u64>> {
    let data = forage_vm::sparse::data_ranges(f, len)?;
    let mut holes = HashSet::new();
    let mut pos = 0u64;
    let cs = CHUNK_SIZE as u64;
    for (start, end) in data.into_iter().chain(std::iter::once((len, len))) {
        // [pos, start) is a hole: whole chunks inside it.
        holes.extend(pos.div_ceil(cs)..start / cs);
        pos = end;
    }
    Ok(holes)
}
