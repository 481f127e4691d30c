//! Child processes measured as the kernel saw them: wall time, CPU time and peak resident
//! memory (`wait4`'s rusage, the same figure as `/proc/PID/status` VmHWM), so that every
//! forage process of a bench reports its own peak, not the bench's.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// What one process cost.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Usage {
    pub wall_s: f64,
    /// User + system CPU seconds: over `wall_s`, how many cores it kept busy.
    pub cpu_s: f64,
    pub peak_rss_mb: f64,
}

impl Usage {
    pub fn cores(&self) -> f64 {
        self.cpu_s / self.wall_s.max(1e-9)
    }
}

/// The output of a measured child.
pub struct Measured {
    pub stdout: Vec<u8>,
    pub usage: Usage,
}

/// Run `cmd` to its end; fail (with its stderr) if it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<Measured> {
    let program = format!("{:?}", cmd.get_program());
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it for our own child `pid`.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our child, not waited for yet; the pointers are to live locals.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    if r != pid {
        bail!("waiting for {program}: {}", std::io::Error::last_os_error());
    }
    let wall_s = start.elapsed().as_secs_f64();
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let usage =
        Usage { wall_s, cpu_s: secs(ru.ru_utime) + secs(ru.ru_stime), peak_rss_mb: ru.ru_maxrss as f64 / 1024.0 };
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        bail!("{program} failed ({status:#x}): {}", String::from_utf8_lossy(&stderr).trim());
    }
    Ok(Measured { stdout, usage })
}

/// Peak resident memory so far of a running process (VmHWM), in MB.
pub fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim();
    kib.parse::<f64>().ok().map(|k| k / 1024.0)
}
