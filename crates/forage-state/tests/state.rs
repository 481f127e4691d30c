//! forage-state against real SQLite files in temporary directories.

mod common;

use std::path::{Path, PathBuf};

use common::{cache, instance, session};
use forage_state::{
    InstanceStatus, OpenError, SessionMode, SessionStatus, SessionTimings, State, StateError, Timing, Totals,
    SCHEMA_VERSION,
};

fn journal_mode(path: &Path) -> String {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap()
}

#[test]
fn state_survives_closing_and_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/state.db");
    {
        let state = State::open(&path).unwrap();
        state.session_started(&session("s1", SessionMode::Pipelined)).unwrap();
        state.session_ready("s1", 412).unwrap();
        state.session_ended("s1", Ok(985_000)).unwrap();
        state.session_started(&session("s2", SessionMode::Cached)).unwrap();
        state.session_ended("s2", Err("base digest mismatch")).unwrap();
        state.instance_started(&instance("i1", "s1", 4242)).unwrap();
        state.cache_put(&cache("d1", 1 << 20)).unwrap();
    }
    assert_eq!(journal_mode(&path), "wal");

    let state = State::open(&path).unwrap();
    let sessions = state.list_sessions(10).unwrap();
    assert_eq!(sessions.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["s2", "s1"], "newest first");
    let s1 = state.session("s1").unwrap().unwrap();
    assert_eq!(s1.status, SessionStatus::Done);
    assert_eq!(s1.mode, SessionMode::Pipelined);
    assert_eq!(s1.first_ready_ms, Some(412));
    assert_eq!(s1.bytes_received, 985_000);
    assert_eq!(s1.error, None);
    assert!(s1.ended_unix_ms.unwrap() >= s1.started_unix_ms);
    let s2 = state.session("s2").unwrap().unwrap();
    assert_eq!(s2.status, SessionStatus::Failed);
    assert_eq!(s2.error.as_deref(), Some("base digest mismatch"));
    assert_eq!(s2.first_ready_ms, None);

    let i1 = state.instance("i1").unwrap().unwrap();
    assert_eq!(i1.qemu_pid, 4242);
    assert_eq!(i1.dir, PathBuf::from("/srv/forage/work/i1"));
    assert_eq!(i1.status, InstanceStatus::Running);
    assert_eq!(state.cache_entry("d1").unwrap().unwrap().bytes, 1 << 20);
    assert_eq!(state.list_sessions(1).unwrap().len(), 1);
}

#[test]
fn unknown_and_duplicate_ids_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let state = State::open(dir.path().join("state.db")).unwrap();
    assert!(matches!(state.session_ready("nope", 1), Err(StateError::NotFound { kind: "session", .. })));
    assert!(matches!(state.session_ended("nope", Ok(1)), Err(StateError::NotFound { kind: "session", .. })));
    assert!(matches!(state.instance_stopped("nope"), Err(StateError::NotFound { kind: "instance", .. })));
    state.session_started(&session("s1", SessionMode::Pipelined)).unwrap();
    let err = state.session_started(&session("s1", SessionMode::Pipelined)).unwrap_err();
    assert!(matches!(err, StateError::Duplicate { kind: "session", .. }), "{err:?}");
    assert_eq!(err.to_string(), r#"state: session "s1" already exists"#);
}

#[test]
fn instance_stop_is_recorded_once() {
    let dir = tempfile::tempdir().unwrap();
    let state = State::open(dir.path().join("state.db")).unwrap();
    state.instance_started(&instance("i1", "s1", 1)).unwrap();
    state.instance_started(&instance("i2", "s1", 2)).unwrap();
    let first = state.instance_stopped("i1").unwrap();
    assert_eq!(first.status, InstanceStatus::Stopped);
    let again = state.instance_stopped("i1").unwrap();
    assert_eq!(again.stopped_unix_ms, first.stopped_unix_ms);
    let running = state.list_instances(true).unwrap();
    assert_eq!(running.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["i2"]);
    assert_eq!(state.list_instances(false).unwrap().len(), 2);
}

