//! A substrate's sections in format 3: windows of guest pages (reference:
//! `docs/substrates.md`).
//!
//! ```text
//! record: u64 LE offset (a multiple of 1 MiB) | u32 LE span (1 to 1 MiB, to the window's
//!         end or the file's) | u32 LE compressed length | zstd frame
//! frame:  page map (one byte per page of the span: 0 not stored, 1 data, 2 image block)
//!         | per image block: u64 LE offset in the guest image's disk | 8 bytes of the
//!           block's SHA-256
//!         | the data pages, in order (the span's last page may be short)
//! ```
//!
//! Formats 1 and 2 stored each run of contiguous pages as its own zstd frame. A docked
//! VM's memory is scattered over its physical address space (runs of a few pages), so
//! each run was compressed without the context of its neighbours: a window compresses all
//! of its pages together. And a running Debian guest keeps the pages of the programs and
//! libraries it runs in memory, each equal to a block of the image's disk the substrate
//! refers to anyway: the memory section names those blocks instead of storing them
//! (about a fifth of a docked Debian's memory). What is "not stored" is zero, or for a
//! section kept over the image's disk, the image's block.

use std::collections::HashMap;
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::record::{DecodeError, Hashing, SectionRecord, Sink, PAGE};

/// Pages per window and the window's size.
pub const WINDOW: u64 = 1 << 20;
const PAGES: usize = (WINDOW as usize) / PAGE;
const NOT_STORED: u8 = 0;
const DATA: u8 = 1;
const IMAGE: u8 = 2;
/// An image block's reference in a frame: its offset and a SHA-256 prefix.
pub const IMAGE_REF: usize = 16;
const RECORD_HEADER: u64 = 16;
/// The largest frame a window decompresses to.
pub const MAX_FRAME: usize = PAGES + PAGES * IMAGE_REF + WINDOW as usize;
/// Image blocks indexed at most (4 GiB of an image's data; about 100 MiB of index):
/// blocks past it are not looked for.
const MAX_INDEXED: usize = 1 << 20;

/// Most bytes a record of a section can take in the file.
pub fn max_record_bytes() -> u64 {
    RECORD_HEADER + zstd::zstd_safe::compress_bound(MAX_FRAME) as u64
}

/// The guest image's disk blocks by content, to find memory pages equal to one.
pub struct ImageBlocks {
    file: File,
    by_hash: HashMap<u64, u64>,
}

fn block_hash(b: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

impl ImageBlocks {
    /// Index the non-zero 4 KiB blocks of `path` (its data ranges, at most
    /// [`MAX_INDEXED`]).
    pub fn build(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        let mut by_hash = HashMap::new();
        let mut buf = vec![0u8; WINDOW as usize];
        'ranges: for (start, end) in forage_vm::sparse::data_ranges(&file, len)? {
            let mut off = start - start % PAGE as u64;
            while off < end {
                let n = ((end - off) as usize).min(buf.len());
                file.read_exact_at(&mut buf[..n], off)?;
                for (i, b) in buf[..n].chunks_exact(PAGE).enumerate() {
                    if b.iter().any(|&x| x != 0) {
                        by_hash.entry(block_hash(b)).or_insert(off + (i * PAGE) as u64);
                        if by_hash.len() >= MAX_INDEXED {
                            break 'ranges;
                        }
                    }
                }
                off += n as u64;
            }
        }
        Ok(Self { file, by_hash })
    }

    /// The offset of a block equal to `page` (compared byte for byte), if any.
    fn find(&self, page: &[u8], scratch: &mut [u8]) -> io::Result<Option<u64>> {
        let Some(&off) = self.by_hash.get(&block_hash(page)) else { return Ok(None) };
        self.file.read_exact_at(scratch, off)?;
        Ok((scratch == page).then_some(off))
    }
}

/// One window read and sorted: its page map, image references and data, uncompressed.
struct Window {
    offset: u64,
    span: usize,
    frame: Vec<u8>,
    data: u64,
    images: u64,
}

