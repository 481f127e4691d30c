//! The chunk hash index of a base VM: SHA-256 of every non-zero 4 KiB chunk of its memory
//! and disk, sorted by hash, and the base's digest computed on the same pass.
//!
//! Stored as `index.bin`: `"FORAGEIX" u32 version u64 count` then `count` records of
//! `[32-byte hash][u8 space: 0 disk, 1 memory][u64 LE chunk index]`. Kept in memory as a
//! sorted vector (41 bytes per non-zero base chunk; bounded by the base, not the overlay).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use forage_format::chunk::is_zero;
use forage_format::{Space, CHUNK_SIZE};
use sha2::{Digest, Sha256};

const MAGIC: &[u8; 8] = b"FORAGEIX";
const VERSION: u32 = 1;
const READ_BUF: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    hash: [u8; 32],
    space: u8,
    index: u64,
}

#[derive(Debug, Default)]
pub struct ChunkIndex {
    entries: Vec<Entry>,
}

pub fn sha256(chunk: &[u8]) -> [u8; 32] {
    Sha256::digest(chunk).into()
}

/// Read `path` chunk by chunk with a 1 MiB buffer; `f(index, chunk)` for each chunk.
pub fn for_each_chunk(path: &Path, mut f: impl FnMut(u64, &[u8])) -> std::io::Result<u64> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut buf = vec![0u8; READ_BUF];
    let mut off = 0u64;
    while off < len {
        let n = ((len - off) as usize).min(READ_BUF);
        file.read_exact_at(&mut buf[..n], off)?;
        for (i, chunk) in buf[..n].chunks(CHUNK_SIZE).enumerate() {
            f(off / CHUNK_SIZE as u64 + i as u64, chunk);
        }
        off += n as u64;
    }
    Ok(len)
}

impl ChunkIndex {
    /// Hash every chunk of the base's memory and disk; returns the index and the base
    /// digest: SHA-256 over "forage-base-v1", both sizes, every chunk's hash in order (zero
    /// chunks as 32 zero bytes), and the device state's SHA-256.
    pub fn build(memory: &Path, disk: &Path, state_sha256: &str) -> std::io::Result<(Self, String)> {
        let mut entries = Vec::new();
        let mut digest = Sha256::new_with_prefix(b"forage-base-v1");
        for (space, path) in [(Space::Memory, memory), (Space::Disk, disk)] {
            let len = std::fs::metadata(path)?.len();
            digest.update(len.to_le_bytes());
            for_each_chunk(path, |index, chunk| {
                if is_zero(chunk) {
                    digest.update([0u8; 32]);
                } else {
                    let hash = sha256(chunk);
                    digest.update(hash);
                    entries.push(Entry { hash, space: space_byte(space), index });
                }
            })?;
        }
        digest.update(state_sha256.as_bytes());
        entries.sort();
        Ok((Self { entries }, hex::encode(digest.finalize())))
    }

    /// A base chunk with this content, memory preferred.
    pub fn lookup(&self, hash: &[u8; 32]) -> Option<(Space, u64)> {
        let i = self.entries.partition_point(|e| e.hash < *hash);
        let e = self.entries.get(i).filter(|e| e.hash == *hash)?;
        // Entries with equal hashes sort by space byte: disk (0) before memory (1).
        let best = self.entries[i..].iter().take_while(|x| x.hash == *hash).find(|x| x.space == 1).unwrap_or(e);
        Some((if best.space == 1 { Space::Memory } else { Space::Disk }, best.index))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut w = BufWriter::new(File::create(path)?);
        w.write_all(MAGIC)?;
        w.write_all(&VERSION.to_le_bytes())?;
        w.write_all(&(self.entries.len() as u64).to_le_bytes())?;
        for e in &self.entries {
            w.write_all(&e.hash)?;
            w.write_all(&[e.space])?;
            w.write_all(&e.index.to_le_bytes())?;
        }
        w.into_inner().map_err(|e| e.into_error())?.sync_all()
    }

    pub fn load(path: &Path) -> std::io::Result<Self> {
        let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {m}", path.display()));
        let file = File::open(path)?;
        let file_len = file.metadata()?.len();
        let mut r = BufReader::new(file);
        let mut head = [0u8; 20];
        r.read_exact(&mut head)?;
        if &head[..8] != MAGIC || u32::from_le_bytes(head[8..12].try_into().expect("4")) != VERSION {
            return Err(bad("not a forage chunk index of version 1"));
        }
        let count = u64::from_le_bytes(head[12..20].try_into().expect("8"));
        if count.checked_mul(41).map(|n| n + 20) != Some(file_len) {
            return Err(bad("size does not match its record count"));
        }
        let mut entries = Vec::with_capacity(count as usize);
        let mut rec = [0u8; 41];
        for _ in 0..count {
            r.read_exact(&mut rec)?;
            entries.push(Entry {
                hash: rec[..32].try_into().expect("32"),
                space: rec[32],
                index: u64::from_le_bytes(rec[33..].try_into().expect("8")),
            });
        }
        if entries.windows(2).any(|w| w[0] > w[1]) {
            return Err(bad("records are not sorted"));
        }
        Ok(Self { entries })
    }
}

fn space_byte(s: Space) -> u8 {
    match s {
        Space::Disk => 0,
        Space::Memory => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_finds_chunks_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let mem = dir.path().join("m");
        let disk = dir.path().join("d");
        let mut m = vec![0u8; 8 * CHUNK_SIZE];
        m[CHUNK_SIZE..2 * CHUNK_SIZE].fill(1);
        m[5 * CHUNK_SIZE..6 * CHUNK_SIZE].fill(2);
        let mut d = vec![0u8; 4 * CHUNK_SIZE];
        d[3 * CHUNK_SIZE..].fill(2); // same content as memory chunk 5
        d[..CHUNK_SIZE].fill(3);
        std::fs::write(&mem, &m).unwrap();
        std::fs::write(&disk, &d).unwrap();
        let (idx, digest) = ChunkIndex::build(&mem, &disk, "s").unwrap();
        assert_eq!(idx.len(), 4);
        assert_eq!(idx.lookup(&sha256(&[1u8; CHUNK_SIZE])), Some((Space::Memory, 1)));
        assert_eq!(idx.lookup(&sha256(&[2u8; CHUNK_SIZE])), Some((Space::Memory, 5)), "memory preferred");
        assert_eq!(idx.lookup(&sha256(&[3u8; CHUNK_SIZE])), Some((Space::Disk, 0)));
        assert_eq!(idx.lookup(&sha256(&[4u8; CHUNK_SIZE])), None);
        let p = dir.path().join("index.bin");
        idx.save(&p).unwrap();
        let back = ChunkIndex::load(&p).unwrap();
        assert_eq!(back.entries, idx.entries);
        // The digest depends on contents and state.
        let (_, d2) = ChunkIndex::build(&mem, &disk, "other").unwrap();
        assert_ne!(digest, d2);
        // A cut index is refused.
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
        assert!(ChunkIndex::load(&p).is_err());
    }
}
