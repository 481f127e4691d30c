//! The state file: one SQLite connection shared by clones; each table's operations are
//! in their own module (sessions, instances, cache).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::Connection;

use crate::error::{OpenError, StateError};
use crate::records::{SessionStatus, Totals};
use crate::schema::{self, SCHEMA_VERSION};

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
            std::fs::create_dir_all(dir).map_err(|source| OpenError::CreateDir { path: path.clone(), source })?;
        }
        let open_err = |source| OpenError::Open { path: path.clone(), source };
        let mut conn = Connection::open(&path).map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(open_err)?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %path.display(), %mode, "state file is not in WAL mode");
        }
        schema::migrate(&mut conn, &path)?;
        tracing::debug!(path = %path.display(), version = SCHEMA_VERSION, "state opened");
        Ok(State { conn: Arc::new(Mutex::new(conn)), path })
    }

    /// The file this state lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The shared connection. A panic while it was held leaves SQLite consistent (every
    /// multi-statement change runs in a transaction), so a poisoned lock is taken anyway.
    pub(crate) fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A number that grows with every row this state (any clone) inserted, changed or
    /// deleted: a live view reads the tables again only when it moved.
    pub fn generation(&self) -> u64 {
        self.conn().total_changes()
    }

    /// Counters for metrics and the status route.
    pub fn totals(&self) -> Result<Totals, StateError> {
        let conn = self.conn();
        let mut totals = Totals::default();
        let mut stmt = conn
            .prepare_cached("SELECT status, COUNT(*) FROM sessions GROUP BY status")
            .map_err(StateError::sql("count sessions"))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, SessionStatus>(0)?, r.get::<_, u64>(1)?)))
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
            .query_row("SELECT COUNT(*) FROM instances WHERE status = 'running'", [], |r| r.get(0))
            .map_err(StateError::sql("count instances"))?;
        (totals.cache_entries, totals.cache_bytes, totals.cache_hits) = conn
            .query_row("SELECT COUNT(*), COALESCE(SUM(bytes), 0), COALESCE(SUM(hits), 0) FROM launch_cache", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .map_err(StateError::sql("count cache entries"))?;
        Ok(totals)
    }
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
