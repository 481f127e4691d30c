//! forage-remote: an overlay read from an HTTP(S) URL instead of a file, so a cloudlet
//! can fetch it itself (the device only says where it is).
//!
//! The header and manifest come first with two range requests; segments then come one
//! range request each (`Range: bytes=START-END`), in any order: the bulk stream asks for
//! them in overlay order, an early-start demand fetch for the one a read needs. A server
//! that ignores ranges (answers 200 with the whole file) is refused with a clear error
//! rather than downloaded whole for every segment. `ureq` (blocking, rustls) does HTTP.

use std::io::Read;
use std::time::Duration;

use forage_format::container::HEADER_LEN;
use forage_format::{Manifest, OverlayReader};

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{url}: {detail}")]
    Http { url: String, detail: String },
    #[error("{url} does not serve byte ranges (answered {status} to a range request)")]
    NoRanges { url: String, status: u16 },
    #[error("{url}: {source}")]
    Overlay {
        url: String,
        #[source]
        source: forage_format::FormatError,
    },
}

/// An overlay at a URL, its header and manifest read.
#[derive(Debug, Clone)]
pub struct RemoteOverlay {
    pub url: String,
    /// Header + manifest bytes, as in the file.
    pub prefix: Vec<u8>,
    pub manifest: Manifest,
    /// Where each segment starts in the file.
    pub offsets: Vec<u64>,
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(10)).timeout_read(Duration::from_secs(30)).build()
}

/// Bytes `start..start+len` of `url`.
/// The overlay's detached signature (`URL.sig`), if the server has one (at most 64 KiB).
pub fn fetch_signature(url: &str) -> Option<Vec<u8>> {
    let resp = agent().get(&format!("{url}.sig")).call().ok()?;
    let mut out = Vec::new();
    resp.into_reader().take(64 << 10).read_to_end(&mut out).ok()?;
    Some(out)
}

pub fn read_range(url: &str, start: u64, len: u64) -> Result<Vec<u8>, RemoteError> {
    let http = |detail: String| RemoteError::Http { url: url.into(), detail };
    if len == 0 {
        return Ok(Vec::new());
    }
    let resp = agent()
        .get(url)
        .set("Range", &format!("bytes={}-{}", start, start + len - 1))
        .call()
        .map_err(|e| http(e.to_string()))?;
    if resp.status() != 206 {
        return Err(RemoteError::NoRanges { url: url.into(), status: resp.status() });
    }
    let mut out = Vec::with_capacity(len as usize);
    resp.into_reader().take(len + 1).read_to_end(&mut out).map_err(|e| http(e.to_string()))?;
    if out.len() as u64 != len {
        return Err(http(format!("asked for {len} bytes at {start}, got {}", out.len())));
    }
    Ok(out)
}

impl RemoteOverlay {
    /// Read and check the header and manifest.
    pub fn open(url: &str) -> Result<Self, RemoteError> {
        let ov = |source| RemoteError::Overlay { url: url.into(), source };
        let head = read_range(url, 0, HEADER_LEN as u64)?;
        let header = forage_format::read_header(&head[..].try_into().expect("header length")).map_err(ov)?;
        let mut prefix = head;
        prefix.extend(read_range(url, HEADER_LEN as u64, header.manifest_len)?);
        let manifest = OverlayReader::open(&prefix[..]).map_err(ov)?.manifest().clone();
        let mut offsets = Vec::with_capacity(manifest.segments.len());
        let mut at = prefix.len() as u64;
        for s in &manifest.segments {
            offsets.push(at);
            at += s.compressed_len;
        }
        Ok(Self { url: url.into(), prefix, manifest, offsets })
    }

    /// The manifest's SHA-256 (hex): the overlay's name.
    pub fn digest(&self) -> String {
        hex::encode(&self.prefix[24..56])
    }

    /// Segment `i`'s bytes as stored (checked later, against the manifest).
    pub fn segment(&self, i: usize) -> Result<Vec<u8>, RemoteError> {
        let s = self.manifest.segments.get(i).ok_or_else(|| RemoteError::Http { url: self.url.clone(), detail: format!("segment {i} does not exist") })?;
        read_range(&self.url, self.offsets[i], s.compressed_len)
    }
}

impl RemoteOverlay {
    /// The overlay from the end of the manifest to its end, as one stream (pipelined
    /// synthesis applies it while it downloads).
    pub fn segments_stream(&self) -> Result<Box<dyn Read + Send>, RemoteError> {
        let http = |detail: String| RemoteError::Http { url: self.url.clone(), detail };
        let resp = agent().get(&self.url).set("Range", &format!("bytes={}-", self.prefix.len())).call().map_err(|e| http(e.to_string()))?;
        if resp.status() != 206 {
            return Err(RemoteError::NoRanges { url: self.url.clone(), status: resp.status() });
        }
        Ok(Box::new(resp.into_reader()))
    }
}
