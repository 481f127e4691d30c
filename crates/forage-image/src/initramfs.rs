//! Writing the initramfs (a newc cpio archive). Written with the `cpio` crate rather than
//! the `cpio` tool so that `/dev/console` can be a device node without being root.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use crate::ImageError;

/// One entry of the archive.
pub enum Entry<'a> {
    Dir(&'a str),
    File { path: &'a str, mode: u32, data: &'a [u8] },
    Symlink { path: &'a str, target: &'a str },
    CharDev { path: &'a str, major: u32, minor: u32 },
}

/// Write `entries` (parents before children) as a newc archive owned by root.
pub fn write(out: &Path, entries: &[Entry<'_>]) -> Result<(), ImageError> {
    let io = |source| ImageError::Io { path: out.to_path_buf(), source };
    let mut w = BufWriter::new(File::create(out).map_err(io)?);
    for (ino, e) in entries.iter().enumerate() {
        let (name, mode, data, rdev): (&str, u32, &[u8], Option<(u32, u32)>) = match e {
            Entry::Dir(p) => (p, 0o040755, &[], None),
            Entry::File { path, mode, data } => (path, 0o100000 | (mode & 0o7777), data, None),
            Entry::Symlink { path, target } => (path, 0o120777, target.as_bytes(), None),
            Entry::CharDev { path, major, minor } => (path, 0o020600, &[], Some((*major, *minor))),
        };
        let mut b = cpio::newc::Builder::new(name)
            .ino(ino as u32 + 1)
            .mode(mode)
            .uid(0)
            .gid(0)
            .nlink(if matches!(e, Entry::Dir(_)) { 2 } else { 1 });
        if let Some((major, minor)) = rdev {
            b = b.rdev_major(major).rdev_minor(minor);
        }
        let size = u32::try_from(data.len()).map_err(|_| ImageError::TooLarge { what: name.to_string() })?;
        let mut writer = b.write(&mut w, size);
        writer.write_all(data).map_err(io)?;
        writer.finish().map_err(io)?;
    }
    cpio::newc::trailer(&mut w).map_err(io)?;
    w.flush().map_err(io)?;
    w.into_inner().map_err(|e| io(e.into_error()))?.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn archive_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("i.cpio");
        write(
            &out,
            &[
                Entry::Dir("dev"),
                Entry::CharDev { path: "dev/console", major: 5, minor: 1 },
                Entry::File { path: "init", mode: 0o755, data: b"#!/bin/sh\n" },
                Entry::Symlink { path: "sh", target: "busybox" },
            ],
        )
        .unwrap();
        let mut f = File::open(&out).unwrap();
        let mut names = Vec::new();
        loop {
            let mut r = cpio::NewcReader::new(f).unwrap();
            if r.entry().is_trailer() {
                break;
            }
            names.push((r.entry().name().to_string(), r.entry().mode(), r.entry().rdev_major()));
            let mut data = Vec::new();
            r.read_to_end(&mut data).unwrap();
            if names.last().unwrap().0 == "init" {
                assert_eq!(data, b"#!/bin/sh\n");
            }
            f = r.finish().unwrap();
        }
        assert_eq!(names[1], ("dev/console".to_string(), 0o020600, 5));
        assert_eq!(names.len(), 4);
    }
}
