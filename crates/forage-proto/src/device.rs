//! The device protocol: synthesis, the other four provisioning mechanisms and the app
//! store, between a paired device and a cloudlet (TLS 1.3, both sides authenticated).
//!
//! ```mermaid
//! sequenceDiagram
//!     participant D as device
//!     participant C as cloudlet
//!     D->>C: Hello {versions 2..=2, device, offers: [base digest, sizes]...}
//!     C->>D: Welcome {version, chosen base, cached} | Welcome {no base, missing digests[, redirect]}
//!     Note over D,C: redirect: another node of the cloudlet's cluster holds the base; connect there
//!     Note over D,C: cached: the launch VM is in the cloudlet's cache, skip to Ready
//!     D->>C: Manifest {overlay header + manifest bytes} | OverlayUrl {url}
//!     Note over C: checks it; with early start, resumes the VM now
//!     C-->>D: Fetch {segment}   (a VM read needs a segment not yet here)
//!     D->>C: Segment {index, bytes}   (fetched ones overtake the bulk stream)
//!     D->>C: Segment ... in overlay order, until all are sent
//!     C->>D: Ready {service endpoint + token, resumed after ms}   (before Complete with early start)
//!     C->>D: Complete {segments, bytes}   (every segment applied)
//!     D->>C: Checkpoint {label}   (optional, e.g. at the first response)
//!     C->>D: Usage {blobs accessed, fetches}
//!     D->>C: Bye | WantResidue
//!     C->>D: Residue {offset, bytes, last}...   (after WantResidue: the instance's changes)
//!     D-->>C: Follow {to}   (move my instance there; NotFollowed {why} if it stays)
//!     C-->>D: Moved {cloudlet, service}   (the instance was handed off elsewhere)
//!     Note over D,C: either side may send Error {code, message} and close
//!     Note over D,C: other mechanisms: Hello without offers, Welcome, then
//!     D->>C: ListApps | GetApp   (the app store, any number of times)
//!     D->>C: WhereIs {endpoint}   (in a cluster: where is my instance?)
//!     C->>D: Whereabouts {node, lost: none | why}   (or Error {not_found})
//!     D->>C: Provision {cached VM | push | script | app package}
//!     C->>D: Ready {service endpoint + token}   (then the same Checkpoint/Bye lifecycle)
//!     D->>C: Activate {substrate, vcpus, memory MiB}   (instead of Provision, kind 37)
//!     C->>D: Ready {service endpoint + token} | Error {not_found | provision | busy}
//! ```
//!
//! Documented in `docs/synthesis-protocol.md` and `docs/tactical-cloudlets.md`.

use serde::{Deserialize, Serialize};

use crate::{ErrorCode, ServiceEndpoint};

/// The label of the Checkpoint a device sends once its service first answered: the
/// cloudlet records when it came (the session's first-response breakdown).
pub const FIRST_RESPONSE: &str = "first-response";

/// An overlay the device can send.
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

/// A client app in the cloudlet's app store (also what the HTTP API lists).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AppInfo {
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

/// The device protocol's messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "m", rename_all = "snake_case")]
pub enum DeviceMessage {
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
        /// With no base chosen: the node of this cloudlet's cluster that holds the
        /// offered base (`HOST:PORT`); the device connects there instead.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        redirect: Option<String>,
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
    /// The instance runs; its service answers at `service` (see [`crate::service`]).
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
    /// After a Hello without offers: the cloudlet's app store, for `platform` (and
    /// `any`) or all.
    ListApps {
        #[serde(default)]
        platform: Option<String>,
    },
    Apps {
        apps: Vec<AppInfo>,
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
    /// To the device: its instance moved to the cloudlet at `cloudlet`; its service now
    /// answers at `service`. The cloudlet then closes the session.
    Moved {
        cloudlet: String,
        service: ServiceEndpoint,
    },
    /// From the device, on a held session: move my instance to the cloudlet at `to`
    /// (`HOST:PORT`, paired with this one as a cloudlet), e.g. one closer to me. Moved
    /// follows, or NotFollowed.
    Follow {
        to: String,
    },
    /// To the device: its instance did not follow it and runs on here; why. The session
    /// goes on.
    NotFollowed {
        message: String,
    },
    /// After a Hello without offers, to any node of a cluster: where is the instance whose
    /// service the device reached at `endpoint` (`HOST:PORT`, from Ready or Moved)? A
    /// device whose instance stopped answering asks this. Whereabouts follows, or
    /// `Error {not_found}`. A cloudlet older than this message answers `Error {protocol}`.
    WhereIs {
        endpoint: String,
    },
    /// Answer to WhereIs: the cluster's record of the instance.
    Whereabouts(Whereabouts),
    /// After a Hello without offers, instead of Provision: activate the VM substrate
    /// `substrate` of this cloudlet's pool (`docs/substrates.md`) with `vcpus` and
    /// `memory_mib`, at most what it was docked for and what the cloudlet lets one VM
    /// have. Ready follows (then the instance's usual life), or `Error {not_found}` (no
    /// such substrate), `{provision}` (more than it or the host allows, no service),
    /// `{busy}` (the host lacks the memory now, or activates too many at once). A cloudlet
    /// older than this message answers `Error {protocol}`.
    Activate {
        substrate: String,
        vcpus: u32,
        memory_mib: u64,
    },
}

/// Where an instance is, as the cluster recorded it (`docs/cluster.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Whereabouts {
    /// The service endpoint asked about.
    pub endpoint: String,
    /// The node that runs (or ran) it.
    pub node: String,
    /// Set when the instance is lost: why (e.g. "node n1's lease expired").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<String>,
}

impl std::fmt::Display for Whereabouts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.lost {
            Some(why) => write!(f, "instance lost: node {} gone ({why})", self.node),
            None => write!(f, "instance at {} runs on node {}", self.endpoint, self.node),
        }
    }
}

crate::protocol_kinds!(
    DeviceMessage,
    "device",
    Hello = 1,
    Welcome = 2,
    Manifest = 3,
    Segment = 4,
    Fetch = 5,
    Ready = 6,
    Complete = 7,
    Error = 8,
    Bye = 9,
    Checkpoint = 10,
    Usage = 11,
    WantResidue = 12,
    Residue = 13,
    OverlayUrl = 14,
    Provision = 15,
    ListApps = 18,
    Apps = 19,
    GetApp = 20,
    AppFile = 21,
    Moved = 29,
    Follow = 33,
    NotFollowed = 34,
    WhereIs = 35,
    Whereabouts = 36,
    Activate = 37,
);
