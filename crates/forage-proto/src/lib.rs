//! forage-proto: the device <-> cloudlet synthesis protocol, version 1.
//!
//! Every connection is TLS 1.3 with mutual authentication (`forage-trust`); a connection
//! without a client certificate may only pair (PairRequest -> PairGranted | Error).
//!
//! Every message is one frame: `u32 LE length | u8 kind | payload`, where `length` counts
//! the kind byte and the payload (at most [`MAX_FRAME`]), and the payload is the message
//! encoded as CBOR (byte strings for overlay bytes). The first message of each side says
//! which versions it speaks; both then use the highest common one ("accept N and N-1").
//!
//! ```mermaid
//! sequenceDiagram
//!     participant D as device
//!     participant C as cloudlet
//!     D->>C: Hello {versions 1..=1, device, offers: [base digest, sizes]...}
//!     C->>D: Welcome {version, chosen base, cached} | Welcome {no base, missing digests}
//!     Note over D,C: cached: the launch VM is in the cloudlet's cache, skip to Ready
//!     D->>C: Manifest {overlay header + manifest bytes}
//!     Note over C: checks it; with early start, resumes the VM now
//!     C-->>D: Fetch {segment}   (a VM read needs a segment not yet here)
//!     D->>C: Segment {index, bytes}   (fetched ones overtake the bulk stream)
//!     D->>C: Segment ... in overlay order, until all are sent
//!     C->>D: Ready {service endpoint + token, resumed after ms}   (VM running; before Complete with early start)
//!     C->>D: Complete {segments, bytes}   (every segment applied)
//!     D->>C: Checkpoint {label}   (optional, e.g. at the first response)
//!     C->>D: Usage {blobs accessed, fetches}
//!     D->>C: Bye | WantResidue
//!     C->>D: Residue {offset, bytes, last}...   (after WantResidue: the instance's changes)
//!     Note over D,C: either side may send Error {code, message} and close
//!     Note over D,C: other mechanisms: Hello without offers, Welcome, then
//!     D->>C: Provision {cached VM | push | script | app package}
//!     C->>D: Ready {service endpoint + token}   (then the same Checkpoint/Bye lifecycle)
//! ```
//!
//! Documented in `docs/synthesis-protocol.md`.

pub mod service;

use serde::{Deserialize, Serialize};

pub use service::ServiceEndpoint;

/// Versions this build speaks. Version 2: services are reached through the cloudlet's
/// TLS relay with the instance's token ([`service`]); Ready, Moved and HandoffDone carry
/// a [`ServiceEndpoint`] instead of a bare address; PairRequest no longer asks for a kind
/// or lifetime.
pub const VERSION_MIN: u16 = 2;
pub const VERSION_MAX: u16 = 2;
/// Largest frame (kind + payload): a segment is at most 32 MiB compressed.
pub const MAX_FRAME: u32 = 33 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// Digest of the base VM the overlay applies to.
    pub base_digest: String,
    pub manifest_bytes: u64,
    pub overlay_bytes: u64,
    /// SHA-256 of the overlay's manifest (which holds every segment's hash): names the
    /// overlay for the cloudlet's launch-VM cache.
    #[serde(default)]
    pub overlay_digest: String,
    /// The builder's signature of `overlay_digest` (`APP.ovl.sig`, JSON), if the device
    /// has one; cloudlets with a signers list refuse overlays without a good one.
    #[serde(default, with = "serde_bytes")]
    pub signature: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// No common protocol version.
    Version,
    /// The cloudlet holds none of the offered bases.
    NoBase,
    /// The overlay failed a check (checksum, truncation, format).
    BadOverlay,
    /// The peer broke the message sequence.
    Protocol,
    /// Something failed on the cloudlet (disk full, QEMU...).
    Internal,
    /// The peer did not answer in time.
    Timeout,
    /// The service, app or guest OS asked for is not held by this cloudlet.
    NotFound,
    /// Provisioning failed: the script failed or ran over its limit, the app package is
    /// incomplete or for another OS.
    Provision,
    /// The instance was stopped for want of use (no traffic for the idle timeout).
    Idle,
    /// The peer presented no credentials: it may pair, nothing else.
    Unpaired,
    /// Pairing refused (wrong, used or expired code).
    Pairing,
    /// A VM handoff failed (the instance keeps running at its source).
    Handoff,
    /// The cloudlet is at a limit (sessions in all or of this peer, disk space): later.
    Busy,
}

