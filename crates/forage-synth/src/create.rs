//! Overlay creation: compare the launch VM with its base, then
//! 1. drop free chunks (semantic gap: discarded disk chunks, ext4 free blocks, memory pages
//!    the guest reported free),
//! 2. deduplicate by the paper's five rules (base disk, base memory, within the same space,
//!    zero, across memory and disk), memory first so it holds the canonical copies,
//! 3. delta-encode each unique chunk against the base chunk at the same position, keeping
//!    the delta only when it packs smaller,
//! 4. pack blobs into ~1 MiB segments in offset or access order and compress each.
//!
//! Memory: the base index, one map entry per unique blob (hash -> id), the chunk map, and
//! one segment buffer. Chunk data streams from the files.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use forage_format::chunk::is_zero;
use forage_format::codec::packed_size;
use forage_format::manifest::{BaseRef, DeviceState, Service};
use forage_format::{Blob, BlobEncoding, ChunkEntry, ChunkRef, DeltaCodec, Manifest, Order, Segment, SegmentCodec, SegmentKind, Space, Stats, CHUNK_SIZE, FORMAT_VERSION};
use forage_vm::Snapshot;
use sha2::{Digest, Sha256};

use crate::base::BaseVm;
use crate::index::{for_each_chunk, sha256};
use crate::SynthError;

#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub dedup: bool,
    pub semantic_disk: bool,
    pub semantic_memory: bool,
    pub delta: Option<DeltaCodec>,
    pub codec: SegmentCodec,
    pub segment_bytes: usize,
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self {
            dedup: true,
            semantic_disk: true,
            semantic_memory: true,
            delta: Some(DeltaCodec::Bsdiff),
            codec: SegmentCodec::Lzma { level: 6 },
            segment_bytes: 1 << 20,
        }
    }
}

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
}

#[derive(Debug, Clone)]
pub struct CreateReport {
    pub manifest: Manifest,
    pub bytes: u64,
    pub took: Duration,
}

struct PendingBlob {
    space: Space,
    index: u64,
}

