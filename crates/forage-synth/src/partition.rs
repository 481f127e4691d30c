//! Where a Linux file system may start on a partitioned guest disk: the MBR's primary
//! entries, or the GPT a protective MBR points to (disk images as operators and clouds
//! ship them, `docs/import-disk-image.md`). [`crate::ext4`] reads the file system of the
//! first Linux partition when the disk does not start with one.
//!
//! The table belongs to the guest: these bytes are untrusted. Every count and size is
//! capped, every range checked against the device, arithmetic checked; anything
//! unexpected means fewer candidates, never an error or a read outside the device. A
//! candidate is only a place to look: ext4's own checks decide whether a file system is
//! there. 512-byte sectors (QEMU's disks here). Not read: extended (logical) partitions,
//! the GPT's CRCs and backup header (a table the guest wrote is no more trusted for a
//! good CRC: the guest could write that too).

/// Reads `buf.len()` bytes of the device at an offset (shared with [`crate::ext4`]).
pub type ReadAt<'a> = &'a dyn Fn(u64, &mut [u8]) -> std::io::Result<()>;

/// Bytes per sector of the tables' addresses.
pub const SECTOR: u64 = 512;
/// Most GPT entries read (the usual table's 128).
pub const MAX_GPT_ENTRIES: u32 = 128;
/// Largest GPT entry read (the specification's 128 bytes, times a power of two).
const MAX_GPT_ENTRY_SIZE: u32 = 1024;

/// MBR partition types of a Linux file system.
const MBR_LINUX: u8 = 0x83;
const MBR_GPT_PROTECTIVE: u8 = 0xEE;
/// GPT type GUIDs, as stored (mixed-endian): Linux filesystem data
/// (0FC63DAF-8483-4772-8E79-3D69D8477DE4) and Linux root x86-64
/// (4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709).
const GPT_LINUX_TYPES: [[u8; 16]; 2] = [
    [0xAF, 0x3D, 0xC6, 0x0F, 0x83, 0x84, 0x72, 0x47, 0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47, 0x7D, 0xE4],
    [0xE3, 0xBC, 0x68, 0x4F, 0xCD, 0xE8, 0xB1, 0x4D, 0x96, 0xE7, 0xFB, 0xCA, 0xF9, 0x84, 0xB7, 0x09],
];

/// Which table named a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Mbr,
    Gpt,
}

/// A Linux partition: its bytes on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub table: Table,
    /// Index in its table (0-based).
    pub index: u32,
    pub start: u64,
    pub len: u64,
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

/// Sectors `[first, first + count)` as bytes, if non-empty and inside the device.
fn range(first: u64, count: u64, dev_len: u64) -> Option<(u64, u64)> {
    let start = first.checked_mul(SECTOR)?;
    let len = count.checked_mul(SECTOR)?;
    (first > 0 && len > 0 && start.checked_add(len)? <= dev_len).then_some((start, len))
}

/// The Linux partitions of the device, in table order (none when it has no table).
pub fn linux_partitions(read: ReadAt<'_>, dev_len: u64) -> Vec<Partition> {
    let mut mbr = [0u8; 512];
    if dev_len < SECTOR || read(0, &mut mbr).is_err() || mbr[510..512] != [0x55, 0xAA] {
        return Vec::new();
    }
    let entries: Vec<&[u8]> = (0..4).map(|i| &mbr[446 + 16 * i..446 + 16 * (i + 1)]).collect();
    if entries.iter().any(|e| e[4] == MBR_GPT_PROTECTIVE) {
        return gpt(read, dev_len);
    }
    entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e[4] == MBR_LINUX)
        .filter_map(|(i, e)| {
            let (start, len) = range(u32_at(e, 8) as u64, u32_at(e, 12) as u64, dev_len)?;
            Some(Partition { table: Table::Mbr, index: i as u32, start, len })
        })
        .collect()
}

