//! After a restart of the daemon: the instances a previous daemon left running (their
//! QEMU and shim outlive it, see `instance`) are adopted again: listed, stoppable, idle
//! timed, movable; their device sessions ended with the old daemon, so they live until an
//! operator stops them, the idle timeout, or a handoff. Those whose QEMU or shim is gone
//! are stopped, their folders removed, and recorded lost; the sessions the previous
//! daemon was serving are recorded failed. Session folders of dead daemons that no
//! instance uses are removed.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use forage_shim::ShimClient;
use forage_vm::{Snapshot, Vm};

use crate::instance::{unmount_session, Instance, InstanceFile, Place};
use crate::Cloudlet;

/// Adopt or settle every instance the state says is running.
pub(crate) async fn adopt_all(cloudlet: &Arc<Cloudlet>) {
    // The previous daemon's device sessions ended with it ("failed: daemon restarted"),
    // and instances whose QEMU is gone are recorded lost; their remains go below.
    match cloudlet.state.recover_after_restart() {
        Ok(lost) => {
            for rec in lost {
                settle_lost(cloudlet, &rec.id, &rec.dir).await;
            }
        }
        Err(e) => tracing::error!("cannot settle the sessions and instances of the previous daemon: {e}"),
    }
    let running = match cloudlet.state.list_instances(true) {
        Ok(r) => r,
        Err(e) => return tracing::error!("cannot list the instances of the previous daemon: {e}"),
    };
    for rec in running {
        if cloudlet.is_registered(&rec.id) {
            continue;
        }
        match adopt(cloudlet, &rec.id, &rec.dir).await {
            Ok(instance) => {
                tracing::info!(instance = rec.id, endpoint = instance.endpoint, "instance adopted after a restart");
                let c = cloudlet.clone();
                tokio::spawn(async move { life(c, instance, rec.dir).await });
            }
            Err(why) => {
                tracing::warn!(instance = rec.id, "instance lost in a restart: {why}");
                settle_lost(cloudlet, &rec.id, &rec.dir).await;
            }
        }
    }
    sweep_dead_sessions(cloudlet);
    cloudlet.data.sweep_scratch();
}

async fn adopt(cloudlet: &Cloudlet, id: &str, dir: &Path) -> Result<Instance, String> {
    let file = InstanceFile::read(dir)?;
    if !forage_vm::process::alive(file.qemu_pid) {
        return Err(format!("its QEMU (pid {}) is gone", file.qemu_pid));
    }
    let shim = ShimClient::connect(&file.shim).await.map_err(|e| format!("its shim: {e}"))?;
    let log = dir.join("run").join("qemu.log");
    let vm =
        Vm::adopt(file.spec.clone(), file.accel, file.qemu_pid, &log).await.map_err(|e| format!("its QEMU: {e}"))?;
    if let Some(d) = &file.saved {
        Snapshot::open(d).map_err(|e| format!("its saved VM: {e}"))?;
    }
    let place = Place { cloudlet, id, dir, started: Instant::now() };
    Ok(Instance::adopted(place, vm, Arc::new(shim), file))
}

/// An adopted instance's life, then its end.
async fn life(cloudlet: Arc<Cloudlet>, instance: Instance, dir: std::path::PathBuf) {
    let place = Place { cloudlet: &cloudlet, id: &instance.id.clone(), dir: &dir, started: Instant::now() };
    instance.control.set_movable(instance.lineage.is_some());
    let ended = crate::handoff::live(None, place, &instance).await;
    tracing::info!(instance = place.id, "adopted instance ends: {:?}", ended.as_ref().err());
    instance.finish(&cloudlet).await;
    let _ = cloudlet.state.instance_stopped(place.id);
    unmount_session(&dir);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whatever remains of an instance that cannot be adopted: stopped and removed.
async fn settle_lost(cloudlet: &Cloudlet, id: &str, dir: &Path) {
    if let Ok(file) = InstanceFile::read(dir) {
        if let Ok(shim) = ShimClient::connect(&file.shim).await {
            if let Some(pid) = rustix::process::Pid::from_raw(file.qemu_pid as i32)
                .filter(|_| forage_vm::process::alive(file.qemu_pid))
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::Kill);
            }
            let _ = shim.shutdown().await;
        } else if forage_vm::process::alive(file.qemu_pid) {
            if let Some(pid) = rustix::process::Pid::from_raw(file.qemu_pid as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::Kill);
            }
        }
    }
    let _ = cloudlet.state.instance_lost(id);
    unmount_session(dir);
    let _ = std::fs::remove_dir_all(dir);
}

/// Session folders of daemons that are gone (crashed or killed) that no running instance
/// uses: their mounts and files.
pub(crate) fn sweep_dead_sessions(cloudlet: &Cloudlet) {
    let in_use: Vec<std::path::PathBuf> =
        cloudlet.state.list_instances(true).map(|v| v.into_iter().map(|i| i.dir).collect()).unwrap_or_default();
    for entry in std::fs::read_dir(cloudlet.data.work()).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) =
            name.strip_prefix("session-").and_then(|r| r.split('-').next()).and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if forage_datadir::process_gone(pid) && !in_use.contains(&entry.path()) {
            tracing::info!("removing {} left by a daemon that is gone", entry.path().display());
            unmount_session(&entry.path());
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
