//! forage-remote: an overlay read from an HTTP(S) URL instead of a file, so a cloudlet
//! can fetch it itself (the device only says where it is).
//!
//! The header and manifest come first with two range requests; segments then come one
//! range request each (`Range: bytes=START-END`), in any order: the bulk stream asks for
//! them in overlay order, an early-start demand fetch for the one a read needs. A server
//! that ignores ranges (answers 200 with the whole file) is refused with a clear error
//! rather than downloaded whole for every segment. `ureq` (blocking, rustls) does HTTP.
//!
//! What may be fetched is a [`FetchPolicy`] (a cloudlet fetches what a device names:
//! https to public addresses only unless its operator lists networks); redirects are not
//! followed, and a response is never copied into an error.

pub mod policy;

use std::io::Read;
use std::net::SocketAddr;
use std::time::Duration;

use forage_format::container::HEADER_LEN;
use forage_format::manifest::MAX_MANIFEST_RAW;
use forage_format::{Manifest, OverlayReader};

pub use policy::{FetchPolicy, PolicyError, UrlTarget};

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{url}: {source}")]
    Refused {
        url: String,
        #[source]
        source: PolicyError,
    },
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
    agent: ureq::Agent,
    pub url: String,
    /// Header + manifest bytes, as in the file.
    pub prefix: Vec<u8>,
    pub manifest: Manifest,
    /// Where each segment starts in the file.
    pub offsets: Vec<u64>,
}

/// Resolves through the policy: connections go only to addresses it allows.
struct PolicyResolver {
    policy: FetchPolicy,
    https: bool,
}

impl ureq::Resolver for PolicyResolver {
    fn resolve(&self, netloc: &str) -> std::io::Result<Vec<SocketAddr>> {
        self.policy
            .resolve(netloc, self.https)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::PermissionDenied, e))
    }
}

/// An HTTP client for `url` under `policy`: no redirects, the policy's resolver.
fn agent(url: &str, policy: &FetchPolicy) -> Result<ureq::Agent, RemoteError> {
    policy.check_url(url).map_err(|source| RemoteError::Refused { url: url.into(), source })?;
    let https = url.get(..8).is_some_and(|s| s.eq_ignore_ascii_case("https://"));
    Ok(ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(10))
        .timeout_read(Duration::from_secs(30))
        .redirects(0)
        .resolver(PolicyResolver { policy: policy.clone(), https })
        .build())
}

/// What went wrong with a request, without anything the server sent.
fn http_detail(e: ureq::Error) -> String {
    match e {
        ureq::Error::Status(code, _) if (300..400).contains(&code) => {
            format!("redirected ({code}): redirects are not followed")
        }
        ureq::Error::Status(code, _) => format!("HTTP status {code}"),
        ureq::Error::Transport(t) => match t.kind() {
            ureq::ErrorKind::Dns => "the host does not resolve to an allowed address".into(),
            k => format!("transport: {k}"),
        },
    }
}

/// The overlay's detached signature (`URL.sig`), if the server has one (at most 64 KiB).
pub fn fetch_signature(url: &str, policy: &FetchPolicy) -> Option<Vec<u8>> {
    let sig = format!("{url}.sig");
    let resp = agent(&sig, policy).ok()?.get(&sig).call().ok()?;
    let mut out = Vec::new();
    resp.into_reader().take(64 << 10).read_to_end(&mut out).ok()?;
    Some(out)
}

/// Bytes `start..start+len` of `url`.
fn read_range(agent: &ureq::Agent, url: &str, start: u64, len: u64) -> Result<Vec<u8>, RemoteError> {
    let http = |detail: String| RemoteError::Http { url: url.into(), detail };
    if len == 0 {
        return Ok(Vec::new());
    }
    let resp = agent
        .get(url)
        .set("Range", &format!("bytes={}-{}", start, start + len - 1))
        .call()
        .map_err(|e| http(http_detail(e)))?;
    if resp.status() != 206 {
        return Err(RemoteError::NoRanges { url: url.into(), status: resp.status() });
    }
    let mut out = Vec::with_capacity(len.min(64 << 20) as usize);
    resp.into_reader()
        .take(len + 1)
        .read_to_end(&mut out)
        .map_err(|e| http(format!("reading the body: {}", e.kind())))?;
    if out.len() as u64 != len {
        return Err(http(format!("asked for {len} bytes at {start}, got {}", out.len())));
    }
    Ok(out)
}

impl RemoteOverlay {
    /// Read and check the header and manifest, the manifest capped at `manifest_limit`
    /// decompressed bytes (`forage_format::manifest::raw_limit_for` the base).
    pub fn open(url: &str, policy: &FetchPolicy, manifest_limit: u64) -> Result<Self, RemoteError> {
        let ov = |source| RemoteError::Overlay { url: url.into(), source };
        let agent = agent(url, policy)?;
        let head = read_range(&agent, url, 0, HEADER_LEN as u64)?;
        let header = forage_format::read_header(&head[..].try_into().expect("header length")).map_err(ov)?;
        if header.manifest_len > MAX_MANIFEST_RAW {
            return Err(ov(forage_format::FormatError::TooLarge { what: "manifest".into(), limit: MAX_MANIFEST_RAW }));
        }
        let mut prefix = head;
        prefix.extend(read_range(&agent, url, HEADER_LEN as u64, header.manifest_len)?);
        let manifest = OverlayReader::open_limited(&prefix[..], manifest_limit).map_err(ov)?.manifest().clone();
        let mut offsets = Vec::with_capacity(manifest.segments.len());
        let mut at = prefix.len() as u64;
        for s in &manifest.segments {
            offsets.push(at);
            at += s.compressed_len;
        }
        Ok(Self { agent, url: url.into(), prefix, manifest, offsets })
    }

    /// The manifest's SHA-256 (hex): the overlay's name.
    pub fn digest(&self) -> String {
        hex::encode(&self.prefix[24..56])
    }

    /// Segment `i`'s bytes as stored (checked later, against the manifest).
    pub fn segment(&self, i: usize) -> Result<Vec<u8>, RemoteError> {
        let s = self.manifest.segments.get(i).ok_or_else(|| RemoteError::Http {
            url: self.url.clone(),
            detail: format!("segment {i} does not exist"),
        })?;
        read_range(&self.agent, &self.url, self.offsets[i], s.compressed_len)
    }
}

impl RemoteOverlay {
    /// The overlay from the end of the manifest to its end, as one stream (pipelined
    /// synthesis applies it while it downloads).
    pub fn segments_stream(&self) -> Result<Box<dyn Read + Send>, RemoteError> {
        let http = |detail: String| RemoteError::Http { url: self.url.clone(), detail };
        let resp = self
            .agent
            .get(&self.url)
            .set("Range", &format!("bytes={}-", self.prefix.len()))
            .call()
            .map_err(|e| http(http_detail(e)))?;
        if resp.status() != 206 {
            return Err(RemoteError::NoRanges { url: self.url.clone(), status: resp.status() });
        }
        Ok(Box::new(resp.into_reader()))
    }
}
