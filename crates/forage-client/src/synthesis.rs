//! VM synthesis from the device's side: offer an overlay (a file, or a URL the cloudlet
//! fetches), stream its segments (answering demand fetches first), and report what it
//! took until the first response.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use forage_format::container::HEADER_LEN;
use forage_proto::asynchronous::{read, write};
use forage_proto::{DeviceMessage as Message, Offer, ServiceEndpoint, VERSION_MAX, VERSION_MIN};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::connect::connect;
use crate::error::ClientError;
use crate::{sender, service};

/// How to synthesize.
#[derive(Debug, Clone, Default)]
pub struct SynthesisOptions {
    /// Names the device in the cloudlet's records.
    pub device: String,
    /// Resume the VM as soon as the manifest is there (demand fetch for the rest).
    pub early_start: bool,
    /// Ask the cloudlet to receive everything before applying anything (the unpipelined
    /// baseline; overrides early start).
    pub store_and_forward: bool,
    /// The first request to send (default: the overlay's probe, else `ping`).
    pub request: Option<String>,
    /// Bytes of segments handed to the network so far (for a progress bar).
    pub sent: Option<Arc<AtomicU64>>,
    /// This device's credentials for the cloudlet (`forage-trust`: TLS 1.3 with its
    /// certificate); required.
    pub credentials: Option<Arc<rustls::ClientConfig>>,
    /// This device's pairings (`DATA/trust/peers`): a redirect to another node of the
    /// cloudlet's cluster is followed once, with the pairing recorded for that node's
    /// address. Without it a redirect is an error.
    pub pairings: Option<std::path::PathBuf>,
}

/// What the VM used of the overlay before the first response (early start).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OverlayUsage {
    pub blobs_accessed: u64,
    pub blobs: u64,
    pub demand_fetches: u32,
    pub segments_arrived: u32,
    pub segments: u32,
}

/// What a synthesis took, from the first byte sent (`forage synthesize --json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SynthesisReport {
    /// `baseline` (store and forward), `pipelined`, `early_start` or `cached`.
    pub mode: String,
    pub cloudlet: String,
    pub overlay_bytes: u64,
    /// Bytes of segments sent (0 when the cloudlet had the launch VM cached).
    pub bytes_sent: u64,
    /// Until the last segment was handed to the network.
    pub transfer_s: f64,
    /// The cloudlet's time from the manifest to the last segment applied.
    pub apply_s: f64,
    /// Of which checking and decompressing segments.
    pub decompress_s: f64,
    /// The cloudlet's time to resume the VM.
    pub resume_s: f64,
    pub ready_s: f64,
    /// Until the first answer of the service arrived: the figure of merit.
    pub first_response_s: f64,
    /// Until the cloudlet had every segment applied.
    pub complete_s: f64,
    /// The relay's address (what `service` says too).
    pub endpoint: String,
    /// How this device reaches the service (its token included).
    pub service: ServiceEndpoint,
    pub answer: String,
    /// At the first response (early start).
    pub usage: Option<OverlayUsage>,
    /// Fraction of the overlay's blobs the VM had read at its first response.
    pub accessed_fraction: Option<f64>,
}

impl std::fmt::Display for SynthesisReport {
    /// The breakdown an operator reads (`forage synthesize`, the demo).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self;
        writeln!(
            f,
            "synthesized on cloudlet {} ({} KiB overlay, {}):",
            r.cloudlet,
            r.overlay_bytes >> 10,
            r.mode.replace('_', " ")
        )?;
        if r.mode == "cached" {
            writeln!(
                f,
                "  launch VM from the cloudlet's cache: nothing sent | resume {:.2} s | first response {:.2} s",
                r.resume_s, r.first_response_s
            )?;
        } else {
            writeln!(
                f,
                "  transfer {:.2} s | decompress {:.2} s | apply {:.2} s | resume {:.2} s | first response {:.2} s | all applied {:.2} s",
                r.transfer_s, r.decompress_s, r.apply_s, r.resume_s, r.first_response_s, r.complete_s
            )?;
        }
        if let Some(u) = &r.usage {
            writeln!(
                f,
                "  at the first response the VM had read {} of {} overlay blobs ({:.0}%); {} segments fetched on demand, {} of {} there",
                u.blobs_accessed,
                u.blobs,
                r.accessed_fraction.unwrap_or(0.0) * 100.0,
                u.demand_fetches,
                u.segments_arrived,
                u.segments
            )?;
        }
        write!(f, "  service at {} answered: {}", r.endpoint, r.answer)
    }
}

