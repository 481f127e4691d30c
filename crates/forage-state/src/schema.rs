//! The schema and its migrations, versioned with `PRAGMA user_version`.
//!
//! `MIGRATIONS[i]` takes a file from version `i` to `i + 1`; version 0 is an empty file.
//! A change to the schema is a new entry at the end, never an edit of an old one.

use std::path::Path;

use rusqlite::Connection;

use crate::OpenError;

/// The schema version this forage writes and understands.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

const MIGRATIONS: &[&str] = &[
    // 0 -> 1: sessions, instances, launch cache.
    "CREATE TABLE sessions (
        id              TEXT PRIMARY KEY NOT NULL,
        device          TEXT NOT NULL,
        base_digest     TEXT NOT NULL,
        overlay_digest  TEXT NOT NULL,
        mode            TEXT NOT NULL CHECK (mode IN ('pipelined', 'early_start', 'cached')),
        started_unix_ms INTEGER NOT NULL,
        ended_unix_ms   INTEGER,
        status          TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
        error           TEXT,
        bytes_received  INTEGER NOT NULL DEFAULT 0,
        first_ready_ms  INTEGER
    );
    CREATE INDEX sessions_started ON sessions (started_unix_ms);
    CREATE INDEX sessions_status ON sessions (status);
    CREATE TABLE instances (
        id              TEXT PRIMARY KEY NOT NULL,
        session_id      TEXT NOT NULL,
        name            TEXT NOT NULL,
        qemu_pid        INTEGER NOT NULL,
        dir             TEXT NOT NULL,
        endpoint        TEXT NOT NULL,
        started_unix_ms INTEGER NOT NULL,
        stopped_unix_ms INTEGER,
        status          TEXT NOT NULL CHECK (status IN ('running', 'stopped', 'lost'))
    );
    CREATE INDEX instances_status ON instances (status);
    CREATE INDEX instances_session ON instances (session_id);
    CREATE TABLE launch_cache (
        overlay_digest    TEXT PRIMARY KEY NOT NULL,
        base_digest       TEXT NOT NULL,
        dir               TEXT NOT NULL,
        bytes             INTEGER NOT NULL,
        created_unix_ms   INTEGER NOT NULL,
        last_used_unix_ms INTEGER NOT NULL,
        hits              INTEGER NOT NULL DEFAULT 0
    );",
    // 1 -> 2: sessions of the other provisioning mechanisms (tactical cloudlets). SQLite
    // cannot change a CHECK in place: the table is rebuilt with its rows.
    "CREATE TABLE sessions_v2 (
        id              TEXT PRIMARY KEY NOT NULL,
        device          TEXT NOT NULL,
        base_digest     TEXT NOT NULL,
        overlay_digest  TEXT NOT NULL,
        mode            TEXT NOT NULL CHECK (mode IN ('pipelined', 'early_start', 'cached',
                            'cached_vm', 'cloudlet_push', 'on_demand', 'app_virtualization')),
        started_unix_ms INTEGER NOT NULL,
        ended_unix_ms   INTEGER,
        status          TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
        error           TEXT,
        bytes_received  INTEGER NOT NULL DEFAULT 0,
        first_ready_ms  INTEGER
    );
    INSERT INTO sessions_v2 SELECT * FROM sessions;
    DROP TABLE sessions;
    ALTER TABLE sessions_v2 RENAME TO sessions;
    CREATE INDEX sessions_started ON sessions (started_unix_ms);
    CREATE INDEX sessions_status ON sessions (status);",
    // 2 -> 3: instances that arrived by VM handoff from another cloudlet.
    "CREATE TABLE sessions_v3 (
        id              TEXT PRIMARY KEY NOT NULL,
        device          TEXT NOT NULL,
        base_digest     TEXT NOT NULL,
        overlay_digest  TEXT NOT NULL,
        mode            TEXT NOT NULL CHECK (mode IN ('pipelined', 'early_start', 'cached',
                            'cached_vm', 'cloudlet_push', 'on_demand', 'app_virtualization',
                            'handoff')),
        started_unix_ms INTEGER NOT NULL,
        ended_unix_ms   INTEGER,
        status          TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
        error           TEXT,
        bytes_received  INTEGER NOT NULL DEFAULT 0,
        first_ready_ms  INTEGER
    );
    INSERT INTO sessions_v3 SELECT * FROM sessions;
    DROP TABLE sessions;
    ALTER TABLE sessions_v3 RENAME TO sessions;
    CREATE INDEX sessions_started ON sessions (started_unix_ms);
    CREATE INDEX sessions_status ON sessions (status);",
    // 3 -> 4: where a session's time went, as the cloudlet saw it (the first-response
    // breakdown): milliseconds from the session's start, or durations.
    "ALTER TABLE sessions ADD COLUMN received_ms INTEGER;
    ALTER TABLE sessions ADD COLUMN applied_ms INTEGER;
    ALTER TABLE sessions ADD COLUMN decompress_ms INTEGER;
    ALTER TABLE sessions ADD COLUMN resume_ms INTEGER;
    ALTER TABLE sessions ADD COLUMN first_response_ms INTEGER;",
    // 4 -> 5: instances activated from a VM substrate, a mode of their own. The table is
    // rebuilt for the CHECK, its columns named (version 4 added five at the end).
    "CREATE TABLE sessions_v5 (
        id                TEXT PRIMARY KEY NOT NULL,
        device            TEXT NOT NULL,
        base_digest       TEXT NOT NULL,
        overlay_digest    TEXT NOT NULL,
        mode              TEXT NOT NULL CHECK (mode IN ('pipelined', 'early_start', 'cached',
                              'cached_vm', 'cloudlet_push', 'on_demand', 'app_virtualization',
                              'handoff', 'substrate')),
        started_unix_ms   INTEGER NOT NULL,
        ended_unix_ms     INTEGER,
        status            TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
        error             TEXT,
        bytes_received    INTEGER NOT NULL DEFAULT 0,
        first_ready_ms    INTEGER,
        received_ms       INTEGER,
        applied_ms        INTEGER,
        decompress_ms     INTEGER,
        resume_ms         INTEGER,
        first_response_ms INTEGER
    );
    INSERT INTO sessions_v5 (id, device, base_digest, overlay_digest, mode, started_unix_ms,
            ended_unix_ms, status, error, bytes_received, first_ready_ms, received_ms,
            applied_ms, decompress_ms, resume_ms, first_response_ms)
        SELECT id, device, base_digest, overlay_digest, mode, started_unix_ms, ended_unix_ms,
            status, error, bytes_received, first_ready_ms, received_ms, applied_ms,
            decompress_ms, resume_ms, first_response_ms FROM sessions;
    DROP TABLE sessions;
    ALTER TABLE sessions_v5 RENAME TO sessions;
    CREATE INDEX sessions_started ON sessions (started_unix_ms);
    CREATE INDEX sessions_status ON sessions (status);",
];

/// Brings the file to [`SCHEMA_VERSION`], one transaction per step; refuses a newer file.
pub(crate) fn migrate(conn: &mut Connection, path: &Path) -> Result<(), OpenError> {
    let found: u32 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|source| OpenError::Open { path: path.to_path_buf(), source })?;
    if found > SCHEMA_VERSION {
        return Err(OpenError::NewerSchema { path: path.to_path_buf(), found, supported: SCHEMA_VERSION });
    }
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let from = from as u32;
        let to = from + 1;
        let err = |source| OpenError::Migrate { path: path.to_path_buf(), from, to, source };
        let tx = conn.transaction().map_err(err)?;
        tx.execute_batch(sql).map_err(err)?;
        tx.pragma_update(None, "user_version", to).map_err(err)?;
        tx.commit().map_err(err)?;
        tracing::info!(path = %path.display(), from, to, "state schema migrated");
    }
    Ok(())
}
