//! The records the state holds, as Rust types, and how their enums are spelled in SQLite.

use std::fmt;
use std::path::PathBuf;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};

/// An enum stored as TEXT: one fixed spelling per variant.
macro_rules! text_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The spelling stored in the database and shown by the API.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            /// The variant spelled `text`, if any.
            pub fn parse(text: &str) -> Option<$name> {
                match text {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_str()))
            }
        }

        impl FromSql for $name {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                let text = value.as_str()?;
                $name::parse(text).ok_or_else(|| {
                    FromSqlError::Other(
                        format!(concat!("unknown ", stringify!($name), " {:?}"), text).into(),
                    )
                })
            }
        }
    };
}

text_enum!(
    /// How a session brought its instance up: synthesis modes, then the other
    /// provisioning mechanisms.
    SessionMode {
        /// Segments applied while they arrive; resume once all are applied.
        Pipelined = "pipelined",
        /// The VM resumes before every segment has arrived.
        EarlyStart = "early_start",
        /// The overlay was already in the launch cache: no transfer.
        Cached = "cached",
        /// A copy-on-write instance of a service VM held here.
        CachedVm = "cached_vm",
        /// The service of a client app from the cloudlet's app store.
        CloudletPush = "cloudlet_push",
        /// A provisioning script run in a copy of a baseline VM.
        OnDemand = "on_demand",
        /// A packed application deployed into a copy of a baseline VM.
        AppVirtualization = "app_virtualization",
        /// A running instance moved here from another cloudlet (VM handoff).
        Handoff = "handoff",
        /// A docked VM substrate activated for the device (resumed and expanded).
        Substrate = "substrate",
    }
);

text_enum!(
    /// Where a synthesis session is.
    SessionStatus {
        Running = "running",
        Done = "done",
        Failed = "failed",
    }
);

text_enum!(
    /// Where a launch VM is.
    InstanceStatus {
        Running = "running",
        Stopped = "stopped",
        /// Its QEMU was gone when the daemon restarted.
        Lost = "lost",
    }
);

/// A session as the caller starts it; the state stamps its start time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSession {
    /// Chosen by the caller, unique.
    pub id: String,
    /// The device that asked for it (its address or name).
    pub device: String,
    pub base_digest: String,
    pub overlay_digest: String,
    pub mode: SessionMode,
}

/// A session as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub id: String,
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
    /// From the session's start to its VM being ready, when it got there.
    pub first_ready_ms: Option<u64>,
    /// The rest of its first-response breakdown.
    pub timings: SessionTimings,
}

/// Where a session's time went, as the cloudlet saw it: each known once it happened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionTimings {
    /// From the start to the last segment received (synthesis; none for a cached launch).
    pub received_ms: Option<u64>,
    /// From the start to every segment applied.
    pub applied_ms: Option<u64>,
    /// Time spent checking and decompressing segments (store and forward, pipelined).
    pub decompress_ms: Option<u64>,
    /// What resuming the VM took (it ended when the VM was ready).
    pub resume_ms: Option<u64>,
    /// From the start to the device's first answer from the service (its checkpoint).
    pub first_response_ms: Option<u64>,
}

/// One moment of a session's breakdown, recorded when it happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timing {
    /// The last segment arrived, this long after the start.
    Received(u64),
    /// Every segment applied, this long after the start; of which decompressing.
    Applied { at_ms: u64, decompress_ms: Option<u64> },
    /// Resuming the VM took this long.
    Resumed(u64),
    /// The device had its first answer this long after the start.
    FirstResponse(u64),
}

/// A launch VM as the caller starts it; the state stamps its start time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewInstance {
    /// Chosen by the caller, unique.
    pub id: String,
    /// The session that launched it.
    pub session_id: String,
    pub name: String,
    pub qemu_pid: u32,
    /// Its directory (launch files); removed by the caller once it is lost or stopped.
    pub dir: PathBuf,
    /// Where its service answers, `host:port`.
    pub endpoint: String,
}

/// A launch VM as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRecord {
    pub id: String,
    pub session_id: String,
    pub name: String,
    pub qemu_pid: u32,
    pub dir: PathBuf,
    pub endpoint: String,
    pub started_unix_ms: i64,
    pub stopped_unix_ms: Option<i64>,
    pub status: InstanceStatus,
}

/// A launch-cache entry as the caller adds it; the state stamps its times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCacheEntry {
    pub overlay_digest: String,
    pub base_digest: String,
    /// The applied launch files.
    pub dir: PathBuf,
    /// What `dir` takes on disk.
    pub bytes: u64,
}

/// A launch-cache entry as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry {
    pub overlay_digest: String,
    pub base_digest: String,
    pub dir: PathBuf,
    pub bytes: u64,
    pub created_unix_ms: i64,
    pub last_used_unix_ms: i64,
    /// How many times [`State::cache_get`](crate::State::cache_get) found it.
    pub hits: u64,
}

/// Counters over the whole state, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub sessions_running: u64,
    pub sessions_done: u64,
    pub sessions_failed: u64,
    pub instances_running: u64,
    pub cache_entries: u64,
    pub cache_bytes: u64,
    pub cache_hits: u64,
}

impl Totals {
    /// Sessions with the given status.
    pub fn sessions(&self, status: SessionStatus) -> u64 {
        match status {
            SessionStatus::Running => self.sessions_running,
            SessionStatus::Done => self.sessions_done,
            SessionStatus::Failed => self.sessions_failed,
        }
    }
}

/// A path as stored: SQLite TEXT holds UTF-8 only, and a lossy path could name another
/// directory (which the caller may later remove), so a non-UTF-8 path is refused.
pub(crate) fn path_text<'a>(field: &'static str, path: &'a std::path::Path) -> Result<&'a str, crate::StateError> {
    path.to_str().ok_or_else(|| crate::StateError::NotUtf8 { field, path: path.to_path_buf() })
}
