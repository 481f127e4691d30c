//! The substrate pool: substrate files held in host memory (a tmpfs folder, `/dev/shm`)
//! within a memory budget; the least recently used ones are spilled to the data folder on
//! disk and read back into memory when used.
//!
//! Layout: `DATA/substrates/pool.json` (budget, last use of each substrate),
//! `DATA/substrates/spill/NAME.substrate` (spilled), `MEM/NAME.substrate` (in memory),
//! `DATA/substrates/disks/NAME/` (a substrate's base disk, decoded on first activation:
//! the read-only backing file of every activation's copy-on-write disk). A substrate is in
//! exactly one of MEM and spill; its file is written under a temporary name and renamed.
//!
//! Temporary files (a substrate being docked, received, copied, reloaded or spilled; a
//! docking VM's memory) are hidden and end in the writer's process id: `.WHAT.PID`.
//! Opening a pool removes those whose process is gone (a dock or a receive killed
//! half-way), so that what they held in host memory comes back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use forage_datadir::DataDir;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::format::plain_name;

pub const EXT: &str = "substrate";
/// Budget when none was set: 1 GiB.
pub const DEFAULT_BUDGET: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("{0:?} is not a substrate name (letters, digits, '-', '_', '.'; at most 64)")]
    BadName(String),
    #[error("no substrate {0} in the pool")]
    NotFound(String),
    #[error("substrate {0} already exists; remove it first: forage substrate rm {0}")]
    Exists(String),
    #[error("{path}: unreadable pool index")]
    Index {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PoolError {
    let path = path.to_path_buf();
    move |source| PoolError::Io { path, source }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Index {
    budget_bytes: Option<u64>,
    #[serde(default)]
    last_used_ms: BTreeMap<String, u64>,
}

/// Why a substrate could not be described ([`Pool::describe`]).
#[derive(Debug, thiserror::Error)]
pub enum DescribeError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("substrate {name} has an unreadable manifest")]
    Manifest {
        name: String,
        #[source]
        source: crate::format::DecodeError,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Memory,
    Disk,
}

/// One substrate as the pool sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolEntry {
    pub name: String,
    pub bytes: u64,
    pub tier: Tier,
    pub last_used_unix_ms: u64,
    pub path: PathBuf,
}

/// A pool's totals, for `list --json`, the API and metrics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolSummary {
    pub budget_bytes: u64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub memory_dir: PathBuf,
    pub substrates: Vec<PoolEntry>,
}

#[derive(Debug, Clone)]
pub struct Pool {
    root: PathBuf,
    memory: PathBuf,
}

impl Pool {
    /// The pool of a data folder: its memory tier is `/dev/shm/forage-substrates-HASH`
    /// (HASH of the data folder's path, so that two data folders never share one), or
    /// `DATA/substrates/memory` where there is no `/dev/shm`.
    pub fn open(data: &DataDir) -> Result<Self, PoolError> {
        let root = data.root().join("substrates");
        let shm = Path::new("/dev/shm");
        let memory = if shm.is_dir() {
            let h = hex::encode(Sha256::digest(data.root().as_os_str().as_encoded_bytes()));
            shm.join(format!("forage-substrates-{}", &h[..12]))
        } else {
            root.join("memory")
        };
        Self::at(root, memory)
    }

    pub fn at(root: PathBuf, memory: PathBuf) -> Result<Self, PoolError> {
        for d in [root.join("spill"), root.join("disks"), memory.clone()] {
            std::fs::create_dir_all(&d).map_err(io(&d))?;
        }
        let pool = Self { root, memory };
        pool.sweep();
        Ok(pool)
    }

    /// A hidden temporary file of this process in `dir`: `.WHAT.PID`.
    fn temp(dir: &Path, what: &str) -> PathBuf {
        dir.join(format!(".{what}.{}", std::process::id()))
    }

    /// A temporary file of this process in the memory tier (e.g. a substrate being
    /// received): swept once this process is gone.
    pub fn temp_file(&self, what: &str) -> PathBuf {
        Self::temp(&self.memory, what)
    }

