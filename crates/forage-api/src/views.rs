//! The JSON bodies of the API: what a client sends and receives.
//!
//! They derive `Deserialize` as well as `Serialize` so that a client (the CLI) reuses
//! these types instead of redefining them. Lists come wrapped in an object, so that a
//! field can be added later without breaking old readers.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use forage_state::{CacheEntry, InstanceRecord, SessionRecord};

/// An error: every non-2xx answer carries this body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for a human.
    #[schema(example = "no instance with id \"vm-7\"")]
    pub error: String,
}

/// The cloudlet at a glance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StatusView {
    /// The cloudlet's name.
    #[schema(example = "demo-cloudlet")]
    pub name: String,
    /// The daemon's version.
    #[schema(example = "0.1.0")]
    pub version: String,
    /// How VMs run here: "kvm" or "tcg".
    #[schema(example = "tcg")]
    pub accel: String,
    /// Seconds since the daemon started.
    pub uptime_s: u64,
    pub sessions_running: u64,
    pub instances_running: u64,
    pub cache_entries: u64,
}

/// A base VM this cloudlet holds, which overlays can be applied to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BaseInfo {
    #[schema(example = "demo-base")]
    pub name: String,
    /// SHA-256 of the base, hex.
    pub digest: String,
    /// Guest memory size.
    pub memory_bytes: u64,
    /// Disk image size.
    pub disk_bytes: u64,
}

/// The bases this cloudlet holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BaseList {
    pub bases: Vec<BaseInfo>,
}

/// How a session brought its launch VM up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SessionMode {
    Pipelined,
    EarlyStart,
    Cached,
    CachedVm,
    CloudletPush,
    OnDemand,
    AppVirtualization,
    /// Moved here from another cloudlet (VM handoff).
    Handoff,
    /// Activated from a docked VM substrate.
    Substrate,
}

/// A service VM held here (a baseline VM has no port).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ServiceInfo {
    #[schema(example = "hashsearch")]
    pub id: String,
    #[schema(example = "linux-x86_64")]
    pub os: String,
    /// Guest port of the service; none for a baseline VM.
    pub port: Option<u16>,
    pub description: String,
    /// Ids of its client apps in the app store.
    pub client_apps: Vec<String>,
}

/// The service VMs this cloudlet holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ServiceList {
    pub services: Vec<ServiceInfo>,
}

/// A client app in the cloudlet's app store: the device protocol's type.
pub use forage_proto::AppInfo;

/// The app store, filtered by platform if asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AppList {
    pub apps: Vec<AppInfo>,
}

/// Query of `GET /v1/apps`.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AppsQuery {
    /// Only apps for this device platform (and those for `any`).
    pub platform: Option<String>,
}

/// Where a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    Running,
    Done,
    Failed,
}

/// Where an instance is; "lost" means its QEMU was gone when the daemon restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum InstanceStatus {
    Running,
    Stopped,
    Lost,
}

/// A synthesis session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SessionView {
    pub id: String,
    /// The device that asked for it.
    pub device: String,
    pub base_digest: String,
    pub overlay_digest: String,
    pub mode: SessionMode,
    pub started_unix_ms: i64,
    pub ended_unix_ms: Option<i64>,
    pub status: SessionStatus,
    /// Why it failed, when it did.
    pub error: Option<String>,
    pub bytes_received: u64,
    /// From the session's start to its VM being ready.
    pub first_ready_ms: Option<u64>,
    /// The rest of its first-response breakdown, as the cloudlet saw it.
    #[serde(default)]
    pub timings: SessionTimings,
}

/// Where a session's time went (milliseconds from its start, or durations); each known
/// once it happened, and only for the mechanisms that have it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SessionTimings {
    /// The last segment of the overlay arrived.
    pub received_ms: Option<u64>,
    /// Every segment was applied.
    pub applied_ms: Option<u64>,
    /// Time spent checking and decompressing segments (a duration).
    pub decompress_ms: Option<u64>,
    /// What resuming the VM took (a duration, ending at `first_ready_ms`).
    pub resume_ms: Option<u64>,
    /// The device had its first answer from the service.
    pub first_response_ms: Option<u64>,
}

/// Sessions, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SessionList {
    pub sessions: Vec<SessionView>,
}

