//! The overlay manifest: what base it applies to, the chunk map, the blob and segment
//! tables, and statistics. Encoded as CBOR (self-describing: fields can be added without
//! breaking older readers, which ignore them) and compressed with zstd.

use std::collections::BTreeMap;
use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkEntry, Space, CHUNK_SIZE};
use crate::codec::{DeltaCodec, SegmentCodec};
use crate::{FormatError, FORMAT_VERSION, PACKAGES_FORMAT, RESIDUE_FORMAT};

/// Largest decompressed manifest accepted at all (about a million chunks, a few GB of
/// modified state); a receiver that knows the base caps it lower ([`raw_limit_for`]).
pub const MAX_MANIFEST_RAW: u64 = 64 << 20;
/// Most a chunk can add to a decoded manifest: its chunk entry, a blob, a share of a
/// segment, as CBOR with field names (about 120 bytes in practice).
const MAX_RAW_PER_CHUNK: u64 = 192;

/// The largest decompressed manifest an overlay of a VM with this much memory and disk
/// can have: what a receiver holding the base accepts, before decoding anything.
pub fn raw_limit_for(memory_size: u64, disk_size: u64) -> u64 {
    let chunks = memory_size.div_ceil(CHUNK_SIZE as u64).saturating_add(disk_size.div_ceil(CHUNK_SIZE as u64));
    chunks.saturating_mul(MAX_RAW_PER_CHUNK).saturating_add(1 << 20).min(MAX_MANIFEST_RAW)
}
/// Largest decompressed segment accepted.
pub const MAX_SEGMENT_RAW: u64 = 16 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`crate::OVERLAY_FORMAT`], or [`crate::RESIDUE_FORMAT`] for a residue.
    pub format: u32,
    pub base: BaseRef,
    /// Residues only: the digest of the overlay this residue continues (hex of that
    /// overlay's header manifest SHA-256, [`crate::Header::digest`]). Not written when
    /// absent, so plain overlays encode exactly as before the field existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub disk_size: u64,
    pub memory_size: u64,
    pub chunk_size: u32,
    /// Modified chunks of the launch VM, sorted by (space, index), each once. In a residue:
    /// the chunks the instance changed since launch (still referenced against the base).
    pub chunks: Vec<ChunkEntry>,
    pub blobs: Vec<Blob>,
    pub segments: Vec<Segment>,
    pub order: Order,
    /// The launch VM's QEMU device state lives in this segment.
    pub device_state: DeviceState,
    /// The launch VM's description (a forage-vm `VmSpec`, opaque here).
    pub vm: serde_json::Value,
    #[serde(default)]
    pub service: Option<Service>,
    pub stats: Stats,
    #[serde(default)]
    pub created_unix: u64,
    #[serde(default)]
    pub creator: String,
    /// Format 3 only: the Debian packages whose blocks [`ChunkRef::Package`] names. Not
    /// written when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packages: Option<PackageSet>,
}

/// Most .debs one overlay may list (a desktop install is a few thousand).
pub const MAX_DEBS: usize = 20_000;
/// Largest package volume an overlay may name: 64 GiB of files, in 4 KiB blocks.
pub const MAX_VOLUME_BLOCKS: u64 = 1 << 24;

/// The Debian packages of a format-3 overlay, in volume order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageSet {
    pub debs: Vec<DebRef>,
    /// 4 KiB blocks in the volume they make (what the cloudlet must find when it rebuilds it).
    pub blocks: u64,
    /// SHA-256 of the whole volume, checked when the cloudlet rebuilds it.
    pub volume_sha256: String,
}

/// One .deb, named by its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebRef {
    pub package: String,
    pub version: String,
    pub architecture: String,
    /// SHA-256 of the .deb file (what Debian's signed package index lists too).
    pub sha256: String,
    pub size: u64,
}