/// An open session: the VM runs on the cloudlet until this is closed or dropped.
pub struct Session {
    control: mpsc::UnboundedSender<Message>,
    sender: tokio::task::JoinHandle<()>,
    events: mpsc::UnboundedReceiver<(Message, Instant)>,
    addr: SocketAddr,
}

impl Session {
    /// Wait until the cloudlet ends the instance (idle timeout, operator, error), or hands
    /// it off (where it went). Progress messages are passed over.
    pub async fn ended(&mut self) -> crate::held::Ended {
        self.ended_following(&mut mpsc::unbounded_channel().1).await
    }

    /// [`Session::ended`], asking the instance to follow the device to each cloudlet
    /// (`HOST:PORT`) that `follow` names meanwhile; a refusal (NotFollowed) is logged and
    /// the instance stays.
    pub async fn ended_following(&mut self, follow: &mut mpsc::UnboundedReceiver<String>) -> crate::held::Ended {
        loop {
            let event = tokio::select! {
                e = self.events.recv() => e,
                Some(to) = follow.recv() => {
                    let _ = self.control.send(Message::Follow { to });
                    continue;
                }
            };
            match event {
                Some((Message::NotFollowed { message }, _)) => tracing::warn!("the instance did not follow: {message}"),
                Some((Message::Moved { cloudlet, service }, _)) => {
                    return crate::held::Ended::Moved { cloudlet, service }
                }
                Some((Message::Usage { .. } | Message::Complete { .. }, _)) => {}
                Some((Message::Error { code, message }, _)) => {
                    return crate::held::Ended::Stopped(ClientError::Refused { addr: self.addr, code, message })
                }
                Some((other, _)) => {
                    return crate::held::Ended::Stopped(ClientError::Sequence {
                        addr: self.addr,
                        expected: "Moved or Error",
                        got: other.name(),
                    })
                }
                None => {
                    return crate::held::Ended::Stopped(ClientError::Proto {
                        addr: self.addr,
                        source: forage_proto::ProtoError::Closed,
                    })
                }
            }
        }
    }

    pub async fn close(self) {
        let _ = self.control.send(Message::Bye);
        drop(self.control);
        let _ = self.sender.await;
    }

    /// End the session asking for the instance's residue (its changes against the launch
    /// VM), written to `out` (checked, and renamed into place only when complete).
    /// Returns its size; `forage overlay merge` folds it into the overlay.
    pub async fn close_with_residue(mut self, out: &Path) -> Result<u64, ClientError> {
        let bad = |detail: String| ClientError::Overlay { path: out.to_path_buf(), detail };
        let partial = out.with_extension(format!("partial-{}", std::process::id()));
        let result = async {
            let _ = self.control.send(Message::WantResidue);
            let mut file = tokio::fs::File::create(&partial).await.map_err(|e| bad(e.to_string()))?;
            let mut written = 0u64;
            loop {
                match next_event(&mut self.events, self.addr).await? {
                    (Message::Residue { offset, bytes, last }, _) => {
                        if offset != written {
                            return Err(ClientError::Sequence {
                                addr: self.addr,
                                expected: "the next residue piece",
                                got: "a piece out of order",
                            });
                        }
                        tokio::io::AsyncWriteExt::write_all(&mut file, &bytes).await.map_err(|e| bad(e.to_string()))?;
                        written += bytes.len() as u64;
                        if last {
                            break;
                        }
                    }
                    (Message::Usage { .. } | Message::Complete { .. }, _) => {}
                    (other, _) => {
                        return Err(ClientError::Sequence { addr: self.addr, expected: "Residue", got: other.name() })
                    }
                }
            }
            tokio::io::AsyncWriteExt::flush(&mut file).await.map_err(|e| bad(e.to_string()))?;
            // Every checksum, before it counts as a residue.
            let p = partial.clone();
            tokio::task::spawn_blocking(move || -> Result<(), String> {
                let f = std::fs::File::open(&p).map_err(|e| e.to_string())?;
                let mut r =
                    forage_format::OverlayReader::open(std::io::BufReader::new(f)).map_err(|e| e.to_string())?;
                while r.next_segment().map_err(|e| e.to_string())?.is_some() {}
                r.finish().map_err(|e| e.to_string())
            })
            .await
            .expect("no panic")
            .map_err(|e| bad(format!("the residue received is damaged: {e}")))?;
            tokio::fs::rename(&partial, out).await.map_err(|e| bad(e.to_string()))?;
            Ok(written)
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&partial).await;
        }
        drop(self.control);
        let _ = self.sender.await;
        result
    }
}

