//! The substrate file, format 3 (reference: `docs/substrates.md`); formats 1 and 2 are
//! read too.
//!
//! ```text
//! "FORAGESB" | u32 LE format | u32 LE 0 | u64 LE manifest length
//! manifest (JSON, SubstrateManifest)
//! section "memory" | section "disk0" ... | section "state"   (order and sizes in the manifest)
//! sha256 of every byte above (32 bytes), then end of file
//! ```
//! A section is a run of 1 MiB windows of pages ([`crate::section`], format 3; formats 1
//! and 2: of extents, each `u64 LE offset | u32 LE raw length | u32 LE compressed length
//! | zstd bytes`), in ascending, non-overlapping order. What no window stores is zero (a
//! hole in the file it is written to): the balloon and free page reporting leave most of a
//! docked VM's memory file as holes, and only its data is kept.
//!
//! Reading is streaming and checks everything a file claims against caps and against the
//! manifest before allocating for it; [`verify`] reads a whole file without writing
//! anything, so a corrupted substrate is refused before anything runs.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use forage_vm::snapshot::SnapshotManifest;
use serde::{Deserialize, Serialize};

use crate::record::{is_false, Hashing};
pub use crate::record::{DecodeError, SectionRecord, Sink, FORMAT, PAGE};
use sha2::{Digest, Sha256};

pub const MAGIC: &[u8; 8] = b"FORAGESB";
pub const KIND: &str = "forage-substrate";
/// zstd level a dock compresses at unless told otherwise (19 is about a fifth smaller
/// for a Debian guest and takes tens of seconds).
pub const DEFAULT_LEVEL: i32 = 3;
/// Guest ports a detached NIC may forward.
pub const MAX_NIC_PORTS: usize = 16;
pub const HEADER_LEN: usize = 24;
/// Caps on what a file may claim.
pub const MAX_MANIFEST: u64 = 1 << 20;
pub const MAX_EXTENT: u32 = 1 << 20;
pub const MAX_MEMORY: u64 = 64 << 30;
pub const MAX_DISK: u64 = 256 << 30;
pub const MAX_STATE: u64 = 64 << 20;
const EXTENT_HEADER: u64 = 16;

/// What a substrate is: the docked VM's snapshot description (hardware, sizes, device
/// state checksum), where it came from, and its sections.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubstrateManifest {
    pub kind: String,
    pub format: u32,
    /// Substrate name: letters, digits, '-', '_', '.'.
    pub name: String,
    /// What was docked (`image:tiny`, `image:tiny+app:hashsearch`).
    pub source: String,
    /// The guest image whose kernel and initramfs it runs; activation uses this host's
    /// image of that name and refuses one built from another recipe.
    pub image: String,
    pub image_recipe: String,
    /// The guest's service port besides the agent's, if it serves one.
    #[serde(default)]
    pub service_port: Option<u16>,
    /// Guest memory the balloon left when it was docked.
    pub docked_memory_bytes: u64,
    pub docked_at_unix: u64,
    pub snapshot: SnapshotManifest,
    pub sections: Vec<SectionRecord>,
    /// The NIC unplugged at dock (the snapshot's VM has none): activation plugs one in
    /// on this PCI slot with fresh host ports for these guest ports. Format 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nic: Option<DetachedNic>,
    /// A public substrate: each activation renews the guest's identity (host name,
    /// machine-id, SSH host keys). Format 2.
    #[serde(default, skip_serializing_if = "is_false")]
    pub public: bool,
}

/// What a docked VM's NIC was, for activation to plug one back in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetachedNic {
    pub pci_slot: u8,
    pub guest_ports: Vec<u16>,
}

/// Checks only.
pub struct Discard;

