//! Segment compression (zstd, LZMA/xz) and per-chunk delta codecs (xor, bsdiff).

use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::{FormatError, CHUNK_SIZE};

/// Most memory an xz decoder may take: a stream asking for more (its dictionary) is
/// refused, not allocated. Level 9's 64 MiB dictionary fits.
const LZMA_DECODER_MEMLIMIT: u64 = 96 << 20;

/// An xz encoder at `level` for `len` bytes: the preset's dictionary, but no larger than
/// the input needs (the same output; the encoder's and any decoder's memory follow the
/// dictionary: level 6 would take ~94 MiB to compress a 1 MiB segment). With `x86`, the
/// BCJ x86 filter goes first (machine code compresses better).
fn lzma_encoder(level: u32, len: usize, x86: bool) -> liblzma::stream::Stream {
    let mut opts = liblzma::stream::LzmaOptions::new_preset(level.min(9)).expect("presets 0-9 exist");
    // xz's presets' dictionaries (liblzma's lzma_lzma_preset), 0..=9.
    const DICT_KIB: [u32; 10] = [256, 1024, 2048, 4096, 4096, 8192, 8192, 16384, 32768, 65536];
    let preset_dict = DICT_KIB[level.min(9) as usize] << 10;
    let need = (len.max(4096) as u64).next_power_of_two().min(u32::MAX as u64 / 2) as u32;
    opts.dict_size(need.min(preset_dict).max(4096));
    let mut filters = liblzma::stream::Filters::new();
    if x86 {
        filters.x86();
    }
    filters.lzma2(&opts);
    liblzma::stream::Stream::new_stream_encoder(&filters, liblzma::stream::Check::Crc64).expect("xz encoder")
}

/// How a segment's bytes are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "codec", rename_all = "lowercase")]
pub enum SegmentCodec {
    None,
    Zstd {
        level: i32,
    },
    /// xz container around LZMA2, as the paper's LZMA.
    Lzma {
        level: u32,
    },
}

impl SegmentCodec {
    pub fn name(self) -> String {
        match self {
            SegmentCodec::None => "none".into(),
            SegmentCodec::Zstd { level } => format!("zstd-{level}"),
            SegmentCodec::Lzma { level } => format!("lzma-{level}"),
        }
    }

    pub fn compress(self, data: &[u8]) -> Vec<u8> {
        match self {
            SegmentCodec::None => data.to_vec(),
            SegmentCodec::Zstd { level } => zstd::bulk::compress(data, level).expect("zstd compresses in memory"),
            SegmentCodec::Lzma { level } => {
                let mut out = Vec::new();
                liblzma::read::XzEncoder::new_stream(data, lzma_encoder(level, data.len(), false))
                    .read_to_end(&mut out)
                    .expect("xz compresses in memory");
                out
            }
        }
    }

    /// Decompress exactly `expected` bytes; more or fewer is corruption.
    pub fn decompress(self, data: &[u8], expected: usize) -> Result<Vec<u8>, FormatError> {
        let mut out = Vec::with_capacity(expected);
        let limit = expected as u64 + 1;
        let r = match self {
            SegmentCodec::None => data.take(limit).read_to_end(&mut out),
            SegmentCodec::Zstd { .. } => {
                zstd::stream::read::Decoder::new(data).and_then(|d| d.take(limit).read_to_end(&mut out))
            }
            SegmentCodec::Lzma { .. } => match liblzma::stream::Stream::new_stream_decoder(LZMA_DECODER_MEMLIMIT, 0) {
                Ok(stream) => liblzma::read::XzDecoder::new_stream(data, stream).take(limit).read_to_end(&mut out),
                Err(e) => Err(std::io::Error::other(e)),
            },
        };
        r.map_err(|e| FormatError::corrupt(format!("{} stream: {e}", self.name())))?;
        if out.len() != expected {
            return Err(FormatError::corrupt(format!(
                "{} stream holds {}{} bytes, the segment table says {expected}",
                self.name(),
                out.len(),
                if out.len() > expected { "+" } else { "" }
            )));
        }
        Ok(out)
    }
}

/// Delta of a launch chunk against the base chunk at the same position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeltaCodec {
    /// XOR with the base chunk, with runs of equal bytes left out: a list of
    /// `[u16 skip][u16 len][len bytes of xor]` records. Written here: it is five lines and
    /// no crate does exactly this.
    Xor,
    /// bsdiff 4 (the `bsdiff` crate's uncompressed patch format; segments are compressed).
    Bsdiff,
}

/// Bytes a payload costs once compressed: the measure for "keep the delta only when it is
/// smaller" (a bsdiff patch carries mostly-zero diff bytes that compression removes).
pub fn packed_size(payload: &[u8]) -> usize {
    zstd::bulk::compress(payload, 1).map(|c| c.len()).unwrap_or(payload.len())
}

impl DeltaCodec {
    pub fn encode(self, base: &[u8], new: &[u8]) -> Vec<u8> {
        match self {
            DeltaCodec::Xor => xor_encode(base, new),
            DeltaCodec::Bsdiff => {
                let mut patch = Vec::new();
                bsdiff::diff(base, new, &mut patch).expect("bsdiff writes to memory");
                patch
            }
        }
    }

