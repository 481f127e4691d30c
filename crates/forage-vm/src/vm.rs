//! The lifecycle of one VM: boot, pause, resume, save, restore, shutdown.
//!
//! Save (QEMU 7.2, stock):
//! ```text
//! forage                                  QEMU (memory-backend-file share=on)
//!   | stop ------------------------------------>|  vCPUs stop, block layer flushed
//!   | migrate-set-capabilities x-ignore-shared ->|  RAM is not put in the stream
//!   | migrate exec:cat > DIR/state.partial ----->|  device state only (~1 MB)
//!   | query-migrate ... until "completed" ------>|
//!   | quit ------------------------------------->|  exits; RAM stays in the file
//!   move memory + disks into DIR, state.partial -> state, write snapshot.json last
//! ```
//! Restore: copy memory and disks from the snapshot (holes kept), start QEMU with the same
//! devices plus `-S -incoming defer`, set `x-ignore-shared`, `migrate-incoming exec:cat
//! state`, wait until the state is loaded, `cont`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};

use crate::accel::Accel;
use crate::process::{qemu_binary, tail_lines, QemuProcess};
use crate::qmp::Qmp;
use crate::snapshot::{
    sha256_file, FileRecord, Snapshot, SnapshotManifest, StateRecord, MANIFEST_FILE, MEMORY_FILE, SNAPSHOT_FORMAT,
    SNAPSHOT_KIND, STATE_FILE,
};
use crate::sparse::copy_sparse;
use crate::spec::VmSpec;
use crate::{RestoreError, SaveError, VmError};

const QMP_WAIT: Duration = Duration::from_secs(15);
const MIGRATION_WAIT: Duration = Duration::from_secs(300);
/// Longest unix socket path (sun_path is 108 bytes including the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// How to restore.
#[derive(Debug, Clone, Copy)]
pub struct RestoreOptions {
    /// Copy the snapshot's disks to the spec's disk paths (otherwise the caller prepared
    /// them, e.g. a qcow2 layer over the snapshot's disk).
    pub copy_disks: bool,
    /// Drop the copied files from the host page cache before QEMU starts, so that what the
    /// guest touches can be seen afterwards (access profiling with `mincore`).
    pub evict_cache: bool,
    /// The state stream was saved with `x-ignore-shared` (guest RAM is in the memory file,
    /// not in the stream): the default. A handoff's stream announces every RAM block
    /// without addresses instead, and carries the ROM blocks' pages.
    pub ignore_shared: bool,
    /// QEMU outlives this process (a cloudlet's instances outlive a restart of the
    /// daemon): a session of its own, no death signal, not killed when the `Vm` drops.
    pub detached: bool,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        Self { copy_disks: true, evict_cache: false, ignore_shared: true, detached: false }
    }
}

/// A running QEMU VM.
pub struct Vm {
    spec: VmSpec,
    accel: Accel,
    process: QemuProcess,
    qmp: Qmp,
}

impl Vm {
    /// Start QEMU for `spec` and connect to its QMP socket. QEMU's own output goes to
    /// `qemu_log`. The guest is running when this returns.
    pub async fn boot(spec: VmSpec, accel: Accel, qemu_log: &Path) -> Result<Self, VmError> {
        Self::start(spec, accel, qemu_log, false, false).await
    }