impl Sink for Discard {
    fn begin(&mut self, _: &SectionRecord) -> io::Result<()> {
        Ok(())
    }
    fn extent(&mut self, _: u64, _: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn end(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes each wanted section to a (sparse) file: `targets` maps section names to paths.
/// A section kept over the guest image's disk starts as a copy of that disk (`bases`).
pub struct ToFiles {
    pub targets: Vec<(String, PathBuf)>,
    bases: Vec<(String, PathBuf)>,
    current: Option<File>,
    /// The image's disk (disk0's base), opened at the first image block.
    image: Option<File>,
}

impl ToFiles {
    pub fn new(targets: Vec<(String, PathBuf)>) -> Self {
        Self { targets, bases: Vec::new(), current: None, image: None }
    }

    /// The image file section `name` is a difference against.
    pub fn with_base(mut self, name: &str, path: PathBuf) -> Self {
        self.bases.push((name.to_string(), path));
        self
    }
}

impl Sink for ToFiles {
    fn begin(&mut self, s: &SectionRecord) -> io::Result<()> {
        self.current = None;
        if let Some((_, path)) = self.targets.iter().find(|(n, _)| *n == s.name) {
            if s.over_image {
                let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
                let (_, base) = self.bases.iter().find(|(n, _)| *n == s.name).ok_or_else(|| {
                    invalid(format!("section {} is kept over the guest image's disk, which is not at hand", s.name))
                })?;
                if std::fs::metadata(base)?.len() != s.raw_size {
                    return Err(invalid(format!("{}: not the size of section {}", base.display(), s.name)));
                }
                forage_vm::sparse::copy_sparse(base, path)?;
                self.current = Some(std::fs::OpenOptions::new().write(true).open(path)?);
            } else {
                let f = File::create(path)?;
                f.set_len(s.raw_size)?;
                self.current = Some(f);
            }
        }
        Ok(())
    }
    fn extent(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        match &self.current {
            Some(f) => f.write_all_at(data, offset),
            None => Ok(()),
        }
    }
    fn image_block(&mut self, offset: u64, image_offset: u64, sum: &[u8; 8]) -> io::Result<()> {
        let Some(f) = &self.current else { return Ok(()) };
        if self.image.is_none() {
            let (_, base) = self.bases.iter().find(|(n, _)| n == "disk0").ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "memory refers to the guest image's disk, which is not at hand",
                )
            })?;
            self.image = Some(File::open(base)?);
        }
        // Refused as another image, not as a short read, when this host's is smaller.
        let image_len = self.image.as_ref().expect("opened").metadata()?.len();
        if image_offset.checked_add(PAGE as u64).is_none_or(|end| end > image_len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the guest image's disk has no block at {image_offset} (memory page at {offset}): this host's image differs"
                ),
            ));
        }
        let mut block = vec![0u8; PAGE];
        self.image.as_ref().expect("opened").read_exact_at(&mut block, image_offset)?;
        if Sha256::digest(&block)[..8] != sum[..] {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the guest image's disk block at {image_offset} is not the one the substrate was docked with \
                     (memory page at {offset}): this host's image differs"
                ),
            ));
        }
        f.write_all_at(&block, offset)
    }
    fn end(&mut self) -> io::Result<()> {
        self.current = None;
        Ok(())
    }
}

/// Read a whole substrate from `r`, checking it, and hand its sections to `sink`. The
/// manifest is returned only when everything, checksum included, checked out; a sink
/// that writes files must therefore write where nothing runs and discard what it wrote
/// when this fails (activation decodes into folders it removes), or follow a [`verify`].
pub fn decode(r: impl Read, sink: &mut dyn Sink) -> Result<SubstrateManifest, DecodeError> {
    let mut r = Hashing { inner: r, hash: Sha256::new() };
    let (manifest, format) = read_head(&mut r)?;
    // Memory may refer to the image's disk when disk0 is kept over it.
    let image_len = manifest.sections.iter().find(|s| s.name == "disk0" && s.over_image).map(|s| s.raw_size);
    for s in &manifest.sections {
        sink.begin(s).map_err(DecodeError::Io)?;
        match format {
            1 | 2 => read_section(&mut r, s, sink)?,
            3 => crate::section::read_section(&mut r, s, image_len.filter(|_| s.name == "memory"), sink)?,
            other => return Err(DecodeError::NewerFormat(other)),
        }
        sink.end().map_err(DecodeError::Io)?;
    }
    let computed = r.hash.clone().finalize();
    let mut stored = [0u8; 32];
    r.inner.read_exact(&mut stored).map_err(|_| DecodeError::Truncated("checksum"))?;
    if computed.as_slice() != stored {
        return Err(DecodeError::Checksum);
    }
    let mut extra = [0u8; 1];
    match r.inner.read(&mut extra) {
        Ok(0) => Ok(manifest),
        Ok(_) => Err(DecodeError::Trailing),
        Err(e) => Err(DecodeError::Io(e)),
    }
}

