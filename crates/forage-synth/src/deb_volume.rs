//! Package volumes: what lets an overlay name the files of Debian packages instead of
//! carrying them (overlay format 3).
//!
//! The volume of a [`PackageSet`] is the regular files of its .debs' data archives, .deb
//! by .deb and in archive order, each cut in 4 KiB blocks (its last block zero-padded),
//! end to end. An installed file's data sits on ext4 in 4 KiB blocks too, and its pages in
//! the guest's page cache, so a chunk of the launch VM that holds a piece of an installed
//! file is equal to a block of the volume: overlay creation names it
//! (`ChunkRef::Package(N)`) and the cloudlet reads it from its own copy of the volume.
//!
//! A data archive is read with `dpkg-deb --fsys-tarfile` (the package's data.tar
//! decompressed: the same bytes on every host) and the `tar` crate. The cloudlet keeps
//! (`PackageStore`, DATA/packages):
//! ```text
//!   debs/SHA256.deb       .debs, named by their content (`forage packages add`)
//!   volumes/DIGEST.raw    volumes, named by PackageSet::digest, built when first needed
//! ```
//! A volume is built from .debs whose SHA-256 the overlay lists, to `.partial` first, and
//! must come out exactly as long as the overlay says; only then is it renamed into place.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use forage_datadir::DataDir;
use forage_format::chunk::is_zero;
use forage_format::manifest::MAX_VOLUME_BLOCKS;
use forage_format::{DebRef, PackageSet, CHUNK_SIZE};
use forage_image::app_debs::DebsInstalled;
use sha2::{Digest, Sha256};

use crate::index::sha256;
use crate::{run_tool, SynthError};

/// The blocks of a package volume by content: what overlay creation looks chunks up in.
pub struct PackageIndex {
    pub set: PackageSet,
    blocks: HashMap<[u8; 32], u64>,
}

impl std::fmt::Debug for PackageIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackageIndex({} debs, {} blocks)", self.set.debs.len(), self.set.blocks)
    }
}

impl PackageIndex {
    /// Index the volume of `debs` (files on this host), in this order.
    /// A .deb given twice is taken once.
    pub fn build(debs: &[PathBuf]) -> Result<Self, SynthError> {
        let mut refs: Vec<DebRef> = Vec::with_capacity(debs.len());
        let mut files = Vec::with_capacity(debs.len());
        for d in debs {
            let r = deb_ref(d)?;
            if !refs.iter().any(|x| x.sha256 == r.sha256) {
                refs.push(r);
                files.push(d);
            }
        }
        let mut blocks = HashMap::new();
        let mut n = 0u64;
        let mut volume = Sha256::new();
        for d in files {
            for_each_block(d, MAX_VOLUME_BLOCKS - n, &mut |block| {
                if !is_zero(block) {
                    blocks.entry(sha256(block)).or_insert(n);
                }
                volume.update(block);
                n += 1;
                Ok(())
            })?;
        }
        let set = PackageSet { debs: refs, blocks: n, volume_sha256: hex::encode(volume.finalize()) };
        Ok(Self { set, blocks })
    }

    /// The volume block holding exactly `hash`'s content, if any.
    pub fn lookup(&self, hash: &[u8; 32]) -> Option<u64> {
        self.blocks.get(hash).copied()
    }
}

/// The index of the Debian packages an app installed (`debs`, on this host), for an
/// overlay that names their files; the .debs are added to this host's package store, so
/// that this host can apply and synthesize that overlay too.
pub fn index_installed(data: &DataDir, app: &str, debs: Option<&DebsInstalled>) -> Result<PackageIndex, SynthError> {
    let files = debs.map(|d| &d.files[..]).unwrap_or_default();
    if files.is_empty() {
        return Err(SynthError::NoPackages { app: app.to_string() });
    }
    let store = PackageStore::open(data);
    for f in files {
        store.add(f)?;
    }
    PackageIndex::build(files)
}

