//! forage-format: the VM overlay format, versions 1 (overlays), 2 (residues) and 3
//! (overlays naming blocks of Debian packages the cloudlet holds). Pure: no
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
//!
//! An overlay of format 3 also lists Debian packages ([`PackageSet`]: name, version,
//! SHA-256 of each .deb): the regular files of their data archives, in archive order, each
//! cut in 4 KiB blocks (the last one zero-padded), make a *package volume* that the
//! cloudlet rebuilds from its own copies of those .debs; a chunk equal to block N of that
//! volume is [`ChunkRef::Package`]`(N)` and travels as nothing but that reference.

pub mod chunk;
pub mod codec;
pub mod container;
mod error;
pub mod manifest;
mod version;

pub use chunk::{ChunkEntry, ChunkRef, Space, CHUNK_SIZE};
pub use codec::{DeltaCodec, SegmentCodec};
pub use container::{read_header, Header, OverlayReader, SegmentData, HEADER_LEN, MAGIC};
pub use error::FormatError;
pub use manifest::{Blob, BlobEncoding, DebRef, Manifest, Order, PackageSet, Segment, SegmentKind, Stats};
pub use version::{FORMAT_VERSION, OVERLAY_FORMAT, PACKAGES_FORMAT, RESIDUE_FORMAT};
