//! VMs run by hand (`forage vm`, the demo): their folders under `DATA/vms/NAME/` and a
//! restore of a snapshot into a fresh run folder.

use std::path::PathBuf;

use forage_datadir::{DataDir, DataDirError};
use forage_vm::{Accel, Snapshot, Vm};

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
    Vm::restore(snap, spec, accel, &run.dir.join("qemu.log")).await.map_err(|source| RestoreRunError::Restore {
        name: name.into(),
        dir: snap.dir().to_path_buf(),
        source,
    })
}
