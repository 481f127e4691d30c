//! The cloudlet daemon's persistent state, kept in one SQLite file.
//!
//! What a cloudlet must remember across a restart of its daemon: the synthesis sessions
//! it served, the launch VMs (instances) it started, and its launch cache (overlays
//! already applied to a base, ready to resume without a transfer). Three tables:
//!
//! ```text
//! sessions      id, device, base_digest, overlay_digest, mode, started/ended, status,
//!               error, bytes_received, first_ready_ms, received_ms, applied_ms,
//!               decompress_ms, resume_ms, first_response_ms (the first-response breakdown)
//! instances     id, session_id, name, qemu_pid, dir, endpoint, started/stopped, status
//! launch_cache  overlay_digest (key), base_digest, dir, bytes, created, last_used, hits
//! ```
//!
//! The schema carries its version in `PRAGMA user_version`; [`State::open`] creates or
//! migrates it, and refuses a file written by a newer forage ([`OpenError::NewerSchema`])
//! instead of guessing. The file runs in WAL mode, so readers (the HTTP API) do not block
//! the writer (the session code).
//!
//! [`State`] is a cheap handle (`Clone + Send + Sync`): every clone shares one connection
//! behind a mutex. Calls are synchronous and short (one statement or one transaction on a
//! local file); async callers may call them directly.
//!
//! After a restart, [`State::recover_after_restart`] settles what the previous daemon left
//! "running": instances whose QEMU is gone become "lost" (returned, so the caller removes
//! their directories) and unfinished sessions become "failed".

mod cache;
mod error;
mod instances;
mod records;
mod schema;
mod sessions;
mod store;

pub use error::{OpenError, StateError};
pub use instances::qemu_alive;
pub use records::{
    CacheEntry, InstanceRecord, InstanceStatus, NewCacheEntry, NewInstance, NewSession, SessionMode, SessionRecord,
    SessionStatus, SessionTimings, Timing, Totals,
};
pub use schema::SCHEMA_VERSION;
pub(crate) use store::now_unix_ms;
pub use store::State;