    /// Rebuild a chunk from its base chunk and a delta (untrusted bytes).
    pub fn decode(self, base: &[u8], delta: &[u8]) -> Result<Vec<u8>, FormatError> {
        let out = match self {
            DeltaCodec::Xor => xor_decode(base, delta)?,
            DeltaCodec::Bsdiff => {
                // The patcher only grows its output by bytes present in the patch, so the
                // output is bounded by the (bounded) delta length.
                let mut out = Vec::with_capacity(CHUNK_SIZE);
                bsdiff::patch(base, &mut &delta[..], &mut out)
                    .map_err(|e| FormatError::corrupt(format!("bsdiff delta: {e}")))?;
                out
            }
        };
        if out.len() != CHUNK_SIZE {
            return Err(FormatError::corrupt(format!(
                "delta rebuilds {} bytes, not a {CHUNK_SIZE}-byte chunk",
                out.len()
            )));
        }
        Ok(out)
    }
}

fn xor_encode(base: &[u8], new: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < new.len() {
        let start = pos;
        while pos < new.len() && new[pos] == base[pos] && pos - start < u16::MAX as usize {
            pos += 1;
        }
        let skip = pos - start;
        let run = pos;
        while pos < new.len() && new[pos] != base[pos] && pos - run < u16::MAX as usize {
            pos += 1;
        }
        if pos == run && pos == new.len() {
            break; // trailing equal bytes need no record
        }
        out.extend_from_slice(&(skip as u16).to_le_bytes());
        out.extend_from_slice(&((pos - run) as u16).to_le_bytes());
        out.extend(new[run..pos].iter().zip(&base[run..pos]).map(|(n, b)| n ^ b));
    }
    out
}

fn xor_decode(base: &[u8], delta: &[u8]) -> Result<Vec<u8>, FormatError> {
    let mut out = base.to_vec();
    let mut pos = 0usize;
    let mut d = delta;
    while !d.is_empty() {
        if d.len() < 4 {
            return Err(FormatError::corrupt("xor delta: cut record header"));
        }
        let skip = u16::from_le_bytes([d[0], d[1]]) as usize;
        let len = u16::from_le_bytes([d[2], d[3]]) as usize;
        d = &d[4..];
        pos += skip;
        if len > d.len() || pos + len > out.len() {
            return Err(FormatError::corrupt("xor delta: record runs past the chunk or the data"));
        }
        for (o, x) in out[pos..pos + len].iter_mut().zip(&d[..len]) {
            *o ^= x;
        }
        pos += len;
        d = &d[len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks() -> (Vec<u8>, Vec<u8>) {
        let base: Vec<u8> = (0..CHUNK_SIZE).map(|i| (i * 7 % 251) as u8).collect();
        let mut new = base.clone();
        new[10..20].copy_from_slice(b"0123456789");
        new[4000] ^= 0xff;
        (base, new)
    }

    #[test]
    fn deltas_round_trip_and_are_small() {
        let (base, new) = chunks();
        for codec in [DeltaCodec::Xor, DeltaCodec::Bsdiff] {
            let d = codec.encode(&base, &new);
            let packed = zstd::bulk::compress(&d, 1).unwrap().len();
            assert!(packed < 600, "{codec:?} delta is {packed} bytes compressed");
            assert_eq!(codec.decode(&base, &d).unwrap(), new);
            assert!(codec.decode(&base, &d[..d.len() - 1]).is_err() || codec == DeltaCodec::Bsdiff);
        }
        assert!(DeltaCodec::Xor.encode(&base, &base).is_empty());
    }

    #[test]
    fn bad_deltas_are_errors_not_panics() {
        let (base, _) = chunks();
        for junk in [&[0xffu8; 3][..], &[0xff; 40], &[1, 0, 0xff, 0xff, 1], &[0u8; 24]] {
            for codec in [DeltaCodec::Xor, DeltaCodec::Bsdiff] {
                let _ = codec.decode(&base, junk);
            }
        }
        assert!(DeltaCodec::Xor.decode(&base, &[0, 16, 1, 0, 9]).is_err());
    }

    #[test]
    fn segment_codecs_round_trip_and_check_length() {
        let data: Vec<u8> = (0..100_000u32).flat_map(|i| (i % 1000).to_le_bytes()).collect();
        for codec in [SegmentCodec::None, SegmentCodec::Zstd { level: 3 }, SegmentCodec::Lzma { level: 1 }] {
            let c = codec.compress(&data);
            assert_eq!(codec.decompress(&c, data.len()).unwrap(), data);
            assert!(codec.decompress(&c, data.len() - 1).is_err());
            assert!(codec.decompress(&c, data.len() + 1).is_err());
            if codec != SegmentCodec::None {
                assert!(c.len() < data.len() / 4);
                assert!(codec.decompress(&c[..c.len() / 2], data.len()).is_err());
            }
        }
    }
}
