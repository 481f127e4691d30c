//! forage-client: the device's side of VM synthesis (protocol in `forage-proto`).
//!
//! [`synthesize`] offers the overlay's base, sends the manifest and every segment in
//! order, waits for Ready, sends the service's probe request to the endpoint it got, and
//! reports the breakdown. The session (and the VM on the cloudlet) lives until
//! [`Session::close`] or until the returned value is dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forage_format::container::HEADER_LEN;
use forage_proto::asynchronous::{read, write};
use forage_proto::{Message, Offer, ProtoError, VERSION_MAX, VERSION_MIN};
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("overlay {path}: {detail}")]
    Overlay { path: PathBuf, detail: String },
    #[error("cloudlet {addr}: {source}")]
    Proto {
        addr: SocketAddr,
        #[source]
        source: ProtoError,
    },
    #[error("cloudlet {addr} refused: {code:?}: {message}")]
    Refused { addr: SocketAddr, code: forage_proto::ErrorCode, message: String },
    #[error("cloudlet {addr} holds none of the overlay's bases (missing {missing:?})")]
    NoBase { addr: SocketAddr, missing: Vec<String> },
    #[error("cloudlet {addr} sent {got} where {expected} was due")]
    Sequence { addr: SocketAddr, expected: &'static str, got: &'static str },
    #[error("the service at {endpoint} did not answer: {detail}")]
    Service { endpoint: String, detail: String },
}

/// What a synthesis took, from the first byte sent.
#[derive(Debug, Clone, Serialize)]
pub struct SynthesisReport {
    pub cloudlet: String,
    pub overlay_bytes: u64,
    /// Until the last segment was handed to the network.
    pub transfer_s: f64,
    /// The cloudlet's time from the manifest to the last segment applied.
    pub apply_s: f64,
    /// The cloudlet's time to resume the VM.
    pub resume_s: f64,
    pub ready_s: f64,
    /// Until the first answer of the service arrived: the figure of merit.
    pub first_response_s: f64,
    pub endpoint: String,
    pub answer: String,
}

/// An open session: the VM runs on the cloudlet until this is closed or dropped.
pub struct Session {
    stream: TcpStream,
}

impl Session {
    pub async fn close(mut self) {
        let _ = write(&mut self.stream, &Message::Bye).await;
    }
}

pub async fn synthesize(overlay: &Path, cloudlet: SocketAddr, device: &str) -> Result<(SynthesisReport, Session), ClientError> {
    let bad = |detail: String| ClientError::Overlay { path: overlay.to_path_buf(), detail };
    let proto = |source| ClientError::Proto { addr: cloudlet, source };
    let mut file = tokio::fs::File::open(overlay).await.map_err(|e| bad(e.to_string()))?;
    let overlay_bytes = file.metadata().await.map_err(|e| bad(e.to_string()))?.len();
    let mut head = [0u8; HEADER_LEN];
    file.read_exact(&mut head).await.map_err(|e| bad(format!("header: {e}")))?;
    let header = forage_format::read_header(&head).map_err(|e| bad(e.to_string()))?;
    let mut prefix = head.to_vec();
    let mut manifest_bytes = vec![0u8; header.manifest_len as usize];
    file.read_exact(&mut manifest_bytes).await.map_err(|e| bad(format!("manifest: {e}")))?;
    prefix.extend_from_slice(&manifest_bytes);
    let manifest = forage_format::OverlayReader::open(&prefix[..]).map_err(|e| bad(e.to_string()))?.manifest().clone();
    let probe = manifest.service.as_ref().and_then(|s| s.probe.clone());

    let start = Instant::now();
    let mut stream = TcpStream::connect(cloudlet).await.map_err(|e| proto(e.into()))?;
    stream.set_nodelay(true).ok();
    let offer = Offer { base_digest: manifest.base.digest.clone(), manifest_bytes: prefix.len() as u64, overlay_bytes };
    write(&mut stream, &Message::Hello { versions: (VERSION_MIN, VERSION_MAX), device: device.into(), offers: vec![offer], early_start: false })
        .await
        .map_err(proto)?;
    let name = match read(&mut stream).await.map_err(proto)? {
        Message::Welcome { chosen: Some(_), cloudlet: name, .. } => name,
        Message::Welcome { chosen: None, missing, .. } => return Err(ClientError::NoBase { addr: cloudlet, missing }),
        Message::Error { code, message } => return Err(ClientError::Refused { addr: cloudlet, code, message }),
        other => return Err(ClientError::Sequence { addr: cloudlet, expected: "Welcome", got: other.name() }),
    };
    write(&mut stream, &Message::Manifest { bytes: prefix }).await.map_err(proto)?;
    // Segments go out while the cloudlet may already answer (an error, early): a reader
    // task collects its messages.
    let (mut rd, mut wr) = stream.into_split();
    let replies = tokio::spawn(async move {
        let mut got = Vec::new();
        loop {
            match read(&mut rd).await {
                Ok(m) => {
                    let done = matches!(m, Message::Complete { .. } | Message::Error { .. });
                    let ready_at = Instant::now();
                    got.push((m, ready_at));
                    if done {
                        return (rd, got, None);
                    }
                }
                Err(e) => return (rd, got, Some(e)),
            }
        }
    });
    for (i, seg) in manifest.segments.iter().enumerate() {
        let mut data = vec![0u8; seg.compressed_len as usize];
        file.read_exact(&mut data).await.map_err(|e| bad(format!("segment {i}: {e}")))?;
        if write(&mut wr, &Message::Segment { index: i as u32, bytes: data }).await.is_err() {
            break; // the cloudlet hung up; its reason arrives through the reader
        }
    }
    let transfer_s = start.elapsed().as_secs_f64();
    let (rd, got, err) = replies.await.expect("reader does not panic");
    let (mut endpoint, mut ready_s, mut resume_s, mut apply_s) = (String::new(), 0.0, 0.0, 0.0);
    for (m, at) in &got {
        match m {
            Message::Ready { endpoint: e, resumed_after_ms } => {
                endpoint = e.clone();
                resume_s = *resumed_after_ms as f64 / 1000.0;
                ready_s = at.duration_since(start).as_secs_f64();
            }
            Message::Complete { apply_ms, .. } => apply_s = *apply_ms as f64 / 1000.0,
            Message::Error { code, message } => return Err(ClientError::Refused { addr: cloudlet, code: *code, message: message.clone() }),
            _ => {}
        }
    }
    if let Some(e) = err {
        return Err(proto(e));
    }
    let stream = rd.reunite(wr).expect("halves of one stream");

    // First response.
    let addr: SocketAddr = endpoint.parse().map_err(|_| ClientError::Service { endpoint: endpoint.clone(), detail: "no usable endpoint".into() })?;
    let line = probe.unwrap_or_else(|| "ping".into());
    let answer = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        loop {
            match forage_agent::app::request_line(addr, &line, Duration::from_secs(120)) {
                Ok(a) => return Ok(a),
                Err(e) if t.elapsed() > Duration::from_secs(60) => return Err(e.to_string()),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    })
    .await
    .expect("request does not panic")
    .map_err(|detail| ClientError::Service { endpoint: endpoint.clone(), detail })?;
    let report = SynthesisReport {
        cloudlet: name,
        overlay_bytes,
        transfer_s,
        apply_s,
        resume_s,
        ready_s,
        first_response_s: start.elapsed().as_secs_f64(),
        endpoint,
        answer,
    };
    Ok((report, Session { stream }))
}
