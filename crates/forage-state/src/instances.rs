//! Launch VMs (instances): started, stopped, listed, and settled after a daemon restart.

use rusqlite::{params, OptionalExtension, Row};

use crate::records::{path_text, InstanceRecord, InstanceStatus, NewInstance, SessionStatus};
use crate::{now_unix_ms, State, StateError};

const COLUMNS: &str = "id, session_id, name, qemu_pid, dir, endpoint, started_unix_ms, \
                       stopped_unix_ms, status";

/// The error recorded on sessions that were running when the daemon went away.
pub(crate) const RESTARTED: &str = "daemon restarted";

fn from_row(r: &Row<'_>) -> rusqlite::Result<InstanceRecord> {
    Ok(InstanceRecord {
        id: r.get(0)?,
        session_id: r.get(1)?,
        name: r.get(2)?,
        qemu_pid: r.get(3)?,
        dir: r.get::<_, String>(4)?.into(),
        endpoint: r.get(5)?,
        started_unix_ms: r.get(6)?,
        stopped_unix_ms: r.get(7)?,
        status: r.get(8)?,
    })
}

/// Whether `pid` is a live QEMU: `/proc/PID` exists and its command line mentions "qemu"
/// (a bare existence check would take a recycled pid for the VM).
pub fn qemu_alive(pid: u32) -> bool {
    pid != 0
        && std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|cmdline| cmdline.windows(4).any(|w| w == b"qemu"))
            .unwrap_or(false)
}

impl State {
    /// Records a new launch VM, "running" from now. Its id must be new.
    pub fn instance_started(&self, i: &NewInstance) -> Result<(), StateError> {
        let dir = path_text("instance dir", &i.dir)?;
        self.conn()
            .execute(
                "INSERT INTO instances (id, session_id, name, qemu_pid, dir, endpoint, \
                 started_unix_ms, status) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    i.id,
                    i.session_id,
                    i.name,
                    i.qemu_pid,
                    dir,
                    i.endpoint,
                    now_unix_ms(),
                    InstanceStatus::Running
                ],
            )
            .map_err(StateError::insert("add instance", "instance", &i.id))?;
        tracing::debug!(instance = %i.id, session = %i.session_id, pid = i.qemu_pid, "instance started");
        Ok(())
    }

    /// Marks a running instance "stopped" (now) and returns it. An instance already
    /// stopped or lost is returned unchanged, so a stop recorded twice keeps its first time.
    pub fn instance_stopped(&self, id: &str) -> Result<InstanceRecord, StateError> {
        let n = self
            .conn()
            .execute(
                "UPDATE instances SET status = ?2, stopped_unix_ms = ?3 \
                 WHERE id = ?1 AND status = ?4",
                params![id, InstanceStatus::Stopped, now_unix_ms(), InstanceStatus::Running],
            )
            .map_err(StateError::sql("stop instance"))?;
        let record = self.instance(id)?.ok_or_else(|| StateError::NotFound { kind: "instance", id: id.to_string() })?;
        if n > 0 {
            tracing::debug!(instance = %id, "instance stopped");
        }
        Ok(record)
    }

    /// Marks a running instance "lost" (now): a restarted daemon could not adopt it.
    pub fn instance_lost(&self, id: &str) -> Result<(), StateError> {
        self.conn()
            .execute(
                "UPDATE instances SET status = ?2, stopped_unix_ms = ?3 WHERE id = ?1 AND status = ?4",
                params![id, InstanceStatus::Lost, now_unix_ms(), InstanceStatus::Running],
            )
            .map_err(StateError::sql("lose instance"))?;
        Ok(())
    }

    /// One instance, if it exists.
    pub fn instance(&self, id: &str) -> Result<Option<InstanceRecord>, StateError> {
        self.conn()
            .query_row(&format!("SELECT {COLUMNS} FROM instances WHERE id = ?1"), [id], from_row)
            .optional()
            .map_err(StateError::sql("read instance"))
    }

    /// Instances, newest first: only the running ones, or all.
    pub fn list_instances(&self, running_only: bool) -> Result<Vec<InstanceRecord>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM instances WHERE (?1 = 0 OR status = ?2) \
                 ORDER BY started_unix_ms DESC, rowid DESC"
            ))
            .map_err(StateError::sql("list instances"))?;
        let rows = stmt
            .query_map(params![running_only, InstanceStatus::Running], from_row)
            .map_err(StateError::sql("list instances"))?;
        rows.collect::<Result<_, _>>().map_err(StateError::sql("list instances"))
    }

    /// Settles what a previous daemon left running, with [`qemu_alive`] as the test of
    /// life; see [`State::recover_after_restart_with`].
    pub fn recover_after_restart(&self) -> Result<Vec<InstanceRecord>, StateError> {
        self.recover_after_restart_with(qemu_alive)
    }

    /// Settles what a previous daemon left running, in one transaction: every "running"
    /// instance whose pid fails `alive` becomes "lost" (returned, for the caller to remove
    /// its directory); every "running" session becomes "failed" with the error
    /// "daemon restarted". Instances whose QEMU is alive stay "running".
    pub fn recover_after_restart_with(&self, alive: impl Fn(u32) -> bool) -> Result<Vec<InstanceRecord>, StateError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(StateError::sql("recover after restart"))?;
        let running: Vec<InstanceRecord> = {
            let mut stmt = tx
                .prepare(&format!("SELECT {COLUMNS} FROM instances WHERE status = ?1"))
                .map_err(StateError::sql("recover after restart"))?;
            let rows = stmt
                .query_map([InstanceStatus::Running], from_row)
                .map_err(StateError::sql("recover after restart"))?;
            rows.collect::<Result<_, _>>().map_err(StateError::sql("recover after restart"))?
        };
        let now = now_unix_ms();
        let mut lost = Vec::new();
        for mut instance in running {
            if alive(instance.qemu_pid) {
                tracing::info!(instance = %instance.id, pid = instance.qemu_pid, "instance survived the restart");
                continue;
            }
            tx.execute(
                "UPDATE instances SET status = ?2, stopped_unix_ms = ?3 WHERE id = ?1",
                params![instance.id, InstanceStatus::Lost, now],
            )
            .map_err(StateError::sql("recover after restart"))?;
            tracing::warn!(instance = %instance.id, pid = instance.qemu_pid, dir = %instance.dir.display(), "instance lost: its QEMU is gone");
            instance.status = InstanceStatus::Lost;
            instance.stopped_unix_ms = Some(now);
            lost.push(instance);
        }
        let failed = tx
            .execute(
                "UPDATE sessions SET status = ?1, ended_unix_ms = ?2, error = ?3 WHERE status = ?4",
                params![SessionStatus::Failed, now, RESTARTED, SessionStatus::Running],
            )
            .map_err(StateError::sql("recover after restart"))?;
        tx.commit().map_err(StateError::sql("recover after restart"))?;
        if failed > 0 {
            tracing::warn!(sessions = failed, "sessions cut short by the restart marked failed");
        }
        Ok(lost)
    }
}