/// The manifest of the substrate file at `path` (header and manifest read and checked; the
/// sections and the checksum are not): what an activation needs to know before it decodes,
/// which is where the whole file is verified.
pub fn read_manifest(path: &Path) -> Result<SubstrateManifest, DecodeError> {
    let f = File::open(path).map_err(DecodeError::Io)?;
    let mut r = Hashing { inner: io::BufReader::new(f), hash: Sha256::new() };
    read_head(&mut r).map(|(m, _)| m)
}

/// The manifest and the header's format.
fn read_head(r: &mut Hashing<impl Read>) -> Result<(SubstrateManifest, u32), DecodeError> {
    let mut head = [0u8; HEADER_LEN];
    r.exact(&mut head, "header")?;
    if &head[..8] != MAGIC {
        return Err(DecodeError::NotASubstrate);
    }
    let format = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    if format > FORMAT || format == 0 {
        return Err(DecodeError::NewerFormat(format));
    }
    let mlen = u64::from_le_bytes(head[16..24].try_into().expect("8 bytes"));
    if mlen > MAX_MANIFEST {
        return Err(DecodeError::Manifest(format!("{mlen} bytes, over the cap of {MAX_MANIFEST}")));
    }
    let mut mbytes = vec![0u8; mlen as usize];
    r.exact(&mut mbytes, "manifest")?;
    let manifest: SubstrateManifest =
        serde_json::from_slice(&mbytes).map_err(|e| DecodeError::Manifest(e.to_string()))?;
    check_manifest(&manifest, format).map_err(DecodeError::Manifest)?;
    Ok((manifest, format))
}

/// Read and check a whole substrate file, writing nothing.
pub fn verify(path: &Path) -> Result<SubstrateManifest, DecodeError> {
    let f = File::open(path).map_err(DecodeError::Io)?;
    decode(io::BufReader::with_capacity(1 << 20, f), &mut Discard)
}

fn read_section(r: &mut Hashing<impl Read>, s: &SectionRecord, sink: &mut dyn Sink) -> Result<(), DecodeError> {
    let bad = |detail: String| DecodeError::Corrupt { section: s.name.clone(), detail };
    let (mut consumed, mut data, mut next_free) = (0u64, 0u64, 0u64);
    let mut comp = Vec::new();
    for _ in 0..s.extents {
        let mut h = [0u8; EXTENT_HEADER as usize];
        r.exact(&mut h, "extent header")?;
        let offset = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
        let raw = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
        let clen = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes"));
        if raw == 0 || raw > MAX_EXTENT {
            return Err(bad(format!("extent of {raw} bytes (1 to {MAX_EXTENT})")));
        }
        let inside = matches!(offset.checked_add(raw as u64), Some(e) if e <= s.raw_size);
        if offset < next_free || !inside {
            return Err(bad(format!("extent at {offset} (+{raw}) overlaps or lies outside {}", s.raw_size)));
        }
        if clen as usize > zstd::zstd_safe::compress_bound(raw as usize) {
            return Err(bad(format!("{clen} compressed bytes for {raw}")));
        }
        consumed += EXTENT_HEADER + clen as u64;
        if consumed > s.encoded_bytes {
            return Err(bad("longer than the manifest says".into()));
        }
        comp.resize(clen as usize, 0);
        r.exact(&mut comp, "extent")?;
        let plain = zstd::bulk::decompress(&comp, raw as usize).map_err(|e| bad(format!("zstd: {e}")))?;
        if plain.len() != raw as usize {
            return Err(bad(format!("extent decompresses to {} bytes, not {raw}", plain.len())));
        }
        sink.extent(offset, &plain).map_err(DecodeError::Io)?;
        next_free = offset + raw as u64;
        data += raw as u64;
    }
    if consumed != s.encoded_bytes || data != s.data_bytes {
        return Err(bad("sizes differ from the manifest".into()));
    }
    Ok(())
}

