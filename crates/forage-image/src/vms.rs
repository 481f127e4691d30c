//! VMs run by hand (`forage vm`, the demo): their folders under `DATA/vms/NAME/` and a
//! restore of a snapshot into a fresh run folder.

use std::path::PathBuf;

use forage_datadir::{DataDir, DataDirError};
use forage_vm::{Accel, Snapshot, Vm, VmSpec};
use serde::{Deserialize, Serialize};

use crate::RunPaths;

/// Where a VM's files are: `run/` (live files), `snapshot/`, `vm.json`.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub dir: PathBuf,
    pub run: RunPaths,
    pub snapshot: PathBuf,
    pub record: PathBuf,
}

impl VmPaths {
    pub fn new(data: &DataDir, name: &str) -> Result<Self, DataDirError> {
        let dir = data.vm(name)?;
        Ok(Self {
            run: RunPaths { dir: dir.join("run"), qmp_socket: data.runtime_dir()?.join(format!("{name}.qmp")) },
            snapshot: dir.join("snapshot"),
            record: dir.join("vm.json"),
            dir,
        })
    }

    pub fn qemu_log(&self) -> PathBuf {
        self.run.dir.join("qemu.log")
    }

    /// The VM's record (`vm.json`).
    pub fn load(&self) -> Result<VmRecord, VmRecordError> {
        let text =
            std::fs::read(&self.record).map_err(|source| VmRecordError::Missing { dir: self.dir.clone(), source })?;
        serde_json::from_slice(&text).map_err(|source| VmRecordError::Unreadable { path: self.record.clone(), source })
    }

    /// Write the record whole (a rename), never half.
    pub fn store(&self, r: &VmRecord) -> Result<(), VmRecordError> {
        let tmp = self.record.with_extension("json.tmp");
        let io = |path: &PathBuf| {
            let path = path.clone();
            move |source| VmRecordError::Write { path, source }
        };
        std::fs::write(&tmp, serde_json::to_vec_pretty(r).expect("a record serializes")).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &self.record).map_err(io(&self.record))
    }
}

/// `vm.json`. The state (running, saved, stopped) is not stored: it is read off the pid
/// and the snapshot folder, so two forage processes never disagree about it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    pub name: String,
    pub image: String,
    pub accel: Accel,
    pub pid: Option<u32>,
    pub spec: VmSpec,
    pub agent_port: u16,
    #[serde(default)]
    pub app: Option<AppForward>,
}

/// The app a VM serves, and where its port is forwarded on the host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppForward {
    pub name: String,
    pub guest_port: u16,
    pub host_port: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum VmRecordError {
    #[error("no VM at {dir}")]
    Missing {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is unreadable")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreRunError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("restoring VM {name} from {dir}")]
    Restore {
        name: String,
        dir: PathBuf,
        #[source]
        source: forage_vm::RestoreError,
    },
}

/// Restore `snap` as VM `name` into a fresh `run` folder, its guest ports forwarded to
/// newly chosen loopback ports.
pub async fn restore_fresh(snap: &Snapshot, name: &str, run: &RunPaths, accel: Accel) -> Result<Vm, RestoreRunError> {
    restore_in(snap, name, run, accel, None, None).await
}

/// [`restore_fresh`] with the disk a qcow2 layer over `backing` (the snapshot's own raw
/// disk, left untouched, e.g. a base's): the layer records what the VM writes, so an
/// overlay made from its save knows the changed chunks without comparing them all.
pub async fn restore_layered(
    snap: &Snapshot,
    name: &str,
    run: &RunPaths,
    accel: Accel,
    backing: &std::path::Path,
) -> Result<Vm, RestoreRunError> {
    restore_in(snap, name, run, accel, Some(backing), None).await
}

/// [`restore_layered`] with the serial console also on the unix socket `console` (an
/// operator's terminal: `forage overlay create --interactive`).
pub async fn restore_layered_with_console(
    snap: &Snapshot,
    name: &str,
    run: &RunPaths,
    accel: Accel,
    backing: &std::path::Path,
    console: &std::path::Path,
) -> Result<Vm, RestoreRunError> {
    restore_in(snap, name, run, accel, Some(backing), Some(console)).await
}

async fn restore_in(
    snap: &Snapshot,
    name: &str,
    run: &RunPaths,
    accel: Accel,
    backing: Option<&std::path::Path>,
    console: Option<&std::path::Path>,
) -> Result<Vm, RestoreRunError> {
    let io = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| RestoreRunError::Io { path, source }
    };
    let guest_ports: Vec<u16> = snap
        .manifest()
        .spec
        .nic
        .as_ref()
        .map(|n| n.forwards.iter().map(|f| f.guest_port).collect())
        .unwrap_or_default();
    let forwards = crate::loopback_forwards(guest_ports).map_err(io(std::path::Path::new("127.0.0.1")))?;
    let _ = std::fs::remove_dir_all(&run.dir);
    std::fs::create_dir_all(&run.dir).map_err(io(&run.dir))?;
    let mut spec = snap.relocated_spec(&run.dir, &run.qmp_socket, Some(forwards));
    spec.name = name.to_string();
    spec.serial_socket = console.map(|c| c.to_path_buf());
    let mut opts = forage_vm::RestoreOptions::default();
    if let Some(backing) = backing {
        // qemu-img resolves a relative backing file against the layer's folder.
        let backing = std::fs::canonicalize(backing).map_err(io(backing))?;
        let layer = run.dir.join("disk0.qcow2");
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-F", "raw", "-b"])
            .arg(&backing)
            .arg(&layer)
            .output()
            .map_err(io(std::path::Path::new("qemu-img")))?;
        if !out.status.success() {
            let detail = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(RestoreRunError::Io { path: layer, source: std::io::Error::other(detail) });
        }
        spec.disks[0].path = layer;
        spec.disks[0].format = forage_vm::DiskFormat::Qcow2;
        opts.copy_disks = false;
    }
    Vm::restore_with(snap, spec, accel, &run.dir.join("qemu.log"), opts)
        .await
        .map_err(|source| RestoreRunError::Restore { name: name.into(), dir: snap.dir().to_path_buf(), source })
}