/// A client app in the cloudlet's app store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppEntry {
    pub id: String,
    /// The service it uses.
    pub service: String,
    /// `os-arch` of the device, or `any`.
    pub platform: String,
    pub file: String,
    pub size: u64,
    pub sha256: String,
}

/// How a device asks for a service without an overlay (the other four mechanisms of
/// tactical cloudlets). Every one yields a transient instance with the same lifecycle as
/// a synthesized one: it stops when the device closes the session or after an idle timeout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "how", rename_all = "snake_case")]
pub enum Provision {
    /// Cached VM: start a copy-on-write instance of a service VM the cloudlet holds;
    /// `join` shares a running instance of it if there is one.
    CachedVm {
        service: String,
        #[serde(default)]
        join: bool,
    },
    /// Cloudlet push: the device took client app `app` from the cloudlet's app store;
    /// start the app's service.
    Push { app: String },
    /// On-demand provisioning: run `script` (sh) inside a transient copy of the baseline
    /// VM of `os`, at most `timeout_s` seconds; the service then listens on `port`. The
    /// cloudlet's server code `components` named are put in the guest first, under
    /// `/opt/components/NAME`.
    Script {
        os: String,
        port: u16,
        #[serde(with = "serde_bytes")]
        script: Vec<u8>,
        timeout_s: u32,
        #[serde(default)]
        components: Vec<String>,
    },
    /// Application virtualization: deploy a packed application (`forage app pack`) into a
    /// transient copy of a VM whose OS matches the package's.
    App {
        #[serde(with = "serde_bytes")]
        package: Vec<u8>,
    },
}

impl Provision {
    /// The mechanism's name in records, logs and the bench.
    pub fn mechanism(&self) -> &'static str {
        match self {
            Provision::CachedVm { .. } => "cached_vm",
            Provision::Push { .. } => "cloudlet_push",
            Provision::Script { .. } => "on_demand",
            Provision::App { .. } => "app_virtualization",
        }
    }
}

