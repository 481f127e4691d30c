//! Base VMs: a guest image booted, settled and saved, with a hash index of its chunks and a
//! digest that names it everywhere. Folder `DATA/bases/NAME/`:
//! `base.json`, `snapshot/` (a forage-vm snapshot), `index.bin` (see `index.rs`).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use forage_datadir::DataDir;
use forage_image::{GuestImage, RunPaths};
use forage_vm::cpu::CpuNeeds;
use forage_vm::{Accel, Snapshot};
use serde::{Deserialize, Serialize};

use crate::index::ChunkIndex;
use crate::SynthError;

pub const BASE_KIND: &str = "forage-base";
/// 2: `cpu` recorded. Format 1 bases (without it) are read, their needs taken from the
/// snapshot's description. 3: `disk_introspection` off (a base whose manifest has it on
/// is written as format 2, which older forage reads).
pub const BASE_FORMAT: u32 = 3;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BaseManifest {
    pub kind: String,
    pub format: u32,
    pub name: String,
    pub digest: String,
    pub image: String,
    pub created_unix: u64,
    pub memory_size: u64,
    pub disk_size: u64,
    pub indexed_chunks: u64,
    /// The CPU model and accelerator VMs of this base (and its overlays) need.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuNeeds>,
    /// Whether overlays of this base may read the ext4 structures of their disks (the
    /// semantic gap). Off for a base made from a foreign disk whose guest has no
    /// qemu-guest-agent: nothing can freeze its file systems, and stale bitmaps could
    /// drop live data.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub disk_introspection: bool,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

#[derive(Debug, Clone)]
pub struct BaseVm {
    dir: PathBuf,
    manifest: BaseManifest,
    snapshot: Snapshot,
}

impl BaseVm {
    pub fn open(data: &DataDir, name: &str) -> Result<Self, SynthError> {
        let dir = data.base(name)?;
        Self::open_dir(&dir).map_err(|e| match e {
            SynthError::Io { .. } if !dir.join("base.json").exists() => SynthError::NoBase { name: name.to_string() },
            e => e,
        })
    }

    fn open_dir(dir: &Path) -> Result<Self, SynthError> {
        let path = dir.join("base.json");
        let text = std::fs::read(&path).map_err(|source| SynthError::Io { path: path.clone(), source })?;
        let manifest: BaseManifest = serde_json::from_slice(&text)
            .map_err(|e| SynthError::BadFile { path: path.clone(), detail: e.to_string() })?;
        if manifest.kind != BASE_KIND || manifest.format > BASE_FORMAT {
            return Err(SynthError::BadFile {
                path,
                detail: format!("{} format {} is not a base this forage reads", manifest.kind, manifest.format),
            });
        }
        let snapshot = Snapshot::open(&dir.join("snapshot"))?;
        let m = snapshot.manifest();
        if manifest.cpu.as_ref().is_some_and(|c| *c != CpuNeeds::of(&m.spec, m.accel)) {
            return Err(SynthError::BadFile {
                path,
                detail: "its CPU record differs from its snapshot's CPU model and accelerator".into(),
            });
        }
        Ok(Self { dir: dir.to_path_buf(), manifest, snapshot })
    }

    /// All bases in the data directory (broken ones as errors).
    pub fn list(data: &DataDir) -> Vec<(String, Result<Self, SynthError>)> {
        let mut out = Vec::new();
        if let Ok(entries) = std::fs::read_dir(data.bases()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !name.starts_with('.') {
                    out.push((name.clone(), Self::open(data, &name)));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Boot `image`, let it settle (free pages get reported and punched out), save it, index it.
    pub async fn create(
        data: &DataDir,
        name: &str,
        image: &GuestImage,
        accel: Accel,
        settle: Duration,
    ) -> Result<Self, SynthError> {
        let final_dir = data.base(name)?;
        if final_dir.exists() {
            return Err(SynthError::Exists { what: format!("base {name}"), path: final_dir });
        }
        let work = data.bases().join(format!(".{name}.partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        let result = async {
            let run =
                RunPaths { dir: work.join("run"), qmp_socket: data.runtime_dir()?.join(format!("base-{name}.qmp")) };
            let ready = image.boot(&format!("base-{name}"), &run, &[], accel, Duration::from_secs(180)).await?;
            tokio::time::sleep(settle).await;
            let vm = ready.vm;
            let snapshot = vm.save(&work.join("snapshot")).await?;
            drop(vm);
            let _ = std::fs::remove_dir_all(&run.dir);
            let index = finish(&work, name, &image.manifest().name, &snapshot, true)?;
            Ok::<_, SynthError>(index)
        }
        .await;
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&work);
            return Err(e);
        }
        std::fs::rename(&work, &final_dir).map_err(|source| SynthError::Io { path: final_dir.clone(), source })?;
        Self::open(data, name)
    }

    /// A saved VM (imported, or prepared by hand) becomes base `name`: its snapshot copied
    /// (holes kept; a qcow2 layer flattened to raw, so the base names no other file) and
    /// indexed. `label` is recorded as the base's image.
    pub fn from_saved(data: &DataDir, name: &str, label: &str, saved: &Snapshot) -> Result<Self, SynthError> {
        let final_dir = data.base(name)?;
        if final_dir.exists() {
            return Err(SynthError::Exists { what: format!("base {name}"), path: final_dir });
        }
        let work = data.bases().join(format!(".{name}.partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        let result = (|| {
            let dir = work.join("snapshot");
            let io = |path: &Path| {
                let path = path.to_path_buf();
                move |source| SynthError::Io { path, source }
            };
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            let mut files = vec![saved.memory_path(), saved.state_path()];
            files.extend(saved.disk_paths());
            files.push(saved.dir().join(forage_vm::snapshot::MANIFEST_FILE));
            for from in &files {
                let to = dir.join(from.file_name().expect("a file"));
                forage_vm::sparse::copy_sparse(from, &to).map_err(io(from))?;
            }
            let mut snapshot = Snapshot::open(&dir)?;
            if snapshot.manifest().spec.disks.first().is_some_and(|d| d.format == forage_vm::DiskFormat::Qcow2) {
                let layer = snapshot.disk_paths()[0].clone();
                let flat = work.join("disk0.raw");
                crate::run_tool(
                    std::process::Command::new("qemu-img")
                        .args(["convert", "-q", "-f", "qcow2", "-O", "raw"])
                        .arg(&layer)
                        .arg(&flat),
                )?;
                snapshot.replace_disk_with_raw(0, &flat)?;
            }
            finish(&work, name, label, &Snapshot::open(&dir)?, true)
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&work);
            return Err(e);
        }
        std::fs::rename(&work, &final_dir).map_err(|source| SynthError::Io { path: final_dir.clone(), source })?;
        Self::open(data, name)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &BaseManifest {
        &self.manifest
    }

    pub fn digest(&self) -> &str {
        &self.manifest.digest
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The CPU model and accelerator this base's VMs need (a format 1 base's, from its
    /// snapshot: the same facts).
    pub fn cpu_needs(&self) -> CpuNeeds {
        self.manifest.cpu.clone().unwrap_or_else(|| {
            let m = self.snapshot.manifest();
            CpuNeeds::of(&m.spec, m.accel)
        })
    }

    pub fn memory_path(&self) -> PathBuf {
        self.snapshot.memory_path()
    }

    pub fn disk_path(&self) -> PathBuf {
        self.snapshot.disk_paths()[0].clone()
    }

    /// The Debian packages overlays on this base may name: those of the data folder the
    /// base is in (DATA/packages beside DATA/bases/NAME).
    pub fn packages(&self) -> crate::deb_volume::PackageStore {
        let data = self.dir.parent().and_then(Path::parent).unwrap_or(&self.dir);
        crate::deb_volume::PackageStore::open(&forage_datadir::DataDir::at(data))
    }

    pub fn index(&self) -> Result<ChunkIndex, SynthError> {
        let p = self.dir.join("index.bin");
        ChunkIndex::load(&p).map_err(|source| SynthError::Io { path: p, source })
    }

    pub fn remove(data: &DataDir, name: &str) -> Result<(), SynthError> {
        let dir = data.base(name)?;
        if !dir.join("base.json").exists() {
            return Err(SynthError::NoBase { name: name.to_string() });
        }
        std::fs::remove_dir_all(&dir).map_err(|source| SynthError::Io { path: dir, source })
    }
}

/// Index a saved base in `dir` (its `snapshot/`) and write its `base.json`.
pub fn finish(
    dir: &Path,
    name: &str,
    image: &str,
    snapshot: &Snapshot,
    disk_introspection: bool,
) -> Result<BaseManifest, SynthError> {
    let m = snapshot.manifest();
    if m.disks.len() != 1 {
        return Err(SynthError::BadFile {
            path: snapshot.dir().to_path_buf(),
            detail: format!("a base has exactly one disk, this one has {}", m.disks.len()),
        });
    }
    let io = |path: PathBuf| move |source| SynthError::Io { path, source };
    let (index, digest) = ChunkIndex::build(&snapshot.memory_path(), &snapshot.disk_paths()[0], &m.state.sha256)
        .map_err(io(snapshot.dir().to_path_buf()))?;
    let ipath = dir.join("index.bin");
    index.save(&ipath).map_err(io(ipath.clone()))?;
    let manifest = BaseManifest {
        kind: BASE_KIND.into(),
        format: if disk_introspection { 2 } else { BASE_FORMAT },
        name: name.into(),
        digest,
        image: image.into(),
        created_unix: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        memory_size: m.memory.size,
        disk_size: m.disks[0].size,
        indexed_chunks: index.len() as u64,
        cpu: Some(CpuNeeds::of(&m.spec, m.accel)),
        disk_introspection,
    };
    let p = dir.join("base.json");
    std::fs::write(&p, serde_json::to_vec_pretty(&manifest).expect("serializes")).map_err(io(p.clone()))?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn introspection_is_on_unless_recorded_off() {
        let m = serde_json::json!({
            "kind": BASE_KIND, "format": 2, "name": "b", "digest": "d", "image": "tiny",
            "created_unix": 1, "memory_size": 4096, "disk_size": 4096, "indexed_chunks": 1,
        });
        let mut base: BaseManifest = serde_json::from_value(m).unwrap();
        assert!(base.disk_introspection, "bases written before the field existed");
        assert!(serde_json::to_value(&base).unwrap().get("disk_introspection").is_none());
        base.disk_introspection = false;
        let v = serde_json::to_value(&base).unwrap();
        assert_eq!(v["disk_introspection"], false);
        assert!(!serde_json::from_value::<BaseManifest>(v).unwrap().disk_introspection);
    }
}