/// Read the window at `offset` of `src` (`len` bytes long) and sort its pages: `None`
/// when it stores nothing.
fn read_window(
    src: &File,
    base: Option<&File>,
    image: Option<&ImageBlocks>,
    offset: u64,
    len: u64,
) -> io::Result<Option<Window>> {
    let span = (len - offset).min(WINDOW) as usize;
    let mut buf = vec![0u8; span];
    src.read_exact_at(&mut buf, offset)?;
    let mut old = vec![0u8; if base.is_some() { span } else { 0 }];
    if let Some(b) = base {
        b.read_exact_at(&mut old, offset)?;
    }
    let pages = span.div_ceil(PAGE);
    let mut map = vec![NOT_STORED; pages];
    let (mut refs, mut data) = (Vec::new(), Vec::new());
    let mut scratch = vec![0u8; PAGE];
    for (i, kind) in map.iter_mut().enumerate() {
        let page = &buf[i * PAGE..((i + 1) * PAGE).min(span)];
        *kind = match base {
            Some(_) if page == &old[i * PAGE..((i + 1) * PAGE).min(span)] => NOT_STORED,
            Some(_) => DATA,
            None if page.iter().all(|&b| b == 0) => NOT_STORED,
            None => match image.filter(|_| page.len() == PAGE) {
                Some(img) => match img.find(page, &mut scratch)? {
                    Some(at) => {
                        refs.extend_from_slice(&at.to_le_bytes());
                        refs.extend_from_slice(&Sha256::digest(page)[..8]);
                        IMAGE
                    }
                    None => DATA,
                },
                None => DATA,
            },
        };
        if *kind == DATA {
            data.extend_from_slice(page);
        }
    }
    if map.iter().all(|&k| k == NOT_STORED) {
        return Ok(None);
    }
    let (n_data, images) = (data.len() as u64, (refs.len() / IMAGE_REF) as u64);
    let mut frame = map;
    frame.extend_from_slice(&refs);
    frame.extend_from_slice(&data);
    Ok(Some(Window { offset, span, frame, data: n_data, images }))
}

/// Encode the file `path` as a section into `part`: windows of its data ranges (and of
/// `base`'s: pages equal to `base` are not stored), compressed at zstd `level` on every
/// core a few windows at a time; pages equal to a block of `image` are referred to.
pub fn encode_section(
    name: &str,
    path: &Path,
    base: Option<&Path>,
    image: Option<&ImageBlocks>,
    level: i32,
    part: &Path,
) -> io::Result<SectionRecord> {
    let src = File::open(path)?;
    let len = src.metadata()?.len();
    let base = match base {
        Some(b) => {
            let f = File::open(b)?;
            if f.metadata()?.len() != len {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} differs in size", b.display())));
            }
            Some(f)
        }
        None => None,
    };
    let mut out = io::BufWriter::new(File::create(part)?);
    let mut rec = SectionRecord {
        name: name.into(),
        raw_size: len,
        data_bytes: 0,
        extents: 0,
        encoded_bytes: 0,
        over_image: base.is_some(),
        image_pages: 0,
    };
    let mut ranges = forage_vm::sparse::data_ranges(&src, len)?;
    if let Some(b) = &base {
        ranges = crate::record::union(ranges, forage_vm::sparse::data_ranges(b, len)?);
    }
    let mut windows: Vec<u64> = Vec::new();
    for (start, end) in ranges.into_iter().filter(|(s, e)| e > s) {
        for w in start / WINDOW..=(end - 1) / WINDOW {
            if windows.last() != Some(&(w * WINDOW)) {
                windows.push(w * WINDOW);
            }
        }
    }
    // A few windows per core at a time: memory stays bounded whatever the section's size.
    let batch = 2 * rayon::current_num_threads().max(1);
    for offsets in windows.chunks(batch) {
        let read: Vec<Window> = offsets
            .iter()
            .map(|&o| read_window(&src, base.as_ref(), image, o, len))
            .filter_map(|w| w.transpose())
            .collect::<io::Result<_>>()?;
        let compressed: Vec<Vec<u8>> =
            read.par_iter().map(|w| zstd::bulk::compress(&w.frame, level)).collect::<io::Result<_>>()?;
        for (w, comp) in read.iter().zip(compressed) {
            out.write_all(&w.offset.to_le_bytes())?;
            out.write_all(&(w.span as u32).to_le_bytes())?;
            out.write_all(&(comp.len() as u32).to_le_bytes())?;
            out.write_all(&comp)?;
            rec.extents += 1;
            rec.data_bytes += w.data;
            rec.image_pages += w.images;
            rec.encoded_bytes += RECORD_HEADER + comp.len() as u64;
        }
    }
    out.flush()?;
    Ok(rec)
}

