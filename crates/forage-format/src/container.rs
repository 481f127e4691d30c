//! The overlay file: header, manifest, segments. Reading is streaming: the manifest first,
//! then one segment at a time (memory use: one compressed + one decompressed segment).

use std::io::{Read, Write};

use sha2::{Digest, Sha256};

use crate::manifest::{Blob, Manifest, Segment, MAX_MANIFEST_RAW};
use crate::{FormatError, FORMAT_VERSION};

pub const MAGIC: &[u8; 8] = b"FORAGEOV";
/// Magic, format, manifest codec, manifest length, manifest SHA-256.
pub const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 32;
/// Manifest codec 1: zstd-compressed CBOR.
const MANIFEST_ZSTD_CBOR: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub format: u32,
    pub manifest_len: u64,
    pub manifest_sha256: [u8; 32],
}

impl Header {
    /// The overlay's name: hex of its manifest's SHA-256. The cloudlet caches launch VMs
    /// by it, and a residue's `parent` is it.
    pub fn digest(&self) -> String {
        hex::encode(self.manifest_sha256)
    }
}

/// Header and encoded manifest: the first bytes of an overlay file. The header carries the
/// manifest's format (1 for overlays, 2 for residues).
pub fn encode_prefix(manifest: &Manifest) -> Vec<u8> {
    let body = manifest.encode();
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&manifest.format.to_le_bytes());
    out.extend_from_slice(&MANIFEST_ZSTD_CBOR.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&body));
    out.extend_from_slice(&body);
    out
}

/// Parse the fixed header (untrusted bytes).
pub fn read_header(bytes: &[u8; HEADER_LEN]) -> Result<Header, FormatError> {
    if &bytes[..8] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let format = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if format > FORMAT_VERSION || format == 0 {
        return Err(FormatError::NewerFormat { found: format });
    }
    let codec = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    if codec != MANIFEST_ZSTD_CBOR {
        return Err(FormatError::corrupt(format!("unknown manifest encoding {codec}")));
    }
    let manifest_len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    if manifest_len > MAX_MANIFEST_RAW {
        return Err(FormatError::TooLarge { what: "manifest".into(), limit: MAX_MANIFEST_RAW });
    }
    Ok(Header { format, manifest_len, manifest_sha256: bytes[24..56].try_into().expect("32 bytes") })
}

/// Check and decompress one segment's bytes as they arrived.
pub fn open_segment(index: usize, seg: &Segment, compressed: &[u8]) -> Result<Vec<u8>, FormatError> {
    if hex::encode(Sha256::digest(compressed)) != seg.sha256 {
        return Err(FormatError::corrupt(format!("segment {index} fails its checksum")));
    }
    seg.codec
        .decompress(compressed, seg.raw_len as usize)
        .map_err(|e| FormatError::corrupt(format!("segment {index}: {e}")))
}

/// A decompressed, verified segment.
#[derive(Debug)]
pub struct SegmentData {
    pub index: usize,
    pub data: Vec<u8>,
}

impl SegmentData {
    /// The payload of `blob` (which must live in this segment; the manifest was validated).
    pub fn blob(&self, blob: &Blob) -> Result<&[u8], FormatError> {
        let start = blob.offset as usize;
        self.data
            .get(start..start + blob.len as usize)
            .ok_or_else(|| FormatError::corrupt(format!("blob outside segment {}", self.index)))
    }
}

/// Streaming reader of an overlay.
pub struct OverlayReader<R> {
    r: R,
    header: Header,
    manifest: Manifest,
    next: usize,
    buf: Vec<u8>,
}

impl<R: Read> OverlayReader<R> {
    /// Read and check the header and manifest.
    pub fn open(r: R) -> Result<Self, FormatError> {
        Self::open_limited(r, MAX_MANIFEST_RAW)
    }

    /// [`Self::open`] with the manifest capped at `raw_limit` decompressed bytes (what the
    /// base implies: [`crate::manifest::raw_limit_for`]).
    pub fn open_limited(mut r: R, raw_limit: u64) -> Result<Self, FormatError> {
        let mut head = [0u8; HEADER_LEN];
        read_exact(&mut r, &mut head, "header")?;
        let header = read_header(&head)?;
        let mut body = Vec::new();
        (&mut r).take(header.manifest_len).read_to_end(&mut body)?;
        if body.len() as u64 != header.manifest_len {
            return Err(FormatError::Truncated {
                what: format!("manifest has {} of {} bytes", body.len(), header.manifest_len),
            });
        }
        if Sha256::digest(&body)[..] != header.manifest_sha256 {
            return Err(FormatError::corrupt("manifest fails its checksum"));
        }
        let manifest = Manifest::decode_limited(&body, raw_limit)?;
        if manifest.format != header.format {
            return Err(FormatError::corrupt(format!(
                "header says format {} but the manifest says {}",
                header.format, manifest.format
            )));
        }
        Ok(Self { r, header, manifest, next: 0, buf: Vec::new() })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The next segment, verified and decompressed; `None` after the last.
    pub fn next_segment(&mut self) -> Result<Option<SegmentData>, FormatError> {
        let Some(seg) = self.manifest.segments.get(self.next) else {
            return Ok(None);
        };
        let index = self.next;
        self.buf.clear();
        (&mut self.r).take(seg.compressed_len).read_to_end(&mut self.buf)?;
        if self.buf.len() as u64 != seg.compressed_len {
            return Err(FormatError::Truncated {
                what: format!("segment {index} has {} of {} bytes", self.buf.len(), seg.compressed_len),
            });
        }
        let data = open_segment(index, seg, &self.buf)?;
        self.next += 1;
        Ok(Some(SegmentData { index, data }))
    }

    /// After the last segment: nothing may follow.
    pub fn finish(mut self) -> Result<(), FormatError> {
        if self.next < self.manifest.segments.len() {
            return Err(FormatError::Truncated {
                what: format!("only {} of {} segments read", self.next, self.manifest.segments.len()),
            });
        }
        let mut extra = [0u8; 1];
        if self.r.read(&mut extra)? != 0 {
            return Err(FormatError::corrupt("bytes after the last segment"));
        }
        Ok(())
    }
}

fn read_exact(r: &mut impl Read, buf: &mut [u8], what: &str) -> Result<(), FormatError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FormatError::Truncated { what: format!("{what} is cut short") },
        _ => FormatError::Io(e),
    })
}

