//! The peer protocol: cloudlet to cloudlet, over TLS 1.3 with the source's cloudlet
//! credentials (paired `--as-cloudlet` with the destination). It carries VM handoff.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as source cloudlet
//!     participant D as destination cloudlet
//!     S->>D: PeerHello {versions, cloudlet}
//!     D->>S: PeerWelcome {version, cloudlet} | Error {unpaired: not paired as a cloudlet}
//!     S->>D: HandoffBegin {base's state digest, VM description, ports, service token}
//!     D->>S: HandoffAccept {has_base} | Error
//!     S->>D: HandoffFile {kernel, initrd}...   (only without the base)
//!     Note over S: QEMU migrates into a local socket; the VM runs meanwhile
//!     S->>D: HandoffSegment {seq, bytes}...   (disk chunks, RAM rounds)
//!     D->>S: HandoffAck {seq, bytes}...   (bandwidth for the adaptation)
//!     Note over S: QEMU stops the VM for its last round (downtime starts)
//!     S->>D: HandoffCommit {segments, ROM + device state}
//!     Note over D: every segment applied: resume
//!     D->>S: HandoffDone {service endpoint}
//! ```
//!
//! At most one copy of the VM runs. Once the source has sent its commit it never resumes
//! the VM unless the destination says it did not: if the link fails before HandoffDone,
//! the source asks on a new connection until it knows (for up to 5 minutes; after that
//! it stops its copy):
//!
//! ```mermaid
//! sequenceDiagram
//!     S->>D: PeerHello
//!     D->>S: PeerWelcome
//!     S->>D: HandoffQuery {instance}
//!     D->>S: HandoffDone {service} | Error {busy: ask again} | Error {not_found}
//! ```
//!
//! The destination resumes the VM once the commit has arrived and applied, whether or
//! not it can tell the source.
//!
//! A cloudlet that lacks a base VM or a service VM another cloudlet holds asks for it (a
//! node of a cluster filling in a base, `forage base fetch`, `forage service fetch`); the
//! package is the one `forage base|service export` writes, checked whole by the asker
//! before it imports it:
//!
//! ```mermaid
//! sequenceDiagram
//!     participant A as asking cloudlet
//!     participant H as holding cloudlet
//!     A->>H: PeerHello
//!     H->>A: PeerWelcome
//!     A->>H: PackageWanted {what: base|service, name}
//!     H->>A: PackageOffer {name, package_bytes} | Error {not_found}
//!     H->>A: PackagePiece {bytes}...   (at most 1 MiB each, package_bytes in all)
//!     H->>A: PackageEnd {sha256 of the package, the holder's signature of it}
//! ```
//!
//! Documented in `docs/handoff-protocol.md`.

use serde::{Deserialize, Serialize};

use crate::{ErrorCode, ServiceEndpoint};

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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "m", rename_all = "snake_case")]
pub enum PeerMessage {
    PeerHello {
        versions: (u16, u16),
        /// The source cloudlet's name (its certificate names it too).
        cloudlet: String,
    },
    PeerWelcome {
        version: u16,
        cloudlet: String,
    },
    /// The source offers a running instance. The destination answers HandoffAccept or
    /// Error.
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
    HandoffAck {
        seq: u64,
        bytes: u64,
    },
    /// Everything is sent: `segments` in all, and the VM's remaining state (a QEMU
    /// migration stream without guest RAM, zstd-compressed). The destination resumes only
    /// now, and only if every segment arrived and applied.
    HandoffCommit {
        segments: u64,
        #[serde(with = "serde_bytes")]
        state: Vec<u8>,
    },
    /// After a commit whose outcome it did not hear (the link failed), the source asks on a
    /// new connection whether the destination runs the instance it sent (`instance`, the
    /// id HandoffBegin gave). Answers: HandoffDone (it runs there: the source stops its
    /// copy), Error{busy} (it is being resumed: ask again), Error{not_found} (it never
    /// resumed it: the source may run it again).
    HandoffQuery {
        instance: String,
    },
    /// The instance runs at the destination; its service answers at `service`.
    HandoffDone {
        service: ServiceEndpoint,
        resumed_after_ms: u64,
    },
    /// A cloudlet that lacks a base VM or a service VM asks for its package (in place of
    /// HandoffBegin): `name` is a base's name or digest (64 hex digits), or a service's
    /// id. Answers: PackageOffer, then the package, or Error.
    PackageWanted {
        what: PackageKind,
        name: String,
    },
    /// The package of `name` (the holder's name for what was asked) follows:
    /// `package_bytes` in PackagePiece frames, then PackageEnd.
    PackageOffer {
        name: String,
        package_bytes: u64,
    },
    /// The next piece of the package, at most [`PACKAGE_PIECE`] bytes.
    PackagePiece {
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// The whole package was sent: its SHA-256 (hex), and the holder's detached
    /// signature of it (`FILE.sig`, JSON), which an asker with a signers list checks.
    PackageEnd {
        sha256: String,
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

/// The largest PackagePiece.
pub const PACKAGE_PIECE: usize = 1 << 20;

/// What a PackageWanted asks for: the package `forage base export` or `forage service
/// export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PackageKind {
    Base,
    Service,
}

impl PackageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PackageKind::Base => "base",
            PackageKind::Service => "service",
        }
    }
}

crate::protocol_kinds!(
    PeerMessage,
    "peer",
    PeerHello = 30,
    PeerWelcome = 31,
    HandoffBegin = 22,
    HandoffAccept = 23,
    HandoffFile = 24,
    HandoffSegment = 25,
    HandoffAck = 26,
    HandoffCommit = 27,
    HandoffDone = 28,
    HandoffQuery = 32,
    PackageWanted = 38,
    PackageOffer = 39,
    PackagePiece = 40,
    PackageEnd = 41,
    Error = 8,
);