/// What can be checked of a manifest alone, written in file format `format`.
pub fn check_manifest(m: &SubstrateManifest, format: u32) -> Result<(), String> {
    if m.kind != KIND {
        return Err(format!("kind {:?}, expected {KIND}", m.kind));
    }
    if !plain_name(&m.name) || !plain_name(&m.image) {
        return Err(format!("name {:?} or image {:?} is not a plain name", m.name, m.image));
    }
    m.snapshot.check()?;
    let snap = &m.snapshot;
    if let Some(nic) = &m.nic {
        if snap.spec.nic.is_some() {
            return Err("a detached NIC and a NIC in the docked VM".into());
        }
        if nic.guest_ports.len() > MAX_NIC_PORTS || !(1..32).contains(&nic.pci_slot) {
            return Err(format!(
                "detached NIC on PCI slot {} with {} ports (slots 1 to 31, at most {MAX_NIC_PORTS} ports)",
                nic.pci_slot,
                nic.guest_ports.len()
            ));
        }
    }
    let mut expected: Vec<(String, u64, u64)> = vec![("memory".into(), snap.memory.size, MAX_MEMORY)];
    for (i, d) in snap.disks.iter().enumerate() {
        expected.push((format!("disk{i}"), d.size, MAX_DISK));
    }
    expected.push(("state".into(), snap.state.size, MAX_STATE));
    if m.sections.len() != expected.len() {
        return Err(format!("{} sections, the VM needs {}", m.sections.len(), expected.len()));
    }
    for (s, (name, size, cap)) in m.sections.iter().zip(&expected) {
        if &s.name != name || s.raw_size != *size || *size > *cap {
            return Err(format!(
                "section {:?} of {} bytes where {name} of {size} (at most {cap}) belongs",
                s.name, s.raw_size
            ));
        }
        if s.over_image && !name.starts_with("disk") {
            return Err(format!("section {name} cannot be kept over the image's disk"));
        }
        let over_image = m.sections.iter().any(|d| d.name == "disk0" && d.over_image);
        let image_pages_allowed = format >= 3 && name == "memory" && over_image;
        if s.image_pages > 0 && (!image_pages_allowed || s.image_pages > s.raw_size / PAGE as u64) {
            return Err(format!("section {name} claims {} image blocks (format {format})", s.image_pages));
        }
        // Format 3 writes one record per 1 MiB window at most; earlier formats, extents of
        // whole pages. Pages held as image blocks are not data bytes.
        let (max_extents, bound) = match format {
            3.. => (s.raw_size.div_ceil(crate::section::WINDOW), crate::section::max_record_bytes()),
            _ => (
                s.raw_size / PAGE as u64 + 1,
                zstd::zstd_safe::compress_bound(MAX_EXTENT as usize) as u64 + EXTENT_HEADER,
            ),
        };
        let held = s.image_pages.checked_mul(PAGE as u64).and_then(|b| b.checked_add(s.data_bytes));
        if s.extents > max_extents || !matches!(held, Some(h) if h <= s.raw_size) {
            return Err(format!(
                "section {name} claims {} extents, {} data bytes, {} image blocks",
                s.extents, s.data_bytes, s.image_pages
            ));
        }
        if s.encoded_bytes > s.extents.saturating_mul(bound) {
            return Err(format!("section {name} claims {} encoded bytes", s.encoded_bytes));
        }
    }
    if m.docked_memory_bytes > snap.memory.size {
        return Err("docked memory is larger than the VM's memory".into());
    }
    Ok(())
}

