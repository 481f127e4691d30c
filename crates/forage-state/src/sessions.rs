//! Synthesis sessions: started, ready, ended, listed.

use rusqlite::{params, OptionalExtension, Row};

use crate::records::{NewSession, SessionRecord, SessionStatus, SessionTimings, Timing};
use crate::{now_unix_ms, State, StateError};

const COLUMNS: &str = "id, device, base_digest, overlay_digest, mode, started_unix_ms, \
                       ended_unix_ms, status, error, bytes_received, first_ready_ms, \
                       received_ms, applied_ms, decompress_ms, resume_ms, first_response_ms";

fn from_row(r: &Row<'_>) -> rusqlite::Result<SessionRecord> {
    Ok(SessionRecord {
        id: r.get(0)?,
        device: r.get(1)?,
        base_digest: r.get(2)?,
        overlay_digest: r.get(3)?,
        mode: r.get(4)?,
        started_unix_ms: r.get(5)?,
        ended_unix_ms: r.get(6)?,
        status: r.get(7)?,
        error: r.get(8)?,
        bytes_received: r.get(9)?,
        first_ready_ms: r.get(10)?,
        timings: SessionTimings {
            received_ms: r.get(11)?,
            applied_ms: r.get(12)?,
            decompress_ms: r.get(13)?,
            resume_ms: r.get(14)?,
            first_response_ms: r.get(15)?,
        },
    })
}

impl State {
    /// Records a new session, "running" from now. Its id must be new.
    pub fn session_started(&self, s: &NewSession) -> Result<(), StateError> {
        self.conn()
            .execute(
                "INSERT INTO sessions (id, device, base_digest, overlay_digest, mode, \
                 started_unix_ms, status) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![s.id, s.device, s.base_digest, s.overlay_digest, s.mode, now_unix_ms(), SessionStatus::Running],
            )
            .map_err(StateError::insert("add session", "session", &s.id))?;
        tracing::debug!(session = %s.id, device = %s.device, mode = %s.mode, "session started");
        Ok(())
    }

    /// Records that the session's VM was ready `first_ready_ms` after the session started.
    pub fn session_ready(&self, id: &str, first_ready_ms: u64) -> Result<(), StateError> {
        let n = self
            .conn()
            .execute("UPDATE sessions SET first_ready_ms = ?2 WHERE id = ?1", params![id, first_ready_ms])
            .map_err(StateError::sql("mark session ready"))?;
        found(n, "session", id)?;
        tracing::debug!(session = %id, first_ready_ms, "session ready");
        Ok(())
    }

    /// Records one moment of the session's first-response breakdown (the first
    /// first-response checkpoint counts; later ones are the device's own business).
    pub fn session_timing(&self, id: &str, timing: Timing) -> Result<(), StateError> {
        let conn = self.conn();
        let n = match timing {
            Timing::Received(ms) => conn.execute("UPDATE sessions SET received_ms = ?2 WHERE id = ?1", params![id, ms]),
            Timing::Applied { at_ms, decompress_ms } => conn.execute(
                "UPDATE sessions SET applied_ms = ?2, decompress_ms = ?3 WHERE id = ?1",
                params![id, at_ms, decompress_ms],
            ),
            Timing::Resumed(ms) => conn.execute("UPDATE sessions SET resume_ms = ?2 WHERE id = ?1", params![id, ms]),
            Timing::FirstResponse(ms) => conn.execute(
                "UPDATE sessions SET first_response_ms = COALESCE(first_response_ms, ?2) WHERE id = ?1",
                params![id, ms],
            ),
        }
        .map_err(StateError::sql("record session timing"))?;
        found(n, "session", id)?;
        tracing::debug!(session = %id, ?timing, "session timing");
        Ok(())
    }

    /// Records the end of a session: `Ok(bytes received)` makes it "done", `Err(why)`
    /// makes it "failed" with that error.
    pub fn session_ended(&self, id: &str, outcome: Result<u64, &str>) -> Result<(), StateError> {
        let now = now_unix_ms();
        let n = match outcome {
            Ok(bytes) => self.conn().execute(
                "UPDATE sessions SET status = ?2, ended_unix_ms = ?3, bytes_received = ?4, \
                 error = NULL WHERE id = ?1",
                params![id, SessionStatus::Done, now, bytes],
            ),
            Err(why) => self.conn().execute(
                "UPDATE sessions SET status = ?2, ended_unix_ms = ?3, error = ?4 WHERE id = ?1",
                params![id, SessionStatus::Failed, now, why],
            ),
        }
        .map_err(StateError::sql("end session"))?;
        found(n, "session", id)?;
        match outcome {
            Ok(bytes) => tracing::debug!(session = %id, bytes, "session done"),
            Err(why) => tracing::debug!(session = %id, error = %why, "session failed"),
        }
        Ok(())
    }

    /// One session, if it exists.
    pub fn session(&self, id: &str) -> Result<Option<SessionRecord>, StateError> {
        self.conn()
            .query_row(&format!("SELECT {COLUMNS} FROM sessions WHERE id = ?1"), [id], from_row)
            .optional()
            .map_err(StateError::sql("read session"))
    }

    /// The `limit` most recently started sessions, newest first.
    pub fn list_sessions(&self, limit: usize) -> Result<Vec<SessionRecord>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM sessions ORDER BY started_unix_ms DESC, rowid DESC \
                 LIMIT ?1"
            ))
            .map_err(StateError::sql("list sessions"))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map([limit], from_row).map_err(StateError::sql("list sessions"))?;
        rows.collect::<Result<_, _>>().map_err(StateError::sql("list sessions"))
    }
}

/// `n` rows changed: none means there was no such record.
pub(crate) fn found(n: usize, kind: &'static str, id: &str) -> Result<(), StateError> {
    if n == 0 {
        return Err(StateError::NotFound { kind, id: id.to_string() });
    }
    Ok(())
}