/// A launch VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InstanceView {
    pub id: String,
    pub session_id: String,
    pub name: String,
    pub qemu_pid: u32,
    /// Its directory on the cloudlet.
    pub dir: String,
    /// Where its service answers, `host:port`.
    pub endpoint: String,
    pub started_unix_ms: i64,
    pub stopped_unix_ms: Option<i64>,
    pub status: InstanceStatus,
    /// How it was provisioned (its session's mode), when its session is known.
    #[serde(default)]
    pub mechanism: Option<SessionMode>,
    /// The device (credential name) it was started for, when its session is known.
    #[serde(default)]
    pub device: Option<String>,
    /// Its relay's traffic and idleness (running instances with a service).
    #[serde(default)]
    pub usage: Option<InstanceUsage>,
}

/// What an instance's service relay carried: what the idle timeout measures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InstanceUsage {
    /// Milliseconds since the relay last carried a byte (or since the device got it).
    pub idle_ms: u64,
    /// Device connections admitted (with the instance's token), in all.
    pub connections: u64,
    pub bytes_to_guest: u64,
    pub bytes_from_guest: u64,
}

/// Instances, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InstanceList {
    pub instances: Vec<InstanceView>,
}

/// An overlay already applied to a base, ready to launch without a transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CacheEntryView {
    pub overlay_digest: String,
    pub base_digest: String,
    pub dir: String,
    /// What its launch files take on disk.
    pub bytes: u64,
    pub created_unix_ms: i64,
    pub last_used_unix_ms: i64,
    /// Launches served from it.
    pub hits: u64,
}

/// The launch cache, least recently used first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CacheList {
    pub entries: Vec<CacheEntryView>,
}

/// Query of `GET /v1/sessions`.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SessionsQuery {
    /// How many sessions at most (1 to 1000, default 50).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// Query of `GET /v1/instances`.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct InstancesQuery {
    /// Also list stopped and lost instances (default: running ones only).
    pub all: Option<bool>,
}

impl From<forage_state::SessionMode> for SessionMode {
    fn from(m: forage_state::SessionMode) -> Self {
        match m {
            forage_state::SessionMode::Pipelined => SessionMode::Pipelined,
            forage_state::SessionMode::EarlyStart => SessionMode::EarlyStart,
            forage_state::SessionMode::Cached => SessionMode::Cached,
            forage_state::SessionMode::CachedVm => SessionMode::CachedVm,
            forage_state::SessionMode::CloudletPush => SessionMode::CloudletPush,
            forage_state::SessionMode::OnDemand => SessionMode::OnDemand,
            forage_state::SessionMode::AppVirtualization => SessionMode::AppVirtualization,
            forage_state::SessionMode::Handoff => SessionMode::Handoff,
            forage_state::SessionMode::Substrate => SessionMode::Substrate,
        }
    }
}

impl From<forage_state::SessionStatus> for SessionStatus {
    fn from(s: forage_state::SessionStatus) -> Self {
        match s {
            forage_state::SessionStatus::Running => SessionStatus::Running,
            forage_state::SessionStatus::Done => SessionStatus::Done,
            forage_state::SessionStatus::Failed => SessionStatus::Failed,
        }
    }
}

impl From<forage_state::InstanceStatus> for InstanceStatus {
    fn from(s: forage_state::InstanceStatus) -> Self {
        match s {
            forage_state::InstanceStatus::Running => InstanceStatus::Running,
            forage_state::InstanceStatus::Stopped => InstanceStatus::Stopped,
            forage_state::InstanceStatus::Lost => InstanceStatus::Lost,
        }
    }
}

impl From<SessionRecord> for SessionView {
    fn from(r: SessionRecord) -> Self {
        SessionView {
            id: r.id,
            device: r.device,
            base_digest: r.base_digest,
            overlay_digest: r.overlay_digest,
            mode: r.mode.into(),
            started_unix_ms: r.started_unix_ms,
            ended_unix_ms: r.ended_unix_ms,
            status: r.status.into(),
            error: r.error,
            bytes_received: r.bytes_received,
            first_ready_ms: r.first_ready_ms,
            timings: SessionTimings {
                received_ms: r.timings.received_ms,
                applied_ms: r.timings.applied_ms,
                decompress_ms: r.timings.decompress_ms,
                resume_ms: r.timings.resume_ms,
                first_response_ms: r.timings.first_response_ms,
            },
        }
    }
}