/// Name, version, architecture (from its control file), SHA-256 and size of a .deb.
pub fn deb_ref(path: &Path) -> Result<DebRef, SynthError> {
    let out = run_tool(Command::new("dpkg-deb").arg("--field").arg(path).args(["Package", "Version", "Architecture"]))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |k: &str| {
        text.lines().find_map(|l| l.strip_prefix(k).and_then(|v| v.strip_prefix(':')).map(|v| v.trim().to_string()))
    };
    let (Some(package), Some(version), Some(architecture)) =
        (field("Package"), field("Version"), field("Architecture"))
    else {
        return Err(SynthError::BadFile {
            path: path.to_path_buf(),
            detail: "not a Debian package (no Package, Version and Architecture in its control file)".into(),
        });
    };
    let (sha256, size) = file_sha256(path)?;
    Ok(DebRef { package, version, architecture, sha256, size })
}

/// SHA-256 (hex) and size of a file.
fn file_sha256(path: &Path) -> Result<(String, u64), SynthError> {
    let io = |source| SynthError::Io { path: path.to_path_buf(), source };
    let size = std::fs::metadata(path).map_err(io)?.len();
    Ok((forage_vm::snapshot::sha256_file(path).map_err(io)?, size))
}

/// Call `each` with every block of `deb`'s volume part, in order; refuse more than `most`.
fn for_each_block(
    deb: &Path,
    most: u64,
    each: &mut dyn FnMut(&[u8]) -> Result<(), SynthError>,
) -> Result<u64, SynthError> {
    let bad = |detail: String| SynthError::BadFile { path: deb.to_path_buf(), detail };
    let io = |source| SynthError::Io { path: deb.to_path_buf(), source };
    let mut child = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| SynthError::Tool { tool: "dpkg-deb".into(), detail: format!("cannot run it: {e}") })?;
    let stdout = child.stdout.take().expect("piped");
    let mut count = 0u64;
    let result = (|| -> Result<(), SynthError> {
        let mut archive = tar::Archive::new(stdout);
        let entries = archive.entries().map_err(io)?;
        let mut block = vec![0u8; CHUNK_SIZE];
        for entry in entries {
            let mut entry = entry.map_err(io)?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            loop {
                let mut got = 0;
                while got < CHUNK_SIZE {
                    let n = entry.read(&mut block[got..]).map_err(io)?;
                    if n == 0 {
                        break;
                    }
                    got += n;
                }
                if got == 0 {
                    break;
                }
                block[got..].fill(0);
                count += 1;
                if count > most {
                    return Err(bad(format!("its files make more than the {most} blocks the overlay expects")));
                }
                each(&block)?;
                if got < CHUNK_SIZE {
                    break;
                }
            }
        }
        // The archive ends at its first zero record: read dpkg-deb's padding too, or it
        // may fail writing it to a closed pipe.
        std::io::copy(&mut archive.into_inner(), &mut std::io::sink()).map_err(io)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = child.kill();
    }
    let out =
        child.wait_with_output().map_err(|e| SynthError::Tool { tool: "dpkg-deb".into(), detail: e.to_string() })?;
    result?;
    if !out.status.success() {
        return Err(SynthError::Tool {
            tool: "dpkg-deb --fsys-tarfile".into(),
            detail: format!("{}: {}", deb.display(), String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(count)
}

/// A number for this process's scratch files, unique among its threads.
fn next_build() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The cloudlet's Debian packages and the volumes made of them (DATA/packages).
#[derive(Debug, Clone)]
pub struct PackageStore {
    root: PathBuf,
}

impl PackageStore {
    pub fn open(data: &DataDir) -> Self {
        Self { root: data.packages() }
    }

    fn deb_path(&self, sha256: &str) -> PathBuf {
        self.root.join("debs").join(format!("{sha256}.deb"))
    }

    /// Keep a copy of the .deb at `path` (checked to be one), named by its content.
    pub fn add(&self, path: &Path) -> Result<DebRef, SynthError> {
        let r = deb_ref(path)?;
        let dest = self.deb_path(&r.sha256);
        if dest.exists() {
            return Ok(r);
        }
        let dir = self.root.join("debs");
        DataDir::ensure(&dir)?;
        let tmp = dir.join(format!(".{}.partial-{}-{}", r.sha256, std::process::id(), next_build()));
        let copied = (|| {
            std::fs::copy(path, &tmp).map_err(|source| SynthError::Io { path: tmp.clone(), source })?;
            // What was copied is what was checked.
            if file_sha256(&tmp)?.0 != r.sha256 {
                return Err(SynthError::BadFile {
                    path: path.to_path_buf(),
                    detail: "changed while it was copied".into(),
                });
            }
            std::fs::rename(&tmp, &dest).map_err(|source| SynthError::Io { path: dest.clone(), source })
        })();
        if copied.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        copied.map(|()| r)
    }

    /// The .debs this store holds, by name.
    pub fn list(&self) -> Result<Vec<DebRef>, SynthError> {
        let dir = self.root.join("debs");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(SynthError::Io { path: dir, source }),
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "deb") {
                out.push(deb_ref(&p)?);
            }
        }
        out.sort_by(|a, b| (&a.package, &a.version).cmp(&(&b.package, &b.version)));
        Ok(out)
    }

    /// The .debs of `set` this store lacks.
    pub fn missing<'a>(&self, set: &'a PackageSet) -> Vec<&'a DebRef> {
        set.debs.iter().filter(|d| !self.deb_path(&d.sha256).is_file()).collect()
    }

    fn volume_path(&self, set: &PackageSet) -> PathBuf {
        self.root.join("volumes").join(format!("{}.raw", set.digest()))
    }

    /// The volume of `set` is built (and as long as it says).
    pub fn has_volume(&self, set: &PackageSet) -> bool {
        let want = set.blocks.checked_mul(CHUNK_SIZE as u64);
        std::fs::metadata(self.volume_path(set)).is_ok_and(|m| Some(m.len()) == want)
    }

    /// The volume of `set`, built from the store's .debs if it is not there yet.
    pub fn volume(&self, set: &PackageSet) -> Result<PathBuf, SynthError> {
        let dir = self.root.join("volumes");
        let path = self.volume_path(set);
        if self.has_volume(set) {
            return Ok(path);
        }
        let missing = self.missing(set);
        if !missing.is_empty() {
            return Err(SynthError::MissingPackages {
                count: missing.len(),
                of: set.debs.len(),
                some: missing
                    .iter()
                    .take(5)
                    .map(|d| format!("{}={}", d.package, d.version))
                    .collect::<Vec<_>>()
                    .join(" "),
            });
        }
        DataDir::ensure(&dir)?;
        // Sessions of one daemon may build the same volume at once: each its own file.
        let tmp = dir.join(format!(".{}.partial-{}-{}", set.digest(), std::process::id(), next_build()));
        let built = self.write_volume(set, &tmp).and_then(|()| {
            std::fs::rename(&tmp, &path).map_err(|source| SynthError::Io { path: path.clone(), source })
        });
        if built.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        built.map(|()| path)
    }

    fn write_volume(&self, set: &PackageSet, tmp: &Path) -> Result<(), SynthError> {
        let io = |source| SynthError::Io { path: tmp.to_path_buf(), source };
        let mut out = BufWriter::with_capacity(1 << 20, File::create(tmp).map_err(io)?);
        let mut n = 0u64;
        let mut volume = Sha256::new();
        for d in &set.debs {
            let deb = self.deb_path(&d.sha256);
            // The store's file is named by its content when added; check it still is.
            if file_sha256(&deb)?.0 != d.sha256 {
                return Err(SynthError::BadFile { path: deb, detail: "no longer matches its SHA-256".into() });
            }
            n += for_each_block(&deb, set.blocks.saturating_sub(n), &mut |block| {
                volume.update(block);
                out.write_all(block).map_err(io)
            })?;
        }
        if n != set.blocks || hex::encode(volume.finalize()) != set.volume_sha256 {
            return Err(SynthError::VolumeMismatch { blocks: n, claimed: set.blocks });
        }
        let f = out.into_inner().map_err(|e| io(e.into_error()))?;
        f.sync_all().map_err(io)
    }
}
