//! The bodies of what the operator's web UI watches: the host, instances' traffic,
//! handoffs while they run, pairing, cloudlets seen on the network, sign-in, and the live
//! feed's events. Shared by the server, the typed client and the tests, like `views`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::views::{BaseList, CacheList, InstanceList, ServiceList, SessionList, StatusView};

/// The machine the cloudlet runs on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostView {
    #[schema(example = "field-1")]
    pub hostname: String,
    /// `uname -sr`.
    #[schema(example = "Linux 6.1.0-27-amd64")]
    pub kernel: String,
    pub cores: u32,
    /// Load averages over 1, 5 and 15 minutes.
    pub load: [f64; 3],
    pub memory_total_bytes: u64,
    /// What can be given to new VMs without swapping (`MemAvailable`).
    pub memory_available_bytes: u64,
    /// Seconds since the host booted.
    pub host_uptime_s: u64,
}

/// Where a handoff is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HandoffStatus {
    Running,
    /// The instance runs at the destination.
    Done,
    /// It runs on here (the error says why it did not move).
    Failed,
}

/// A handoff from this cloudlet: running, or one of the last few that ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HandoffView {
    /// This daemon's name for it (`h1`, `h2`, ...).
    pub id: String,
    pub instance: String,
    pub to: String,
    /// The static mode asked for; none: adaptive.
    pub mode: Option<String>,
    pub started_unix_ms: i64,
    pub ended_unix_ms: Option<i64>,
    pub status: HandoffStatus,
    pub error: Option<String>,
    /// Every 100 ms so far: input, output and potential output throughput (bytes/s),
    /// the mode, whether it switched there (the VM handoff paper's Figure 17).
    #[schema(value_type = Vec<Object>)]
    pub trace: Vec<forage_handoff::pipeline::TraceRow>,
    pub total_s: Option<f64>,
    pub downtime_s: Option<f64>,
    /// Bytes sent.
    pub bytes: Option<u64>,
    pub modified_bytes: Option<u64>,
}

/// Handoffs, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HandoffList {
    pub handoffs: Vec<HandoffView>,
}

/// One more point of a running handoff's trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HandoffTick {
    /// The handoff's id.
    pub id: String,
    #[schema(value_type = Object)]
    pub row: forage_handoff::pipeline::TraceRow,
}

/// What a handoff board tells its watchers.
#[derive(Debug, Clone, PartialEq)]
pub enum HandoffEvent {
    /// Started or ended: the whole handoff.
    Changed(HandoffView),
    /// A point of its trace.
    Tick(HandoffTick),
}

/// Who a pairing code is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PeerKindView {
    /// A device: it may ask for instances.
    Device,
    /// Another cloudlet: it may hand instances over to this one.
    Cloudlet,
}

/// A one-time pairing code to make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PairingCodeRequest {
    /// Default: a device.
    #[serde(default)]
    pub kind: Option<PeerKindView>,
    /// Lifetime of the credential it gives, 1 to 365 days (default 7).
    #[serde(default)]
    pub valid_days: Option<u32>,
}

/// A one-time pairing code: redeemable once, for ten minutes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PairingCodeView {
    /// What the operator reads out (`forage pair --cloudlet ADDR --code CODE`).
    #[schema(example = "POOZX-BTV6V-HPU3D-QWLCO-FRI")]
    pub code: String,
    /// What the QR code says: `forage://pair?cloudlet=ADDR&name=NAME&code=CODE`.
    pub uri: String,
    /// The URI as a QR code, an SVG image.
    pub qr_svg: String,
    pub expires_unix_ms: i64,
    pub kind: PeerKindView,
    pub valid_days: u32,
}

/// A credential this cloudlet issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CredentialView {
    pub serial: u64,
    pub name: String,
    pub kind: PeerKindView,
    /// `code` or `bundle`.
    pub via: String,
    pub issued_unix_ms: i64,
    pub not_after_unix_ms: i64,
    pub revoked_unix_ms: Option<i64>,
}

/// Credentials issued, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CredentialList {
    pub credentials: Vec<CredentialView>,
}

/// A cloudlet announcing itself on the local network (DNS-SD, `_cloudlet._tcp`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SeenCloudlet {
    pub name: String,
    /// Where devices connect to it.
    pub addr: String,
    pub http_port: Option<u16>,
    /// Short digests of the bases it holds.
    pub bases: Vec<String>,
    pub services: Vec<String>,
    /// Instances running there.
    pub load: u32,
    pub free_mem_mib: u64,
    pub cores: u32,
    /// A TCP connect's round trip from here, when it answered.
    pub rtt_ms: Option<f64>,
    pub last_seen_unix_ms: i64,
    /// This cloudlet's own announcement.
    pub this: bool,
}

/// Cloudlets seen on the network, by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CloudletList {
    /// False when this daemon does not browse (`serve --no-advertise`).
    pub browsing: bool,
    pub cloudlets: Vec<SeenCloudlet>,
}

/// The API token, to sign in to the web UI with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignInRequest {
    pub token: String,
}

/// Who the caller is to the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SignInState {
    /// Holds a session cookie this daemon issued.
    pub signed_in: bool,
    /// May read (signed in, or the API listens on loopback).
    pub can_read: bool,
    /// May change things (signed in).
    pub can_change: bool,
    /// To send as `X-CSRF-Token` with every change made with the cookie.
    pub csrf_token: Option<String>,
    pub expires_unix_ms: Option<i64>,
}

/// One message of the live feed (`GET /v1/events`, server-sent events): the `data:` of
/// one SSE event, `{"kind": ..., "data": ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", content = "data", rename_all = "snake_case")]
pub enum FeedEvent {
    /// Sent first on every connection: the feed then sends what changes.
    Hello {
        csrf_token: Option<String>,
        can_change: bool,
    },
    Status(StatusView),
    Host(HostView),
    Bases(BaseList),
    Services(ServiceList),
    Instances(InstanceList),
    Sessions(SessionList),
    Cache(CacheList),
    Handoffs(HandoffList),
    HandoffTick(HandoffTick),
    Credentials(CredentialList),
    Cloudlets(CloudletList),
}

impl FeedEvent {
    /// The SSE event name: the `kind`.
    pub fn name(&self) -> &'static str {
        match self {
            FeedEvent::Hello { .. } => "hello",
            FeedEvent::Status(_) => "status",
            FeedEvent::Host(_) => "host",
            FeedEvent::Bases(_) => "bases",
            FeedEvent::Services(_) => "services",
            FeedEvent::Instances(_) => "instances",
            FeedEvent::Sessions(_) => "sessions",
            FeedEvent::Cache(_) => "cache",
            FeedEvent::Handoffs(_) => "handoffs",
            FeedEvent::HandoffTick(_) => "handoff_tick",
            FeedEvent::Credentials(_) => "credentials",
            FeedEvent::Cloudlets(_) => "cloudlets",
        }
    }
}
