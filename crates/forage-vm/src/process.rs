//! Supervision of one QEMU process: output to a log file, death with its owner, exit status.

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use rustix::process::{Pid, Signal};
use tokio::sync::watch;

use crate::VmError;

/// The QEMU binary: `$FORAGE_QEMU`, else `qemu-system-x86_64` from `PATH`.
pub fn qemu_binary() -> Result<PathBuf, VmError> {
    if let Some(p) = std::env::var_os("FORAGE_QEMU").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let name = "qemu-system-x86_64";
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or(VmError::QemuNotFound)
}

/// A running (or exited) QEMU process. Dropping a spawned one kills QEMU; dropping an
/// attached one (started by another forage process) leaves it alone.
pub struct QemuProcess {
    pid: Pid,
    exit: watch::Receiver<Option<ExitStatus>>,
    log: PathBuf,
    owned: bool,
}

impl QemuProcess {
    /// Start QEMU with stdout and stderr appended to `log`. Must be called from within a
    /// tokio runtime; QEMU gets SIGKILL when this process dies.
    pub fn spawn(program: &Path, args: &[OsString], log: &Path) -> Result<Self, VmError> {
        let io = |source| VmError::Io { path: log.to_path_buf(), source };
        let out = File::options().create(true).append(true).open(log).map_err(io)?;
        let err = out.try_clone().map_err(io)?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err).kill_on_drop(true);
        // SAFETY: the closure only makes one async-signal-safe syscall (prctl).
        unsafe {
            cmd.pre_exec(|| {
                rustix::process::set_parent_process_death_signal(Some(Signal::Kill)).map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn().map_err(|source| VmError::Spawn { program: program.to_path_buf(), source })?;
        let raw = child.id().expect("a just-spawned child has a pid");
        let pid = Pid::from_raw(raw as i32).expect("pid is positive");
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = tx.send(status.ok());
        });
        tracing::debug!(pid = raw, program = %program.display(), "QEMU started");
        Ok(Self { pid, exit: rx, log: log.to_path_buf(), owned: true })
    }

    /// Start QEMU so that it can outlive this process: a session of its own (no
    /// terminal's signals), no death signal. Until [`QemuProcess::release`] it is killed
    /// when dropped (a launch abandoned half-way leaves nothing running); afterwards only
    /// [`QemuProcess::kill`] stops it. Must be called from within a tokio runtime.
    pub fn spawn_detached(program: &Path, args: &[OsString], log: &Path) -> Result<Self, VmError> {
        use std::os::unix::process::CommandExt;
        let io = |source| VmError::Io { path: log.to_path_buf(), source };
        let out = File::options().create(true).append(true).open(log).map_err(io)?;
        let err = out.try_clone().map_err(io)?;
        let mut cmd = std::process::Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| rustix::process::setsid().map(|_| ()).map_err(std::io::Error::from));
        }
        let mut child = cmd.spawn().map_err(|source| VmError::Spawn { program: program.to_path_buf(), source })?;
        let raw = child.id();
        let pid = Pid::from_raw(raw as i32).expect("pid is positive");
        let (tx, rx) = watch::channel(None);
        // Reap it (while this process lives); its status goes to the watchers.
        std::thread::spawn(move || {
            let status = child.wait();
            let _ = tx.send(status.ok());
        });
        tracing::debug!(pid = raw, program = %program.display(), "QEMU started, detached");
        Ok(Self { pid, exit: rx, log: log.to_path_buf(), owned: true })
    }

    /// Watch a QEMU started by another process (e.g. the `forage vm boot` that supervises
    /// it). Its exit is noticed by polling `/proc/PID`; the status is not known (reported
    /// as 0).
    pub fn attach(pid: u32, log: &Path) -> Option<Self> {
        let pid = Pid::from_raw(pid as i32)?;
        let proc_dir = PathBuf::from(format!("/proc/{}", pid.as_raw_nonzero()));
        if !proc_dir.exists() {
            return None;
        }
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            while proc_dir.exists() && !is_zombie(&proc_dir) {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            let _ = tx.send(Some(std::os::unix::process::ExitStatusExt::from_raw(0)));
        });
        Some(Self { pid, exit: rx, log: log.to_path_buf(), owned: false })
    }

    pub fn pid(&self) -> u32 {
        self.pid.as_raw_nonzero().get() as u32
    }

    /// The exit status, if QEMU has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// Wait until QEMU exits.
    pub async fn wait(&self) -> Option<ExitStatus> {
        let mut rx = self.exit.clone();
        let r = rx.wait_for(Option::is_some).await;
        r.ok().and_then(|s| *s)
    }

    /// No longer kill it when dropped: it runs on after this process (see
    /// [`QemuProcess::spawn_detached`]).
    pub fn release(&mut self) {
        self.owned = false;
    }

    /// SIGKILL, if still running.
    pub fn kill(&self) {
        if self.exit_status().is_none() {
            let _ = rustix::process::kill_process(self.pid, Signal::Kill);
        }
    }

    /// The last `lines` lines QEMU wrote to its log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail_lines(&self.log, lines)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if self.owned {
            self.kill();
        }
    }
}

/// Is process `pid` alive (running, not a zombie)?
pub fn alive(pid: u32) -> bool {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    dir.exists() && !is_zombie(&dir)
}

fn is_zombie(proc_dir: &Path) -> bool {
    std::fs::read_to_string(proc_dir.join("stat"))
        .map(|s| s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')))
        .unwrap_or(true)
}

/// The last `lines` lines of a text file (empty if it cannot be read).
pub fn tail_lines(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