    async fn start(
        spec: VmSpec,
        accel: Accel,
        qemu_log: &Path,
        incoming: bool,
        detached: bool,
    ) -> Result<Self, VmError> {
        let program = qemu_binary()?;
        check_inputs(&spec)?;
        // A stale socket would let us talk to nobody; a stale serial log would show old output.
        let _ = std::fs::remove_file(&spec.qmp_socket);
        let sockets = spec.control_socket.iter().chain(spec.guest_agent.as_ref().map(|g| &g.socket));
        for socket in sockets.chain(spec.serial_socket.iter()) {
            let _ = std::fs::remove_file(socket);
        }
        if let Some(dir) = spec.qmp_socket.parent() {
            std::fs::create_dir_all(dir).map_err(|source| VmError::Io { path: dir.to_path_buf(), source })?;
        }
        let _ = std::fs::remove_file(&spec.serial_log);
        let args = spec.qemu_args(accel, incoming);
        tracing::info!(vm = %spec.name, %accel, incoming, "starting QEMU");
        let process = match detached {
            true => QemuProcess::spawn_detached(&program, &args, qemu_log)?,
            false => QemuProcess::spawn(&program, &args, qemu_log)?,
        };
        let qmp = tokio::select! {
            r = Qmp::connect(&spec.qmp_socket, QMP_WAIT) => r,
            _ = process.wait() => return Err(exited(&spec, &process)),
        };
        let qmp = match qmp {
            Ok(q) => q,
            Err(e) => {
                if process.exit_status().is_some() {
                    return Err(exited(&spec, &process));
                }
                return Err(e.into());
            }
        };
        Ok(Self { spec, accel, process, qmp })
    }

    /// Take control of a VM that another process started and supervises, through the
    /// spec's control socket. Dropping the result leaves QEMU running.
    pub async fn attach(spec: VmSpec, accel: Accel, pid: u32, qemu_log: &Path) -> Result<Self, VmError> {
        let process = QemuProcess::attach(pid, qemu_log).ok_or_else(|| VmError::Exited {
            vm: spec.name.clone(),
            status: format!("pid {pid} is gone"),
            qemu_said: tail_lines(qemu_log, 5),
        })?;
        let socket = spec.control_socket.clone().ok_or_else(|| VmError::NoControlSocket { vm: spec.name.clone() })?;
        let qmp = Qmp::connect(&socket, Duration::from_secs(2)).await?;
        Ok(Self { spec, accel, process, qmp })
    }

    /// Take control again of a detached VM this program started before (a cloudlet
    /// daemon after its restart), through the spec's own QMP socket. Dropping the result
    /// leaves QEMU running; [`Vm::shutdown`] stops it.
    pub async fn adopt(spec: VmSpec, accel: Accel, pid: u32, qemu_log: &Path) -> Result<Self, VmError> {
        let process = QemuProcess::attach(pid, qemu_log).ok_or_else(|| VmError::Exited {
            vm: spec.name.clone(),
            status: format!("pid {pid} is gone"),
            qemu_said: tail_lines(qemu_log, 5),
        })?;
        let qmp = Qmp::connect(&spec.qmp_socket, Duration::from_secs(5)).await?;
        Ok(Self { spec, accel, process, qmp })
    }

    /// Restore a saved VM into `spec` (normally [`Snapshot::relocated_spec`]). Memory and
    /// disks are copied from the snapshot, so the snapshot stays as it was. On any error
    /// QEMU is killed and the copies removed.
    pub async fn restore(
        snapshot: &Snapshot,
        spec: VmSpec,
        accel: Accel,
        qemu_log: &Path,
    ) -> Result<Self, RestoreError> {
        Self::restore_with(snapshot, spec, accel, qemu_log, RestoreOptions::default()).await
    }

    /// [`restore`](Self::restore) with options.
    pub async fn restore_with(
        snapshot: &Snapshot,
        spec: VmSpec,
        accel: Accel,
        qemu_log: &Path,
        opts: RestoreOptions,
    ) -> Result<Self, RestoreError> {
        snapshot.check_hardware(&spec)?;
        let saved_accel = snapshot.manifest().accel;
        if saved_accel != accel {
            tracing::warn!(%saved_accel, %accel, "restoring with a different accelerator than the save");
        }
        let mut copies = Vec::new();
        let result = async {
            let disk_sources = if opts.copy_disks { snapshot.disk_paths() } else { Vec::new() };
            let sources = std::iter::once(snapshot.memory_path()).chain(disk_sources);
            let targets = std::iter::once(spec.memory_file.clone()).chain(spec.disks.iter().map(|d| d.path.clone()));
            for (from, to) in sources.zip(targets) {
                if from != to {
                    copies.push(to.clone());
                    let copy_err = |source| RestoreError::Copy { from: from.clone(), to: to.clone(), source };
                    copy_sparse(&from, &to).map_err(copy_err)?;
                    if opts.evict_cache {
                        crate::sparse::evict_from_page_cache(&to).map_err(copy_err)?;
                    }
                }
            }
            let vm = Self::start(spec, accel, qemu_log, true, opts.detached).await?;
            let loaded = vm.load_state(&snapshot.state_path(), opts.ignore_shared).await;
            if loaded.is_err() {
                vm.process.kill();
            }
            loaded?;
            vm.qmp.execute("cont", None).await.map_err(VmError::from)?;
            Ok(vm)
        }
        .await;
        if result.is_err() {
            for c in copies {
                let _ = std::fs::remove_file(c);
            }
        }
        result
    }