    /// Remove temporary files whose writer is gone. Best effort: a file that cannot be
    /// removed stays for the next open.
    fn sweep(&self) {
        for dir in [&self.memory, &self.root.join("spill")] {
            let Ok(entries) = std::fs::read_dir(dir) else { continue };
            for e in entries.flatten() {
                let file = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = temp_owner(&file) {
                    if forage_datadir::process_gone(pid) && std::fs::remove_file(e.path()).is_ok() {
                        tracing::info!(file = %e.path().display(), pid, "removed a pool file its process left behind");
                    }
                }
            }
        }
    }

    pub fn memory_dir(&self) -> &Path {
        &self.memory
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("pool.json")
    }

    fn load_index(&self) -> Result<Index, PoolError> {
        let p = self.index_path();
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|source| PoolError::Index { path: p, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Index::default()),
            Err(e) => Err(io(&p)(e)),
        }
    }

    fn store_index(&self, idx: &Index) -> Result<(), PoolError> {
        let p = self.index_path();
        let tmp = p.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(idx).expect("serializes")).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &p).map_err(io(&p))
    }

    fn check(name: &str) -> Result<(), PoolError> {
        if plain_name(name) {
            Ok(())
        } else {
            Err(PoolError::BadName(name.to_string()))
        }
    }

    fn in_memory(&self, name: &str) -> PathBuf {
        self.memory.join(format!("{name}.{EXT}"))
    }

    fn spilled(&self, name: &str) -> PathBuf {
        self.root.join("spill").join(format!("{name}.{EXT}"))
    }

    /// A substrate's decoded folder: base disks, memory and device state
    /// ([`crate::decoded`]).
    pub fn disks_dir(&self, name: &str) -> Result<PathBuf, PoolError> {
        Self::check(name)?;
        Ok(self.root.join("disks").join(name))
    }

    /// A name for a file that will become substrate `name` (same file system as the
    /// memory tier, so [`insert`](Self::insert) is a rename).
    pub fn staging(&self, name: &str) -> Result<PathBuf, PoolError> {
        Self::check(name)?;
        if self.find(name).is_some() {
            return Err(PoolError::Exists(name.into()));
        }
        Ok(Self::temp(&self.memory, &format!("{name}.{EXT}")))
    }

    /// Where a VM being docked as substrate `name` keeps its guest memory: in host memory
    /// beside the pool (tmpfs), so the holes the balloon and free page reporting punch
    /// in it are cheap (on the data folder's disk each 4 KiB page handed to the balloon
    /// was an ext4 change: a 1 GiB Debian VM's shrink took 9.2 s there, 4.1 s here). The
    /// save moves its used pages to the data folder.
    pub fn dock_memory(&self, name: &str) -> Result<PathBuf, PoolError> {
        Self::check(name)?;
        Ok(Self::temp(&self.memory, &format!("dock-{name}.memory")))
    }

    fn find(&self, name: &str) -> Option<(PathBuf, Tier)> {
        let m = self.in_memory(name);
        if m.is_file() {
            return Some((m, Tier::Memory));
        }
        let d = self.spilled(name);
        d.is_file().then_some((d, Tier::Disk))
    }

    pub fn budget(&self) -> Result<u64, PoolError> {
        Ok(self.load_index()?.budget_bytes.unwrap_or(DEFAULT_BUDGET))
    }

    /// Set the memory budget and spill what no longer fits.
    pub fn set_budget(&self, bytes: u64) -> Result<Vec<String>, PoolError> {
        let mut idx = self.load_index()?;
        idx.budget_bytes = Some(bytes);
        self.store_index(&idx)?;
        self.enforce(None)
    }

    /// Take `file` (a verified substrate, e.g. from [`staging`](Self::staging)) into the
    /// memory tier as `name`. Returns the names spilled to make room.
    pub fn insert(&self, name: &str, file: &Path) -> Result<Vec<String>, PoolError> {
        Self::check(name)?;
        if self.find(name).is_some() {
            return Err(PoolError::Exists(name.into()));
        }
        let target = self.in_memory(name);
        if std::fs::rename(file, &target).is_err() {
            // Another file system: copy, then rename within the tier.
            let tmp = Self::temp(&self.memory, &format!("{name}.{EXT}.copy"));
            std::fs::copy(file, &tmp).map_err(io(file))?;
            std::fs::rename(&tmp, &target).map_err(io(&target))?;
            let _ = std::fs::remove_file(file);
        }
        self.touch(name)?;
        self.enforce(Some(name))
    }

    /// The file of substrate `name`, read back into memory if it was spilled (spilling
    /// others if needed), and marked as just used.
    pub fn get(&self, name: &str) -> Result<(PathBuf, Vec<String>), PoolError> {
        Self::check(name)?;
        let (path, tier) = self.find(name).ok_or_else(|| PoolError::NotFound(name.into()))?;
        let path = match tier {
            Tier::Memory => path,
            Tier::Disk => {
                let target = self.in_memory(name);
                let tmp = Self::temp(&self.memory, &format!("{name}.{EXT}.reload"));
                std::fs::copy(&path, &tmp).map_err(io(&path))?;
                std::fs::rename(&tmp, &target).map_err(io(&target))?;
                std::fs::remove_file(&path).map_err(io(&path))?;
                target
            }
        };
        self.touch(name)?;
        let spilled = self.enforce(Some(name))?;
        Ok((path, spilled))
    }

    fn touch(&self, name: &str) -> Result<(), PoolError> {
        let mut idx = self.load_index()?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        // Strictly increasing, so that two uses within one millisecond keep their order.
        let newest = idx.last_used_ms.values().copied().max().unwrap_or(0);
        idx.last_used_ms.insert(name.to_string(), now.max(newest + 1));
        self.store_index(&idx)
    }

    /// Spill least recently used substrates (never `keep`) until the memory tier fits the
    /// budget. Returns what was spilled, oldest first.
    fn enforce(&self, keep: Option<&str>) -> Result<Vec<String>, PoolError> {
        let summary = self.summary()?;
        let mut used = summary.memory_bytes;
        let mut resident: Vec<&PoolEntry> = summary.substrates.iter().filter(|e| e.tier == Tier::Memory).collect();
        resident.sort_by_key(|e| e.last_used_unix_ms);
        let mut spilled = Vec::new();
        for e in resident {
            if used <= summary.budget_bytes {
                break;
            }
            if Some(e.name.as_str()) == keep {
                continue;
            }
            let target = self.spilled(&e.name);
            let tmp = Self::temp(&self.root.join("spill"), &format!("{}.{EXT}.spilling", e.name));
            std::fs::copy(&e.path, &tmp).map_err(io(&e.path))?;
            std::fs::rename(&tmp, &target).map_err(io(&target))?;
            std::fs::remove_file(&e.path).map_err(io(&e.path))?;
            used -= e.bytes;
            spilled.push(e.name.clone());
        }
        Ok(spilled)
    }

    pub fn entry(&self, name: &str) -> Result<PoolEntry, PoolError> {
        Self::check(name)?;
        self.summary()?.substrates.into_iter().find(|e| e.name == name).ok_or_else(|| PoolError::NotFound(name.into()))
    }

    /// Substrate `name` and its manifest (header and manifest read, not the whole file:
    /// that is verified when it enters the pool and when it is activated). Unlike
    /// [`get`](Self::get), it neither reads a spilled substrate back nor counts as a use.
    pub fn describe(&self, name: &str) -> Result<(PoolEntry, crate::SubstrateManifest), DescribeError> {
        let entry = self.entry(name)?;
        let manifest = crate::format::read_manifest(&entry.path)
            .map_err(|source| DescribeError::Manifest { name: name.into(), source })?;
        Ok((entry, manifest))
    }

    pub fn summary(&self) -> Result<PoolSummary, PoolError> {
        let idx = self.load_index()?;
        let mut substrates = Vec::new();
        for (dir, tier) in [(self.memory.clone(), Tier::Memory), (self.root.join("spill"), Tier::Disk)] {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for e in entries.flatten() {
                let file = e.file_name().to_string_lossy().into_owned();
                let Some(name) = file.strip_suffix(&format!(".{EXT}")) else { continue };
                if !plain_name(name) || name.starts_with('.') {
                    continue;
                }
                let bytes = e.metadata().map(|m| m.len()).unwrap_or(0);
                let last = idx.last_used_ms.get(name).copied().unwrap_or(0);
                substrates.push(PoolEntry { name: name.into(), bytes, tier, last_used_unix_ms: last, path: e.path() });
            }
        }
        substrates.sort_by(|a, b| a.name.cmp(&b.name));
        let sum = |t: Tier| substrates.iter().filter(|e| e.tier == t).map(|e| e.bytes).sum();
        Ok(PoolSummary {
            budget_bytes: idx.budget_bytes.unwrap_or(DEFAULT_BUDGET),
            memory_bytes: sum(Tier::Memory),
            disk_bytes: sum(Tier::Disk),
            memory_dir: self.memory.clone(),
            substrates,
        })
    }

    /// Remove a substrate and its base disks. Running activations keep their own memory
    /// and copy-on-write layer but need the base disk: the caller checks none runs.
    pub fn remove(&self, name: &str) -> Result<(), PoolError> {
        let (path, _) = self.find(name).ok_or_else(|| PoolError::NotFound(name.into()))?;
        std::fs::remove_file(&path).map_err(io(&path))?;
        let disks = self.disks_dir(name)?;
        if disks.exists() {
            std::fs::remove_dir_all(&disks).map_err(io(&disks))?;
        }
        let mut idx = self.load_index()?;
        idx.last_used_ms.remove(name);
        self.store_index(&idx)
    }
}