/// The overlay's header and manifest, read from its file.
#[derive(Clone)]
pub struct OverlayFile {
    pub path: PathBuf,
    pub prefix: Vec<u8>,
    pub manifest: forage_format::Manifest,
    pub bytes: u64,
    /// Header's manifest SHA-256: the overlay's name for the cloudlet cache.
    pub digest: String,
    /// The builder's signature (`PATH.sig`), if there is one beside the overlay.
    pub signature: Vec<u8>,
}

impl OverlayFile {
    pub async fn open(path: &Path) -> Result<Self, ClientError> {
        let bad = |detail: String| ClientError::Overlay { path: path.to_path_buf(), detail };
        let mut file = tokio::fs::File::open(path).await.map_err(|e| bad(e.to_string()))?;
        let bytes = file.metadata().await.map_err(|e| bad(e.to_string()))?.len();
        let mut head = [0u8; HEADER_LEN];
        file.read_exact(&mut head).await.map_err(|e| bad(format!("header: {e}")))?;
        let header = forage_format::read_header(&head).map_err(|e| bad(e.to_string()))?;
        let mut prefix = head.to_vec();
        let mut manifest_bytes = vec![0u8; header.manifest_len as usize];
        file.read_exact(&mut manifest_bytes).await.map_err(|e| bad(format!("manifest: {e}")))?;
        prefix.extend_from_slice(&manifest_bytes);
        let manifest =
            forage_format::OverlayReader::open(&prefix[..]).map_err(|e| bad(e.to_string()))?.manifest().clone();
        if let Some(parent) = &manifest.parent {
            return Err(bad(format!(
                "this is a residue of overlay {parent}: merge it into that overlay first (forage overlay merge)"
            )));
        }
        let signature = tokio::fs::read(format!("{}.sig", path.display())).await.unwrap_or_default();
        Ok(Self {
            path: path.to_path_buf(),
            prefix,
            manifest,
            bytes,
            digest: hex_digest(&header.manifest_sha256),
            signature,
        })
    }
}