/// The GPT's Linux partitions (its header at LBA 1).
fn gpt(read: ReadAt<'_>, dev_len: u64) -> Vec<Partition> {
    let mut h = [0u8; 512];
    if dev_len < 2 * SECTOR || read(SECTOR, &mut h).is_err() || &h[0..8] != b"EFI PART" {
        return Vec::new();
    }
    let (entries_lba, count, size) = (u64_at(&h, 72), u32_at(&h, 80), u32_at(&h, 84));
    if !(128..=MAX_GPT_ENTRY_SIZE).contains(&size) || !size.is_power_of_two() {
        return Vec::new();
    }
    let count = count.min(MAX_GPT_ENTRIES);
    let Some((table_start, _)) = range(entries_lba, 1, dev_len) else { return Vec::new() };
    let table_len = count as u64 * size as u64; // at most 128 KiB
    if table_start.checked_add(table_len).is_none_or(|end| end > dev_len) {
        return Vec::new();
    }
    let mut table = vec![0u8; table_len as usize];
    if read(table_start, &mut table).is_err() {
        return Vec::new();
    }
    table
        .chunks_exact(size as usize)
        .enumerate()
        .filter(|(_, e)| GPT_LINUX_TYPES.iter().any(|t| e[0..16] == t[..]))
        .filter_map(|(i, e)| {
            let (first, last) = (u64_at(e, 32), u64_at(e, 40));
            let (start, len) = range(first, last.checked_sub(first)?.checked_add(1)?, dev_len)?;
            Some(Partition { table: Table::Gpt, index: i as u32, start, len })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(disk: &[u8]) -> impl Fn(u64, &mut [u8]) -> std::io::Result<()> + '_ {
        move |off, buf| {
            let s = usize::try_from(off).map_err(std::io::Error::other)?;
            let src = disk.get(s..s + buf.len()).ok_or_else(|| std::io::Error::other("past the end"))?;
            buf.copy_from_slice(src);
            Ok(())
        }
    }

    fn mbr(entries: &[(u8, u32, u32)]) -> Vec<u8> {
        let mut d = vec![0u8; 1 << 20];
        for (i, &(t, first, n)) in entries.iter().enumerate() {
            let e = &mut d[446 + 16 * i..];
            e[4] = t;
            e[8..12].copy_from_slice(&first.to_le_bytes());
            e[12..16].copy_from_slice(&n.to_le_bytes());
        }
        d[510] = 0x55;
        d[511] = 0xAA;
        d
    }

    #[test]
    fn mbr_linux_entries_inside_the_disk_only() {
        let d = mbr(&[(0x0B, 64, 64), (0x83, 128, 256), (0x83, 2000, 100), (0x83, 0, 10)]);
        let r = reader(&d);
        let found = linux_partitions(&r, d.len() as u64);
        assert_eq!(found, vec![Partition { table: Table::Mbr, index: 1, start: 128 * 512, len: 256 * 512 }]);
        let mut unsigned = d.clone();
        unsigned[510] = 0;
        assert!(linux_partitions(&reader(&unsigned), d.len() as u64).is_empty());
    }

    #[test]
    fn gpt_behind_a_protective_mbr_with_capped_entries() {
        let mut d = mbr(&[(0xEE, 1, 2047)]);
        d[512..520].copy_from_slice(b"EFI PART");
        d[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
        d[512 + 80..512 + 84].copy_from_slice(&u32::MAX.to_le_bytes()); // capped to 128
        d[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        let e = &mut d[1024 + 128..1024 + 256]; // entry 1
        e[0..16].copy_from_slice(&GPT_LINUX_TYPES[0]);
        e[32..40].copy_from_slice(&100u64.to_le_bytes());
        e[40..48].copy_from_slice(&199u64.to_le_bytes());
        let e = &mut d[1024 + 256..1024 + 384]; // entry 2: past the disk
        e[0..16].copy_from_slice(&GPT_LINUX_TYPES[1]);
        e[32..40].copy_from_slice(&100u64.to_le_bytes());
        e[40..48].copy_from_slice(&u64::MAX.to_le_bytes());
        let found = linux_partitions(&reader(&d), d.len() as u64);
        assert_eq!(found, vec![Partition { table: Table::Gpt, index: 1, start: 100 * 512, len: 100 * 512 }]);
        d[512 + 84..512 + 88].copy_from_slice(&100u32.to_le_bytes()); // not a power of two
        assert!(linux_partitions(&reader(&d), d.len() as u64).is_empty());
    }

    /// ext4 introspection finds the file system of an MBR partition at 1 MiB, its chunks
    /// moved by 256 (4 KiB chunks), as it finds them in the file system alone.
    #[test]
    fn ext4_in_an_mbr_partition_is_introspected_where_it_lies() {
        use crate::ext4::{introspect, Checkpoint, Introspection};
        let dir = tempfile::tempdir().unwrap();
        let fs_img = dir.path().join("fs.img");
        let st = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "nodiscard"])
            .arg(&fs_img)
            .arg("16M")
            .status()
            .expect("mkfs.ext4 (e2fsprogs, installed by scripts/deps.sh)");
        assert!(st.success());
        let fs = std::fs::read(&fs_img).unwrap();
        let mut disk = mbr(&[(0x83, 2048, (fs.len() / 512) as u32)]);
        disk.extend_from_slice(&fs);
        let disk_img = dir.path().join("disk.img");
        std::fs::write(&disk_img, &disk).unwrap();
        let known = |p: &std::path::Path| match introspect(p, 4096, Checkpoint::Unknown).unwrap() {
            Introspection::Known(k) => k,
            other => panic!("not introspected: {other:?}"),
        };
        let (alone, inside) = (known(&fs_img), known(&disk_img));
        assert!(alone.free_chunks() > 0);
        assert_eq!(alone.free_chunks(), inside.free_chunks());
        assert_eq!(alone.journal_chunks(), inside.journal_chunks());
        for i in 0..(fs.len() / 4096) as u64 {
            assert_eq!(alone.is_free(i), inside.is_free(i + 256), "chunk {i}");
            assert_eq!(alone.is_dead_journal(i), inside.is_dead_journal(i + 256), "chunk {i}");
        }
        assert!((0..256).all(|i| !inside.is_free(i)), "nothing before the partition is free");
    }
}
