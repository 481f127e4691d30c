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
    /// The saved VM of a copy-on-write instance (it can move).
    pub saved: Option<PathBuf>,
}

impl InstanceFile {
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
