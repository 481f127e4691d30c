//! Copying files that have holes (guest memory, disk images) without filling the holes.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rustix::fs::SeekFrom;

/// Copy `from` to `to` (created or truncated), reproducing holes: only the data ranges
/// reported by `SEEK_DATA`/`SEEK_HOLE` are read and written. Uses a 1 MiB buffer.
/// Returns the number of data bytes copied.
pub fn copy_sparse(from: &Path, to: &Path) -> io::Result<u64> {
    let src = File::open(from)?;
    let len = src.metadata()?.len();
    let dst = File::create(to)?;
    dst.set_len(len)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0;
    for (start, end) in data_ranges(&src, len)? {
        let mut off = start;
        while off < end {
            let n = ((end - off) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], off)?;
            if buf[..n].iter().any(|&b| b != 0) {
                dst.write_all_at(&buf[..n], off)?;
            }
            off += n as u64;
            copied += n as u64;
        }
    }
    dst.sync_all()?;
    Ok(copied)
}

/// The `[start, end)` ranges of `file` that hold data (not holes).
pub fn data_ranges(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut ranges = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let start = match rustix::fs::seek(file, SeekFrom::Data(pos as i64)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = rustix::fs::seek(file, SeekFrom::Hole(start as i64))?.min(len);
        ranges.push((start, end));
        pos = end;
    }
    Ok(ranges)
}

/// Bytes of `path` that are allocated (not holes).
pub fn allocated_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_survive_and_data_is_identical() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let f = File::create(&a).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[7u8; 4096], 5 << 20).unwrap();
        f.write_all_at(&[9u8; 10], (64 << 20) - 10).unwrap();
        drop(f);
        let b = dir.path().join("b");
        copy_sparse(&a, &b).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert!(allocated_bytes(&b).unwrap() < 4 << 20, "holes were filled");
    }
}