/// Write header + manifest, then the segments' compressed bytes from `segments` in order.
pub fn write_overlay(out: &mut impl Write, manifest: &Manifest, segments: &mut impl Read) -> std::io::Result<u64> {
    let prefix = encode_prefix(manifest);
    out.write_all(&prefix)?;
    let copied = std::io::copy(&mut segments.take(manifest.segments_bytes()), out)?;
    if copied != manifest.segments_bytes() {
        return Err(std::io::Error::other("segment data is shorter than the segment table"));
    }
    Ok(prefix.len() as u64 + copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::SegmentCodec;
    use crate::manifest::tests::sample;

    fn sample_file() -> Vec<u8> {
        let mut m = sample();
        let chunk = vec![7u8; crate::CHUNK_SIZE];
        let seg0 = SegmentCodec::Zstd { level: 3 }.compress(&chunk);
        let seg1 = b"QEVM".to_vec();
        m.segments[0].compressed_len = seg0.len() as u64;
        m.segments[0].sha256 = hex::encode(Sha256::digest(&seg0));
        m.segments[1].sha256 = hex::encode(Sha256::digest(&seg1));
        let mut out = Vec::new();
        let data = [seg0, seg1].concat();
        write_overlay(&mut out, &m, &mut &data[..]).unwrap();
        out
    }

    #[test]
    fn streams_back() {
        let file = sample_file();
        let mut r = OverlayReader::open(&file[..]).unwrap();
        let s0 = r.next_segment().unwrap().unwrap();
        let blob = r.manifest().blobs[0];
        assert_eq!(s0.blob(&blob).unwrap(), &[7u8; crate::CHUNK_SIZE][..]);
        assert_eq!(r.next_segment().unwrap().unwrap().data, b"QEVM");
        assert!(r.next_segment().unwrap().is_none());
        r.finish().unwrap();
    }

    #[test]
    fn every_truncation_and_flip_is_an_error() {
        let file = sample_file();
        for cut in [0, 7, HEADER_LEN - 1, HEADER_LEN + 3, file.len() - 5, file.len() - 1] {
            let res = (|| {
                let mut r = OverlayReader::open(&file[..cut])?;
                while r.next_segment()?.is_some() {}
                r.finish()
            })();
            assert!(res.is_err(), "cut at {cut} accepted");
        }
        for pos in (0..file.len()).step_by(7) {
            let mut f = file.clone();
            f[pos] ^= 0x40;
            let res = (|| {
                let mut r = OverlayReader::open(&f[..])?;
                while r.next_segment()?.is_some() {}
                r.finish()
            })();
            assert!(res.is_err(), "flip at {pos} accepted");
        }
        let mut newer = file.clone();
        newer[8] = 4;
        assert!(matches!(OverlayReader::open(&newer[..]), Err(FormatError::NewerFormat { found: 4 })));
        // A format-1 manifest behind a format-2 (residue) header, and the reverse.
        let mut mixed = file.clone();
        mixed[8] = 2;
        let err = OverlayReader::open(&mixed[..]).err().expect("refused").to_string();
        assert!(err.contains("header says format 2"), "{err}");
    }

    #[test]
    fn residues_carry_their_format_and_parent() {
        let mut m = sample();
        m.format = crate::RESIDUE_FORMAT;
        m.parent = Some("12".repeat(32));
        let prefix = encode_prefix(&m);
        let header = read_header(prefix[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(header.format, 2);
        assert_eq!(header.digest(), hex::encode(Sha256::digest(&prefix[HEADER_LEN..])));
        // The manifest alone opens (segments are not read here).
        let r = OverlayReader::open(&prefix[..]).unwrap();
        assert_eq!(r.manifest().parent.as_deref(), Some(&"12".repeat(32)[..]));
        assert_eq!(r.header(), &header);
        // An older reader (format 1 only) would stop at the header.
        assert!(header.format > crate::OVERLAY_FORMAT);
    }
}