/// Every message of version 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "m", rename_all = "snake_case")]
pub enum Message {
    Hello {
        versions: (u16, u16),
        device: String,
        offers: Vec<Offer>,
        /// Resume the VM as soon as the manifest is there.
        early_start: bool,
        /// Receive the whole overlay before applying any of it (the unpipelined baseline
        /// of the bench; implies no early start).
        #[serde(default)]
        store_and_forward: bool,
    },
    Welcome {
        version: u16,
        cloudlet: String,
        /// The base chosen among the offers, or none.
        chosen: Option<String>,
        /// Offered bases this cloudlet does not hold.
        missing: Vec<String>,
        /// The cloudlet has the chosen offer's launch VM cached: send no manifest or
        /// segments, wait for Ready.
        #[serde(default)]
        cached: bool,
    },
    Manifest {
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    Segment {
        index: u32,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    Fetch {
        index: u32,
    },
    /// The instance runs; its service answers at `service` (see [`service`]).
    Ready {
        service: ServiceEndpoint,
        resumed_after_ms: u64,
    },
    Complete {
        segments: u32,
        bytes: u64,
        /// From the manifest's arrival to the last segment applied.
        apply_ms: u64,
        /// Of which checking and decompressing segments.
        #[serde(default)]
        decompress_ms: u64,
    },
    /// The device marks a moment (e.g. its first response arrived) and asks what the VM
    /// has used of the overlay so far.
    Checkpoint {
        label: String,
    },
    /// Answer to Checkpoint (early start only; zeros otherwise).
    Usage {
        label: String,
        /// Overlay blobs (chunks of new data) the VM has read, of all blobs.
        blobs_accessed: u64,
        blobs: u64,
        /// Segments asked for out of order, and segments there at this moment.
        demand_fetches: u32,
        segments_arrived: u32,
        segments: u32,
    },
    /// Instead of Manifest and segments: the cloudlet fetches the overlay itself from this
    /// HTTP(S) URL (range requests; demand fetches become out-of-order ranges).
    OverlayUrl {
        url: String,
    },
    /// After a Hello without offers: what to provision instead of synthesizing.
    Provision {
        request: Provision,
    },
    /// First message of a connection without a client certificate: pair with the code's
    /// secret, asking for a certificate for the key of `csr` (DER), named `name`.
    PairRequest {
        #[serde(with = "serde_bytes")]
        secret: Vec<u8>,
        name: String,
        #[serde(with = "serde_bytes")]
        csr: Vec<u8>,
        // What the credential grants (device or cloudlet, lifetime) is fixed by the code
        // the operator made; earlier devices sent `kind` and `valid_s` here, now ignored.
    },
    /// After a Hello without offers: the cloudlet's app store, for `platform` (and `any`),
    /// or all.
    ListApps {
        #[serde(default)]
        platform: Option<String>,
    },
    Apps {
        apps: Vec<AppEntry>,
    },
    /// After a Hello without offers: one client app's file.
    GetApp {
        id: String,
    },
    AppFile {
        id: String,
        file: String,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// The credentials: the cloudlet's CA and the new certificate (DER).
    PairGranted {
        cloudlet: String,
        #[serde(with = "serde_bytes")]
        ca: Vec<u8>,
        #[serde(with = "serde_bytes")]
        cert: Vec<u8>,
        not_after_unix: u64,
    },
    /// The device ends the session asking for the instance's residue: its changes against
    /// the launch VM, as an overlay to merge into its own (`forage overlay merge`).
    WantResidue,
    /// A piece of the residue file, in order; `last` ends it (then the cloudlet closes).
    Residue {
        offset: u64,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
        last: bool,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    Bye,
    /// Handoff (cloudlet to cloudlet, after a Hello without offers): the source offers a
    /// running instance. The destination answers HandoffAccept or Error.
    HandoffBegin(HandoffBegin),
    HandoffAccept {
        /// The destination holds the instance's base VM: chunks equal to the base are not
        /// sent, others may be deltas against it. Without it every chunk is sent whole
        /// and the source sends the boot files (HandoffFile) first.
        has_base: bool,
    },
    /// A file the VM needs besides memory and disk (direct-boot kernel, initramfs), in
    /// pieces of at most 16 MiB; only to a destination without the base.
    HandoffFile {
        name: String,
        offset: u64,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
        last: bool,
    },
    /// One handoff segment (`forage-handoff` segment format), in sequence order.
    HandoffSegment {
        seq: u64,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// The destination applied segment `seq` (`bytes` on the wire): the source's
    /// bandwidth measure.
    HandoffAck { seq: u64, bytes: u64 },
    /// Everything is sent: `segments` in all, and the VM's remaining state (a QEMU
    /// migration stream without guest RAM, zstd-compressed). The destination resumes only
    /// now, and only if every segment arrived and applied.
    HandoffCommit {
        segments: u64,
        #[serde(with = "serde_bytes")]
        state: Vec<u8>,
    },
    /// The instance runs at the destination; its service answers at `service`.
    HandoffDone { service: ServiceEndpoint, resumed_after_ms: u64 },
    /// To the device: its instance moved to the cloudlet at `cloudlet`; its service now
    /// answers at `service`. The cloudlet then closes the session.
    Moved { cloudlet: String, service: ServiceEndpoint },
}

/// What a handoff's source tells the destination before any state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffBegin {
    /// The instance's id at the source (for logs).
    pub instance: String,
    /// Names the base VM: the SHA-256 of its saved device state (unique per save, and
    /// kept by package export and import).
    pub base_state_sha256: String,
    /// The base's description (`forage-vm` snapshot manifest, JSON): the hardware the
    /// destination must start, and the sizes of memory and disk.
    #[serde(with = "serde_bytes")]
    pub vm: Vec<u8>,
    /// Guest port relayed as the service, and other guest ports to forward.
    pub service_port: Option<u16>,
    pub extra_ports: Vec<u16>,
    /// The instance's service token (hex), kept at the destination so that its devices
    /// reach it there with what they hold.
    #[serde(default)]
    pub service_token: String,
}

impl Message {
    /// The frame's kind byte (also lets a reader skip a payload it will not decode).
    pub fn kind(&self) -> u8 {
        match self {
            Message::Hello { .. } => 1,
            Message::Welcome { .. } => 2,
            Message::Manifest { .. } => 3,
            Message::Segment { .. } => 4,
            Message::Fetch { .. } => 5,
            Message::Ready { .. } => 6,
            Message::Complete { .. } => 7,
            Message::Error { .. } => 8,
            Message::Bye => 9,
            Message::Checkpoint { .. } => 10,
            Message::Usage { .. } => 11,
            Message::WantResidue => 12,
            Message::Residue { .. } => 13,
            Message::OverlayUrl { .. } => 14,
            Message::Provision { .. } => 15,
            Message::PairRequest { .. } => 16,
            Message::PairGranted { .. } => 17,
            Message::ListApps { .. } => 18,
            Message::Apps { .. } => 19,
            Message::GetApp { .. } => 20,
            Message::AppFile { .. } => 21,
            Message::HandoffBegin(_) => 22,
            Message::HandoffAccept { .. } => 23,
            Message::HandoffFile { .. } => 24,
            Message::HandoffSegment { .. } => 25,
            Message::HandoffAck { .. } => 26,
            Message::HandoffCommit { .. } => 27,
            Message::HandoffDone { .. } => 28,
            Message::Moved { .. } => 29,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Welcome { .. } => "Welcome",
            Message::Manifest { .. } => "Manifest",
            Message::Segment { .. } => "Segment",
            Message::Fetch { .. } => "Fetch",
            Message::Ready { .. } => "Ready",
            Message::Complete { .. } => "Complete",
            Message::Error { .. } => "Error",
            Message::Bye => "Bye",
            Message::Checkpoint { .. } => "Checkpoint",
            Message::Usage { .. } => "Usage",
            Message::WantResidue => "WantResidue",
            Message::Residue { .. } => "Residue",
            Message::OverlayUrl { .. } => "OverlayUrl",
            Message::Provision { .. } => "Provision",
            Message::PairRequest { .. } => "PairRequest",
            Message::PairGranted { .. } => "PairGranted",
            Message::ListApps { .. } => "ListApps",
            Message::Apps { .. } => "Apps",
            Message::GetApp { .. } => "GetApp",
            Message::AppFile { .. } => "AppFile",
            Message::HandoffBegin(_) => "HandoffBegin",
            Message::HandoffAccept { .. } => "HandoffAccept",
            Message::HandoffFile { .. } => "HandoffFile",
            Message::HandoffSegment { .. } => "HandoffSegment",
            Message::HandoffAck { .. } => "HandoffAck",
            Message::HandoffCommit { .. } => "HandoffCommit",
            Message::HandoffDone { .. } => "HandoffDone",
            Message::Moved { .. } => "Moved",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("frame of {0} bytes is over the limit of {MAX_FRAME}")]
    TooLarge(u64),
    #[error("empty frame")]
    Empty,
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("message kind {kind} does not match its payload ({payload})")]
    KindMismatch { kind: u8, payload: &'static str },
    #[error("unreadable {kind} message: {detail}")]
    Payload { kind: u8, detail: String },
    #[error("peer closed the connection")]
    Closed,
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
}

/// Encode a message as one frame.
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut payload = Vec::new();
    ciborium::into_writer(msg, &mut payload).expect("messages encode");
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.extend_from_slice(&((payload.len() + 1) as u32).to_le_bytes());
    frame.push(msg.kind());
    frame.extend_from_slice(&payload);
    frame
}

/// Check a frame length read off the wire.
pub fn check_len(len: u32) -> Result<(), ProtoError> {
    match len {
        0 => Err(ProtoError::Empty),
        l if l > MAX_FRAME => Err(ProtoError::TooLarge(l as u64)),
        _ => Ok(()),
    }
}

/// Decode the body of a frame (kind byte + payload; untrusted bytes).
pub fn decode_body(body: &[u8]) -> Result<Message, ProtoError> {
    let (&kind, payload) = body.split_first().ok_or(ProtoError::Empty)?;
    if !(1..=29).contains(&kind) {
        return Err(ProtoError::UnknownKind(kind));
    }
    let msg: Message = ciborium::from_reader(payload).map_err(|e| ProtoError::Payload { kind, detail: e.to_string() })?;
    if msg.kind() != kind {
        return Err(ProtoError::KindMismatch { kind, payload: msg.name() });
    }
    Ok(msg)
}

/// The version two sides agree on, if any.
pub fn negotiate(theirs: (u16, u16)) -> Option<u16> {
    let hi = theirs.1.min(VERSION_MAX);
    (hi >= theirs.0.max(VERSION_MIN)).then_some(hi)
}

/// Blocking I/O.
pub mod blocking {
    use std::io::{Read, Write};

    use super::*;

    /// Write one frame and flush it (see the asynchronous `write`).
    pub fn write(w: &mut impl Write, msg: &Message) -> Result<(), ProtoError> {
        w.write_all(&encode(msg))?;
        w.flush()?;
        Ok(())
    }

    pub fn read(r: &mut impl Read) -> Result<Message, ProtoError> {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len) {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ProtoError::Closed),
            other => other?,
        }
        let len = u32::from_le_bytes(len);
        check_len(len)?;
        let mut body = Vec::new();
        r.take(len as u64).read_to_end(&mut body)?;
        if body.len() != len as usize {
            return Err(ProtoError::Closed);
        }
        decode_body(&body)
    }
}

/// Asynchronous I/O (tokio).
#[cfg(feature = "tokio")]
pub mod asynchronous {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    use super::*;

    /// Write one frame and flush it: over TLS the frame's last record otherwise waits in
    /// the TLS layer's buffer until the next write, and a peer waiting for it (a demand
    /// fetch) waits forever.
    pub async fn write(w: &mut (impl AsyncWrite + Unpin), msg: &Message) -> Result<(), ProtoError> {
        w.write_all(&encode(msg)).await?;
        w.flush().await?;
        Ok(())
    }

    pub async fn read(r: &mut (impl AsyncRead + Unpin)) -> Result<Message, ProtoError> {
        let len = match r.read_u32_le().await {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ProtoError::Closed),
            other => other?,
        };
        check_len(len)?;
        let mut body = Vec::new();
        r.take(len as u64).read_to_end(&mut body).await?;
        if body.len() != len as usize {
            return Err(ProtoError::Closed);
        }
        decode_body(&body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Message> {
        vec![
            Message::Hello {
                versions: (2, 2),
                device: "phone".into(),
                offers: vec![Offer { base_digest: "ab".repeat(32), manifest_bytes: 10, overlay_bytes: 99, overlay_digest: "cd".repeat(32), signature: b"{}".to_vec() }],
                early_start: true,
                store_and_forward: false,
            },
            Message::Welcome { version: 1, cloudlet: "c".into(), chosen: Some("ab".into()), missing: vec![], cached: true },
            Message::Checkpoint { label: "first-response".into() },
            Message::WantResidue,
            Message::OverlayUrl { url: "https://example.org/app.ovl".into() },
            Message::Residue { offset: 4096, bytes: vec![1; 100], last: true },
            Message::Usage { label: "first-response".into(), blobs_accessed: 3, blobs: 10, demand_fetches: 2, segments_arrived: 4, segments: 9 },
            Message::Manifest { bytes: b"FORAGEOV".to_vec() },
            Message::Segment { index: 3, bytes: vec![7; 1000] },
            Message::Fetch { index: 9 },
            Message::Ready { service: ServiceEndpoint { addr: "127.0.0.1:4000".into(), token: "00".repeat(16), ca_sha256: "ab".repeat(32) }, resumed_after_ms: 1500 },
            Message::Complete { segments: 10, bytes: 12345, apply_ms: 80, decompress_ms: 20 },
            Message::Error { code: ErrorCode::NoBase, message: "no base".into() },
            Message::Provision { request: Provision::CachedVm { service: "hashsearch".into(), join: true } },
            Message::Provision { request: Provision::Push { app: "hashsearch-client".into() } },
            Message::Provision { request: Provision::Script { os: "linux-x86_64".into(), port: 8080, script: b"echo hi".to_vec(), timeout_s: 30, components: vec!["hashsearch".into()] } },
            Message::Provision { request: Provision::App { package: vec![0x28, 0xb5, 0x2f, 0xfd] } },
            Message::Error { code: ErrorCode::Idle, message: "idle".into() },
            Message::PairRequest { secret: vec![1, 2, 3], name: "phone".into(), csr: vec![0x30, 0x82] },
            Message::PairGranted { cloudlet: "c".into(), ca: vec![0x30], cert: vec![0x30], not_after_unix: 1 },
            Message::ListApps { platform: Some("linux-x86_64".into()) },
            Message::Apps { apps: vec![AppEntry { id: "a".into(), service: "s".into(), platform: "any".into(), file: "a.sh".into(), size: 3, sha256: "00".into() }] },
            Message::GetApp { id: "a".into() },
            Message::AppFile { id: "a".into(), file: "a.sh".into(), bytes: b"abc".to_vec() },
            Message::HandoffBegin(HandoffBegin { instance: "7-1".into(), base_state_sha256: "ab".into(), vm: b"{}".to_vec(), service_port: Some(7000), extra_ports: vec![7001], service_token: "00".repeat(16) }),
            Message::HandoffAccept { has_base: true },
            Message::HandoffFile { name: "kernel".into(), offset: 0, bytes: vec![1; 10], last: true },
            Message::HandoffSegment { seq: 3, bytes: vec![9; 1000] },
            Message::HandoffAck { seq: 3, bytes: 1000 },
            Message::HandoffCommit { segments: 4, state: vec![0x28, 0xb5] },
            Message::HandoffDone { service: ServiceEndpoint { addr: "10.0.0.2:4000".into(), ..Default::default() }, resumed_after_ms: 300 },
            Message::Moved { cloudlet: "10.0.0.2:7878".into(), service: ServiceEndpoint { addr: "10.0.0.2:4000".into(), ..Default::default() } },
            Message::Bye,
        ]
    }

    #[test]
    fn every_message_round_trips_through_both_io_flavours() {
        let mut wire = Vec::new();
        for m in all() {
            blocking::write(&mut wire, &m).unwrap();
        }
        let mut r = &wire[..];
        for m in all() {
            assert_eq!(blocking::read(&mut r).unwrap(), m);
        }
        assert!(matches!(blocking::read(&mut r), Err(ProtoError::Closed)));
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let mut r = &wire[..];
            for m in all() {
                assert_eq!(asynchronous::read(&mut r).await.unwrap(), m);
            }
        });
    }

    #[test]
    fn segment_bytes_are_carried_as_bytes() {
        let frame = encode(&Message::Segment { index: 0, bytes: vec![0xab; 100_000] });
        assert!(frame.len() < 100_100, "{} bytes on the wire for 100000", frame.len());
    }

    #[test]
    fn bad_frames_are_errors() {
        assert!(matches!(check_len(0), Err(ProtoError::Empty)));
        assert!(matches!(check_len(MAX_FRAME + 1), Err(ProtoError::TooLarge(_))));
        assert!(matches!(decode_body(&[0]), Err(ProtoError::UnknownKind(0))));
        assert!(matches!(decode_body(&[4, 0xff]), Err(ProtoError::Payload { .. })));
        // A Fetch payload under the Segment kind byte.
        let mut f = encode(&Message::Fetch { index: 1 });
        f[4] = 4;
        assert!(matches!(decode_body(&f[4..]), Err(ProtoError::KindMismatch { .. })));
        // Cut mid-frame.
        let f = encode(&Message::Bye);
        assert!(matches!(blocking::read(&mut &f[..f.len() - 1]), Err(ProtoError::Closed)));
    }

    #[test]
    fn versions() {
        assert_eq!(negotiate((1, 3)), Some(2));
        assert_eq!(negotiate((3, 4)), None);
        assert_eq!(negotiate((0, 1)), None, "version 1 devices reach services without a token");
        assert_eq!(negotiate((1, 2)), Some(2));
    }
}