/// Create the overlay of `launch` against `base` at `out` (written as `out.partial` and
/// renamed when complete).
pub fn create(base: &BaseVm, launch: &LaunchInput, opts: &CreateOptions, out: &Path) -> Result<CreateReport, SynthError> {
    let start = Instant::now();
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| SynthError::Io { path: p, source }
    };
    let snap = launch.snapshot;
    let (l_mem, l_disk) = (snap.memory_path(), snap.disk_paths()[0].clone());
    let (b_mem, b_disk) = (base.memory_path(), base.disk_path());
    let mem_size = std::fs::metadata(&l_mem).map_err(io(&l_mem))?.len();
    let disk_size = std::fs::metadata(&l_disk).map_err(io(&l_disk))?.len();
    if mem_size != base.manifest().memory_size || disk_size != base.manifest().disk_size {
        return Err(SynthError::BadFile {
            path: snap.dir().to_path_buf(),
            detail: "launch VM memory or disk size differs from its base".into(),
        });
    }

    // Modified chunks: memory by comparison with the base; disk from the layer.
    let modified_memory = changed_chunks(&l_mem, &b_mem).map_err(io(&l_mem))?;
    // The layer lists what the VM wrote or discarded; a chunk rewritten with what the base
    // has (e.g. free space trimmed that was never used) is not a modification.
    let mut modified_disk: Vec<u64> = launch.written_disk_chunks.iter().chain(launch.discarded_disk_chunks).copied().collect();
    modified_disk.sort_unstable();
    modified_disk.dedup();
    let modified_disk = differing(&l_disk, &b_disk, &modified_disk).map_err(io(&l_disk))?;

    // Semantic gap.
    let mut free: HashMap<(Space, u64), &'static str> = HashMap::new();
    if opts.semantic_memory {
        let l = File::open(&l_mem).map_err(io(&l_mem))?;
        let holes = hole_chunks(&l, mem_size).map_err(io(&l_mem))?;
        for &i in &modified_memory {
            if holes.contains(&i) {
                free.insert((Space::Memory, i), "reported");
            }
        }
    }
    if opts.semantic_disk {
        for &i in launch.discarded_disk_chunks {
            free.insert((Space::Disk, i), "trim");
        }
        if let Some(fs_free) = crate::ext4::free_chunks(&l_disk, CHUNK_SIZE as u64).map_err(io(&l_disk))? {
            for &i in &modified_disk {
                if fs_free.get(i as usize).copied().unwrap_or(false) {
                    free.entry((Space::Disk, i)).or_insert("ext4");
                }
            }
        }
    }

    // Classify.
    let index = if opts.dedup { Some(base.index()?) } else { None };
    let files = [(Space::Memory, File::open(&l_mem).map_err(io(&l_mem))?), (Space::Disk, File::open(&l_disk).map_err(io(&l_disk))?)];
    let mut seen: HashMap<[u8; 32], (u32, Space)> = HashMap::new();
    let mut pending: Vec<PendingBlob> = Vec::new();
    let mut chunks: Vec<ChunkEntry> = Vec::with_capacity(modified_memory.len() + modified_disk.len());
    let mut stats = Stats {
        modified_memory_chunks: modified_memory.len() as u64,
        modified_disk_chunks: modified_disk.len() as u64,
        ..Stats::default()
    };
    let mut buf = vec![0u8; CHUNK_SIZE];
    for (space, list) in [(Space::Memory, &modified_memory), (Space::Disk, &modified_disk)] {
        let file = &files[if space == Space::Memory { 0 } else { 1 }].1;
        for &i in list.iter() {
            let reference = if let Some(src) = free.get(&(space, i)) {
                *stats.free_by_source.entry(src.to_string()).or_insert(0) += 1;
                ChunkRef::Free
            } else {
                read_chunk(file, i, &mut buf).map_err(io(snap.dir()))?;
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
                        None => match seen.get(&hash) {
                            Some(&(blob, first)) if first == space => ChunkRef::SameSpace(blob),
                            Some(&(blob, _)) => ChunkRef::CrossSpace(blob),
                            None => {
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
    drop(seen);
    // Classified memory first (its copies are canonical); stored sorted by (space, index).
    chunks.sort_unstable_by_key(|c| (c.space, c.index));

    // Order.
    let mut accessed_blobs = 0u64;
    let order_ids: Vec<u32> = match launch.accessed {
        None => (0..pending.len() as u32).collect(),
        Some((mem, disk)) => {
            let touched: HashSet<(Space, u64)> = mem.iter().map(|&i| (Space::Memory, i)).chain(disk.iter().map(|&i| (Space::Disk, i))).collect();
            let mut first = Vec::new();
            let mut first_set = HashSet::new();
            for c in &chunks {
                if let Some(b) = c.reference.blob() {
                    if touched.contains(&(c.space, c.index)) && first_set.insert(b) {
                        first.push(b);
                    }
                }
            }
            first.sort_unstable();
            accessed_blobs = first.len() as u64;
            let rest = (0..pending.len() as u32).filter(|b| !first_set.contains(b));
            first.iter().copied().chain(rest).collect()
        }
    };
    let order = match launch.accessed {
        None => Order::Offset,
        Some((m, d)) => Order::Access {
            profiled_chunks: (m.len() + d.len()) as u64,
            accessed_blobs,
        },
    };

    // Encode and pack.
    let partial = out.with_extension("partial");
    let seg_tmp = out.with_extension("segments.partial");
    let result = (|| -> Result<(Manifest, u64), SynthError> {
        let mut seg_file = BufWriter::new(File::create(&seg_tmp).map_err(io(&seg_tmp))?);
        let mut segments = Vec::new();
        let state = std::fs::read(snap.state_path()).map_err(io(&snap.state_path()))?;
        push_segment(&mut seg_file, &mut segments, SegmentKind::DeviceState, opts.codec, &state).map_err(io(&seg_tmp))?;
        let device_state = DeviceState {
            segment: 0,
            size: state.len() as u64,
            sha256: hex::encode(Sha256::digest(&state)),
        };
        drop(state);
        let base_files = [File::open(&b_mem).map_err(io(&b_mem))?, File::open(&b_disk).map_err(io(&b_disk))?];
        let mut blobs = vec![Blob { segment: 0, offset: 0, len: 0, encoding: BlobEncoding::Raw }; pending.len()];
        let mut seg_buf: Vec<u8> = Vec::with_capacity(opts.segment_bytes + CHUNK_SIZE);
        let mut base_buf = vec![0u8; CHUNK_SIZE];
        for id in order_ids {
            let p = &pending[id as usize];
            let si = if p.space == Space::Memory { 0 } else { 1 };
            read_chunk(&files[si].1, p.index, &mut buf).map_err(io(snap.dir()))?;
            let (payload, encoding) = match opts.delta {
                Some(codec) => {
                    read_chunk(&base_files[si], p.index, &mut base_buf).map_err(io(base.dir()))?;
                    let d = codec.encode(&base_buf, &buf);
                    if packed_size(&d) < packed_size(&buf) {
                        (d, BlobEncoding::Delta { codec, space: p.space, index: p.index })
                    } else {
                        (buf.clone(), BlobEncoding::Raw)
                    }
                }
                None => (buf.clone(), BlobEncoding::Raw),
            };
            match encoding {
                BlobEncoding::Raw => stats.blobs_raw += 1,
                BlobEncoding::Delta { .. } => stats.blobs_delta += 1,
            }
            blobs[id as usize] = Blob {
                segment: segments.len() as u32,
                offset: seg_buf.len() as u32,
                len: payload.len() as u32,
                encoding,
            };
            seg_buf.extend_from_slice(&payload);
            stats.delta_bytes += payload.len() as u64;
            if seg_buf.len() >= opts.segment_bytes {
                push_segment(&mut seg_file, &mut segments, SegmentKind::Chunks, opts.codec, &seg_buf).map_err(io(&seg_tmp))?;
                seg_buf.clear();
            }
        }
        if !seg_buf.is_empty() {
            push_segment(&mut seg_file, &mut segments, SegmentKind::Chunks, opts.codec, &seg_buf).map_err(io(&seg_tmp))?;
        }
        seg_file.flush().map_err(io(&seg_tmp))?;
        drop(seg_file);
        stats.modified_bytes = (stats.modified_memory_chunks + stats.modified_disk_chunks) * CHUNK_SIZE as u64;
        stats.dedup_bytes = pending.len() as u64 * CHUNK_SIZE as u64;
        stats.compressed_bytes = segments.iter().filter(|s| s.kind == SegmentKind::Chunks).map(|s| s.compressed_len).sum();
        let manifest = Manifest {
            format: FORMAT_VERSION,
            base: BaseRef {
                digest: base.digest().to_string(),
                name: base.manifest().name.clone(),
            },
            disk_size,
            memory_size: mem_size,
            chunk_size: CHUNK_SIZE as u32,
            chunks,
            blobs,
            segments,
            order,
            device_state,
            vm: serde_json::json!({ "spec": snap.manifest().spec, "accel": snap.manifest().accel }),
            service: launch.service.clone(),
            stats,
            created_unix: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            creator: format!("forage {}", env!("CARGO_PKG_VERSION")),
        };
        manifest.validate().map_err(|source| SynthError::Overlay { path: out.to_path_buf(), source })?;
        let mut w = BufWriter::new(File::create(&partial).map_err(io(&partial))?);
        let mut segs = File::open(&seg_tmp).map_err(io(&seg_tmp))?;
        let bytes = forage_format::container::write_overlay(&mut w, &manifest, &mut segs).map_err(io(&partial))?;
        w.into_inner().map_err(|e| SynthError::Io { path: partial.clone(), source: e.into_error() })?.sync_all().map_err(io(&partial))?;
        Ok((manifest, bytes))
    })();
    let _ = std::fs::remove_file(&seg_tmp);
    match result {
        Ok((manifest, bytes)) => {
            std::fs::rename(&partial, out).map_err(io(out))?;
            Ok(CreateReport { manifest, bytes, took: start.elapsed() })
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

fn push_segment(out: &mut impl Write, segments: &mut Vec<Segment>, kind: SegmentKind, codec: SegmentCodec, raw: &[u8]) -> std::io::Result<()> {
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
fn changed_chunks(a: &Path, b: &Path) -> std::io::Result<Vec<u64>> {
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
fn differing(a: &Path, b: &Path, candidates: &[u64]) -> std::io::Result<Vec<u64>> {
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

