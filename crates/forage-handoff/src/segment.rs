//! Handoff segments, format 1: what the source sends for about 1 MiB of modified chunks.
//!
//! A segment is CBOR `{format, mode, entries: [{chunk: {space, index}, kind, len}],
//! sha256, payload}`.
//! `sha256` is that of the decompressed payload. `payload` is the entries' encoded bytes, concatenated in order, compressed with the
//! mode's codec. An entry's kind says how the destination rebuilds the chunk:
//!
//! | kind | payload bytes | chunk |
//! |---|---|---|
//! | `zero` | none | all zeros |
//! | `base` | none | the destination's own chunk at that place (same as its base) |
//! | `raw` | the chunk | the bytes |
//! | `xor` / `bsdiff` | a delta | the delta applied to the destination's chunk |
//!
//! Segments of later iterations overwrite chunks of earlier ones: the destination applies
//! them in sequence order. [`decode`] reads untrusted bytes: sizes are bounded, every
//! entry must be accounted for by the payload, and a rebuilt chunk must be chunk-sized.

use forage_format::codec::DeltaCodec;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::adapt::{Delta, Mode};
use crate::encode::{compress, decompress, PayloadError};

pub const SEGMENT_FORMAT: u32 = 1;
/// Chunk size of handoff: a guest page and a disk block.
pub const CHUNK: usize = 4096;
/// The most chunks one segment may carry (decoders refuse more).
pub const MAX_ENTRIES: usize = 4096;

/// A segment's bytes that cannot be rebuilt into chunks.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("not a segment (CBOR)")]
    Cbor(#[source] ciborium::de::Error<std::io::Error>),
    #[error("segment format {0} is not {SEGMENT_FORMAT}")]
    Format(u32),
    #[error("segment of {0} chunks, over {MAX_ENTRIES}")]
    TooManyEntries(usize),
    #[error("an entry is larger than a chunk's worst-case encoding")]
    EntryTooLarge,
    #[error("its {0:?} payload")]
    Payload(crate::adapt::Codec, #[source] PayloadError),
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

/// Guest memory or disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Space {
    Memory,
    Disk,
}

/// A chunk of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ChunkId {
    pub space: Space,
    pub index: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Zero,
    Base,
    Raw,
    Xor,
    Bsdiff,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub chunk: ChunkId,
    pub kind: Kind,
    /// Bytes of this entry in the decompressed payload.
    pub len: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Wire {
    format: u32,
    mode: Mode,
    entries: Vec<Entry>,
    /// SHA-256 of the decompressed payload: a damaged segment never lands in a VM.
    #[serde(with = "serde_bytes")]
    sha256: Vec<u8>,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
}

/// A modified chunk to send, with the destination's chunk at its place if it has one
/// (the same base VM).
pub struct Modified {
    pub chunk: ChunkId,
    pub data: Vec<u8>,
    pub base: Option<Vec<u8>>,
}

/// What encoding a segment took and gave.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EncodeStats {
    pub chunks: u64,
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub seconds: f64,
}

/// Encode `chunks` in `mode`: dedup (zero, same as base), delta, compression.
pub fn encode(mode: Mode, chunks: &[Modified]) -> (Vec<u8>, EncodeStats) {
    let t = std::time::Instant::now();
    let mut entries = Vec::with_capacity(chunks.len());
    let mut raw = Vec::new();
    for c in chunks {
        let (kind, bytes) = if forage_format::chunk::is_zero(&c.data) {
            (Kind::Zero, Vec::new())
        } else if c.base.as_deref() == Some(&c.data[..]) {
            (Kind::Base, Vec::new())
        } else {
            match (mode.delta, &c.base) {
                (Delta::Xor, Some(b)) => (Kind::Xor, DeltaCodec::Xor.encode(b, &c.data)),
                (Delta::Bsdiff, Some(b)) => match DeltaCodec::Bsdiff.encode(b, &c.data) {
                    // A chunk unlike its base gives a patch larger than the chunk (one
                    // control triple per short match): sending it raw is smaller, and
                    // keeps every entry within what decoders accept.
                    patch if patch.len() >= CHUNK => (Kind::Raw, c.data.clone()),
                    patch => (Kind::Bsdiff, patch),
                },
                _ => (Kind::Raw, c.data.clone()),
            }
        };
        entries.push(Entry { chunk: c.chunk, kind, len: bytes.len() as u32 });
        raw.extend_from_slice(&bytes);
    }
    let payload = compress(mode.codec, &raw);
    let sha256 = sha2::Sha256::digest(&raw).to_vec();
    let wire = Wire { format: SEGMENT_FORMAT, mode, entries, sha256, payload };
    let mut out = Vec::new();
    ciborium::into_writer(&wire, &mut out).expect("segments encode");
    let stats = EncodeStats {
        chunks: chunks.len() as u64,
        input_bytes: (chunks.len() * CHUNK) as u64,
        output_bytes: out.len() as u64,
        seconds: t.elapsed().as_secs_f64(),
    };
    (out, stats)
}