/// Read a format 3 section from `r` into `sink`, checking every record against the
/// section's record and caps. `image_len`: the size of the guest image's disk a memory
/// section may refer to (`None`: references are refused).
pub(crate) fn read_section(
    r: &mut Hashing<impl Read>,
    s: &SectionRecord,
    image_len: Option<u64>,
    sink: &mut dyn Sink,
) -> Result<(), DecodeError> {
    let bad = |detail: String| DecodeError::Corrupt { section: s.name.clone(), detail };
    let (mut consumed, mut data, mut images, mut next_free) = (0u64, 0u64, 0u64, 0u64);
    let mut comp = Vec::new();
    for _ in 0..s.extents {
        let mut h = [0u8; RECORD_HEADER as usize];
        r.exact(&mut h, "window header")?;
        let offset = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
        let span = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes")) as u64;
        let clen = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes"));
        let whole = offset.checked_add(WINDOW).map_or(s.raw_size, |e| e.min(s.raw_size)).saturating_sub(offset);
        if offset % WINDOW != 0 || offset < next_free || offset >= s.raw_size || span != whole {
            return Err(bad(format!("window at {offset} (+{span}) is misplaced in {} bytes", s.raw_size)));
        }
        if clen as usize > zstd::zstd_safe::compress_bound(MAX_FRAME) {
            return Err(bad(format!("{clen} compressed bytes for a window")));
        }
        consumed += RECORD_HEADER + clen as u64;
        if consumed > s.encoded_bytes {
            return Err(bad("longer than the manifest says".into()));
        }
        comp.resize(clen as usize, 0);
        r.exact(&mut comp, "window")?;
        let pages = (span as usize).div_ceil(PAGE);
        let cap = pages + pages * IMAGE_REF + span as usize;
        let frame = zstd::bulk::decompress(&comp, cap).map_err(|e| bad(format!("zstd: {e}")))?;
        let (d, i) = emit(&frame, offset, span as usize, image_len, sink).map_err(|e| match e {
            Emit::Bad(detail) => bad(format!("window at {offset}: {detail}")),
            Emit::Io(e) => DecodeError::Io(e),
        })?;
        data += d;
        images += i;
        next_free = offset + span;
    }
    if consumed != s.encoded_bytes || data != s.data_bytes || images != s.image_pages {
        return Err(bad("sizes differ from the manifest".into()));
    }
    Ok(())
}

enum Emit {
    Bad(String),
    Io(io::Error),
}

/// Check one window's frame and hand its pages to `sink`: data bytes and image blocks.
fn emit(
    frame: &[u8],
    offset: u64,
    span: usize,
    image_len: Option<u64>,
    sink: &mut dyn Sink,
) -> Result<(u64, u64), Emit> {
    let pages = span.div_ceil(PAGE);
    let page_len = |i: usize| (span - i * PAGE).min(PAGE);
    let map = frame.get(..pages).ok_or_else(|| Emit::Bad("shorter than its page map".into()))?;
    let n_images = map.iter().filter(|&&k| k == IMAGE).count();
    let data_len: usize = (0..pages).filter(|&i| map[i] == DATA).map(page_len).sum();
    if let Some(k) = map.iter().find(|&&k| k > IMAGE) {
        return Err(Emit::Bad(format!("page kind {k}")));
    }
    if frame.len() != pages + n_images * IMAGE_REF + data_len {
        return Err(Emit::Bad(format!(
            "{} bytes where its map says {}",
            frame.len(),
            pages + n_images * IMAGE_REF + data_len
        )));
    }
    if map.iter().all(|&k| k == NOT_STORED) {
        return Err(Emit::Bad("stores nothing".into()));
    }
    let (mut refs, mut data) = (&frame[pages..pages + n_images * IMAGE_REF], &frame[pages + n_images * IMAGE_REF..]);
    let mut i = 0;
    while i < pages {
        match map[i] {
            NOT_STORED => i += 1,
            DATA => {
                let run_start = i;
                while i < pages && map[i] == DATA {
                    i += 1;
                }
                let n: usize = (run_start..i).map(page_len).sum();
                sink.extent(offset + (run_start * PAGE) as u64, &data[..n]).map_err(Emit::Io)?;
                data = &data[n..];
            }
            _ => {
                let at = u64::from_le_bytes(refs[..8].try_into().expect("8 bytes"));
                let sum: [u8; 8] = refs[8..16].try_into().expect("8 bytes");
                let inside = |len: u64| at % PAGE as u64 == 0 && at.checked_add(PAGE as u64).is_some_and(|e| e <= len);
                match image_len {
                    None => return Err(Emit::Bad("refers to an image block; only memory over an image may".into())),
                    Some(_) if page_len(i) != PAGE => {
                        return Err(Emit::Bad("a short page refers to an image block".into()))
                    }
                    Some(len) if !inside(len) => {
                        return Err(Emit::Bad(format!("image block at {at} outside the image")))
                    }
                    Some(_) => sink.image_block(offset + (i * PAGE) as u64, at, &sum).map_err(Emit::Io)?,
                }
                refs = &refs[IMAGE_REF..];
                i += 1;
            }
        }
    }
    Ok((data_len as u64, n_images as u64))
}