    /// Start QEMU waiting for an incoming migration on `uri` (e.g. `unix:PATH`, `tcp:HOST:PORT`),
    /// as plain QEMU live migration's destination. The VM stays paused once the
    /// migration has arrived (`query-status` says `paused`); `cont` runs it.
    pub async fn incoming(spec: VmSpec, accel: Accel, qemu_log: &Path, uri: &str) -> Result<Self, VmError> {
        let vm = Self::start(spec, accel, qemu_log, true, false).await?;
        vm.qmp.execute("migrate-incoming", Some(json!({ "uri": uri }))).await?;
        Ok(vm)
    }

    async fn load_state(&self, state: &Path, ignore_shared: bool) -> Result<(), RestoreError> {
        if ignore_shared {
            self.set_ignore_shared().await?;
        }
        let uri = format!("exec:cat {}", shell_quote(state));
        self.qmp.execute("migrate-incoming", Some(json!({ "uri": uri }))).await.map_err(VmError::from)?;
        let start = Instant::now();
        loop {
            if self.process.exit_status().is_some() {
                return Err(RestoreError::Incoming {
                    vm: self.spec.name.clone(),
                    state: state.to_path_buf(),
                    qemu_said: self.process.log_tail(5),
                });
            }
            match self.qmp.execute("query-status", None).await {
                Ok(s) if s["status"] != "inmigrate" => return Ok(()),
                Ok(_) => {}
                // QEMU exits when the stream is bad: report that, not the socket.
                Err(e) => {
                    if tokio::time::timeout(Duration::from_secs(10), self.process.wait()).await.is_err() {
                        return Err(VmError::from(e).into());
                    }
                    continue;
                }
            }
            if start.elapsed() > MIGRATION_WAIT {
                return Err(RestoreError::Incoming {
                    vm: self.spec.name.clone(),
                    state: state.to_path_buf(),
                    qemu_said: format!("still loading after {MIGRATION_WAIT:?}"),
                });
            }
            // A small device state loads in a few ms: each step of the wait is the
            // restore's (and an activation's first response's) time.
            tokio::time::sleep(Duration::from_millis(if start.elapsed() < Duration::from_secs(1) { 2 } else { 20 }))
                .await;
        }
    }