#[test]
fn cache_hits_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let state = State::open(dir.path().join("state.db")).unwrap();
    state.cache_put(&cache("d1", 100)).unwrap();
    state.cache_put(&cache("d2", 50)).unwrap();
    // Hits below must land in a later millisecond than the puts, for the LRU order.
    std::thread::sleep(std::time::Duration::from_millis(5));

    assert_eq!(state.cache_get("missing").unwrap(), None);
    let first = state.cache_get("d1").unwrap().unwrap();
    assert_eq!(first.hits, 1);
    let second = state.cache_get("d1").unwrap().unwrap();
    assert_eq!(second.hits, 2);
    assert!(second.last_used_unix_ms > first.created_unix_ms);
    // Looking without launching counts nothing.
    assert_eq!(state.cache_entry("d1").unwrap().unwrap().hits, 2);
    assert_eq!(state.cache_entry("d2").unwrap().unwrap().hits, 0);

    let totals = state.totals().unwrap();
    assert_eq!((totals.cache_entries, totals.cache_bytes, totals.cache_hits), (2, 150, 2));
    // Least recently used first: d2 was never used after d1's hits.
    let order: Vec<_> = state.cache_list().unwrap().into_iter().map(|e| e.overlay_digest).collect();
    assert_eq!(order, ["d2", "d1"]);

    // Replacing an entry starts its count again; removing returns it once.
    state.cache_put(&cache("d1", 120)).unwrap();
    assert_eq!(state.cache_entry("d1").unwrap().unwrap().hits, 0);
    assert_eq!(state.cache_remove("d1").unwrap().unwrap().bytes, 120);
    assert_eq!(state.cache_remove("d1").unwrap(), None);
    assert_eq!(state.totals().unwrap().cache_entries, 1);
}

#[test]
fn totals_count_by_status() {
    let dir = tempfile::tempdir().unwrap();
    let state = State::open(dir.path().join("state.db")).unwrap();
    assert_eq!(state.totals().unwrap(), Totals::default());
    for (id, end) in [("a", None), ("b", Some(Ok(1))), ("c", Some(Err("x"))), ("d", Some(Ok(2)))] {
        state.session_started(&session(id, SessionMode::EarlyStart)).unwrap();
        if let Some(outcome) = end {
            state.session_ended(id, outcome).unwrap();
        }
    }
    state.instance_started(&instance("i1", "a", 1)).unwrap();
    state.instance_started(&instance("i2", "a", 2)).unwrap();
    state.instance_stopped("i2").unwrap();
    let t = state.totals().unwrap();
    assert_eq!((t.sessions(SessionStatus::Running), t.sessions_done, t.sessions_failed), (1, 2, 1));
    assert_eq!(t.instances_running, 1);
}

// State is shared between the session tasks and the HTTP API.
const _: fn() = || {
    fn shareable<T: Clone + Send + Sync + 'static>() {}
    shareable::<State>();
};