impl From<InstanceRecord> for InstanceView {
    fn from(r: InstanceRecord) -> Self {
        InstanceView {
            id: r.id,
            session_id: r.session_id,
            name: r.name,
            qemu_pid: r.qemu_pid,
            dir: r.dir.display().to_string(),
            endpoint: r.endpoint,
            started_unix_ms: r.started_unix_ms,
            stopped_unix_ms: r.stopped_unix_ms,
            status: r.status.into(),
            mechanism: None,
            device: None,
            usage: None,
        }
    }
}

impl From<CacheEntry> for CacheEntryView {
    fn from(e: CacheEntry) -> Self {
        CacheEntryView {
            overlay_digest: e.overlay_digest,
            base_digest: e.base_digest,
            dir: e.dir.display().to_string(),
            bytes: e.bytes,
            created_unix_ms: e.created_unix_ms,
            last_used_unix_ms: e.last_used_unix_ms,
            hits: e.hits,
        }
    }
}

/// Where to move an instance (VM handoff).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HandoffRequest {
    /// The destination cloudlet, `HOST:PORT` (paired with this one as a cloudlet).
    #[schema(example = "10.77.0.2:7878")]
    pub to: String,
    /// A static operating mode such as `xor+zstd-1`; absent: adaptive.
    #[serde(default)]
    pub mode: Option<String>,
    /// QEMU's downtime limit: iterations stop once the rest would take this long.
    #[serde(default)]
    pub downtime_limit_ms: Option<u64>,
    /// Why the instance moves (logged with the handoff); absent: `operator`.
    #[serde(default)]
    pub reason: HandoffReason,
}

/// Why an instance moves: who or what started its handoff.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HandoffReason {
    /// An operator asked for this one instance (`forage handoff`).
    #[default]
    Operator,
    /// An operator drains the cloudlet (`forage drain`): every instance moves.
    Drain,
    /// The cloudlet's load policy: the host is under pressure (`--move-when-*-above`).
    Load,
    /// The instance's device asked it to follow it to another cloudlet.
    Device,
}

impl std::fmt::Display for HandoffReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HandoffReason::Operator => "operator",
            HandoffReason::Drain => "drain",
            HandoffReason::Load => "load",
            HandoffReason::Device => "device",
        })
    }
}

/// What a handoff did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HandoffReport {
    pub instance: String,
    pub to: String,
    /// Where the service answers now.
    pub endpoint: String,
    /// SHA-256 of the destination's CA: its service relay's certificate chains to it (the
    /// instance's devices keep their token).
    pub ca_sha256: String,
    /// The destination held the base VM.
    pub has_base: bool,
    pub total_s: f64,
    /// From the VM's stop here to its resume there.
    pub downtime_s: f64,
    /// Bytes sent.
    pub bytes: u64,
    /// Memory and disk that differ from the base VM, bytes.
    pub modified_bytes: u64,
    pub memory_pages: u64,
    pub disk_chunks: u64,
    pub segments: u64,
    pub state_bytes: u64,
    pub boot_file_bytes: u64,
    /// QEMU's dirty-memory synchronisations (iterations).
    pub qemu_rounds: u64,
    /// The operating mode at the end.
    pub mode: String,
    /// Every mode switch of the adaptation.
    pub switches: Vec<String>,
    /// What the last handoffs to this destination taught this one's first decision (the
    /// link's rate, bytes/s; how much slower than the VM's own table the encoders ran);
    /// absent for the first handoff there.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub prior: Option<forage_handoff::adapt::Prior>,
    /// Every 100 ms: input, output and potential output throughput, mode.
    #[schema(value_type = Vec<Object>)]
    pub trace: Vec<forage_handoff::pipeline::TraceRow>,
    /// When QEMU stopped the VM for its last round, seconds on the trace's clock (the
    /// stream's start): the ticks before it moved state while the VM ran.
    #[serde(default)]
    pub stopped_at_s: Option<f64>,
}

impl HandoffReport {
    /// Where the stream's time went while the VM ran, and in its last round (from the
    /// stop to the end of the stream; the downtime also holds the commit and the resume).
    pub fn time_account(&self) -> (forage_handoff::account::TimeAccount, forage_handoff::account::TimeAccount) {
        use forage_handoff::account::TimeAccount;
        let end = self.trace.last().map_or(0.0, |r| r.t_s);
        let stop = self.stopped_at_s.unwrap_or(end);
        (TimeAccount::of(&self.trace, f64::NEG_INFINITY, stop), TimeAccount::of(&self.trace, stop, f64::INFINITY))
    }
}
