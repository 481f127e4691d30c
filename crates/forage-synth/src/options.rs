//! What overlay creation is asked (its reductions, codecs, segment size) and what it
//! reports.

use std::time::Duration;

use forage_format::{DeltaCodec, Manifest, SegmentCodec};

use crate::ext4::NotCheckpointed;

#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub dedup: bool,
    pub semantic_disk: bool,
    pub semantic_memory: bool,
    pub delta: Option<DeltaCodec>,
    pub codec: SegmentCodec,
    pub segment_bytes: usize,
    /// Name chunks equal to blocks of these Debian packages instead of carrying them
    /// (overlay format 3; the cloudlet needs the packages). Overlays only.
    pub packages: Option<std::sync::Arc<crate::deb_volume::PackageIndex>>,
}

impl CreateOptions {
    /// From the names an operator types: segment codec `lzma` (level 0-9, default 6),
    /// `zstd` (1-22, default 19) or `none`; delta `bsdiff`, `xor` or `none`. The rest as
    /// [`Default`].
    pub fn named(codec: &str, level: Option<i32>, delta: &str) -> Result<Self, String> {
        let codec = match codec {
            "lzma" => SegmentCodec::Lzma { level: level.unwrap_or(6).clamp(0, 9) as u32 },
            "zstd" => SegmentCodec::Zstd { level: level.unwrap_or(19).clamp(1, 22) },
            "none" => SegmentCodec::None,
            other => return Err(format!("unknown segment codec {other:?} (lzma, zstd or none)")),
        };
        let delta = match delta {
            "bsdiff" => Some(DeltaCodec::Bsdiff),
            "xor" => Some(DeltaCodec::Xor),
            "none" => None,
            other => return Err(format!("unknown delta {other:?} (bsdiff, xor or none)")),
        };
        Ok(Self { codec, delta, ..Self::default() })
    }
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self {
            dedup: true,
            semantic_disk: true,
            semantic_memory: true,
            delta: Some(DeltaCodec::Bsdiff),
            codec: SegmentCodec::Lzma { level: 6 },
            segment_bytes: 1 << 20,
            packages: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct CreateReport {
    pub manifest: Manifest,
    pub bytes: u64,
    pub took: Duration,
    /// What the disk's semantic gap made of its file system.
    pub fs: FsIntrospection,
}

/// What ext4 introspection did for the disk's semantic gap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsIntrospection {
    /// The disk's semantic gap is off.
    Off,
    /// The disk holds no ext file system forage reads: nothing dropped by introspection.
    NotExt4,
    /// Not known to be checkpointed: nothing dropped by introspection, and why.
    Skipped(NotCheckpointed),
    /// Off for the base: a foreign guest without qemu-guest-agent (nothing freezes it).
    NoGuestAgent,
    /// Modified chunks found free in the bitmaps, and in the empty journal.
    Used { free_chunks: u64, journal_chunks: u64 },
}

impl std::fmt::Display for FsIntrospection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FsIntrospection::Off => f.write_str("ext4 introspection off (no disk semantic gap)"),
            FsIntrospection::NotExt4 => f.write_str("ext4 introspection: no ext file system on the disk"),
            FsIntrospection::NoGuestAgent => {
                f.write_str("ext4 introspection off for this base (its guest has no qemu-guest-agent to freeze it)")
            }
            FsIntrospection::Skipped(why) => write!(f, "ext4 introspection skipped, nothing dropped as free: {why}"),
            FsIntrospection::Used { free_chunks, journal_chunks } => write!(
                f,
                "ext4 introspection (file system checkpointed): {free_chunks} modified chunks free, {journal_chunks} in the empty journal"
            ),
        }
    }
}
