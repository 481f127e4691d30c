//! The launch VM's memory and disk, assembled chunk by chunk while its overlay arrives.
//!
//! Every 4 KiB chunk of each space is in one of four states:
//! - `Base(space, i)`: equal to chunk `i` of the base's `space` (untouched chunks are
//!   `Base` of their own position; the overlay's base references point elsewhere);
//! - `Zero`: zero bytes (zero and free chunks of the overlay, holes punched by the guest);
//! - `Pending(blob)`: its content is blob `blob`, whose segment has not arrived yet;
//! - `Local`: its content is in this assembly's own sparse file for the space (a blob
//!   that arrived, or a write of the VM: the base is never written).
//!
//! Reads of `Pending` chunks wait for their segment and ask for it out of order (the
//! `fetch` callback) the first time; a segment that arrives turns its blobs' chunks
//! `Local`, unless the VM has overwritten them meanwhile. Everything happens under one
//! mutex: I/O under it is a few page-cache copies, and it keeps the state and the file
//! contents consistent without a second protocol.
//!
//! Memory held: 16 bytes per chunk of the VM (4 MiB per GiB of VM) plus the blob
//! position table (8 bytes per modified chunk); data lives in files.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use forage_format::{BlobEncoding, ChunkRef, Manifest, SegmentKind, Space, CHUNK_SIZE};

pub use crate::stats::AssemblyStats;
use crate::volume::open_volume;
use crate::AssemblyError;

const CHUNK: u64 = CHUNK_SIZE as u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Base(Space, u64),
    Zero,
    Pending(u32),
    Local,
}

/// Requests an out-of-order segment from whoever feeds the assembly.
pub type FetchFn = Box<dyn Fn(u32) + Send + Sync>;

struct SpaceFiles {
    base: File,
    local: File,
    local_path: PathBuf,
    size: u64,
}

/// Chunks in first-read order, and which were seen (per space).
type AccessLog = (Vec<(Space, u64)>, [Vec<bool>; 2]);

struct Inner {
    chunks: [Vec<ChunkState>; 2],
    arrived: Vec<bool>,
    fetched: Vec<bool>,
    blob_accessed: Vec<bool>,
    /// Per chunk, the write generation of its last change (0: never changed).
    write_gen: [Vec<u64>; 2],
    /// Generation of writes happening now; [`Assembly::mark`] starts a new one.
    generation: u64,
    device_state: Option<PathBuf>,
    failed: Option<String>,
    stats: AssemblyStats,
    /// Profiling: chunks in the order the VM first read them.
    access_log: Option<AccessLog>,
}

/// A point in the history of the VM's writes (see [`Assembly::mark`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct WriteMark(pub u64);

pub struct Assembly {
    manifest: Manifest,
    files: [SpaceFiles; 2],
    /// Chunks each blob fills, in (space, index) order.
    positions: Vec<Vec<(Space, u64)>>,
    work: PathBuf,
    fetch: FetchFn,
    inner: Mutex<Inner>,
    changed: Condvar,
}

fn slot(s: Space) -> usize {
    match s {
        Space::Memory => 0,
        Space::Disk => 1,
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AssemblyError + '_ {
    move |source| AssemblyError::Io { path: path.to_path_buf(), source }
}

fn read_full(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = f.read_at(&mut buf[done..], off + done as u64)?;
        if n == 0 {
            buf[done..].fill(0); // past the end of a sparse or short file: zeros
            break;
        }
        done += n;
    }
    Ok(())
}

