//! What overlay creation is asked (its reductions, codecs, segment size) and what it
//! reports.

use std::time::Duration;

use forage_format::{DeltaCodec, Manifest, SegmentCodec};

#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub dedup: bool,
    pub semantic_disk: bool,
    pub semantic_memory: bool,
    pub delta: Option<DeltaCodec>,
    pub codec: SegmentCodec,
    pub segment_bytes: usize,
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
        }
    }
}

#[derive(Debug, Clone)]
pub struct CreateReport {
    pub manifest: Manifest,
    pub bytes: u64,
    pub took: Duration,
}
