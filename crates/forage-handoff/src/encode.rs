//! The encoding stages of the handoff pipeline for one operating mode: the difference of a
//! modified chunk against the chunk the destination already holds (xor or bsdiff, or the
//! chunk itself), then compression of about 1 MiB of encoded chunks at a time (zstd, gzip,
//! bzip2, LZMA). [`profile`] measures P and R of every mode on sample chunks: how the
//! offline lookup table of [`crate::adapt`] is built from a reference workload.

use std::io::{Read, Write};
use std::time::Instant;

use forage_format::codec::{DeltaCodec, SegmentCodec};

use crate::adapt::{Codec, Delta, LookupTable, Mode, Profile};

/// A compressed payload that does not decompress within its limit.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("the stream")]
    Stream(#[source] std::io::Error),
    #[error("the stream holds more than {0} bytes")]
    TooLarge(usize),
}

/// Bytes of encoded chunks compressed together (the paper's ~1 MiB segments).
pub const SEGMENT_BYTES: usize = 1 << 20;

/// The difference of `new` against `base` (the destination's chunk at the same place),
/// or `new` itself when there is no base chunk or the mode has no delta.
pub fn delta(mode: Delta, new: &[u8], base: Option<&[u8]>) -> Vec<u8> {
    match (mode, base) {
        (Delta::Xor, Some(b)) => DeltaCodec::Xor.encode(b, new),
        (Delta::Bsdiff, Some(b)) => DeltaCodec::Bsdiff.encode(b, new),
        _ => new.to_vec(),
    }
}

/// Compress one segment.
pub fn compress(codec: Codec, data: &[u8]) -> Vec<u8> {
    match codec {
        Codec::None => data.to_vec(),
        Codec::Zstd(l) => SegmentCodec::Zstd { level: l }.compress(data),
        Codec::Lzma(l) => SegmentCodec::Lzma { level: l }.compress(data),
        Codec::Gzip(l) => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(l.min(9)));
            e.write_all(data).expect("in memory");
            e.finish().expect("in memory")
        }
        Codec::Bzip2(l) => {
            let mut out = Vec::new();
            bzip2::read::BzEncoder::new(data, bzip2::Compression::new(l.clamp(1, 9)))
                .read_to_end(&mut out)
                .expect("in memory");
            out
        }
    }
}

/// Decompress one segment (untrusted bytes: at most `limit` bytes out).
pub fn decompress(codec: Codec, data: &[u8], limit: usize) -> Result<Vec<u8>, PayloadError> {
    let mut out = Vec::new();
    let lim = limit as u64 + 1;
    let r = match codec {
        Codec::None => data.take(lim).read_to_end(&mut out),
        Codec::Zstd(_) => zstd::stream::read::Decoder::new(data).and_then(|d| d.take(lim).read_to_end(&mut out)),
        Codec::Lzma(_) => liblzma::read::XzDecoder::new(data).take(lim).read_to_end(&mut out),
        Codec::Gzip(_) => flate2::read::GzDecoder::new(data).take(lim).read_to_end(&mut out),
        Codec::Bzip2(_) => bzip2::read::BzDecoder::new(data).take(lim).read_to_end(&mut out),
    };
    r.map_err(PayloadError::Stream)?;
    if out.len() > limit {
        return Err(PayloadError::TooLarge(limit));
    }
    Ok(out)
}

/// A modified chunk and the destination's chunk at its place (if any).
pub type SampleChunk = (Vec<u8>, Option<Vec<u8>>);

/// Measure P (seconds per chunk, one core) and R (output/input) of each of `modes` on
/// `chunks` (each with the destination's chunk at its place, if any).
pub fn profile(modes: &[Mode], chunks: &[SampleChunk], chunk_bytes: u64) -> LookupTable {
    let input: usize = chunks.iter().map(|(c, _)| c.len()).sum();
    let mut out = Vec::new();
    for &mode in modes {
        let t = Instant::now();
        let mut produced = 0usize;
        let mut segment = Vec::with_capacity(SEGMENT_BYTES + 8192);
        for (new, base) in chunks {
            segment.extend_from_slice(&delta(mode.delta, new, base.as_deref()));
            if segment.len() >= SEGMENT_BYTES {
                produced += compress(mode.codec, &segment).len();
                segment.clear();
            }
        }
        if !segment.is_empty() {
            produced += compress(mode.codec, &segment).len();
        }
        let p = t.elapsed().as_secs_f64() / chunks.len().max(1) as f64;
        out.push((mode, Profile { p, r: produced as f64 / input.max(1) as f64 }));
    }
    LookupTable { chunk_bytes, modes: out }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapt::parse_mode;

    fn sample() -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        // Chunks that differ from their base in a few bytes, like modified guest pages.
        (0..64u32)
            .map(|i| {
                let base: Vec<u8> = (0..4096u32).map(|j| ((j * 7 + i) % 251) as u8).collect();
                let mut new = base.clone();
                new[(i as usize * 37) % 4096] ^= 0xff;
                new[100] = i as u8;
                (new, Some(base))
            })
            .collect()
    }

    #[test]
    fn every_codec_round_trips() {
        let data: Vec<u8> = b"forage handoff ".iter().cycle().take(100_000).copied().collect();
        for m in ["none+none", "none+zstd3", "none+gzip6", "none+bzip2_9", "none+lzma1"] {
            let m = parse_mode(&m.replace('_', "")).unwrap();
            let c = compress(m.codec, &data);
            assert_eq!(decompress(m.codec, &c, data.len()).unwrap(), data, "{m}");
            if m.codec != Codec::None {
                assert!(c.len() < data.len() / 10, "{m}: {}", c.len());
                assert!(decompress(m.codec, &c[..c.len() / 2], data.len()).is_err(), "{m}: a cut stream");
            }
        }
        let c = compress(Codec::Zstd(3), &data);
        assert!(decompress(Codec::Zstd(3), &c, 1000).is_err(), "the output limit holds");
    }

    #[test]
    fn profiles_rank_modes_as_expected() {
        let modes: Vec<Mode> =
            ["none+none", "xor+zstd3", "xor+lzma9", "none+gzip1"].iter().map(|m| parse_mode(m).unwrap()).collect();
        let t = profile(&modes, &sample(), 4096);
        let get = |s: &str| t.get(&parse_mode(s).unwrap()).unwrap();
        assert!((get("none+none").r - 1.0).abs() < 1e-9);
        assert!(get("xor+zstd3").r < 0.05, "a few changed bytes per chunk compress away: {:?}", get("xor+zstd3"));
        assert!(get("xor+lzma9").p > get("none+none").p);
        assert_eq!(t.smallest().map(|m| m.delta), Some(Delta::Xor));
    }
}
