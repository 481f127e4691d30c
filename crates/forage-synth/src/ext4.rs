//! What an ext2/3/4 file system on a guest disk no longer needs, read from its on-disk
//! structures (superblock -> group descriptors -> block bitmaps; the journal inode's
//! extents -> the journal superblock): the semantic gap of the disk.
//!
//! - **free blocks**: clear in their group's block bitmap;
//! - **dead journal blocks**: every block of an *empty* journal but its superblock. A
//!   checkpointed journal (`s_start == 0`) is never read again: the next commit writes
//!   after the in-memory head, and recovery starts at `s_start`.
//!
//! Both are only true of a file system whose on-disk state is complete: frozen (FIFREEZE
//! flushes everything, checkpoints the journal, clears `needs_recovery`) or cleanly
//! unmounted. A mounted file system's bitmaps lag its memory: a block the guest allocated
//! and wrote may still be free on disk, its bitmap change waiting in the running
//! transaction. Reading such bitmaps could drop live data, so [`introspect`] needs a
//! [`Checkpoint`] and refuses a file system it cannot show to be checkpointed.
//!
//! The disk belongs to a guest: these bytes are untrusted. Anything unexpected means no
//! claims (`NotExt4`, no journal claims) or an error, never a wrong "free".

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

const SUPERBLOCK_OFFSET: u64 = 1024;
const EXT_MAGIC: u16 = 0xEF53;
const COMPAT_HAS_JOURNAL: u32 = 0x4;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_64BIT: u32 = 0x80;
const BG_BLOCK_UNINIT: u16 = 0x2;
const MAX_GROUPS: u64 = 1 << 20;
const INODE_EXTENTS_FL: u32 = 0x80000;
const EXTENT_MAGIC: u16 = 0xF30A;
const JBD2_MAGIC: u32 = 0xC03B_3998;
/// Most extent-tree nodes read for the journal inode (a journal has a handful).
const MAX_EXTENT_NODES: usize = 4096;

pub use crate::partition::ReadAt;

/// Why the on-disk state may be trusted: what the caller knows of how the image was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "how", rename_all = "snake_case")]
pub enum Checkpoint {
    /// The guest froze the file system (FIFREEZE, e.g. qemu-ga's `guest-fsfreeze-freeze`)
    /// and QEMU's dirty bitmap, added while it was frozen, counted this many chunks of the
    /// disk written between the freeze and the save. The thaw rewrites the superblock (it
    /// sets `needs_recovery` again): one chunk, recognizable by that flag.
    Frozen { chunks_written_after: u64 },
    /// Nothing is known of how the image was taken: only an image that shows itself clean
    /// (no recovery needed, empty journal) is trusted.
    Unknown,
}

/// Why a file system is not known to be checkpointed (introspection skipped).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotCheckpointed {
    #[error("the file system needs journal recovery: it was mounted and not frozen when the image was taken")]
    NeedsRecovery,
    #[error("its journal holds transactions not checkpointed yet (s_start {start})")]
    JournalNotEmpty { start: u32 },
    #[error("{chunks} chunks of the disk were written between the freeze and the save")]
    WrittenAfterFreeze { chunks: u64 },
    #[error("it has no journal, so a clean image cannot be told from a mounted one")]
    NoJournalNoFreeze,
}

/// What introspection found.
#[derive(Debug)]
pub enum Introspection {
    /// Not an ext file system this reader understands: no claims.
    NotExt4,
    /// Not known to be checkpointed: no claims, and why.
    Skipped(NotCheckpointed),
    /// Checkpointed: its free and dead chunks.
    Known(FsChunks),
}

/// Chunks of a checkpointed file system that hold nothing the guest needs.
#[derive(Debug, Clone)]
pub struct FsChunks {
    free: Bits,
    journal: Bits,
    pub block_size: u64,
    /// Blocks of the journal found dead (0 without a journal or when it was not understood).
    pub journal_blocks: u64,
}

impl FsChunks {
    /// Chunk `i` is wholly made of free blocks.
    pub fn is_free(&self, i: u64) -> bool {
        self.free.get(i)
    }

    /// Chunk `i` is wholly made of dead journal blocks.
    pub fn is_dead_journal(&self, i: u64) -> bool {
        self.journal.get(i)
    }

    pub fn free_chunks(&self) -> u64 {
        self.free.count()
    }

    pub fn journal_chunks(&self) -> u64 {
        self.journal.count()
    }

