//! forage-format: the VM overlay format, versions 1 (overlays) and 2 (residues). Pure: no
//! QEMU, no file policy.
//!
//! An overlay turns a base VM (which the cloudlet has) into a launch VM (base + installed,
//! running application). Disk and memory are cut in 4 KiB chunks; each modified chunk of
//! the launch VM gets a [`ChunkRef`]: zero, free (dropped by the semantic gap), equal to a
//! base disk or base memory chunk, or a blob (first occurrence, or a duplicate within the
//! same space or across memory/disk). Blobs are stored raw or as a delta against the base
//! chunk at the same position, packed into ~1 MiB segments, and each segment compressed.
//!
//! Layout of an overlay file (see `docs/overlay-format.md`):
//! ```text
//! "FORAGEOV" | u32 format | u32 manifest codec | u64 manifest length | sha256(manifest)
//! manifest (zstd-compressed CBOR)
//! segment 0 | segment 1 | ...        (lengths and sha256 in the manifest's segment table)
//! ```
//! Readable as a stream: the manifest comes first, then segments in order.
//!
//! A *residue* has the same layout: the changes of a running instance against its launch
//! VM, as chunk references against the same base. Its manifest names the overlay it
//! continues (`parent`, that overlay's [`Header::digest`]) and it is written as format 2,
//! so a reader that predates residues refuses it instead of applying it as an overlay.

pub mod chunk;
pub mod codec;
pub mod container;
pub mod manifest;

pub use chunk::{ChunkEntry, ChunkRef, Space, CHUNK_SIZE};
pub use codec::{DeltaCodec, SegmentCodec};
pub use container::{read_header, Header, OverlayReader, SegmentData, HEADER_LEN, MAGIC};
pub use manifest::{Blob, BlobEncoding, Manifest, Order, Segment, SegmentKind, Stats};

/// Newest overlay format this crate understands; readers accept this and older.
pub const FORMAT_VERSION: u32 = 2;
/// Format written for plain overlays (a launch VM against its base).
pub const OVERLAY_FORMAT: u32 = 1;
/// Format written for residues (an instance's changes since launch; `parent` is set).
pub const RESIDUE_FORMAT: u32 = 2;

/// Errors reading or checking overlay bytes. Every message says what is wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("not a forage overlay (bad magic)")]
    BadMagic,
    #[error("overlay format {found} is newer than this forage understands ({FORMAT_VERSION})")]
    NewerFormat { found: u32 },
    #[error("overlay is truncated: {what}")]
    Truncated { what: String },
    #[error("overlay is corrupted: {what}")]
    Corrupt { what: String },
    #[error("overlay {what} is over the limit of {limit} bytes")]
    TooLarge { what: String, limit: u64 },
    #[error("I/O error reading the overlay")]
    Io(#[from] std::io::Error),
}

impl FormatError {
    pub fn corrupt(what: impl Into<String>) -> Self {
        Self::Corrupt { what: what.into() }
    }
}
