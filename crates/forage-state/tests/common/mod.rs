//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command};

use forage_state::{NewCacheEntry, NewInstance, NewSession, SessionMode};

pub fn session(id: &str, mode: SessionMode) -> NewSession {
    NewSession {
        id: id.into(),
        device: "10.0.0.7:5555".into(),
        base_digest: "b".repeat(64),
        overlay_digest: format!("ovl-{id}"),
        mode,
    }
}

pub fn instance(id: &str, session_id: &str, pid: u32) -> NewInstance {
    NewInstance {
        id: id.into(),
        session_id: session_id.into(),
        name: format!("vm-{id}"),
        qemu_pid: pid,
        dir: PathBuf::from(format!("/srv/forage/work/{id}")),
        endpoint: "127.0.0.1:40001".into(),
    }
}

pub fn cache(digest: &str, bytes: u64) -> NewCacheEntry {
    NewCacheEntry {
        overlay_digest: digest.into(),
        base_digest: "b".repeat(64),
        dir: PathBuf::from(format!("/srv/forage/cache/{digest}")),
        bytes,
    }
}

/// A process that is alive and is not QEMU, killed and reaped on drop.
pub struct Sleeper(Child);

impl Sleeper {
    pub fn spawn() -> Sleeper {
        Sleeper(Command::new("sleep").arg("60").spawn().expect("spawn sleep"))
    }
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The pid of a process that has exited and been reaped.
pub fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().expect("spawn true");
    let pid = child.id();
    child.wait().expect("wait true");
    pid
}

/// A stand-in for [`qemu_alive`] that takes `sleep` for the VM.
pub fn sleep_alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).map(|c| c.starts_with(b"sleep\0")).unwrap_or(false)
}
