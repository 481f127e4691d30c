//! `instance.json`: what a daemon needs to adopt a running instance after a restart of
//! its own (QEMU and the shim keep running; see `adopt`). Written once the instance runs.

use std::path::{Path, PathBuf};

use forage_proto::ServiceEndpoint;
use forage_vm::{PortForward, VmSpec};
use serde::{Deserialize, Serialize};

pub(crate) const INSTANCE_FILE: &str = "instance.json";
pub(super) const FORMAT: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct InstanceFile {
    pub format: u32,
    pub id: String,
    pub qemu_pid: u32,
    /// The spec QEMU runs with (its QMP socket, files, forwards).
    pub spec: VmSpec,
    pub accel: forage_vm::Accel,
    /// The shim's control socket.
    pub shim: PathBuf,
    pub service: ServiceEndpoint,
    pub service_port: Option<u16>,
    pub extra_ports: Vec<u16>,
    pub forwards: Vec<PortForward>,
    /// The saved VM a handoff compares the instance with (see `Lineage`).
    pub saved: Option<PathBuf>,
    /// Disk chunks that differed from it when the VM first resumed, as [first, count]
    /// ranges.
    #[serde(default)]
    pub disk_changed: Vec<[u64; 2]>,
}

/// Sorted indices as [first, count] ranges.
pub(crate) fn ranges(indices: &[u64]) -> Vec<[u64; 2]> {
    let mut out: Vec<[u64; 2]> = Vec::new();
    for &i in indices {
        match out.last_mut() {
            Some([first, count]) if *first + *count == i => *count += 1,
            _ => out.push([i, 1]),
        }
    }
    out
}

impl InstanceFile {
    /// The disk chunks of [`InstanceFile::disk_changed`], one by one.
    pub fn disk_changed(&self) -> Vec<u64> {
        self.disk_changed.iter().flat_map(|&[first, count]| first..first.saturating_add(count.min(1 << 32))).collect()
    }

    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join(format!("{INSTANCE_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).expect("serializes"))?;
        std::fs::rename(&tmp, dir.join(INSTANCE_FILE))
    }

    pub fn read(dir: &Path) -> Result<Self, String> {
        let path = dir.join(INSTANCE_FILE);
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let f: Self = serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        if f.format > FORMAT {
            return Err(format!("{}: format {} is newer than this daemon's ({FORMAT})", path.display(), f.format));
        }
        Ok(f)
    }
}
