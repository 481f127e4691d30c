//! A saved VM on disk: guest RAM as a plain file, the disks, QEMU's device-state stream,
//! and `snapshot.json` describing them. Format documented in `docs/vm-snapshot.md`.
//!
//! `snapshot.json` is written last (through a temporary name), so a folder without it is
//! an interrupted save and is never taken for a snapshot.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::accel::Accel;
use crate::spec::{PortForward, VmSpec};

pub const SNAPSHOT_KIND: &str = "forage-vm-snapshot";
/// Version of the snapshot layout written by this forage.
pub const SNAPSHOT_FORMAT: u32 = 1;
pub const MANIFEST_FILE: &str = "snapshot.json";
pub const MEMORY_FILE: &str = "memory.raw";
pub const STATE_FILE: &str = "state";

/// QEMU migration stream header: "QEVM", version 3.
const QEMU_STREAM_MAGIC: [u8; 8] = [0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotManifest {
    pub kind: String,
    pub format: u32,
    /// The spec of the VM that was saved (its paths are those of that run).
    pub spec: VmSpec,
    pub hardware_fingerprint: String,
    pub accel: Accel,
    pub memory: FileRecord,
    pub disks: Vec<FileRecord>,
    pub state: StateRecord,
    pub saved_at_unix: u64,
}

impl SnapshotManifest {
    /// What can be checked without the files, e.g. of a description a peer sent: files
    /// are plain names inside the folder, one record per disk of the spec, words QEMU
    /// reads are plain, sizes agree.
    pub fn check(&self) -> Result<(), String> {
        for name in
            std::iter::once(&self.memory.file).chain(self.disks.iter().map(|d| &d.file)).chain([&self.state.file])
        {
            if !plain_file_name(name) {
                return Err(format!("file name {name:?} is not a plain name inside the folder"));
            }
        }
        crate::spec::check_words(&self.spec)?;
        if self.spec.disks.len() != self.disks.len() {
            return Err(format!(
                "the spec has {} disks and the description {}",
                self.spec.disks.len(),
                self.disks.len()
            ));
        }
        if self.spec.memory_mib.checked_mul(1 << 20).is_none() {
            return Err(format!("{} MiB of memory is not a size", self.spec.memory_mib));
        }
        if self.memory.size != self.spec.memory_bytes() {
            return Err(format!(
                "memory file size {} does not match {} MiB of guest RAM",
                self.memory.size, self.spec.memory_mib
            ));
        }
        Ok(())
    }

    /// A VM described by someone else (a peer cloudlet) must be hardware this host builds
    /// itself (`allowed_machines`, QEMU's default CPU model) and fit what it allows:
    /// vCPUs, memory, disk sizes, raw disks only (a qcow2 header names files QEMU would
    /// open).
    pub fn check_fits(&self, host: &HostCapacity, allowed_machines: &[&str]) -> Result<(), String> {
        self.check()?;
        let s = &self.spec;
        if !allowed_machines.contains(&s.machine.as_str()) {
            return Err(format!(
                "machine type {:?} is not one this host runs ({})",
                s.machine,
                allowed_machines.join(", ")
            ));
        }
        if let Some(cpu) = &s.cpu_model {
            return Err(format!(
                "CPU model {cpu:?}: this host only runs QEMU's default CPU model for VMs it did not build"
            ));
        }
        if s.vcpus == 0 || s.vcpus > host.vcpus {
            return Err(format!("{} vCPUs: this host allows 1 to {}", s.vcpus, host.vcpus));
        }
        if self.memory.size > host.memory_bytes {
            return Err(format!(
                "{} MiB of memory: this host allows at most {} MiB",
                self.memory.size >> 20,
                host.memory_bytes >> 20
            ));
        }
        for (i, (d, rec)) in s.disks.iter().zip(&self.disks).enumerate() {
            if d.format != crate::spec::DiskFormat::Raw {
                return Err(format!("disk {i} is {:?}: only raw disks are taken from peers", d.format));
            }
            if rec.size > host.disk_bytes {
                return Err(format!(
                    "disk {i} of {} MiB: this host allows at most {} MiB",
                    rec.size >> 20,
                    host.disk_bytes >> 20
                ));
            }
        }
        if s.cdrom.as_ref().is_some_and(|cd| cd.medium.is_some()) {
            return Err("the CD drive holds a medium (a host file): saved VMs have an empty drive".into());
        }
        if let Some(b) = &s.boot {
            if b.cmdline.len() > 4096 || b.cmdline.chars().any(|c| c.is_control()) {
                return Err("the kernel command line is over 4 KiB or holds control characters".into());
            }
        }
        Ok(())
    }
}

/// What one VM may take of this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCapacity {
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

impl HostCapacity {
    /// This host: its cores, half its memory (at most 64 GiB), and disks of up to 256 GiB.
    pub fn detect() -> Self {
        let cores = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
        let total = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .map(|kib| kib << 10)
            .unwrap_or(4 << 30);
        Self { vcpus: cores, memory_bytes: (total / 2).min(64 << 30), disk_bytes: 256 << 30 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRecord {
    pub file: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateRecord {
    pub file: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{dir} is not a saved VM (no {MANIFEST_FILE}; an interrupted save leaves none)")]
    Missing { dir: PathBuf },
    #[error("{path}: unreadable snapshot description: {detail}")]
    BadManifest { path: PathBuf, detail: String },
    #[error("{path}: snapshot format {found} is newer than this forage understands ({SNAPSHOT_FORMAT})")]
    NewerFormat { path: PathBuf, found: u32 },
    #[error("{path}: missing")]
    FileMissing { path: PathBuf },
    #[error("{path}: size is {found} bytes, the snapshot says {expected} (truncated or replaced)")]
    WrongSize { path: PathBuf, found: u64, expected: u64 },
    #[error("{path}: not a QEMU device-state stream (bad header)")]
    NotAStateStream { path: PathBuf },
    #[error("{path}: checksum does not match the snapshot (corrupted or from another VM)")]
    StateChecksum { path: PathBuf },
    #[error("{dir}: saved VM hardware ({saved}) differs from the VM to restore into ({wanted})")]
    HardwareMismatch { dir: PathBuf, saved: String, wanted: String },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A validated snapshot folder.
#[derive(Debug, Clone)]
pub struct Snapshot {
    dir: PathBuf,
    manifest: SnapshotManifest,
}

impl Snapshot {
    /// Open and check a snapshot: description, format version, file sizes, and the
    /// device-state stream's header and checksum. Nothing is started.
    pub fn open(dir: &Path) -> Result<Self, SnapshotError> {
        let mpath = dir.join(MANIFEST_FILE);
        let text = match std::fs::read(&mpath) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SnapshotError::Missing { dir: dir.to_path_buf() })
            }
            Err(source) => return Err(SnapshotError::Io { path: mpath, source }),
        };
        let bad = |detail: String| SnapshotError::BadManifest { path: mpath.clone(), detail };
        let raw: serde_json::Value = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        if raw["kind"] != SNAPSHOT_KIND {
            return Err(bad(format!("kind is {}, expected {SNAPSHOT_KIND}", raw["kind"])));
        }
        let found = raw["format"].as_u64().unwrap_or(0) as u32;
        if found > SNAPSHOT_FORMAT {
            return Err(SnapshotError::NewerFormat { path: mpath, found });
        }
        let manifest: SnapshotManifest = serde_json::from_value(raw).map_err(|e| bad(e.to_string()))?;
        let snap = Self { dir: dir.to_path_buf(), manifest };
        snap.check_files()?;
        Ok(snap)
    }

    fn check_files(&self) -> Result<(), SnapshotError> {
        let m = &self.manifest;
        let bad = |detail: String| SnapshotError::BadManifest { path: self.dir.join(MANIFEST_FILE), detail };
        m.check().map_err(bad)?;
        for rec in std::iter::once(&m.memory).chain(&m.disks) {
            check_size(&self.dir.join(&rec.file), rec.size)?;
        }
        let state = self.state_path();
        check_size(&state, m.state.size)?;
        let io = |source| SnapshotError::Io { path: state.clone(), source };
        let mut file = std::fs::File::open(&state).map_err(io)?;
        let mut head = [0u8; 8];
        if file.read_exact(&mut head).is_err() || head != QEMU_STREAM_MAGIC {
            return Err(SnapshotError::NotAStateStream { path: state });
        }
        let mut hasher = Sha256::new_with_prefix(head);
        std::io::copy(&mut file, &mut hasher).map_err(io)?;
        if hex::encode(hasher.finalize()) != m.state.sha256 {
            return Err(SnapshotError::StateChecksum { path: state });
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &SnapshotManifest {
        &self.manifest
    }

    pub fn memory_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.memory.file)
    }

    pub fn disk_paths(&self) -> Vec<PathBuf> {
        self.manifest.disks.iter().map(|d| self.dir.join(&d.file)).collect()
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.state.file)
    }

    /// The saved VM's spec moved to a new run: memory and disks in `run_dir`, the given
    /// QMP socket (the control and guest-agent sockets beside it: `.ctl`, `.qga`), and
    /// host ports re-chosen by the caller (`forwards`, same guest ports).
    pub fn relocated_spec(&self, run_dir: &Path, qmp_socket: &Path, forwards: Option<Vec<PortForward>>) -> VmSpec {
        let mut spec = self.manifest.spec.clone();
        spec.memory_file = run_dir.join(MEMORY_FILE);
        for (i, disk) in spec.disks.iter_mut().enumerate() {
            disk.path = run_dir.join(format!("disk{i}.raw"));
        }
        spec.serial_log = run_dir.join("serial.log");
        spec.serial_socket = None;
        if let Some(cd) = spec.cdrom.as_mut() {
            cd.medium = None;
        }
        spec.qmp_socket = qmp_socket.to_path_buf();
        spec.control_socket = Some(qmp_socket.with_extension("ctl"));
        if let Some(ga) = spec.guest_agent.as_mut() {
            ga.socket = qmp_socket.with_extension("qga");
        }
        if let (Some(nic), Some(fw)) = (spec.nic.as_mut(), forwards) {
            nic.forwards = fw;
        }
        spec
    }

    /// Replace disk `i` with the raw image `raw` (moved into the folder), e.g. a qcow2
    /// layer flattened with `qemu-img convert`; the description is rewritten.
    pub fn replace_disk_with_raw(&mut self, i: usize, raw: &Path) -> Result<(), SnapshotError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SnapshotError::Io { path, source }
        };
        let name = format!("disk{i}.raw");
        let target = self.dir.join(&name);
        let old = self.dir.join(&self.manifest.disks[i].file);
        std::fs::rename(raw, &target).map_err(io(raw))?;
        if old != target {
            let _ = std::fs::remove_file(&old);
        }
        let size = std::fs::metadata(&target).map_err(io(&target))?.len();
        self.manifest.disks[i] = FileRecord { file: name, size };
        self.manifest.spec.disks[i].format = crate::spec::DiskFormat::Raw;
        self.manifest.spec.disks[i].path = target.clone();
        self.write_manifest()
    }

    /// The saved VM had `vcpus` (some plugged in after its start, which its spec does
    /// not say): a restore starts it with them all (`-smp VCPUS,maxcpus=...`), so that
    /// each vCPU's saved state has a vCPU to go to, and its virtio-blk devices keep the
    /// queues they started with. The description is rewritten.
    pub fn set_vcpus(&mut self, vcpus: u32) -> Result<(), SnapshotError> {
        let spec = &mut self.manifest.spec;
        spec.virtio_blk_queues.get_or_insert(spec.vcpus);
        spec.vcpus = vcpus;
        self.manifest.hardware_fingerprint = spec.hardware_fingerprint();
        self.write_manifest()
    }

    /// Boot files of the saved VM (direct kernel boot), e.g. the local copy of its image.
    pub fn set_direct_boot(&mut self, kernel: PathBuf, initrd: PathBuf) -> Result<(), SnapshotError> {
        if let Some(boot) = self.manifest.spec.boot.as_mut() {
            boot.kernel = kernel;
            boot.initrd = initrd;
            self.write_manifest()?;
        }
        Ok(())
    }

    fn write_manifest(&self) -> Result<(), SnapshotError> {
        let tmp = self.dir.join(format!("{MANIFEST_FILE}.tmp"));
        let io = |source| SnapshotError::Io { path: tmp.clone(), source };
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.manifest).expect("serializes")).map_err(io)?;
        std::fs::rename(&tmp, self.dir.join(MANIFEST_FILE)).map_err(io)
    }

    /// Refuse to restore into hardware different from what was saved.
    pub fn check_hardware(&self, spec: &VmSpec) -> Result<(), SnapshotError> {
        let wanted = spec.hardware_fingerprint();
        if wanted != self.manifest.hardware_fingerprint {
            return Err(SnapshotError::HardwareMismatch {
                dir: self.dir.clone(),
                saved: describe(&self.manifest.spec),
                wanted: describe(spec),
            });
        }
        Ok(())
    }
}

fn plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

fn describe(spec: &VmSpec) -> String {
    format!("{} {} vCPU {} MiB, {} disk(s)", spec.machine, spec.vcpus, spec.memory_mib, spec.disks.len())
}

fn check_size(path: &Path, expected: u64) -> Result<(), SnapshotError> {
    match std::fs::metadata(path) {
        Ok(m) if m.len() == expected => Ok(()),
        Ok(m) => Err(SnapshotError::WrongSize { path: path.to_path_buf(), found: m.len(), expected }),
        Err(_) => Err(SnapshotError::FileMissing { path: path.to_path_buf() }),
    }
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}
