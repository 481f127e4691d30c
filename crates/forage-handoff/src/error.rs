//! What goes wrong decoding and applying handoff segments (untrusted bytes from the
//! source cloudlet): one line each, naming the part of the segment at fault.

use crate::adapt::Codec;
use crate::segment::Space;

/// A segment's bytes that cannot be rebuilt into chunks.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("not a segment (CBOR)")]
    Cbor(#[source] ciborium::de::Error<std::io::Error>),
    #[error("segment format {0} is not {want}", want = crate::segment::SEGMENT_FORMAT)]
    Format(u32),
    #[error("segment of {0} chunks, over {max}", max = crate::segment::MAX_ENTRIES)]
    TooManyEntries(usize),
    #[error("an entry is larger than a chunk's worst-case encoding")]
    EntryTooLarge,
    #[error("its {0:?} payload")]
    Payload(Codec, #[source] PayloadError),
    #[error("payload holds {got} bytes, the entries {want}")]
    PayloadSize { got: usize, want: usize },
    #[error("segment payload does not match its SHA-256 (damaged)")]
    Damaged,
    #[error("{space:?} chunk {index} refers to a chunk the destination does not have")]
    NoBase { space: Space, index: u64 },
    #[error("{space:?} chunk {index}: its delta")]
    Delta {
        space: Space,
        index: u64,
        #[source]
        source: forage_format::FormatError,
    },
    #[error("{space:?} chunk {index} rebuilt to {len} bytes")]
    Rebuilt { space: Space, index: u64, len: usize },
}

/// A compressed payload that does not decompress within its limit.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("the stream")]
    Stream(#[source] std::io::Error),
    #[error("the stream holds more than {0} bytes")]
    TooLarge(usize),
}

/// A segment the destination cannot apply.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("segment {seq} arrived where {due} was due")]
    OutOfOrder { seq: u64, due: u64 },
    #[error("segment {seq}")]
    Segment {
        seq: u64,
        #[source]
        source: SegmentError,
    },
    #[error("segment {seq}: {space:?} chunk {index} is outside the VM ({limit} chunks)")]
    Outside { seq: u64, space: Space, index: u64, limit: u64 },
    #[error("segment {seq}: writing {space:?} chunk {index}")]
    Write {
        seq: u64,
        space: Space,
        index: u64,
        #[source]
        source: std::io::Error,
    },
}