impl Assembly {
    /// Start assembling the launch VM described by `manifest` (already validated) over
    /// the base's memory and disk files. `work` receives the local files; it must exist.
    /// An overlay naming blocks of Debian packages (format 3) needs their volume
    /// (`packages`): those chunks are copied into the local files here, before anything
    /// reads them (they are on this host: no segment brings them).
    pub fn new(
        manifest: Manifest,
        base_memory: &Path,
        base_disk: &Path,
        packages: Option<&Path>,
        work: &Path,
        fetch: FetchFn,
    ) -> Result<Self, AssemblyError> {
        if let Some(parent) = &manifest.parent {
            // A residue only makes sense on top of its parent overlay's launch VM.
            return Err(AssemblyError::Overlay(format!("this is a residue of overlay {parent}: merge it first")));
        }
        let open_space = |base: &Path, name: &str, size: u64| -> Result<SpaceFiles, AssemblyError> {
            let local_path = work.join(name);
            let local = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&local_path)
                .map_err(io(&local_path))?;
            local.set_len(size).map_err(io(&local_path))?;
            let base_file = File::open(base).map_err(io(base))?;
            let have = base_file.metadata().map_err(io(base))?.len();
            if have != size {
                return Err(AssemblyError::Mismatch(format!(
                    "{} is {have} bytes, the overlay expects {size}",
                    base.display()
                )));
            }
            Ok(SpaceFiles { base: base_file, local, local_path, size })
        };
        let files = [
            open_space(base_memory, "memory.local", manifest.memory_size)?,
            open_space(base_disk, "disk.local", manifest.disk_size)?,
        ];
        let mut chunks = [Vec::new(), Vec::new()];
        for space in [Space::Memory, Space::Disk] {
            let n = files[slot(space)].size.div_ceil(CHUNK);
            chunks[slot(space)] = (0..n).map(|i| ChunkState::Base(space, i)).collect();
        }
        let volume = open_volume(&manifest, packages)?;
        let mut block = vec![0u8; CHUNK as usize];
        let mut positions = vec![Vec::new(); manifest.blobs.len()];
        for c in &manifest.chunks {
            let state = match c.reference {
                ChunkRef::Zero | ChunkRef::Free => ChunkState::Zero,
                ChunkRef::BaseDisk(i) => ChunkState::Base(Space::Disk, i),
                ChunkRef::BaseMemory(i) => ChunkState::Base(Space::Memory, i),
                ChunkRef::Package(i) => {
                    let (volume, p) = (volume.as_ref().expect("checked above"), packages.expect("checked above"));
                    read_full(volume, &mut block, i * CHUNK).map_err(io(p))?;
                    let local = &files[slot(c.space)];
                    local.local.write_all_at(&block, c.index * CHUNK).map_err(io(&local.local_path))?;
                    ChunkState::Local
                }
                r => {
                    let b = r.blob().expect("blob reference");
                    positions[b as usize].push((c.space, c.index));
                    ChunkState::Pending(b)
                }
            };
            chunks[slot(c.space)][c.index as usize] = state;
        }
        let n = manifest.segments.len();
        let write_gen = [vec![0u64; chunks[0].len()], vec![0u64; chunks[1].len()]];
        let stats = AssemblyStats { segments: n as u32, blobs: manifest.blobs.len() as u64, ..Default::default() };
        let inner = Inner {
            chunks,
            arrived: vec![false; n],
            fetched: vec![false; n],
            blob_accessed: vec![false; manifest.blobs.len()],
            write_gen,
            generation: 1,
            device_state: None,
            failed: None,
            stats,
            access_log: None,
        };
        Ok(Self {
            manifest,
            files,
            positions,
            work: work.to_path_buf(),
            fetch,
            inner: Mutex::new(inner),
            changed: Condvar::new(),
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn size(&self, space: Space) -> u64 {
        self.files[slot(space)].size
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Check, decompress and apply segment `index` as it arrived. Returns false for a
    /// segment that was already there (a fetched one that the bulk stream repeats).
    pub fn add_segment(&self, index: u32, compressed: &[u8]) -> Result<bool, AssemblyError> {
        let seg = self
            .manifest
            .segments
            .get(index as usize)
            .ok_or_else(|| AssemblyError::Overlay(format!("segment {index} does not exist")))?;
        if self.lock().arrived[index as usize] {
            return Ok(false);
        }
        let data = forage_format::container::open_segment(index as usize, seg, compressed)
            .map_err(|e| AssemblyError::Overlay(e.to_string()))?;
        if seg.kind == SegmentKind::DeviceState {
            if index == self.manifest.device_state.segment {
                use sha2::Digest;
                if hex::encode(sha2::Sha256::digest(&data)) != self.manifest.device_state.sha256 {
                    return Err(AssemblyError::Overlay("device state fails its checksum".into()));
                }
                let p = self.work.join("state");
                std::fs::write(&p, &data).map_err(io(&p))?;
                let mut inner = self.lock();
                inner.device_state = Some(p);
                Self::mark_arrived(&mut inner, index, compressed.len());
                self.changed.notify_all();
            }
            return Ok(true);
        }
        // Decode the blobs outside the lock (deltas need base chunks: read-only files).
        let segment = forage_format::SegmentData { index: index as usize, data };
        let mut base = vec![0u8; CHUNK_SIZE];
        let mut decoded = Vec::new();
        for (id, blob) in self.manifest.blobs.iter().enumerate().filter(|(_, b)| b.segment == index) {
            let payload = segment.blob(blob).map_err(|e| AssemblyError::Overlay(e.to_string()))?;
            let content = match blob.encoding {
                BlobEncoding::Raw => payload.to_vec(),
                BlobEncoding::Delta { codec, space, index: at } => {
                    read_full(&self.files[slot(space)].base, &mut base, at * CHUNK).map_err(io(&self.work))?;
                    codec.decode(&base, payload).map_err(|e| AssemblyError::Overlay(e.to_string()))?
                }
            };
            if content.len() != CHUNK_SIZE {
                return Err(AssemblyError::Overlay(format!("blob {id} decodes to {} bytes", content.len())));
            }
            decoded.push((id as u32, content));
        }
        let mut inner = self.lock();
        for (id, content) in decoded {
            for &(space, i) in &self.positions[id as usize] {
                let state = &mut inner.chunks[slot(space)][i as usize];
                if *state == ChunkState::Pending(id) {
                    let f = &self.files[slot(space)];
                    f.local.write_all_at(&content, i * CHUNK).map_err(io(&f.local_path))?;
                    *state = ChunkState::Local;
                }
            }
        }
        Self::mark_arrived(&mut inner, index, compressed.len());
        drop(inner);
        self.changed.notify_all();
        Ok(true)
    }

    fn mark_arrived(inner: &mut Inner, index: u32, bytes: usize) {
        inner.arrived[index as usize] = true;
        inner.stats.segments_arrived += 1;
        inner.stats.bytes_arrived += bytes as u64;
    }

    pub fn has_segment(&self, index: u32) -> bool {
        self.lock().arrived.get(index as usize).copied().unwrap_or(false)
    }

    /// Every segment has arrived.
    pub fn is_complete(&self) -> bool {
        self.lock().arrived.iter().all(|&a| a)
    }

    /// The device state, once its segment has arrived (waits up to `timeout`).
    pub fn wait_device_state(&self, timeout: Duration) -> Result<PathBuf, AssemblyError> {
        let deadline = Instant::now() + timeout;
        let mut inner = self.lock();
        loop {
            if let Some(p) = &inner.device_state {
                return Ok(p.clone());
            }
            if let Some(why) = &inner.failed {
                return Err(AssemblyError::Failed(why.clone()));
            }
            let seg = self.manifest.device_state.segment as usize;
            if !inner.fetched[seg] {
                inner.fetched[seg] = true;
                inner.stats.demand_fetches += 1;
                (self.fetch)(seg as u32);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(AssemblyError::Timeout("the device state segment".into()));
            }
            inner = self.changed.wait_timeout(inner, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Stop serving: every waiting and later read fails with `why`.
    pub fn fail(&self, why: impl Into<String>) {
        let mut inner = self.lock();
        inner.failed.get_or_insert_with(|| why.into());
        drop(inner);
        self.changed.notify_all();
    }

    /// Serve the files of a complete VM (`base_memory`, `base_disk` given to [`new`] with
    /// an overlay manifest that changes nothing) and record which chunks the VM reads, in
    /// first-read order: the access profile of a launch VM. The FUSE layer then declines
    /// every read-ahead, so only pages really read are recorded.
    pub fn start_profiling(&self) {
        let mut inner = self.lock();
        let sizes = [inner.chunks[0].len(), inner.chunks[1].len()];
        inner.access_log = Some((Vec::new(), [vec![false; sizes[0]], vec![false; sizes[1]]]));
    }

    pub fn profiling(&self) -> bool {
        self.lock().access_log.is_some()
    }

    /// The chunks read so far, in first-read order.
    pub fn access_log(&self) -> Vec<(Space, u64)> {
        self.lock().access_log.as_ref().map(|(log, _)| log.clone()).unwrap_or_default()
    }

    /// Why the assembly stopped, if it did.
    pub fn failure(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    pub fn stats(&self) -> AssemblyStats {
        self.lock().stats.clone()
    }

    /// Segments the chunks of `[off, off+len)` still wait for (empty: readable now).
    /// With `fetch`, asks for each of them (once).
    fn missing(&self, inner: &mut Inner, space: Space, off: u64, len: u64, fetch: bool) -> Vec<u32> {
        let mut segs = Vec::new();
        for i in off / CHUNK..(off + len).div_ceil(CHUNK) {
            if let Some(ChunkState::Pending(b)) = inner.chunks[slot(space)].get(i as usize) {
                let s = self.manifest.blobs[*b as usize].segment;
                if !segs.contains(&s) {
                    segs.push(s);
                }
            }
        }
        for &s in segs.iter().filter(|_| fetch) {
            if !inner.fetched[s as usize] && !inner.arrived[s as usize] {
                inner.fetched[s as usize] = true;
                inner.stats.demand_fetches += 1;
                tracing::debug!(segment = s, space = space.name(), off, "demand fetch");
                (self.fetch)(s);
            }
        }
        segs
    }

    fn check_range(&self, space: Space, off: u64, len: u64) -> Result<u64, AssemblyError> {
        let size = self.size(space);
        if off > size {
            return Err(AssemblyError::OutOfRange { space: space.name(), off });
        }
        Ok(len.min(size - off))
    }

    /// Wait until the range's chunks are all there (or the assembly failed). Returns the
    /// guard so the caller acts on a consistent state.
    fn wait_for(
        &self,
        space: Space,
        off: u64,
        len: u64,
        wait: Duration,
    ) -> Result<MutexGuard<'_, Inner>, AssemblyError> {
        let mut inner = self.lock();
        let started = Instant::now();
        let mut waited = false;
        loop {
            if let Some(why) = &inner.failed {
                return Err(AssemblyError::Failed(why.clone()));
            }
            if self.missing(&mut inner, space, off, len, true).is_empty() {
                if waited {
                    inner.stats.reads_waited += 1;
                    inner.stats.wait_ms += started.elapsed().as_millis() as u64;
                }
                return Ok(inner);
            }
            let left = wait.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(AssemblyError::Timeout(format!("{} bytes {off}..{}", space.name(), off + len)));
            }
            waited = true;
            inner = self.changed.wait_timeout(inner, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Is `[off, off+len)` readable without waiting? (Asks for nothing.)
    pub fn ready(&self, space: Space, off: u64, len: u64) -> bool {
        let mut inner = self.lock();
        inner.failed.is_some() || self.missing(&mut inner, space, off, len, false).is_empty()
    }

    /// Read `len` bytes at `off`, waiting up to `wait` for missing segments.
    pub fn read(&self, space: Space, off: u64, len: u64, wait: Duration) -> Result<Vec<u8>, AssemblyError> {
        let len = self.check_range(space, off, len)?;
        let mut inner = self.wait_for(space, off, len, wait)?;
        let mut out = vec![0u8; len as usize];
        let mut chunk = vec![0u8; CHUNK_SIZE];
        let mut pos = off;
        while pos < off + len {
            let i = pos / CHUNK;
            let within = (pos % CHUNK) as usize;
            let n = (CHUNK_SIZE - within).min((off + len - pos) as usize);
            self.chunk_content(&mut inner, space, i, &mut chunk)?;
            let at = (pos - off) as usize;
            out[at..at + n].copy_from_slice(&chunk[within..within + n]);
            pos += n as u64;
        }
        Ok(out)
    }

    /// A chunk's current content (its state must not be `Pending`).
    fn chunk_content(&self, inner: &mut Inner, space: Space, i: u64, buf: &mut [u8]) -> Result<(), AssemblyError> {
        if let Some((log, seen)) = inner.access_log.as_mut() {
            if !std::mem::replace(&mut seen[slot(space)][i as usize], true) {
                log.push((space, i));
            }
        }
        let state = inner.chunks[slot(space)][i as usize];
        match state {
            ChunkState::Zero => buf.fill(0),
            ChunkState::Base(s, j) => {
                let f = &self.files[slot(s)];
                read_full(&f.base, buf, j * CHUNK).map_err(io(&self.work))?;
            }
            ChunkState::Local => {
                let f = &self.files[slot(space)];
                read_full(&f.local, buf, i * CHUNK).map_err(io(&f.local_path))?;
            }
            ChunkState::Pending(_) => unreachable!("waited for"),
        }
        if let Some(b) = self.blob_of(space, i) {
            if !inner.blob_accessed[b as usize] {
                inner.blob_accessed[b as usize] = true;
                inner.stats.blobs_accessed += 1;
            }
        }
        Ok(())
    }

    /// The overlay blob chunk `i` comes from, if any.
    fn blob_of(&self, space: Space, i: u64) -> Option<u32> {
        let chunks = &self.manifest.chunks;
        chunks.binary_search_by(|c| (c.space, c.index).cmp(&(space, i))).ok().and_then(|k| chunks[k].reference.blob())
    }

    /// Write `data` at `off` (copy-on-write: into the local file, never the base).
    /// A write that covers part of a chunk still waiting for its segment waits for it.
    pub fn write(&self, space: Space, off: u64, data: &[u8], wait: Duration) -> Result<(), AssemblyError> {
        let len = self.check_range(space, off, data.len() as u64)?;
        if len < data.len() as u64 {
            return Err(AssemblyError::OutOfRange { space: space.name(), off: off + len });
        }
        // Only partly covered chunks need their old content: the first and the last.
        let partial = |i: u64| off > i * CHUNK || off + len < (i + 1) * CHUNK;
        let (first, last) = (off / CHUNK, (off + len).div_ceil(CHUNK).saturating_sub(1));
        let mut inner = if len == 0 {
            return Ok(());
        } else if partial(first) || partial(last) {
            // Waiting for the whole range is simpler and only costs in a rare case.
            self.wait_for(space, off, len, wait)?
        } else {
            self.lock()
        };
        if let Some(why) = &inner.failed {
            return Err(AssemblyError::Failed(why.clone()));
        }
        let f = &self.files[slot(space)];
        let mut chunk = vec![0u8; CHUNK_SIZE];
        for i in first..=last {
            if partial(i) && inner.chunks[slot(space)][i as usize] != ChunkState::Local {
                self.chunk_content(&mut inner, space, i, &mut chunk)?;
                f.local.write_all_at(&chunk, i * CHUNK).map_err(io(&f.local_path))?;
            }
            inner.chunks[slot(space)][i as usize] = ChunkState::Local;
            let g = inner.generation;
            if std::mem::replace(&mut inner.write_gen[slot(space)][i as usize], g) == 0 {
                inner.stats.chunks_written += 1;
            }
        }
        f.local.write_all_at(&data[..len as usize], off).map_err(io(&f.local_path))?;
        drop(inner);
        self.changed.notify_all();
        Ok(())
    }

    /// The guest gave `[off, off+len)` back (a punched hole): whole chunks become zero,
    /// partly covered ones get zeros written.
    pub fn punch(&self, space: Space, off: u64, len: u64, wait: Duration) -> Result<(), AssemblyError> {
        let len = self.check_range(space, off, len)?;
        let (first_whole, end_whole) = (off.div_ceil(CHUNK), (off + len) / CHUNK);
        if first_whole >= end_whole {
            return self.write(space, off, &vec![0u8; len as usize], wait);
        }
        if off < first_whole * CHUNK {
            self.write(space, off, &vec![0u8; (first_whole * CHUNK - off) as usize], wait)?;
        }
        if off + len > end_whole * CHUNK {
            self.write(space, end_whole * CHUNK, &vec![0u8; (off + len - end_whole * CHUNK) as usize], wait)?;
        }
        let mut inner = self.lock();
        for i in first_whole..end_whole {
            inner.chunks[slot(space)][i as usize] = ChunkState::Zero;
            let g = inner.generation;
            if std::mem::replace(&mut inner.write_gen[slot(space)][i as usize], g) == 0 {
                inner.stats.chunks_written += 1;
            }
        }
        Ok(())
    }

    /// Chunks of `space` the VM has changed (written or punched) since the launch.
    pub fn written_chunks(&self, space: Space) -> Vec<u64> {
        self.written_since(space, WriteMark(0))
    }

    /// Start a new round of change tracking (a handoff iteration): changes from now on are
    /// after the returned mark.
    pub fn mark(&self) -> WriteMark {
        let mut inner = self.lock();
        let m = WriteMark(inner.generation);
        inner.generation += 1;
        m
    }

    /// Chunks of `space` changed after `mark` (all changed ones for `WriteMark(0)`).
    pub fn written_since(&self, space: Space, mark: WriteMark) -> Vec<u64> {
        let inner = self.lock();
        inner.write_gen[slot(space)].iter().enumerate().filter(|(_, &g)| g > mark.0).map(|(i, _)| i as u64).collect()
    }
}