/// Rebuild the chunks of a segment (untrusted bytes). `own` gives the destination's chunk
/// at a place (its base, or what an earlier segment put there).
pub fn decode(
    bytes: &[u8],
    own: &mut dyn FnMut(ChunkId) -> Option<Vec<u8>>,
) -> Result<Vec<(ChunkId, Vec<u8>)>, SegmentError> {
    let wire: Wire = ciborium::from_reader(bytes).map_err(SegmentError::Cbor)?;
    if wire.format != SEGMENT_FORMAT {
        return Err(SegmentError::Format(wire.format));
    }
    if wire.entries.len() > MAX_ENTRIES {
        return Err(SegmentError::TooManyEntries(wire.entries.len()));
    }
    let total: usize = wire.entries.iter().map(|e| e.len as usize).sum();
    if wire.entries.iter().any(|e| e.len as usize > 2 * CHUNK + 1024) {
        return Err(SegmentError::EntryTooLarge);
    }
    let raw =
        decompress(wire.mode.codec, &wire.payload, total).map_err(|e| SegmentError::Payload(wire.mode.codec, e))?;
    if raw.len() != total {
        return Err(SegmentError::PayloadSize { got: raw.len(), want: total });
    }
    if sha2::Sha256::digest(&raw)[..] != wire.sha256[..] {
        return Err(SegmentError::Damaged);
    }
    let mut out = Vec::with_capacity(wire.entries.len());
    let mut at = 0usize;
    for e in &wire.entries {
        let bytes = &raw[at..at + e.len as usize];
        at += e.len as usize;
        let (space, index) = (e.chunk.space, e.chunk.index);
        let need_own =
            |own: &mut dyn FnMut(ChunkId) -> Option<Vec<u8>>| own(e.chunk).ok_or(SegmentError::NoBase { space, index });
        let delta = |source| SegmentError::Delta { space, index, source };
        let data = match e.kind {
            Kind::Zero => vec![0u8; CHUNK],
            Kind::Base => need_own(own)?,
            Kind::Raw => bytes.to_vec(),
            Kind::Xor => DeltaCodec::Xor.decode(&need_own(own)?, bytes).map_err(delta)?,
            Kind::Bsdiff => DeltaCodec::Bsdiff.decode(&need_own(own)?, bytes).map_err(delta)?,
        };
        if data.len() != CHUNK {
            return Err(SegmentError::Rebuilt { space, index, len: data.len() });
        }
        out.push((e.chunk, data));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapt::parse_mode;

    fn chunks(n: u64) -> Vec<Modified> {
        (0..n)
            .map(|i| {
                let base: Vec<u8> = (0..CHUNK).map(|j| ((j as u64 * 13 + i) % 251) as u8).collect();
                let data = match i % 4 {
                    0 => vec![0u8; CHUNK],
                    1 => base.clone(),
                    _ => {
                        let mut d = base.clone();
                        d[(i as usize * 31) % CHUNK] ^= 0x5a;
                        d
                    }
                };
                Modified {
                    chunk: ChunkId { space: if i % 2 == 0 { Space::Memory } else { Space::Disk }, index: i },
                    data,
                    base: Some(base),
                }
            })
            .collect()
    }

    #[test]
    fn every_mode_rebuilds_every_chunk() {
        let cs = chunks(64);
        for m in ["none+none", "xor+zstd3", "bsdiff+lzma6", "xor+gzip6", "none+bzip29"] {
            let mode = parse_mode(m).unwrap();
            let (wire, stats) = encode(mode, &cs);
            assert_eq!(stats.chunks, 64);
            let mut own = |id: ChunkId| cs.iter().find(|c| c.chunk == id).and_then(|c| c.base.clone());
            let back = decode(&wire, &mut own).unwrap();
            for ((id, data), c) in back.iter().zip(&cs) {
                assert_eq!((*id, data), (c.chunk, &c.data), "{m}");
            }
            if m != "none+none" {
                assert!(stats.output_bytes < stats.input_bytes / 20, "{m}: {stats:?}");
            }
        }
    }

    #[test]
    fn a_chunk_unlike_its_base_goes_raw_in_bsdiff_mode() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut noise = || (0..CHUNK).map(|_| rng.u8(..)).collect::<Vec<u8>>();
        let cs: Vec<Modified> = (0..8)
            .map(|i| Modified { chunk: ChunkId { space: Space::Memory, index: i }, data: noise(), base: Some(noise()) })
            .collect();
        let (wire, _) = encode(parse_mode("bsdiff+lzma6").unwrap(), &cs);
        let sent: Wire = ciborium::from_reader(&wire[..]).unwrap();
        assert!(sent.entries.iter().all(|e| e.kind == Kind::Raw && e.len as usize == CHUNK), "{:?}", sent.entries);
        let mut own = |id: ChunkId| cs.iter().find(|c| c.chunk == id).and_then(|c| c.base.clone());
        let back = decode(&wire, &mut own).unwrap();
        assert!(back.iter().zip(&cs).all(|((id, data), c)| *id == c.chunk && *data == c.data));
    }

    #[test]
    fn damaged_segments_are_refused() {
        let cs = chunks(16);
        let (wire, _) = encode(parse_mode("xor+zstd3").unwrap(), &cs);
        let mut own = |id: ChunkId| cs.iter().find(|c| c.chunk == id).and_then(|c| c.base.clone());
        assert!(decode(&wire[..wire.len() - 10], &mut own).is_err());
        // A destination without the base cannot rebuild deltas: a clear error.
        let mut none = |_: ChunkId| None;
        assert!(matches!(decode(&wire, &mut none), Err(SegmentError::NoBase { .. })));
        let mut flipped = wire.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0xff;
        assert!(decode(&flipped, &mut own).is_err(), "a flipped byte is caught");
    }
}
