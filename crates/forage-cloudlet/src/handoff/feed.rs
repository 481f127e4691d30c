//! The source's feeder: the VM's changes as the pipeline's chunks (disk chunks written
//! since launch, QEMU's RAM pages window by window in random order, then the disk chunks
//! written during the migration), each chunk the destination already has left out.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use forage_format::Space as FileSpace;
use forage_handoff::migration::{split, Residual};
use forage_handoff::pipeline::shuffle;
use forage_handoff::segment::{ChunkId, Modified, Space, CHUNK};
use forage_shim::ShimClient;

use super::order::HandoffFailure as Failure;

/// Pages gathered before their order is randomized (1 MiB). Everything queued between
/// QEMU and the link is sent during the downtime if QEMU stops the VM early: keep it small.
const SHUFFLE_WINDOW: usize = 256;
/// Disk chunks read from the view at once.
const READ_BATCH: usize = 256;

/// A bit per chunk: which chunks were seen modified.
pub(super) struct Bits {
    words: Vec<u64>,
    pub(super) count: u64,
}

impl Bits {
    pub(super) fn new(bytes: u64) -> Self {
        Self { words: vec![0; (bytes / CHUNK as u64).div_ceil(64) as usize], count: 0 }
    }

    fn get(&self, i: u64) -> bool {
        self.words.get((i / 64) as usize).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn set(&mut self, i: u64) {
        if let Some(w) = self.words.get_mut((i / 64) as usize) {
            let bit = 1 << (i % 64);
            if *w & bit == 0 {
                *w |= bit;
                self.count += 1;
            }
        }
    }
}

/// Turns the VM's changes into the pipeline's chunks: disk chunks written since launch,
/// QEMU's RAM pages (window by window in random order), then the disk chunks written
/// during the migration (the VM is stopped by then).
pub(super) struct Feed {
    /// The instance's view (its shim knows what the VM wrote).
    pub(super) shim: Arc<ShimClient>,
    /// Disk chunks that differed from the base before the VM ran.
    pub(super) disk_changed: Vec<u64>,
    pub(super) runtime: tokio::runtime::Handle,
    pub(super) base_memory: File,
    pub(super) base_disk: File,
    pub(super) has_base: bool,
    /// Chunks that differ from the base (what "modified state" counts).
    pub(super) modified: [Bits; 2],
    /// Chunks sent with content other than the destination's initial one (the base's, or
    /// zeros without it). Until then the destination has the right bytes already: a
    /// chunk equal to those is not sent at all.
    pub(super) sent: [Bits; 2],
    pub(super) memory_pages: u64,
    pub(super) disk_chunks: u64,
    /// Bytes of chunks handed to the pipeline (for the steering).
    pub(super) fed: Arc<std::sync::atomic::AtomicU64>,
}

impl Feed {
    pub(super) fn run(
        mut self,
        conn: std::os::unix::net::UnixStream,
        out: std::sync::mpsc::SyncSender<Modified>,
    ) -> Result<(Residual, Feed), Failure> {
        let mark = self.runtime.block_on(self.shim.mark()).map_err(Failure::View)?;
        // What the VM wrote, and what differed from the base before it ran (an overlay's).
        let mut disk = self.runtime.block_on(self.shim.written_chunks(FileSpace::Disk)).map_err(Failure::View)?;
        disk.extend_from_slice(&self.disk_changed);
        disk.sort_unstable();
        disk.dedup();
        shuffle(&mut disk, 1);
        self.disk_chunks(&disk, &out)?;
        let mut window: Vec<(u64, Vec<u8>)> = Vec::with_capacity(SHUFFLE_WINDOW);
        let mut at: HashMap<u64, usize> = HashMap::new();
        let mut failed = None;
        let mut seed = 2;
        let residual = split(conn, forage_vm::spec::RAM_ID, |offset, page| {
            let index = offset / CHUNK as u64;
            let data = page.to_bytes().to_vec();
            match at.get(&index) {
                Some(&k) => window[k].1 = data, // a later round of the same page
                None => {
                    at.insert(index, window.len());
                    window.push((index, data));
                }
            }
            if window.len() >= SHUFFLE_WINDOW {
                seed += 1;
                if let Err(e) = self.flush(&mut window, &mut at, &out, seed) {
                    failed = Some(e);
                    return false;
                }
            }
            true
        });
        if let Some(e) = failed {
            return Err(e);
        }
        let residual = residual.map_err(Failure::Stream)?;
        self.flush(&mut window, &mut at, &out, 0)?;
        // QEMU stopped the VM and flushed its disk before its stream's end.
        let late = self.runtime.block_on(self.shim.written_since(FileSpace::Disk, mark)).map_err(Failure::View)?;
        self.disk_chunks(&late, &out)?;
        Ok((residual, self))
    }

    /// Disk chunks `indices` of the view, read in batches.
    fn disk_chunks(&mut self, indices: &[u64], out: &std::sync::mpsc::SyncSender<Modified>) -> Result<(), Failure> {
        for batch in indices.chunks(READ_BATCH) {
            let chunks =
                self.runtime.block_on(self.shim.read(FileSpace::Disk, batch.to_vec())).map_err(Failure::View)?;
            for c in chunks {
                self.disk_chunks += 1;
                let base = read_chunk(&self.base_disk, c.index)?;
                if let Some(m) = self.modified(Space::Disk, c.index, c.bytes, base) {
                    out.send(m).map_err(|_| Failure::Stopped)?;
                }
            }
        }
        Ok(())
    }

    fn flush(
        &mut self,
        window: &mut Vec<(u64, Vec<u8>)>,
        at: &mut HashMap<u64, usize>,
        out: &std::sync::mpsc::SyncSender<Modified>,
        seed: u64,
    ) -> Result<(), Failure> {
        shuffle(window, seed);
        at.clear();
        for (index, data) in window.drain(..) {
            self.memory_pages += 1;
            let base = read_chunk(&self.base_memory, index)?;
            if let Some(m) = self.modified(Space::Memory, index, data, base) {
                out.send(m).map_err(|_| Failure::Stopped)?;
            }
        }
        Ok(())
    }

    /// The chunk to send, if the destination does not have these bytes already.
    fn modified(&mut self, space: Space, index: u64, data: Vec<u8>, base: Vec<u8>) -> Option<Modified> {
        let s = (space == Space::Disk) as usize;
        if data != base {
            self.modified[s].set(index);
        }
        let initial = if self.has_base { data == base } else { forage_format::chunk::is_zero(&data) };
        if initial && !self.sent[s].get(index) {
            return None;
        }
        self.sent[s].set(index);
        self.fed.fetch_add(CHUNK as u64, std::sync::atomic::Ordering::Relaxed);
        Some(Modified { chunk: ChunkId { space, index }, data, base: self.has_base.then_some(base) })
    }
}

fn read_chunk(file: &File, index: u64) -> Result<Vec<u8>, Failure> {
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0;
    while got < CHUNK {
        match file.read_at(&mut buf[got..], index * CHUNK as u64 + got as u64) {
            Ok(0) => break, // past the end: zeros
            Ok(n) => got += n,
            Err(source) => return Err(Failure::Io { path: "the base VM".into(), source }),
        }
    }
    Ok(buf)
}
