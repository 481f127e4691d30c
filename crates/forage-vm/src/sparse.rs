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

/// Write `path` back and drop it from the page cache (`posix_fadvise DONTNEED`).
pub fn evict_from_page_cache(path: &Path) -> io::Result<()> {
    let f = File::open(path)?;
    f.sync_all()?;
    rustix::fs::fadvise(&f, 0, 0, rustix::fs::Advice::DontNeed)?; // length 0: to the end
    Ok(())
}

/// Which 4 KiB pages of `path` are in the host page cache now (`mincore` on a read-only
/// mapping). A page read by anyone since the last eviction is resident (read-ahead may
/// bring in neighbours too).
pub fn resident_pages(path: &Path) -> io::Result<Vec<bool>> {
    let f = File::open(path)?;
    let len = f.metadata()?.len() as usize;
    if len == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: a private read-only mapping of a file we opened; it is only passed to
    // mincore, never dereferenced, and unmapped before returning.
    unsafe {
        let addr = rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            rustix::mm::ProtFlags::READ,
            rustix::mm::MapFlags::SHARED,
            &f,
            0,
        )?;
        let mut vec = vec![0u8; len.div_ceil(4096)];
        let r = libc_mincore(addr, len, &mut vec);
        let _ = rustix::mm::munmap(addr, len);
        r?;
        Ok(vec.into_iter().map(|b| b & 1 == 1).collect())
    }
}

unsafe fn libc_mincore(addr: *mut std::ffi::c_void, len: usize, vec: &mut [u8]) -> io::Result<()> {
    unsafe {
        extern "C" {
            fn mincore(addr: *mut std::ffi::c_void, length: usize, vec: *mut u8) -> i32;
        }
        if mincore(addr, len, vec.as_mut_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
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
    fn eviction_and_residency() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, vec![1u8; 64 * 4096]).unwrap();
        evict_from_page_cache(&a).unwrap();
        let f = File::open(&a).unwrap();
        let mut buf = [0u8; 10];
        f.read_exact_at(&mut buf, 40 * 4096).unwrap();
        let res = resident_pages(&a).unwrap();
        assert_eq!(res.len(), 64);
        assert!(res[40], "the page just read is resident");
    }

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
