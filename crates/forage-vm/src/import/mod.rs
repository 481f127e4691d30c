//! Import a VM saved by plain QEMU (`migrate "exec:cat > FILE"`, guest RAM inside the
//! stream) or by `virsh save` (libvirt's header, then the same stream), plus its disk,
//! as a forage snapshot (`docs/vm-snapshot.md`, `docs/import-saved-vm.md`).
//!
//! ```text
//! import_saved(FILE, DISK, target spec)
//!   1. FILE's first bytes: "QEVM" -> stream at 0; "LibvirtQemudSave" -> header decoded,
//!      stream at 92 + data_len; anything else refused (byte 0, the magic found)
//!   2. DISK copied (raw, holes kept) or converted (qcow2, `qemu-img convert`)
//!   3. the target spec started, stopped, saved: its machine, RAM blocks, devices
//!   4. one pass over the stream (convert.rs): RAM -> memory.raw, the rest -> state
//!   5. snapshot.json; the folder, built as OUT.partial, renamed to OUT
//! ```
//! Any refusal names the byte offset in FILE and the reason, and leaves nothing behind.

pub mod convert;
mod error;
pub mod libvirt;
pub mod reference;

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use forage_migstream::{Event, Parser};

use crate::accel::Accel;
use crate::snapshot::{
    sha256_file, FileRecord, Snapshot, SnapshotManifest, StateRecord, MANIFEST_FILE, MEMORY_FILE, SNAPSHOT_FORMAT,
    SNAPSHOT_KIND, STATE_FILE,
};
use crate::spec::{DiskFormat, VmSpec};

pub use convert::Converted;
pub use error::ImportError;
pub use libvirt::{LibvirtHeader, LibvirtHeaderError};

/// How the saved file is wrapped.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SavedFormat {
    /// A bare QEMU stream (`migrate exec:cat > FILE`).
    Qemu,
    /// `virsh save`: libvirt's header, the domain XML, then the stream.
    Libvirt { was_running: bool },
}

/// The saved file's wrapping and where its QEMU stream starts.
pub fn sniff(file: &Path) -> Result<(SavedFormat, u64), ImportError> {
    let mut f = std::fs::File::open(file).map_err(ImportError::io(file))?;
    let file_len = f.metadata().map_err(ImportError::io(file))?.len();
    let mut head = Vec::with_capacity(libvirt::HEADER_LEN);
    (&mut f).take(libvirt::HEADER_LEN as u64).read_to_end(&mut head).map_err(ImportError::io(file))?;
    if head.starts_with(&forage_migstream::FILE_MAGIC.to_be_bytes()) {
        return Ok((SavedFormat::Qemu, 0));
    }
    if libvirt::is_libvirt(&head) {
        let h = libvirt::decode(&head)?;
        if h.stream_offset() >= file_len {
            return Err(ImportError::LibvirtData { offset: 20, data_len: h.data_len, file_len });
        }
        return Ok((SavedFormat::Libvirt { was_running: h.was_running }, h.stream_offset()));
    }
    let shown = &head[..head.len().min(16)];
    let found = if shown.is_empty() { "an empty file".to_string() } else { format!("{}", shown.escape_ascii()) };
    Err(ImportError::Foreign { found })
}

/// The size of the guest RAM a saved stream announces (read up to its MEM_SIZE record).
pub fn saved_ram_bytes(file: &Path) -> Result<u64, ImportError> {
    let (_, start) = sniff(file)?;
    let mut f = std::fs::File::open(file).map_err(ImportError::io(file))?;
    f.seek(SeekFrom::Start(start)).map_err(ImportError::io(file))?;
    let mut p = Parser::new(std::io::BufReader::new(f));
    loop {
        let at = p.offset();
        match p.next_event().map_err(|source| ImportError::Stream { offset: start + source.offset(), source })? {
            Some(Event::RamBlocks { blocks, .. }) => {
                return blocks
                    .iter()
                    .find(|b| convert::MAIN_RAM_NAMES.contains(&&*b.name))
                    .map(|b| b.used_length)
                    .ok_or(ImportError::Refused {
                        offset: start + at,
                        reason: "no guest RAM block (pc.ram or ram0)".into(),
                    })
            }
            Some(_) => {}
            None => {
                return Err(ImportError::Refused {
                    offset: start + p.offset(),
                    reason: "no RAM section in the stream".into(),
                })
            }
        }
    }
}