pub fn plain_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s != "."
        && s != ".."
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// One section to encode: a file, read for its data ranges (holes and zero pages are left
/// out), or, with `base` (the guest image's disk it started as a copy of), only the pages
/// that differ from `base`.
pub struct SectionInput {
    pub name: String,
    pub path: PathBuf,
    pub base: Option<PathBuf>,
}

/// What went wrong writing a substrate, naming the file that was being read or written
/// (a full disk shows as the folder it filled: the section files in `work`, or `out`).
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("compressing section {section} of {input} into {part}")]
    Section {
        section: String,
        input: PathBuf,
        part: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading the compressed section {part} back into {out}")]
    ReadPart {
        part: PathBuf,
        out: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("encoding the substrate's manifest")]
    Manifest(#[source] serde_json::Error),
    #[error("indexing the blocks of the guest image's disk {image}")]
    Index {
        image: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Write a substrate to `out`: the sections are compressed into `work` first (their sizes
/// go into the manifest, which comes first), then copied after the manifest. `manifest`'s
/// `sections` is filled in. Returns the file's size.
/// Sections are compressed at zstd `level` (1 to 19; [`DEFAULT_LEVEL`]); memory pages equal
/// to a block of the image's disk that disk0 is kept over are stored as references.
pub fn encode(
    out: &Path,
    manifest: &mut SubstrateManifest,
    inputs: &[SectionInput],
    work: &Path,
    level: i32,
) -> Result<u64, EncodeError> {
    let mut parts = Vec::new();
    manifest.sections.clear();
    let image = match inputs.iter().find(|i| i.name == "disk0").and_then(|i| i.base.as_ref()) {
        Some(disk) => Some(
            crate::section::ImageBlocks::build(disk)
                .map_err(|source| EncodeError::Index { image: disk.clone(), source })?,
        ),
        None => None,
    };
    for input in inputs {
        let part = work.join(format!("{}.section", input.name));
        let refs = image.as_ref().filter(|_| input.name == "memory");
        let rec = crate::section::encode_section(&input.name, &input.path, input.base.as_deref(), refs, level, &part)
            .map_err(|source| EncodeError::Section {
            section: input.name.clone(),
            input: input.path.clone(),
            part: part.clone(),
            source,
        })?;
        manifest.sections.push(rec);
        parts.push(part);
    }
    let mbytes = serde_json::to_vec(manifest).map_err(EncodeError::Manifest)?;
    write_substrate(out, &mbytes, &parts)
}

fn write_substrate(out: &Path, mbytes: &[u8], parts: &[PathBuf]) -> Result<u64, EncodeError> {
    let write = |source| EncodeError::Write { path: out.to_path_buf(), source };
    let mut w = HashingWriter { inner: io::BufWriter::new(File::create(out).map_err(write)?), hash: Sha256::new() };
    let head = [MAGIC.as_slice(), &FORMAT.to_le_bytes(), &0u32.to_le_bytes(), &(mbytes.len() as u64).to_le_bytes()];
    for bytes in head.into_iter().chain([mbytes]) {
        w.write_all(bytes).map_err(write)?;
    }
    for part in parts {
        let read_part = |source| EncodeError::ReadPart { part: part.clone(), out: out.to_path_buf(), source };
        let mut f = File::open(part).map_err(read_part)?;
        // io::copy fails on either side: name the side that failed.
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(read_part)?;
            if n == 0 {
                break;
            }
            w.write_all(&buf[..n]).map_err(write)?;
        }
        let _ = std::fs::remove_file(part);
    }
    let digest = w.hash.finalize();
    let mut inner = w.inner;
    inner.write_all(&digest).map_err(write)?;
    let file = inner.into_inner().map_err(|e| write(e.into_error()))?;
    file.sync_all().map_err(write)?;
    file.metadata().map(|m| m.len()).map_err(write)
}

struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