    async fn set_ignore_shared(&self) -> Result<(), VmError> {
        self.qmp
            .execute(
                "migrate-set-capabilities",
                Some(json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] })),
            )
            .await?;
        Ok(())
    }

    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    /// For the hardware changes made while it runs (the NIC unplugged or plugged).
    pub(crate) fn spec_mut(&mut self) -> &mut VmSpec {
        &mut self.spec
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Let a VM started with [`RestoreOptions::detached`] outlive this process: dropping
    /// it no longer kills it (before this, an abandoned launch is killed).
    pub fn release(&mut self) {
        self.process.release();
    }

    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    /// QEMU's run state (`running`, `paused`, ...).
    pub async fn status(&self) -> Result<String, VmError> {
        let s = self.qmp.execute("query-status", None).await?;
        Ok(s["status"].as_str().unwrap_or("unknown").to_string())
    }

    pub async fn pause(&self) -> Result<(), VmError> {
        self.qmp.execute("stop", None).await?;
        Ok(())
    }

    pub async fn resume(&self) -> Result<(), VmError> {
        self.qmp.execute("cont", None).await?;
        Ok(())
    }

    /// Take the medium out of the CD drive (QMP `eject`, forced: a guest may hold the tray
    /// locked), so that the spec a save records has an empty drive and names no host file.
    pub async fn eject_cdrom(&mut self) -> Result<(), VmError> {
        let Some(cd) = self.spec.cdrom.as_mut() else { return Ok(()) };
        if cd.medium.is_none() {
            return Ok(());
        }
        let args = json!({"id": crate::spec::CDROM_ID, "force": true});
        self.qmp.execute("eject", Some(args)).await?;
        cd.medium = None;
        Ok(())
    }

    /// Wait until the guest's serial console shows `marker`. On timeout (or if QEMU
    /// exits) the error carries the serial log's last lines, and QEMU is left to the caller.
    pub async fn wait_for_serial(&self, marker: &str, timeout: Duration) -> Result<Duration, VmError> {
        let start = Instant::now();
        loop {
            let text = std::fs::read(&self.spec.serial_log).unwrap_or_default();
            if memchr_str(&text, marker.as_bytes()) {
                return Ok(start.elapsed());
            }
            if self.process.exit_status().is_some() {
                return Err(exited(&self.spec, &self.process));
            }
            if start.elapsed() > timeout {
                return Err(VmError::ReadyTimeout {
                    vm: self.spec.name.clone(),
                    marker: marker.to_string(),
                    waited: timeout,
                    serial_tail: tail_lines(&self.spec.serial_log, 10),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Suspend the VM to `dir`: afterwards QEMU has exited and `dir` holds a snapshot.
    /// If anything fails before QEMU quits, the partial state is removed and the VM
    /// resumes, untouched.
    pub async fn save(&self, dir: &Path) -> Result<Snapshot, SaveError> {
        if dir.join(MANIFEST_FILE).exists() {
            return Err(SaveError::Exists { dir: dir.to_path_buf() });
        }
        std::fs::create_dir_all(dir).map_err(|source| SaveError::Io { path: dir.to_path_buf(), source })?;
        let partial = dir.join(format!("{STATE_FILE}.partial"));
        let was_running = self.status().await? == "running";
        self.qmp.execute("stop", None).await.map_err(VmError::from)?;
        if let Err(e) = self.write_state(&partial).await {
            let _ = std::fs::remove_file(&partial);
            if was_running && self.process.exit_status().is_none() {
                let _ = self.qmp.execute("cont", None).await;
            }
            return Err(e);
        }
        // The device state is complete; QEMU may now go. Its memory file stays.
        let _ = self.qmp.execute("quit", None).await;
        if tokio::time::timeout(Duration::from_secs(10), self.process.wait()).await.is_err() {
            self.process.kill();
            self.process.wait().await;
        }
        self.collect_snapshot(dir, &partial)
    }

    pub(crate) async fn write_state(&self, partial: &Path) -> Result<(), SaveError> {
        self.set_ignore_shared().await?;
        let uri = format!("exec:cat > {}", shell_quote(partial));
        self.qmp.execute("migrate", Some(json!({ "uri": uri }))).await.map_err(VmError::from)?;
        let start = Instant::now();
        loop {
            let info = self.qmp.execute("query-migrate", None).await.map_err(VmError::from)?;
            match info["status"].as_str() {
                Some("completed") => return Ok(()),
                Some("failed") | Some("cancelled") => {
                    return Err(SaveError::Migration {
                        vm: self.spec.name.clone(),
                        detail: info.get("error-desc").and_then(Value::as_str).unwrap_or("failed").to_string(),
                    })
                }
                _ if start.elapsed() > MIGRATION_WAIT => {
                    let _ = self.qmp.execute("migrate_cancel", None).await;
                    return Err(SaveError::Migration {
                        vm: self.spec.name.clone(),
                        detail: format!("not finished after {MIGRATION_WAIT:?}"),
                    });
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    fn collect_snapshot(&self, dir: &Path, partial: &Path) -> Result<Snapshot, SaveError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SaveError::Io { path, source }
        };
        let memory = move_into(&self.spec.memory_file, &dir.join(MEMORY_FILE)).map_err(io(&self.spec.memory_file))?;
        let mut disks = Vec::new();
        for (i, disk) in self.spec.disks.iter().enumerate() {
            let name = format!("disk{i}.{}", disk.format.driver());
            let size = move_into(&disk.path, &dir.join(&name)).map_err(io(&disk.path))?;
            disks.push(FileRecord { file: name, size });
        }
        let state = dir.join(STATE_FILE);
        std::fs::rename(partial, &state).map_err(io(partial))?;
        let manifest = SnapshotManifest {
            kind: SNAPSHOT_KIND.to_string(),
            format: SNAPSHOT_FORMAT,
            spec: self.spec.clone(),
            hardware_fingerprint: self.spec.hardware_fingerprint(),
            accel: self.accel,
            memory: FileRecord { file: MEMORY_FILE.to_string(), size: memory },
            disks,
            state: StateRecord {
                file: STATE_FILE.to_string(),
                size: std::fs::metadata(&state).map_err(io(&state))?.len(),
                sha256: sha256_file(&state).map_err(io(&state))?,
            },
            saved_at_unix: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        };
        let tmp = dir.join(format!("{MANIFEST_FILE}.tmp"));
        let text = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        std::fs::write(&tmp, text).map_err(io(&tmp))?;
        std::fs::rename(&tmp, dir.join(MANIFEST_FILE)).map_err(io(&tmp))?;
        Ok(Snapshot::open(dir)?)
    }

    /// Stop the VM at once (like pulling the plug; QEMU flushes its own block layer).
    pub async fn shutdown(self) -> Result<(), VmError> {
        // A QEMU whose main loop is stuck (e.g. on a read its view cannot answer) does
        // not answer QMP: it is killed after the same wait.
        let asked = async {
            let _ = self.qmp.execute("stop", None).await;
            let _ = self.qmp.execute("quit", None).await;
            self.process.wait().await
        };
        if tokio::time::timeout(Duration::from_secs(10), asked).await.is_err() {
            self.process.kill();
            self.process.wait().await;
        }
        Ok(())
    }

    /// Wait until QEMU exits by itself.
    pub async fn wait_exit(&self) -> Option<std::process::ExitStatus> {
        self.process.wait().await
    }

    pub fn qemu_log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }
}

fn exited(spec: &VmSpec, process: &QemuProcess) -> VmError {
    VmError::Exited {
        vm: spec.name.clone(),
        status: process.exit_status().map(|s| s.to_string()).unwrap_or_else(|| "unknown".into()),
        qemu_said: process.log_tail(5),
    }
}

/// Check, before QEMU starts, the inputs whose absence QEMU reports obscurely.
fn check_inputs(spec: &VmSpec) -> Result<(), VmError> {
    crate::spec::check_words(spec).map_err(|detail| VmError::BadSpec { vm: spec.name.clone(), detail })?;
    let mut needed: Vec<&PathBuf> = spec.disks.iter().map(|d| &d.path).collect();
    if let Some(b) = &spec.boot {
        needed.push(&b.kernel);
        needed.push(&b.initrd);
    }
    if let Some(missing) = needed.into_iter().find(|p| !p.exists()) {
        return Err(VmError::MissingInput { path: missing.clone() });
    }
    let sockets = std::iter::once(&spec.qmp_socket)
        .chain(&spec.control_socket)
        .chain(spec.guest_agent.as_ref().map(|g| &g.socket));
    for socket in sockets {
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(VmError::SocketPathTooLong { path: socket.clone() });
        }
    }
    Ok(())
}

/// Move a file (rename, or sparse copy + remove across filesystems); returns its size.
fn move_into(from: &Path, to: &Path) -> std::io::Result<u64> {
    if std::fs::rename(from, to).is_err() {
        copy_sparse(from, to)?;
        std::fs::remove_file(from)?;
    }
    Ok(std::fs::metadata(to)?.len())
}

fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.to_string_lossy().replace('\'', r"'\''"))
}

fn memchr_str(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(shell_quote(Path::new("/a b/it's")), r"'/a b/it'\''s'");
    }
}