/// What to import.
#[derive(Debug, Clone)]
pub struct ImportRequest {
    /// The saved VM: a QEMU stream or a `virsh save` file.
    pub saved: PathBuf,
    /// Its disk, raw or qcow2.
    pub disk: PathBuf,
    /// The hardware it runs on here (one disk; memory the size of the saved RAM).
    pub target: VmSpec,
    pub accel: Accel,
    /// The snapshot folder to create.
    pub out: PathBuf,
    /// A QMP socket path for the reference start (at most 107 bytes).
    pub qmp_socket: PathBuf,
}

/// What an import did.
#[derive(Debug)]
pub struct ImportReport {
    pub format: SavedFormat,
    pub stream_offset: u64,
    pub converted: Converted,
    pub snapshot: Snapshot,
    pub took: std::time::Duration,
}

/// Import a saved VM as a snapshot folder (see the module doc).
pub async fn import_saved(req: &ImportRequest) -> Result<ImportReport, ImportError> {
    let t = Instant::now();
    if req.out.exists() {
        return Err(ImportError::Exists { dir: req.out.clone() });
    }
    if req.target.disks.len() != 1 {
        return Err(ImportError::Refused { offset: 0, reason: "the target VM must have exactly one disk".into() });
    }
    let (format, start) = sniff(&req.saved)?;
    let partial = req.out.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(ImportError::io(&partial))?;
    let r = build(req, &partial, start).await;
    let _ = std::fs::remove_dir_all(partial.join("reference"));
    match r {
        Ok(converted) => {
            std::fs::rename(&partial, &req.out).map_err(ImportError::io(&req.out))?;
            let snapshot = Snapshot::open(&req.out)?;
            Ok(ImportReport { format, stream_offset: start, converted, snapshot, took: t.elapsed() })
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            Err(e)
        }
    }
}

async fn build(req: &ImportRequest, dir: &Path, start: u64) -> Result<Converted, ImportError> {
    let disk = dir.join("disk0.raw");
    import_disk(&req.disk, &disk).await?;
    let mut spec = req.target.clone();
    spec.memory_file = req.out.join(MEMORY_FILE);
    spec.disks[0].path = disk.clone();
    spec.disks[0].format = DiskFormat::Raw;
    let reference = reference::capture(&spec, req.accel, &dir.join("reference"), &req.qmp_socket).await?;
    let (saved, ram_bytes) = (req.saved.clone(), spec.memory_bytes());
    let (memory, state) = (dir.join(MEMORY_FILE), dir.join(STATE_FILE));
    let (m2, s2) = (memory.clone(), state.clone());
    let converted = tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(&saved).map_err(ImportError::io(&saved))?;
        f.seek(SeekFrom::Start(start)).map_err(ImportError::io(&saved))?;
        convert::convert(std::io::BufReader::with_capacity(1 << 20, f), start, &reference, ram_bytes, &m2, &s2)
    })
    .await
    .map_err(|e| ImportError::Io { path: req.saved.clone(), source: std::io::Error::other(e.to_string()) })??;
    spec.disks[0].path = req.out.join("disk0.raw");
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).map_err(ImportError::io(p));
    let manifest = SnapshotManifest {
        kind: SNAPSHOT_KIND.into(),
        format: SNAPSHOT_FORMAT,
        hardware_fingerprint: spec.hardware_fingerprint(),
        accel: req.accel,
        memory: FileRecord { file: MEMORY_FILE.into(), size: size(&memory)? },
        disks: vec![FileRecord { file: "disk0.raw".into(), size: size(&disk)? }],
        state: StateRecord {
            file: STATE_FILE.into(),
            size: size(&state)?,
            sha256: sha256_file(&state).map_err(ImportError::io(&state))?,
        },
        saved_at_unix: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        spec,
    };
    let path = dir.join(MANIFEST_FILE);
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).expect("serializes")).map_err(ImportError::io(&path))?;
    Ok(converted)
}

/// A raw disk is copied with its holes; a qcow2 disk (magic `QFI\xfb`) is flattened by
/// `qemu-img convert` (its backing files, if any, are read by qemu-img).
async fn import_disk(from: &Path, to: &Path) -> Result<(), ImportError> {
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(from).map_err(ImportError::io(from))?;
    let n = f.read(&mut magic).map_err(ImportError::io(from))?;
    if n == 4 && &magic == b"QFI\xfb" {
        let out = tokio::process::Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(from)
            .arg(to)
            .output()
            .await
            .map_err(ImportError::io(Path::new("qemu-img")))?;
        if !out.status.success() {
            return Err(ImportError::Disk {
                path: from.to_path_buf(),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        return Ok(());
    }
    crate::sparse::copy_sparse(from, to).map_err(ImportError::io(from))?;
    Ok(())
}
