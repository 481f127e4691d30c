//! What a substrate's sections are and how they are read, below both the file
//! ([`crate::format`]) and the section codec ([`crate::section`]).

use std::io::{self, Read};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Format written by this forage. 2 added the manifest's `nic` and `public` (both
/// optional: a format 1 file reads as one without them); 3 stores windows of pages
/// instead of runs, and memory pages as references to the image's disk blocks
/// ([`crate::section`]).
pub const FORMAT: u32 = 3;

/// A guest page, and a block of the image's disk a memory page may refer to.
pub const PAGE: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SectionRecord {
    /// `memory`, `disk0`, ..., `state`.
    pub name: String,
    /// Size of the file it stands for.
    pub raw_size: u64,
    /// Bytes of data in extents (the rest is holes).
    pub data_bytes: u64,
    pub extents: u64,
    /// Bytes of the section in the substrate file.
    pub encoded_bytes: u64,
    /// Memory pages stored as references to blocks of the guest image's disk (format 3,
    /// the memory section of a substrate whose disk0 is kept over the image).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub image_pages: u64,
    /// What no extent covers is the guest image's disk (this host's image of the
    /// manifest's name and recipe), not zero: the disk is kept as a copy-on-write
    /// difference against the image. Disk sections only.
    #[serde(default, skip_serializing_if = "is_false")]
    pub over_image: bool,
}

pub(crate) fn is_false(b: &bool) -> bool {
    !b
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a substrate (bad magic)")]
    NotASubstrate,
    #[error("substrate format {0} is newer than this forage understands ({FORMAT})")]
    NewerFormat(u32),
    #[error("truncated: {0}")]
    Truncated(&'static str),
    #[error("bad manifest: {0}")]
    Manifest(String),
    #[error("corrupted {section}: {detail}")]
    Corrupt { section: String, detail: String },
    #[error("checksum does not match: corrupted in storage or transfer")]
    Checksum,
    #[error("bytes after the end of the substrate")]
    Trailing,
    #[error("reading the substrate")]
    Io(#[source] io::Error),
}

/// Where decoded sections go.
pub trait Sink {
    /// `section` is about to be written; `raw_size` is its file's size.
    fn begin(&mut self, section: &SectionRecord) -> io::Result<()>;
    fn extent(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// The page at `offset` is the guest image's disk block at `image_offset`, whose
    /// SHA-256 begins with `sum` (format 3 memory sections; see [`crate::section`]).
    fn image_block(&mut self, _offset: u64, _image_offset: u64, _sum: &[u8; 8]) -> io::Result<()> {
        Ok(())
    }
    fn end(&mut self) -> io::Result<()>;
}

/// A reader that hashes what it reads.
pub(crate) struct Hashing<R> {
    pub(crate) inner: R,
    pub(crate) hash: Sha256,
}

impl<R: Read> Hashing<R> {
    pub(crate) fn exact(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), DecodeError> {
        self.inner.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => DecodeError::Truncated(what),
            _ => DecodeError::Io(e),
        })?;
        self.hash.update(&*buf);
        Ok(())
    }
}

/// The data ranges of `a` and `b` merged (sorted, non-overlapping).
pub(crate) fn union(mut a: Vec<(u64, u64)>, b: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    a.extend(b);
    a.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in a {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}