    /// The same chunks of a file system that starts at chunk `first` of a device of
    /// `total` chunks.
    fn moved(self, first: u64, total: u64) -> FsChunks {
        let shift = |b: &Bits| {
            let mut out = Bits::new(total);
            for i in (0..b.len).filter(|&i| b.get(i)) {
                out.set(first.saturating_add(i)); // past `total`: dropped by `set`
            }
            out
        };
        FsChunks { free: shift(&self.free), journal: shift(&self.journal), ..self }
    }
}

/// A plain bit set (one bit per chunk or block).
#[derive(Debug, Clone, Default)]
struct Bits {
    words: Vec<u64>,
    len: u64,
}

impl Bits {
    fn new(len: u64) -> Self {
        Self { words: vec![0; len.div_ceil(64) as usize], len }
    }

    fn set(&mut self, i: u64) {
        if i < self.len {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn count(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// Chunks of `chunk_size` wholly made of set blocks of `block_size`.
    fn to_chunks(&self, block_size: u64, chunk_size: u64, dev_len: u64) -> Bits {
        let mut out = Bits::new(dev_len.div_ceil(chunk_size));
        for c in 0..out.len {
            let first = c * chunk_size / block_size;
            let last = ((c + 1) * chunk_size).div_ceil(block_size).min(self.len);
            if first < last && (first..last).all(|b| self.get(b)) {
                out.set(c);
            }
        }
        out
    }
}

/// Introspect the ext file system on `disk` (a raw image) in `chunk_size` chunks.
/// A disk that does not start with one: the file system of its first Linux partition
/// that holds one (`crate::partition`), starting on a chunk boundary.
pub fn introspect(disk: &Path, chunk_size: u64, checkpoint: Checkpoint) -> std::io::Result<Introspection> {
    let f = File::open(disk)?;
    let dev_len = f.metadata()?.len();
    introspect_disk(&|off, buf| f.read_exact_at(buf, off), dev_len, chunk_size, checkpoint)
}

/// [`introspect`] over any reader of the device's bytes (fuzzed): the device as one file
/// system, else its partitions'.
pub fn introspect_disk(
    read: ReadAt<'_>,
    dev_len: u64,
    chunk_size: u64,
    checkpoint: Checkpoint,
) -> std::io::Result<Introspection> {
    let whole = introspect_in(read, dev_len, chunk_size, checkpoint)?;
    if !matches!(whole, Introspection::NotExt4) || chunk_size == 0 {
        return Ok(whole);
    }
    for p in crate::partition::linux_partitions(read, dev_len) {
        if p.start % chunk_size != 0 {
            continue; // its blocks would straddle chunks: no claims
        }
        let inside = |off: u64, buf: &mut [u8]| -> std::io::Result<()> {
            match off.checked_add(buf.len() as u64) {
                Some(end) if end <= p.len => read(p.start + off, buf),
                _ => Err(std::io::Error::other("past the end of the partition")),
            }
        };
        match introspect_in(&inside, p.len, chunk_size, checkpoint)? {
            Introspection::NotExt4 => continue,
            Introspection::Known(fs) => {
                return Ok(Introspection::Known(fs.moved(p.start / chunk_size, dev_len.div_ceil(chunk_size))))
            }
            skipped => return Ok(skipped),
        }
    }
    Ok(Introspection::NotExt4)
}

/// Fields of the superblock this reader uses.
struct Super {
    block_size: u64,
    blocks: u64,
    first_data_block: u64,
    per_group: u64,
    inodes_per_group: u64,
    inode_size: u64,
    desc_size: u64,
    is64: bool,
    groups: u64,
    has_journal: bool,
    needs_recovery: bool,
    journal_inum: u32,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

fn be32_at(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

fn read_super(read: ReadAt<'_>, dev_len: u64) -> Option<Super> {
    let mut sb = [0u8; 1024];
    if dev_len < SUPERBLOCK_OFFSET + 1024 || read(SUPERBLOCK_OFFSET, &mut sb).is_err() {
        return None;
    }
    if u16_at(&sb, 0x38) != EXT_MAGIC {
        return None;
    }
    let log = u32_at(&sb, 0x18);
    if log > 6 {
        return None;
    }
    let block_size = 1024u64 << log;
    let incompat = u32_at(&sb, 0x60);
    if incompat & (INCOMPAT_META_BG | INCOMPAT_JOURNAL_DEV) != 0 {
        return None; // descriptors scattered, or a journal device: not supported, so no claims
    }
    let is64 = incompat & INCOMPAT_64BIT != 0;
    let mut blocks = u32_at(&sb, 0x04) as u64;
    if is64 {
        blocks |= (u32_at(&sb, 0x150) as u64) << 32;
    }
    let first_data_block = u32_at(&sb, 0x14) as u64;
    let per_group = u32_at(&sb, 0x20) as u64;
    let inodes_per_group = u32_at(&sb, 0x28) as u64;
    let inode_size = if u32_at(&sb, 0x4C) >= 1 { u16_at(&sb, 0x58) as u64 } else { 128 };
    let desc_size = if is64 { u16_at(&sb, 0xFE) as u64 } else { 32 };
    if per_group == 0
        || per_group > block_size * 8
        || blocks > dev_len / block_size + 1
        || first_data_block >= blocks
        || !(32..=1024).contains(&desc_size)
        || !(128..=block_size).contains(&inode_size)
    {
        return None;
    }
    let groups = (blocks - first_data_block).div_ceil(per_group);
    if groups > MAX_GROUPS {
        return None;
    }
    Some(Super {
        block_size,
        blocks,
        first_data_block,
        per_group,
        inodes_per_group,
        inode_size,
        desc_size,
        is64,
        groups,
        has_journal: u32_at(&sb, 0x5C) & COMPAT_HAS_JOURNAL != 0,
        needs_recovery: incompat & INCOMPAT_RECOVER != 0,
        journal_inum: u32_at(&sb, 0xE0),
    })
}

/// The same over any reader of the device's bytes (fuzzed).
pub fn introspect_in(
    read: ReadAt<'_>,
    dev_len: u64,
    chunk_size: u64,
    checkpoint: Checkpoint,
) -> std::io::Result<Introspection> {
    let Some(sb) = read_super(read, dev_len) else { return Ok(Introspection::NotExt4) };
    let mut descs = vec![0u8; (sb.groups * sb.desc_size) as usize];
    if read((sb.first_data_block + 1) * sb.block_size, &mut descs).is_err() {
        return Ok(Introspection::NotExt4);
    }
    let journal = if sb.has_journal && sb.journal_inum != 0 {
        match journal_blocks(read, &sb, &descs) {
            Some(j) => Some(j),
            None => return Ok(Introspection::NotExt4),
        }
    } else {
        None
    };
    // Checkpointed? The journal must be empty in every case.
    if let Some(j) = &journal {
        if j.start != 0 {
            return Ok(Introspection::Skipped(NotCheckpointed::JournalNotEmpty { start: j.start }));
        }
    }
    let why_not = match checkpoint {
        Checkpoint::Unknown if journal.is_none() => Some(NotCheckpointed::NoJournalNoFreeze),
        Checkpoint::Unknown if sb.needs_recovery => Some(NotCheckpointed::NeedsRecovery),
        Checkpoint::Unknown => None,
        Checkpoint::Frozen { chunks_written_after: 0 } => None,
        // One chunk, and the superblock shows the thaw's rewrite: that chunk was it.
        Checkpoint::Frozen { chunks_written_after: 1 } if journal.is_some() && sb.needs_recovery => None,
        Checkpoint::Frozen { chunks_written_after } => {
            Some(NotCheckpointed::WrittenAfterFreeze { chunks: chunks_written_after })
        }
    };
    if let Some(why) = why_not {
        return Ok(Introspection::Skipped(why));
    }

    let mut free_block = Bits::new(sb.blocks);
    let mut bitmap = vec![0u8; sb.block_size as usize];
    for g in 0..sb.groups {
        let d = &descs[(g * sb.desc_size) as usize..((g + 1) * sb.desc_size) as usize];
        if u16_at(d, 0x12) & BG_BLOCK_UNINIT != 0 {
            continue; // bitmap not initialized: claim nothing
        }
        let mut at = u32_at(d, 0) as u64;
        if sb.is64 && sb.desc_size >= 64 {
            at |= (u32_at(d, 0x20) as u64) << 32;
        }
        if at >= sb.blocks || read(at * sb.block_size, &mut bitmap).is_err() {
            return Ok(Introspection::NotExt4);
        }
        let start = sb.first_data_block + g * sb.per_group;
        for i in 0..sb.per_group.min(sb.blocks - start) {
            if bitmap[(i / 8) as usize] & (1 << (i % 8)) == 0 {
                free_block.set(start + i);
            }
        }
    }
    let mut dead = Bits::new(sb.blocks);
    let mut journal_count = 0;
    if let Some(j) = journal {
        // A journal block the bitmaps call free is an inconsistency: claim no journal.
        if j.blocks.iter().all(|&b| !free_block.get(b)) {
            for &b in &j.blocks {
                dead.set(b);
            }
            journal_count = j.blocks.len() as u64;
        }
    }
    Ok(Introspection::Known(FsChunks {
        free: free_block.to_chunks(sb.block_size, chunk_size, dev_len),
        journal: dead.to_chunks(sb.block_size, chunk_size, dev_len),
        block_size: sb.block_size,
        journal_blocks: journal_count,
    }))
}

/// The journal: its `s_start`, and its blocks but the first (its superblock).
struct Journal {
    start: u32,
    blocks: Vec<u64>,
}

/// Read the journal inode's block list (extents only) and the journal superblock. `None`
/// when anything is not as expected.
fn journal_blocks(read: ReadAt<'_>, sb: &Super, descs: &[u8]) -> Option<Journal> {
    let ino = sb.journal_inum as u64;
    if ino == 0 || sb.inodes_per_group == 0 {
        return None;
    }
    let group = (ino - 1) / sb.inodes_per_group;
    if group >= sb.groups {
        return None;
    }
    let d = &descs[(group * sb.desc_size) as usize..((group + 1) * sb.desc_size) as usize];
    let mut table = u32_at(d, 0x8) as u64;
    if sb.is64 && sb.desc_size >= 64 {
        table |= (u32_at(d, 0x28) as u64) << 32;
    }
    let mut inode = vec![0u8; sb.inode_size as usize];
    let off = table.checked_mul(sb.block_size)?.checked_add(((ino - 1) % sb.inodes_per_group) * sb.inode_size)?;
    if table >= sb.blocks {
        return None;
    }
    read(off, &mut inode).ok()?;
    if u32_at(&inode, 0x20) & INODE_EXTENTS_FL == 0 {
        return None; // block-mapped (ext3) journal: not read, no claims
    }
    // (logical, physical, len) of every extent.
    let mut extents: Vec<(u64, u64, u64)> = Vec::new();
    let mut nodes = 0usize;
    walk_extents(read, sb, &inode[0x28..0x28 + 60], 5, &mut extents, &mut nodes)?;
    extents.sort_unstable();
    let mut blocks = Vec::new();
    let mut jsb_block = None;
    let mut expect = 0u64;
    for (logical, physical, len) in extents {
        if logical != expect || physical.checked_add(len)? > sb.blocks || blocks.len() as u64 + len > sb.blocks {
            return None; // holes or overlaps: a journal is one mapped range from block 0
        }
        for k in 0..len {
            if logical + k == 0 {
                jsb_block = Some(physical);
            } else {
                blocks.push(physical + k);
            }
        }
        expect = logical + len;
    }
    let mut jsb = [0u8; 1024];
    read(jsb_block?.checked_mul(sb.block_size)?, &mut jsb).ok()?;
    if be32_at(&jsb, 0) != JBD2_MAGIC || !(3..=4).contains(&be32_at(&jsb, 4)) {
        return None;
    }
    if be32_at(&jsb, 12) as u64 != sb.block_size || (be32_at(&jsb, 16) as u64) > expect {
        return None;
    }
    Some(Journal { start: be32_at(&jsb, 28), blocks })
}

/// Collect the leaf extents under the 60-byte (inode) or block-sized node `node`.
fn walk_extents(
    read: ReadAt<'_>,
    sb: &Super,
    node: &[u8],
    depth_left: u16,
    out: &mut Vec<(u64, u64, u64)>,
    nodes: &mut usize,
) -> Option<()> {
    *nodes += 1;
    if *nodes > MAX_EXTENT_NODES || node.len() < 12 || u16_at(node, 0) != EXTENT_MAGIC {
        return None;
    }
    let entries = u16_at(node, 2) as usize;
    let depth = u16_at(node, 6);
    if depth > depth_left || 12 + entries * 12 > node.len() {
        return None;
    }
    for e in node[12..12 + entries * 12].chunks_exact(12) {
        if depth == 0 {
            let mut len = u16_at(e, 4) as u64;
            if len > 32768 {
                len -= 32768; // an unwritten extent: still the journal's blocks
            }
            let physical = (u16_at(e, 6) as u64) << 32 | u32_at(e, 8) as u64;
            out.push((u32_at(e, 0) as u64, physical, len));
        } else {
            let leaf = (u16_at(e, 8) as u64) << 32 | u32_at(e, 4) as u64;
            if leaf >= sb.blocks {
                return None;
            }
            let mut block = vec![0u8; sb.block_size as usize];
            read(leaf * sb.block_size, &mut block).ok()?;
            walk_extents(read, sb, &block, depth - 1, out, nodes)?;
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn mkfs(dir: &Path, size: &str, extra: &[&str]) -> std::path::PathBuf {
        let content = dir.join("c");
        std::fs::create_dir_all(&content).unwrap();
        std::fs::write(content.join("file"), vec![0xabu8; 3 << 20]).unwrap();
        let img = dir.join("fs.img");
        let ok = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "nodiscard"])
            .args(extra)
            .arg("-d")
            .arg(&content)
            .arg(&img)
            .arg(size)
            .status()
            .expect("mkfs.ext4 (e2fsprogs, installed by scripts/deps.sh) is needed by this test");
        assert!(ok.success());
        img
    }

    fn known(i: Introspection) -> FsChunks {
        match i {
            Introspection::Known(k) => k,
            other => panic!("not introspected: {other:?}"),
        }
    }

    #[test]
    fn finds_free_space_and_the_dead_journal_of_a_clean_ext4() {
        let dir = tempfile::tempdir().unwrap();
        let img = mkfs(dir.path(), "32M", &[]);
        let fs = known(introspect(&img, 4096, Checkpoint::Unknown).unwrap());
        let free_count = fs.free_chunks();
        // 32 MiB, 1 KiB blocks, 4 groups; dumpe2fs counts 22.2 MiB free, of which 7.7 MiB in
        // a BLOCK_UNINIT group that this reader conservatively leaves out: 14.5 MiB.
        assert!(free_count * 4096 > 12 << 20 && free_count * 4096 < 23 << 20, "{free_count} free chunks");
        // mkfs gives a 32 MiB file system a 4 MiB journal: all of it dead but its superblock.
        assert_eq!(fs.journal_blocks, 4096 - 1);
        assert!(fs.journal_chunks() >= 1020, "{}", fs.journal_chunks());
        // Neither the file's data nor anything in use is claimed.
        let data = std::fs::read(&img).unwrap();
        for c in 0..(data.len() / 4096) as u64 {
            let chunk = &data[c as usize * 4096..(c as usize + 1) * 4096];
            if fs.is_free(c) || fs.is_dead_journal(c) {
                assert!(chunk.iter().all(|b| *b != 0xab), "chunk {c} holds file data");
            }
            assert!(!(fs.is_free(c) && fs.is_dead_journal(c)), "chunk {c} both free and journal");
        }
        // Not ext4 at all.
        let junk = dir.path().join("junk");
        std::fs::write(&junk, vec![1u8; 1 << 20]).unwrap();
        assert!(matches!(introspect(&junk, 4096, Checkpoint::Unknown).unwrap(), Introspection::NotExt4));
    }

    #[test]
    fn a_file_system_that_needs_recovery_is_not_trusted_without_a_freeze() {
        let dir = tempfile::tempdir().unwrap();
        let img = mkfs(dir.path(), "16M", &["-b", "4096"]);
        // What a mounted, unfrozen ext4 has on disk (debugfs sets the flag as the kernel does).
        let ok = Command::new("debugfs").args(["-w", "-R", "feature needs_recovery"]).arg(&img).output().unwrap();
        assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
        let got = introspect(&img, 4096, Checkpoint::Unknown).unwrap();
        assert!(matches!(got, Introspection::Skipped(NotCheckpointed::NeedsRecovery)), "{got:?}");
        // A freeze, then only the thaw's superblock write: trusted.
        known(introspect(&img, 4096, Checkpoint::Frozen { chunks_written_after: 1 }).unwrap());
        // More writes after the freeze: not.
        let got = introspect(&img, 4096, Checkpoint::Frozen { chunks_written_after: 3 }).unwrap();
        assert!(matches!(got, Introspection::Skipped(NotCheckpointed::WrittenAfterFreeze { chunks: 3 })));
    }
}