#[test]
fn clones_share_one_state_across_threads() {
    let dir = tempfile::tempdir().unwrap();
    let state = State::open(dir.path().join("state.db")).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let state = state.clone();
            std::thread::spawn(move || {
                for n in 0..25 {
                    state.session_started(&session(&format!("t{t}-{n}"), SessionMode::Pipelined)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(state.totals().unwrap().sessions_running, 100);
}

#[test]
fn a_newer_schema_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
    }
    let err = State::open(&path).unwrap_err();
    match &err {
        OpenError::NewerSchema { found, supported, .. } => {
            assert_eq!((*found, *supported), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
        }
        other => panic!("expected NewerSchema, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("newer than this forage supports"), "{message}");
    let conn = rusqlite::Connection::open(&path).unwrap();
    let version: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, SCHEMA_VERSION + 1);
}

#[test]
fn a_fresh_file_gets_the_current_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    drop(State::open(&path).unwrap());
    drop(State::open(&path).unwrap()); // reopening must not migrate again
    let conn = rusqlite::Connection::open(&path).unwrap();
    let version: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(tables, ["instances", "launch_cache", "sessions"]);
}

#[test]
fn every_session_mode_is_recorded_and_old_files_are_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    // A file of schema 1 with a session in it.
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE sessions (id TEXT PRIMARY KEY NOT NULL, device TEXT NOT NULL, base_digest TEXT NOT NULL, overlay_digest TEXT NOT NULL, mode TEXT NOT NULL CHECK (mode IN ('pipelined', 'early_start', 'cached')), started_unix_ms INTEGER NOT NULL, ended_unix_ms INTEGER, status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')), error TEXT, bytes_received INTEGER NOT NULL DEFAULT 0, first_ready_ms INTEGER); CREATE INDEX sessions_started ON sessions (started_unix_ms); CREATE INDEX sessions_status ON sessions (status); CREATE TABLE instances (id TEXT PRIMARY KEY NOT NULL, session_id TEXT NOT NULL, name TEXT NOT NULL, qemu_pid INTEGER NOT NULL, dir TEXT NOT NULL, endpoint TEXT NOT NULL, started_unix_ms INTEGER NOT NULL, stopped_unix_ms INTEGER, status TEXT NOT NULL CHECK (status IN ('running', 'stopped', 'lost'))); CREATE TABLE launch_cache (overlay_digest TEXT PRIMARY KEY NOT NULL, base_digest TEXT NOT NULL, dir TEXT NOT NULL, bytes INTEGER NOT NULL, created_unix_ms INTEGER NOT NULL, last_used_unix_ms INTEGER NOT NULL, hits INTEGER NOT NULL DEFAULT 0); INSERT INTO sessions (id, device, base_digest, overlay_digest, mode, started_unix_ms, status) VALUES ('old', 'd', 'b', 'o', 'cached', 1, 'done'); PRAGMA user_version = 1;").unwrap();
    }
    let state = State::open(&path).unwrap();
    assert_eq!(state.list_sessions(10).unwrap()[0].id, "old", "the migration kept the rows");
    for (i, mode) in SessionMode::ALL.iter().enumerate() {
        state.session_started(&session(&format!("s{i}"), *mode)).unwrap_or_else(|e| panic!("{mode}: {e}"));
    }
    assert_eq!(state.list_sessions(100).unwrap().len(), SessionMode::ALL.len() + 1);
}

#[test]
fn a_sessions_breakdown_is_recorded_and_every_change_moves_the_generation() {
    let dir = tempfile::tempdir().unwrap();
    let state = State::open(dir.path().join("state.db")).unwrap();
    let g0 = state.generation();
    state.session_started(&session("s1", SessionMode::EarlyStart)).unwrap();
    let g1 = state.generation();
    assert!(g1 > g0, "an insert moves it");
    state.session_timing("s1", Timing::Resumed(80)).unwrap();
    state.session_ready("s1", 110).unwrap();
    state.session_timing("s1", Timing::FirstResponse(320)).unwrap();
    state.session_timing("s1", Timing::FirstResponse(900)).unwrap();
    state.session_timing("s1", Timing::Received(450)).unwrap();
    state.session_timing("s1", Timing::Applied { at_ms: 480, decompress_ms: None }).unwrap();
    assert!(state.generation() > g1, "updates move it");
    let g2 = state.generation();
    state.list_sessions(10).unwrap();
    assert_eq!(state.generation(), g2, "reads do not");
    let s1 = state.session("s1").unwrap().unwrap();
    assert_eq!(
        s1.timings,
        SessionTimings {
            received_ms: Some(450),
            applied_ms: Some(480),
            decompress_ms: None,
            resume_ms: Some(80),
            first_response_ms: Some(320),
        },
        "the first first-response checkpoint counts"
    );
    assert!(matches!(state.session_timing("nope", Timing::Resumed(1)), Err(StateError::NotFound { .. })));
}
