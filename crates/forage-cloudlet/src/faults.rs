//! Faults a test can inject into a debug build (`FORAGE_FAULTS=name,name`), to reach
//! states that timing alone cannot reach reliably: a message lost at one exact step; and
//! one probe (`FORAGE_HANDOFF_PROBE=DIR`): each handoff's source copies the VM's memory
//! and disk to `DIR/INSTANCE.source.{memory,disk}` once QEMU has stopped it for good, and
//! its destination copies what it rebuilt to `DIR/INSTANCE.destination.{memory,disk}`
//! before resuming it (INSTANCE: the source's instance id), so that a test can compare
//! them page by page. Release builds compile every check to `false`.
//!
//! | name | where | what happens |
//! |---|---|---|
//! | `handoff-done-lost` | handoff destination | it resumes the VM and closes the connection instead of answering HandoffDone |
//! | `handoff-commit-lost` | handoff destination | it drops the commit (as if never received) and ends the session |

/// Whether the fault `name` is asked for (debug builds only).
pub(crate) fn injected(name: &str) -> bool {
    cfg!(debug_assertions) && std::env::var("FORAGE_FAULTS").is_ok_and(|v| v.split(',').any(|f| f.trim() == name))
}

/// Where the handoff probe keeps its copies (debug builds only).
fn probe_dir() -> Option<std::path::PathBuf> {
    std::env::var_os("FORAGE_HANDOFF_PROBE").filter(|_| cfg!(debug_assertions)).map(Into::into)
}

/// The handoff probe: copy `memory` and `disk` as `instance`'s `side` (a no-op unless asked).
pub(crate) async fn probe_handoff(instance: &str, side: &str, memory: &std::path::Path, disk: &std::path::Path) {
    let Some(dir) = probe_dir() else { return };
    let copies = [(memory.to_path_buf(), "memory"), (disk.to_path_buf(), "disk")]
        .map(|(from, what)| (from, dir.join(format!("{instance}.{side}.{what}"))));
    let copied = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir)?;
        for (from, to) in &copies {
            std::fs::copy(from, to)?;
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    match copied {
        Ok(Ok(())) => tracing::warn!(instance, side, "probe: the VM's memory and disk copied"),
        Ok(Err(e)) => tracing::warn!(instance, side, "probe: copying failed: {e}"),
        Err(e) => tracing::warn!(instance, side, "probe: {e}"),
    }
}
