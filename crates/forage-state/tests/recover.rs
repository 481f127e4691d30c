//! Settling what a previous daemon left running.

mod common;

use std::path::PathBuf;

use common::{dead_pid, instance, session, sleep_alive, Sleeper};
use forage_state::{qemu_alive, InstanceStatus, SessionMode, SessionStatus, State};

#[test]
fn recover_marks_dead_instances_lost_and_keeps_live_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let live = Sleeper::spawn();
    let dead = dead_pid();
    {
        let state = State::open(&path).unwrap();
        state.session_started(&session("s-run", SessionMode::Pipelined)).unwrap();
        state.session_started(&session("s-done", SessionMode::Cached)).unwrap();
        state.session_ended("s-done", Ok(10)).unwrap();
        state.instance_started(&instance("live", "s-run", live.pid())).unwrap();
        state.instance_started(&instance("dead", "s-run", dead)).unwrap();
        state.instance_started(&instance("old", "s-done", dead)).unwrap();
        state.instance_stopped("old").unwrap();
    }

    // The daemon restarts.
    let state = State::open(&path).unwrap();
    let lost = state.recover_after_restart_with(sleep_alive).unwrap();
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(lost[0].id, "dead");
    assert_eq!(lost[0].status, InstanceStatus::Lost);
    assert_eq!(lost[0].dir, PathBuf::from("/srv/forage/work/dead"));
    assert_eq!(state.instance("dead").unwrap().unwrap().status, InstanceStatus::Lost);
    assert_eq!(state.instance("live").unwrap().unwrap().status, InstanceStatus::Running);
    assert_eq!(state.instance("old").unwrap().unwrap().status, InstanceStatus::Stopped);

    let cut = state.session("s-run").unwrap().unwrap();
    assert_eq!(cut.status, SessionStatus::Failed);
    assert_eq!(cut.error.as_deref(), Some("daemon restarted"));
    assert!(cut.ended_unix_ms.is_some());
    assert_eq!(state.session("s-done").unwrap().unwrap().status, SessionStatus::Done);

    // A second recovery finds nothing more to settle.
    assert!(state.recover_after_restart_with(sleep_alive).unwrap().is_empty());
}

#[test]
fn default_probe_does_not_take_a_live_non_qemu_process_for_a_vm() {
    let live = Sleeper::spawn();
    assert!(!qemu_alive(live.pid()), "sleep is not QEMU");
    assert!(!qemu_alive(std::process::id()), "the test binary is not QEMU");
    assert!(!qemu_alive(dead_pid()));
    assert!(!qemu_alive(0));

    let dir = tempfile::tempdir().unwrap();
    let state = State::open(dir.path().join("state.db")).unwrap();
    state.instance_started(&instance("i", "s", live.pid())).unwrap();
    let lost = state.recover_after_restart().unwrap();
    assert_eq!(lost.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["i"]);
}