/// The process id a temporary pool file ends in (`.WHAT.PID`), if it is one.
fn temp_owner(file: &str) -> Option<u32> {
    let rest = file.strip_prefix('.')?;
    let (_, pid) = rest.rsplit_once('.')?;
    pid.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(pool: &Pool, name: &str, bytes: usize) -> Vec<String> {
        let f = pool.staging(name).unwrap();
        std::fs::write(&f, vec![7u8; bytes]).unwrap();
        pool.insert(name, &f).unwrap()
    }

    #[test]
    fn least_recently_used_spill_to_disk_and_come_back() {
        let t = tempfile::tempdir().unwrap();
        let pool = Pool::at(t.path().join("data"), t.path().join("mem")).unwrap();
        pool.set_budget(2500).unwrap();
        assert!(put(&pool, "a", 1000).is_empty());
        assert!(put(&pool, "b", 1000).is_empty());
        assert_eq!(put(&pool, "c", 1000), ["a"], "a is the least recently used");
        let tier = |n: &str| pool.entry(n).unwrap().tier;
        assert_eq!((tier("a"), tier("b"), tier("c")), (Tier::Disk, Tier::Memory, Tier::Memory));
        // Using a brings it back and spills b, now the least recently used.
        let (path, spilled) = pool.get("a").unwrap();
        assert_eq!(spilled, ["b"]);
        assert_eq!(std::fs::read(path).unwrap(), vec![7u8; 1000], "reloaded whole");
        assert_eq!((tier("a"), tier("b")), (Tier::Memory, Tier::Disk));
        let s = pool.summary().unwrap();
        assert_eq!((s.memory_bytes, s.disk_bytes), (2000, 1000));
        assert!(s.memory_bytes <= s.budget_bytes);
        // A smaller budget spills more; rm forgets.
        assert_eq!(pool.set_budget(1000).unwrap(), ["c"]);
        pool.remove("b").unwrap();
        assert!(matches!(pool.get("b"), Err(PoolError::NotFound(_))));
        assert!(matches!(pool.staging("../x"), Err(PoolError::BadName(_))));
        assert!(matches!(pool.staging("a"), Err(PoolError::Exists(_))));
    }

    #[test]
    fn opening_removes_what_a_dead_process_left_and_keeps_the_living() {
        let t = tempfile::tempdir().unwrap();
        let pool = Pool::at(t.path().join("data"), t.path().join("mem")).unwrap();
        // A pid above Linux's highest (2^22) names no process.
        let dead = [
            pool.memory_dir().join(".dock-a.memory.99999999"),
            pool.memory_dir().join(".a.substrate.99999999"),
            t.path().join("data/spill/.a.substrate.spilling.99999999"),
        ];
        let living = [pool.dock_memory("b").unwrap(), pool.staging("b").unwrap(), pool.temp_file("receiving")];
        let kept = [pool.memory_dir().join(".notes"), pool.memory_dir().join("a.substrate.123")];
        for f in dead.iter().chain(&living).chain(&kept) {
            std::fs::write(f, b"x").unwrap();
        }
        let _again = Pool::at(t.path().join("data"), t.path().join("mem")).unwrap();
        for f in &dead {
            assert!(!f.exists(), "{} removed", f.display());
        }
        for f in living.iter().chain(&kept) {
            assert!(f.exists(), "{} kept", f.display());
        }
    }
}
