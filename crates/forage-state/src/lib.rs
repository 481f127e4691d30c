//! The cloudlet daemon's persistent state, kept in one SQLite file.
//!
//! What a cloudlet must remember across a restart of its daemon: the synthesis sessions
//! it served, the launch VMs (instances) it started, and its launch cache (overlays
//! already applied to a base, ready to resume without a transfer). Three tables:
//!
//! ```text
//! sessions      id, device, base_digest, overlay_digest, mode, started/ended, status,
//!               error, bytes_received, first_ready_ms
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
mod instances;
mod records;
mod schema;
mod sessions;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::Connection;

pub use instances::qemu_alive;
pub use records::{
    CacheEntry, InstanceRecord, InstanceStatus, NewCacheEntry, NewInstance, NewSession,
    SessionMode, SessionRecord, SessionStatus, Totals,
};
pub use schema::SCHEMA_VERSION;

/// Why [`State::open`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot create the directory of state file {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open state file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "state file {path} has schema version {found}, newer than this forage supports \
         ({supported}): upgrade forage or use another data directory"
    )]
    NewerSchema {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("cannot migrate state file {path} from schema version {from} to {to}")]
    Migrate {
        path: PathBuf,
        from: u32,
        to: u32,
        #[source]
        source: rusqlite::Error,
    },
}

/// Why a read or an update of the state failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state: {op} failed")]
    Sql {
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("state: no {kind} with id {id:?}")]
    NotFound { kind: &'static str, id: String },
    #[error("state: {kind} {id:?} already exists")]
    Duplicate { kind: &'static str, id: String },
    #[error("state: {field} {path:?} is not UTF-8")]
    NotUtf8 { field: &'static str, path: PathBuf },
}

impl StateError {
    /// Wraps a SQLite error, naming the operation.
    fn sql(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StateError {
        move |source| StateError::Sql { op, source }
    }

    /// Wraps the error of an insert: a primary-key clash becomes [`StateError::Duplicate`].
    fn insert(
        op: &'static str,
        kind: &'static str,
        id: &str,
    ) -> impl FnOnce(rusqlite::Error) -> StateError {
        let id = id.to_string();
        move |source| match &source {
            rusqlite::Error::SqliteFailure(e, _)
                if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
            {
                StateError::Duplicate { kind, id }
            }
            _ => StateError::Sql { op, source },
        }
    }
}

/// A handle on the state file; clones share one connection.
#[derive(Debug, Clone)]
pub struct State {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl State {
    /// Opens (creating it and its directory if needed) the state file at `path`, puts it
    /// in WAL mode and brings its schema to [`SCHEMA_VERSION`].
    pub fn open(path: impl AsRef<Path>) -> Result<State, OpenError> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| OpenError::CreateDir {
                path: path.clone(),
                source,
            })?;
        }
        let open_err = |source| OpenError::Open {
            path: path.clone(),
            source,
        };
        let mut conn = Connection::open(&path).map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %path.display(), %mode, "state file is not in WAL mode");
        }
        schema::migrate(&mut conn, &path)?;
        tracing::debug!(path = %path.display(), version = SCHEMA_VERSION, "state opened");
        Ok(State {
            conn: Arc::new(Mutex::new(conn)),
            path,
        })
    }

    /// The file this state lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The shared connection. A panic while it was held leaves SQLite consistent (every
    /// multi-statement change runs in a transaction), so a poisoned lock is taken anyway.
    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counters for metrics and the status route.
    pub fn totals(&self) -> Result<Totals, StateError> {
        let conn = self.conn();
        let mut totals = Totals::default();
        let mut stmt = conn
            .prepare_cached("SELECT status, COUNT(*) FROM sessions GROUP BY status")
            .map_err(StateError::sql("count sessions"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, SessionStatus>(0)?, r.get::<_, u64>(1)?))
            })
            .map_err(StateError::sql("count sessions"))?;
        for row in rows {
            let (status, n) = row.map_err(StateError::sql("count sessions"))?;
            match status {
                SessionStatus::Running => totals.sessions_running = n,
                SessionStatus::Done => totals.sessions_done = n,
                SessionStatus::Failed => totals.sessions_failed = n,
            }
        }
        totals.instances_running = conn
            .query_row(
                "SELECT COUNT(*) FROM instances WHERE status = 'running'",
                [],
                |r| r.get(0),
            )
            .map_err(StateError::sql("count instances"))?;
        (totals.cache_entries, totals.cache_bytes, totals.cache_hits) = conn
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0), COALESCE(SUM(hits), 0) FROM launch_cache",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map_err(StateError::sql("count cache entries"))?;
        Ok(totals)
    }
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