impl PackageSet {
    /// The volume's name: SHA-256 over a version line and the .debs' digests, in order.
    pub fn digest(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"forage-package-volume 1\n");
        for d in &self.debs {
            h.update(d.sha256.as_bytes());
            h.update(b"\n");
        }
        h.update(self.volume_sha256.as_bytes());
        hex::encode(h.finalize())
    }

    fn validate(&self) -> Result<(), String> {
        if self.debs.is_empty() || self.debs.len() > MAX_DEBS {
            return Err(format!("{} Debian packages listed (1 to {MAX_DEBS})", self.debs.len()));
        }
        if self.blocks == 0 || self.blocks > MAX_VOLUME_BLOCKS {
            return Err(format!("a package volume of {} blocks (1 to {MAX_VOLUME_BLOCKS})", self.blocks));
        }
        if !is_digest(&self.volume_sha256) {
            return Err("the package volume's SHA-256 is not 64 lowercase hex digits".into());
        }
        let mut seen = std::collections::HashSet::new();
        // Names as Debian allows them (policy 5.6.1, 5.6.12); they are only ever shown.
        let plain = |s: &str, extra: &str| {
            !s.is_empty() && s.len() <= 200 && s.chars().all(|c| c.is_ascii_alphanumeric() || extra.contains(c))
        };
        for d in &self.debs {
            if !plain(&d.package, "+-.") || !plain(&d.version, "+-.~:") || !plain(&d.architecture, "-") {
                return Err(
                    "a Debian package's name, version or architecture has characters Debian does not allow".into()
                );
            }
            if !is_digest(&d.sha256) {
                return Err(format!("package {}: its SHA-256 is not 64 lowercase hex digits", d.package));
            }
            if !seen.insert(&d.sha256) {
                return Err(format!("package {}={} is listed twice", d.package, d.version));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseRef {
    /// The base VM's digest: names it everywhere.
    pub digest: String,
    /// Its name where the overlay was built (informative).
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    pub port: u16,
    /// A request line whose answer shows the service works.
    #[serde(default)]
    pub probe: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob {
    pub segment: u32,
    pub offset: u32,
    pub len: u32,
    pub encoding: BlobEncoding,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "as", rename_all = "lowercase")]
pub enum BlobEncoding {
    /// The chunk's 4096 bytes.
    Raw,
    /// A delta against base chunk `index` of `space`.
    Delta { codec: DeltaCodec, space: Space, index: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SegmentKind {
    Chunks,
    DeviceState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub kind: SegmentKind,
    pub codec: SegmentCodec,
    pub compressed_len: u64,
    pub raw_len: u64,
    /// SHA-256 of the compressed bytes, as they travel.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub segment: u32,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "lowercase")]
pub enum Order {
    /// Blobs in chunk order (memory, then disk).
    Offset,
    /// Blobs of chunks touched by a profiling resume before the first response come first.
    Access {
        profiled_chunks: u64,
        /// How many blobs (from the start) were touched.
        #[serde(default)]
        accessed_blobs: u64,
    },
}

/// What creation saw and produced, per stage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub modified_disk_chunks: u64,
    pub modified_memory_chunks: u64,
    /// Chunks per reference kind (`zero`, `free`, `base_disk`, ...).
    pub refs: BTreeMap<String, u64>,
    /// Free chunks by where the knowledge came from (`trim`, `ext4`, `reported`).
    #[serde(default)]
    pub free_by_source: BTreeMap<String, u64>,
    pub blobs_raw: u64,
    pub blobs_delta: u64,
    /// Bytes of modified state (modified chunks x 4 KiB).
    pub modified_bytes: u64,
    /// Bytes of unique blobs before deltas (blobs x 4 KiB).
    pub dedup_bytes: u64,
    /// Bytes of blob payloads after deltas.
    pub delta_bytes: u64,
    /// Bytes of segments after compression (chunk segments only).
    pub compressed_bytes: u64,
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        let mut cbor = Vec::new();
        ciborium::into_writer(self, &mut cbor).expect("manifest encodes");
        zstd::bulk::compress(&cbor, 9).expect("zstd compresses in memory")
    }

    /// Decode and check a manifest (untrusted bytes).
    pub fn decode(compressed: &[u8]) -> Result<Self, FormatError> {
        Self::decode_limited(compressed, MAX_MANIFEST_RAW)
    }

    /// [`Self::decode`], refusing a manifest that decompresses to more than `limit`
    /// bytes (see [`raw_limit_for`]) before it is parsed.
    pub fn decode_limited(compressed: &[u8], limit: u64) -> Result<Self, FormatError> {
        let limit = limit.min(MAX_MANIFEST_RAW);
        let mut raw = Vec::new();
        zstd::stream::read::Decoder::new(compressed)
            .and_then(|d| d.take(limit + 1).read_to_end(&mut raw))
            .map_err(|e| FormatError::corrupt(format!("manifest compression: {e}")))?;
        if raw.len() as u64 > limit {
            return Err(FormatError::TooLarge { what: "manifest".into(), limit });
        }
        let m: Manifest =
            ciborium::from_reader(&raw[..]).map_err(|e| FormatError::corrupt(format!("manifest: {e}")))?;
        m.validate()?;
        Ok(m)
    }

    /// Every reference points inside its table, every blob inside its segment.
    pub fn validate(&self) -> Result<(), FormatError> {
        let bad = |s: String| Err(FormatError::corrupt(format!("manifest: {s}")));
        if self.format > FORMAT_VERSION {
            return Err(FormatError::NewerFormat { found: self.format });
        }
        match (self.format, &self.parent) {
            (0, _) => return bad("format 0".into()),
            (RESIDUE_FORMAT, None) => return bad("a residue (format 2) without its parent overlay's digest".into()),
            (RESIDUE_FORMAT, Some(p)) if !is_digest(p) => {
                return bad("parent overlay digest is not 64 lowercase hex digits".into())
            }
            (f, Some(_)) if f != RESIDUE_FORMAT => {
                return bad(format!("format {f} overlay names a parent overlay (only residues, format 2, do)"))
            }
            _ => {}
        }
        match (self.format, &self.packages) {
            (PACKAGES_FORMAT, None) => return bad("a format 3 overlay without its Debian packages".into()),
            (PACKAGES_FORMAT, Some(p)) => p.validate().or_else(bad)?,
            (f, Some(_)) => return bad(format!("format {f} overlay lists Debian packages (only format 3 does)")),
            _ => {}
        }
        let volume_blocks = self.packages.as_ref().map_or(0, |p| p.blocks);
        if self.chunk_size as usize != CHUNK_SIZE {
            return bad(format!("chunk size {} (only {CHUNK_SIZE} is supported)", self.chunk_size));
        }
        let chunks_in = |space: Space| match space {
            Space::Disk => self.disk_size.div_ceil(CHUNK_SIZE as u64),
            Space::Memory => self.memory_size.div_ceil(CHUNK_SIZE as u64),
        };
        let mut last: Option<(Space, u64)> = None;
        for c in &self.chunks {
            if c.index >= chunks_in(c.space) {
                return bad(format!("{} chunk {} is past the end", c.space.name(), c.index));
            }
            if last.is_some_and(|l| l >= (c.space, c.index)) {
                return bad("chunk map is not sorted or repeats a chunk".into());
            }
            last = Some((c.space, c.index));
            match c.reference {
                crate::ChunkRef::BaseDisk(i) if i >= chunks_in(Space::Disk) => {
                    return bad(format!("base disk chunk {i} is past the end"))
                }
                crate::ChunkRef::BaseMemory(i) if i >= chunks_in(Space::Memory) => {
                    return bad(format!("base memory chunk {i} is past the end"))
                }
                crate::ChunkRef::Package(i) if i >= volume_blocks => {
                    return bad(format!("package block {i} is past the end of the package volume"))
                }
                r => {
                    if let Some(b) = r.blob() {
                        if b as usize >= self.blobs.len() {
                            return bad(format!("blob {b} does not exist"));
                        }
                    }
                }
            }
        }
        // What segments claim is bounded by the blobs they hold: a chunk segment is its
        // blobs end to end, and compression does not grow data by more than a little.
        let mut held = vec![0u64; self.segments.len()];
        for b in &self.blobs {
            if let Some(h) = held.get_mut(b.segment as usize) {
                *h += b.len as u64;
            }
        }
        for (i, s) in self.segments.iter().enumerate() {
            if s.kind == SegmentKind::Chunks && s.raw_len != held[i] {
                return bad(format!("segment {i} claims {} bytes, its blobs are {}", s.raw_len, held[i]));
            }
            if s.compressed_len > s.raw_len + s.raw_len / 16 + 1024 {
                return bad(format!("segment {i} claims {} compressed bytes for {} raw", s.compressed_len, s.raw_len));
            }
            if s.raw_len > MAX_SEGMENT_RAW {
                return Err(FormatError::TooLarge { what: format!("segment {i}"), limit: MAX_SEGMENT_RAW });
            }
            if s.compressed_len > MAX_SEGMENT_RAW * 2 {
                return Err(FormatError::TooLarge {
                    what: format!("compressed segment {i}"),
                    limit: MAX_SEGMENT_RAW * 2,
                });
            }
        }
        for (i, b) in self.blobs.iter().enumerate() {
            let Some(seg) = self.segments.get(b.segment as usize) else {
                return bad(format!("blob {i} is in missing segment {}", b.segment));
            };
            if seg.kind != SegmentKind::Chunks || b.offset as u64 + b.len as u64 > seg.raw_len {
                return bad(format!("blob {i} lies outside segment {}", b.segment));
            }
            match b.encoding {
                BlobEncoding::Raw if b.len as usize != CHUNK_SIZE => {
                    return bad(format!("raw blob {i} is {} bytes", b.len))
                }
                BlobEncoding::Delta { space, index, .. } if index >= chunks_in(space) => {
                    return bad(format!("blob {i} deltas against a chunk past the end"))
                }
                _ => {}
            }
        }
        match self.segments.get(self.device_state.segment as usize) {
            Some(s) if s.kind == SegmentKind::DeviceState && s.raw_len == self.device_state.size => Ok(()),
            _ => bad("device state segment is missing or the wrong size".into()),
        }
    }

    /// A residue: changes against the overlay named by `parent`, not applicable alone.
    pub fn is_residue(&self) -> bool {
        self.parent.is_some()
    }

    /// Count of chunks per reference kind, from the chunk map itself.
    pub fn ref_counts(&self) -> BTreeMap<&'static str, u64> {
        let mut m = BTreeMap::new();
        for c in &self.chunks {
            *m.entry(c.reference.kind()).or_insert(0) += 1;
        }
        m
    }

    /// Total bytes of segments (what travels after the manifest).
    pub fn segments_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.compressed_len).sum()
    }
}

/// SHA-256 in lowercase hex.
fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ChunkRef;

    type Edit = Box<dyn Fn(&mut Manifest)>;

    pub fn sample() -> Manifest {
        Manifest {
            format: crate::OVERLAY_FORMAT,
            base: BaseRef { digest: "ab".repeat(32), name: "b".into() },
            parent: None,
            disk_size: 64 << 20,
            memory_size: 256 << 20,
            chunk_size: CHUNK_SIZE as u32,
            chunks: vec![
                ChunkEntry { space: Space::Disk, index: 1, reference: ChunkRef::New(0) },
                ChunkEntry { space: Space::Disk, index: 5, reference: ChunkRef::Zero },
                ChunkEntry { space: Space::Memory, index: 2, reference: ChunkRef::CrossSpace(0) },
                ChunkEntry { space: Space::Memory, index: 3, reference: ChunkRef::BaseDisk(9) },
            ],
            blobs: vec![Blob { segment: 0, offset: 0, len: CHUNK_SIZE as u32, encoding: BlobEncoding::Raw }],
            segments: vec![
                Segment {
                    kind: SegmentKind::Chunks,
                    codec: SegmentCodec::Zstd { level: 3 },
                    compressed_len: 10,
                    raw_len: CHUNK_SIZE as u64,
                    sha256: String::new(),
                },
                Segment {
                    kind: SegmentKind::DeviceState,
                    codec: SegmentCodec::None,
                    compressed_len: 4,
                    raw_len: 4,
                    sha256: String::new(),
                },
            ],
            order: Order::Offset,
            device_state: DeviceState { segment: 1, size: 4, sha256: String::new() },
            vm: serde_json::json!({"memory_mib": 256}),
            service: Some(Service { name: "s".into(), port: 8080, probe: None }),
            stats: Stats::default(),
            created_unix: 1,
            creator: "test".into(),
            packages: None,
        }
    }

    fn with_packages() -> Manifest {
        let mut m = sample();
        m.format = crate::PACKAGES_FORMAT;
        m.packages = Some(PackageSet {
            debs: vec![DebRef {
                package: "libfoo1".into(),
                version: "1:2.3-4+deb12u1".into(),
                architecture: "amd64".into(),
                sha256: "cd".repeat(32),
                size: 1000,
            }],
            blocks: 10,
            volume_sha256: "ef".repeat(32),
        });
        m.chunks.push(ChunkEntry { space: Space::Memory, index: 4, reference: ChunkRef::Package(9) });
        m
    }

    #[test]
    fn packages_round_trip_and_are_checked() {
        let m = with_packages();
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        assert_eq!(m.ref_counts()["package"], 1);
        assert_eq!(m.packages.as_ref().unwrap().digest().len(), 64);
        let cases: Vec<(&str, Edit)> = vec![
            ("past the end of the package volume", Box::new(|m| m.chunks[4].reference = ChunkRef::Package(10))),
            ("without its Debian packages", Box::new(|m| m.packages = None)),
            ("only format 3", Box::new(|m| m.format = crate::OVERLAY_FORMAT)),
            ("does not allow", Box::new(|m| m.packages.as_mut().unwrap().debs[0].package = "../x".into())),
            ("SHA-256", Box::new(|m| m.packages.as_mut().unwrap().debs[0].sha256 = "x".into())),
            ("0 Debian packages", Box::new(|m| m.packages.as_mut().unwrap().debs.clear())),
            (
                "listed twice",
                Box::new(|m| {
                    let p = m.packages.as_mut().unwrap();
                    p.debs.push(p.debs[0].clone())
                }),
            ),
            ("blocks (1 to", Box::new(|m| m.packages.as_mut().unwrap().blocks = u64::MAX)),
        ];
        for (want, edit) in cases {
            let mut m = with_packages();
            edit(&mut m);
            let err = Manifest::decode(&m.encode()).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
        // A format-1 overlay does not carry the field at all.
        let mut v = Vec::new();
        ciborium::into_writer(&sample(), &mut v).unwrap();
        assert!(!v.windows(8).any(|w| w == b"packages"));
    }

    #[test]
    fn round_trip() {
        let m = sample();
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        assert_eq!(m.ref_counts()["cross_space"], 1);
    }

    #[test]
    fn inconsistent_manifests_are_refused() {
        let cases: Vec<(&str, Edit)> = vec![
            ("past the end", Box::new(|m| m.chunks[0].index = 1 << 40)),
            ("not sorted", Box::new(|m| m.chunks.swap(0, 1))),
            ("blob 7", Box::new(|m| m.chunks[0].reference = ChunkRef::New(7))),
            ("outside segment", Box::new(|m| m.blobs[0].offset = 1)),
            ("device state", Box::new(|m| m.device_state.segment = 0)),
            ("newer", Box::new(|m| m.format = 9)),
            ("base disk chunk", Box::new(|m| m.chunks[3].reference = ChunkRef::BaseDisk(1 << 40))),
        ];
        for (want, edit) in cases {
            let mut m = sample();
            edit(&mut m);
            let err = Manifest::decode(&m.encode()).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
        assert!(Manifest::decode(b"not zstd").is_err());
        assert!(Manifest::decode(&zstd::bulk::compress(b"\xa1\x61x", 1).unwrap()).is_err());
    }

    #[test]
    fn parent_iff_residue() {
        // A plain overlay does not carry the field at all.
        let cbor = |m: &Manifest| {
            let mut v = Vec::new();
            ciborium::into_writer(m, &mut v).unwrap();
            v
        };
        assert!(!cbor(&sample()).windows(6).any(|w| w == b"parent"));
        let mut r = sample();
        r.format = RESIDUE_FORMAT;
        r.parent = Some("0f".repeat(32));
        assert!(r.is_residue());
        assert_eq!(Manifest::decode(&r.encode()).unwrap(), r);
        let cases: Vec<(&str, Edit)> = vec![
            ("without its parent", Box::new(|m| m.parent = None)),
            ("64 lowercase hex", Box::new(|m| m.parent = Some("zz".into()))),
            ("64 lowercase hex", Box::new(|m| m.parent = Some("0F".repeat(32)))),
            ("names a parent", Box::new(|m| m.format = crate::OVERLAY_FORMAT)),
            ("format 0", Box::new(|m| m.format = 0)),
        ];
        for (want, edit) in cases {
            let mut m = r.clone();
            edit(&mut m);
            let err = Manifest::decode(&m.encode()).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
    }
}
