//! Free blocks of an ext2/3/4 file system, read from its on-disk block bitmaps (superblock
//! -> group descriptors -> bitmaps). Used to drop free chunks from overlays (the semantic
//! gap). Only meaningful for a stopped guest whose file system was flushed (forage freezes
//! and thaws it just before the save).
//!
//! The disk belongs to a guest: these bytes are untrusted. Anything unexpected returns an
//! error or `None` (no knowledge), never a wrong "free".

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

const SUPERBLOCK_OFFSET: u64 = 1024;
const EXT_MAGIC: u16 = 0xEF53;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_64BIT: u32 = 0x80;
const BG_BLOCK_UNINIT: u16 = 0x2;
const MAX_GROUPS: u64 = 1 << 20;

/// Which `chunk_size` chunks of the device are wholly free blocks. `None` when the device
/// does not hold an ext file system this reader understands.
pub fn free_chunks(disk: &Path, chunk_size: u64) -> std::io::Result<Option<Vec<bool>>> {
    let f = File::open(disk)?;
    let dev_len = f.metadata()?.len();
    free_chunks_in(&|off, buf| f.read_exact_at(buf, off), dev_len, chunk_size)
}

/// The same over any reader of the device's bytes (fuzzed).
pub fn free_chunks_in(
    read: &dyn Fn(u64, &mut [u8]) -> std::io::Result<()>,
    dev_len: u64,
    chunk_size: u64,
) -> std::io::Result<Option<Vec<bool>>> {
    let mut sb = [0u8; 1024];
    if dev_len < SUPERBLOCK_OFFSET + 1024 || read(SUPERBLOCK_OFFSET, &mut sb).is_err() {
        return Ok(None);
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    if u16_at(&sb, 0x38) != EXT_MAGIC {
        return Ok(None);
    }
    let log = u32_at(&sb, 0x18);
    if log > 6 {
        return Ok(None);
    }
    let block_size = 1024u64 << log;
    let incompat = u32_at(&sb, 0x60);
    if incompat & INCOMPAT_META_BG != 0 {
        return Ok(None); // descriptors scattered: not supported, so no claims
    }
    let is64 = incompat & INCOMPAT_64BIT != 0;
    let mut blocks = u32_at(&sb, 0x04) as u64;
    if is64 {
        blocks |= (u32_at(&sb, 0x150) as u64) << 32;
    }
    let first_data_block = u32_at(&sb, 0x14) as u64;
    let per_group = u32_at(&sb, 0x20) as u64;
    let desc_size = if is64 { u16_at(&sb, 0xFE) as u64 } else { 32 };
    if per_group == 0
        || per_group > block_size * 8
        || blocks > dev_len / block_size + 1
        || first_data_block >= blocks
        || !(32..=1024).contains(&desc_size)
    {
        return Ok(None);
    }
    let groups = (blocks - first_data_block).div_ceil(per_group);
    if groups > MAX_GROUPS {
        return Ok(None);
    }
    let mut descs = vec![0u8; (groups * desc_size) as usize];
    if read((first_data_block + 1) * block_size, &mut descs).is_err() {
        return Ok(None);
    }
    let mut free_block = vec![false; blocks as usize];
    let mut bitmap = vec![0u8; block_size as usize];
    for g in 0..groups {
        let d = &descs[(g * desc_size) as usize..((g + 1) * desc_size) as usize];
        if u16_at(d, 0x12) & BG_BLOCK_UNINIT != 0 {
            continue; // bitmap not initialized: claim nothing
        }
        let mut at = u32_at(d, 0) as u64;
        if is64 && desc_size >= 64 {
            at |= (u32_at(d, 0x20) as u64) << 32;
        }
        if at >= blocks || read(at * block_size, &mut bitmap).is_err() {
            return Ok(None);
        }
        let start = first_data_block + g * per_group;
        for i in 0..per_group.min(blocks - start) {
            if bitmap[(i / 8) as usize] & (1 << (i % 8)) == 0 {
                free_block[(start + i) as usize] = true;
            }
        }
    }
    let chunks = dev_len.div_ceil(chunk_size);
    let mut out = vec![false; chunks as usize];
    for (c, slot) in out.iter_mut().enumerate() {
        let first = c as u64 * chunk_size / block_size;
        let last = ((c as u64 + 1) * chunk_size).div_ceil(block_size).min(blocks);
        *slot = first < last && (first..last).all(|b| free_block[b as usize]);
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn finds_free_space_of_a_real_ext4() {
        let dir = tempfile::tempdir().unwrap();
        let content = dir.path().join("c");
        std::fs::create_dir(&content).unwrap();
        std::fs::write(content.join("file"), vec![0xabu8; 3 << 20]).unwrap();
        let img = dir.path().join("fs.img");
        let ok = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "nodiscard", "-d"])
            .arg(&content)
            .arg(&img)
            .arg("32M")
            .status()
            .expect("mkfs.ext4 (e2fsprogs, installed by scripts/deps.sh) is needed by this test");
        assert!(ok.success());
        let free = free_chunks(&img, 4096).unwrap().expect("ext4 understood");
        let free_count = free.iter().filter(|f| **f).count() as u64;
        // 32 MiB, 1 KiB blocks, 4 groups; dumpe2fs counts 22.2 MiB free, of which 7.7 MiB in
        // a BLOCK_UNINIT group that this reader conservatively leaves out: 14.5 MiB.
        assert!(free_count * 4096 > 12 << 20 && free_count * 4096 < 23 << 20, "{free_count} free chunks");
        // The file's data chunks are not free.
        let data = std::fs::read(&img).unwrap();
        for (c, f) in free.iter().enumerate() {
            if *f {
                assert!(data[c * 4096..(c + 1) * 4096].iter().all(|b| *b != 0xab), "chunk {c} holds file data");
            }
        }
        // Not ext4 at all.
        let junk = dir.path().join("junk");
        std::fs::write(&junk, vec![1u8; 1 << 20]).unwrap();
        assert!(free_chunks(&junk, 4096).unwrap().is_none());
    }
}