fn hex_digest(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Synthesize the overlay in file `overlay` on `cloudlet`.
pub async fn synthesize(
    overlay: &Path,
    cloudlet: SocketAddr,
    opts: &SynthesisOptions,
) -> Result<(SynthesisReport, Session), ClientError> {
    let ov = OverlayFile::open(overlay).await?;
    follow(ov, None, cloudlet, opts).await
}

/// [`run`], following one redirect to another node of the cloudlet's cluster.
async fn follow(
    ov: OverlayFile,
    url: Option<String>,
    cloudlet: SocketAddr,
    opts: &SynthesisOptions,
) -> Result<(SynthesisReport, Session), ClientError> {
    let again = ov.clone();
    match run(ov, url.clone(), cloudlet, opts).await {
        Err(ClientError::Redirected { addr, to }) if opts.pairings.is_some() => {
            let trust = forage_trust::DeviceTrust::new(opts.pairings.as_deref().expect("checked"));
            let credentials = trust.credentials_at(to).map_err(|e| ClientError::RedirectUnpaired {
                addr,
                to,
                source: Box::new(e),
            })?;
            tracing::info!(%addr, %to, "redirected to the node of the cluster holding the base");
            let opts = SynthesisOptions { credentials: Some(credentials), pairings: None, ..opts.clone() };
            run(again, url, to, &opts).await
        }
        other => other,
    }
}

/// Synthesize the overlay at `url`: the cloudlet fetches it itself (range requests), the
/// device only reads its header and manifest (to offer its base and know its probe).
pub async fn synthesize_url(
    url: &str,
    cloudlet: SocketAddr,
    opts: &SynthesisOptions,
) -> Result<(SynthesisReport, Session), ClientError> {
    let u = url.to_string();
    let remote = tokio::task::spawn_blocking(move || {
        forage_remote::RemoteOverlay::open(
            &u,
            &forage_remote::FetchPolicy::any(),
            forage_format::manifest::MAX_MANIFEST_RAW,
        )
    })
    .await
    .expect("no panic")
    .map_err(|e| ClientError::Overlay { path: url.into(), detail: e.to_string() })?;
    if let Some(parent) = &remote.manifest.parent {
        return Err(ClientError::Overlay {
            path: url.into(),
            detail: format!("this is a residue of overlay {parent}: merge it into that overlay first"),
        });
    }
    let bytes = remote.prefix.len() as u64 + remote.manifest.segments.iter().map(|s| s.compressed_len).sum::<u64>();
    let u = url.to_string();
    let signature =
        tokio::task::spawn_blocking(move || forage_remote::fetch_signature(&u, &forage_remote::FetchPolicy::any()))
            .await
            .expect("no panic")
            .unwrap_or_default();
    let ov = OverlayFile {
        path: url.into(),
        digest: remote.digest(),
        prefix: remote.prefix,
        manifest: remote.manifest,
        bytes,
        signature,
    };
    follow(ov, Some(url.to_string()), cloudlet, opts).await
}

async fn run(
    ov: OverlayFile,
    url: Option<String>,
    cloudlet: SocketAddr,
    opts: &SynthesisOptions,
) -> Result<(SynthesisReport, Session), ClientError> {
    let proto = |source| ClientError::Proto { addr: cloudlet, source };
    let probe = ov.manifest.service.as_ref().and_then(|s| s.probe.clone());

    let start = Instant::now();
    let credentials = opts.credentials.as_ref().ok_or(ClientError::NoCredentials(cloudlet))?;
    // A small send buffer keeps fetched segments from queueing behind much bulk data.
    let send_buffer = (opts.early_start && !opts.store_and_forward).then_some(128 << 10);
    let mut stream = connect(cloudlet, credentials, send_buffer).await?;
    let offer = Offer {
        base_digest: ov.manifest.base.digest.clone(),
        manifest_bytes: ov.prefix.len() as u64,
        overlay_bytes: ov.bytes,
        overlay_digest: ov.digest.clone(),
        signature: ov.signature.clone(),
    };
    let early_start = opts.early_start && !opts.store_and_forward;
    let hello = Message::Hello {
        versions: (VERSION_MIN, VERSION_MAX),
        device: opts.device.clone(),
        offers: vec![offer],
        early_start,
        store_and_forward: opts.store_and_forward,
    };
    write(&mut stream, &hello).await.map_err(proto)?;
    let (name, cached) = match read(&mut stream).await.map_err(proto)? {
        Message::Welcome { chosen: Some(_), cloudlet: name, cached, .. } => (name, cached),
        Message::Welcome { chosen: None, redirect: Some(to), .. } => {
            let to = to
                .parse()
                .map_err(|_| ClientError::BadRedirect { addr: cloudlet, to: to.chars().take(80).collect() })?;
            return Err(ClientError::Redirected { addr: cloudlet, to });
        }
        Message::Welcome { chosen: None, missing, .. } => return Err(ClientError::NoBase { addr: cloudlet, missing }),
        Message::Error { code, message } => return Err(ClientError::Refused { addr: cloudlet, code, message }),
        other => return Err(ClientError::Sequence { addr: cloudlet, expected: "Welcome", got: other.name() }),
    };
    match (&url, cached) {
        (_, true) => {}
        (Some(url), false) => write(&mut stream, &Message::OverlayUrl { url: url.clone() }).await.map_err(proto)?,
        (None, false) => write(&mut stream, &Message::Manifest { bytes: ov.prefix.clone() }).await.map_err(proto)?,
    }
    let mode = match (cached, early_start, opts.store_and_forward) {
        (true, _, _) => "cached",
        (false, true, _) => "early_start",
        (false, false, false) => "pipelined",
        (false, false, true) => "baseline",
    };

    // A reader task turns the cloudlet's messages into fetches and events; the sender
    // task streams segments and control messages.
    let (mut rd, wr) = tokio::io::split(stream);
    let (fetch_tx, fetch_rx) = mpsc::unbounded_channel::<u32>();
    let (event_tx, events) = mpsc::unbounded_channel::<(Message, Instant)>();
    tokio::spawn(async move {
        loop {
            match read(&mut rd).await {
                Ok(Message::Fetch { index }) => {
                    let _ = fetch_tx.send(index);
                }
                Ok(m) => {
                    if event_tx.send((m, Instant::now())).is_err() {
                        return;
                    }
                }
                Err(_) => return, // closed: the events channel ends
            }
        }
    });
    let (control, control_rx) = mpsc::unbounded_channel::<Message>();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let plan = sender::Plan {
        overlay: ov.path.clone(),
        prefix_len: ov.prefix.len() as u64,
        manifest: ov.manifest.clone(),
        skip_all: cached || url.is_some(),
        sent: opts.sent.clone(),
    };
    let sender = tokio::spawn(sender::run(plan, wr, fetch_rx, control_rx, done_tx, start));
    let mut session = Session { control, sender, events, addr: cloudlet };

    let mut report = SynthesisReport {
        mode: mode.into(),
        cloudlet: name,
        overlay_bytes: ov.bytes,
        bytes_sent: 0,
        transfer_s: 0.0,
        apply_s: 0.0,
        decompress_s: 0.0,
        resume_s: 0.0,
        ready_s: 0.0,
        first_response_s: 0.0,
        complete_s: 0.0,
        endpoint: String::new(),
        service: ServiceEndpoint::default(),
        answer: String::new(),
        usage: None,
        accessed_fraction: None,
    };
    let mut complete = false;
    loop {
        match next_event(&mut session.events, cloudlet).await? {
            (Message::Ready { service, resumed_after_ms }, at) => {
                report.endpoint = service.addr.clone();
                report.service = service;
                report.resume_s = resumed_after_ms as f64 / 1000.0;
                report.ready_s = at.duration_since(start).as_secs_f64();
                break;
            }
            (Message::Complete { .. }, _) => complete = true,
            (other, _) => return Err(ClientError::Sequence { addr: cloudlet, expected: "Ready", got: other.name() }),
        }
    }

    // First response, while the rest of the overlay may still be on its way.
    // The cloudlet may fail the session meanwhile (a corrupted segment): its reason wins.
    let line = opts.request.clone().or(probe).unwrap_or_else(|| "ping".into());
    let answer = first_response(report.service.clone(), line);
    tokio::pin!(answer);
    let mut pending = Vec::new();
    report.answer = loop {
        tokio::select! {
            a = &mut answer => break a?,
            e = next_event(&mut session.events, cloudlet) => pending.push(e?),
        }
    };
    report.first_response_s = start.elapsed().as_secs_f64();
    let _ = session.control.send(Message::Checkpoint { label: forage_proto::device::FIRST_RESPONSE.into() });
    let mut usage_seen = false;
    let mut pending = pending.into_iter();
    while !(complete && usage_seen) {
        let event = match pending.next() {
            Some(e) => e,
            None => next_event(&mut session.events, cloudlet).await?,
        };
        match event {
            (Message::Complete { apply_ms, decompress_ms, .. }, at) => {
                complete = true;
                report.apply_s = apply_ms as f64 / 1000.0;
                report.decompress_s = decompress_ms as f64 / 1000.0;
                report.complete_s = at.duration_since(start).as_secs_f64();
            }
            (Message::Usage { blobs_accessed, blobs, demand_fetches, segments_arrived, segments, .. }, _) => {
                usage_seen = true;
                if mode == "early_start" {
                    report.accessed_fraction =
                        Some(if blobs == 0 { 0.0 } else { blobs_accessed as f64 / blobs as f64 });
                    report.usage =
                        Some(OverlayUsage { blobs_accessed, blobs, demand_fetches, segments_arrived, segments });
                }
            }
            (other, _) => {
                return Err(ClientError::Sequence { addr: cloudlet, expected: "Complete or Usage", got: other.name() })
            }
        }
    }
    if let Ok((transfer_s, bytes)) = done_rx.await {
        report.transfer_s = transfer_s;
        report.bytes_sent = bytes;
    }
    Ok((report, session))
}

async fn next_event(
    events: &mut mpsc::UnboundedReceiver<(Message, Instant)>,
    addr: SocketAddr,
) -> Result<(Message, Instant), ClientError> {
    match events.recv().await {
        Some((Message::Error { code, message }, _)) => Err(ClientError::Refused { addr, code, message }),
        Some(e) => Ok(e),
        None => Err(ClientError::Closed { addr, what: "the end of the session" }),
    }
}

/// Send `line` to the service, retrying the connection while the guest's service comes up.
pub(crate) async fn first_response(service: ServiceEndpoint, line: String) -> Result<String, ClientError> {
    let endpoint = service.addr.clone();
    tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        loop {
            match service::request_line(&service, &line, Duration::from_secs(120)) {
                Ok(a) => return Ok(a),
                // The relay is the cloudlet's and the token its own: retrying changes nothing.
                Err(
                    e @ (service::ServiceError::Tls { .. }
                    | service::ServiceError::NoEndpoint
                    | service::ServiceError::BadAddress(_)
                    | service::ServiceError::BadFingerprint(_)),
                ) => return Err(e.to_string()),
                Err(e) if t.elapsed() > Duration::from_secs(60) => return Err(e.to_string()),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    })
    .await
    .expect("request does not panic")
    .map_err(|detail| ClientError::Service { endpoint, detail })
}
