//! The forage data directory: one root holding every artifact forage builds or keeps.
//!
//! The root is, in order of precedence: an explicit path (`--data-dir`), `$FORAGE_HOME`,
//! `$XDG_DATA_HOME/forage`, `$HOME/.local/share/forage`. Layout (see `docs/data-dir.md`):
//!
//! ```text
//! ROOT/
//!   cache/debs/          Debian packages fetched with `apt-get download` (reused)
//!   cache/extract/       their unpacked trees, one folder per package file
//!   images/NAME/         guest images: image.json, vmlinuz, initrd.img, disk.raw
//!   bases/NAME/          base VMs: base.json, snapshot/, index.bin
//!   work/                scratch for launch VMs and profiling runs
//!   vms/NAME/            VMs run with `forage vm`: vm.json, run/ (live files), snapshot/
//!   cache/launch/DIGEST/ the cloudlet's launch-VM cache, one snapshot per overlay
//!   cloudlet/state.db    the cloudlet daemon's state (SQLite)
//!   packages/            Debian packages overlays may name: debs/SHA256.deb, volumes/
//! ```
//!
//! Unix sockets (QMP) do not live here: their path length is limited to 107 bytes, so they
//! go to a short per-user runtime directory (see [`DataDir::runtime_dir`]).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("cannot find a data directory: set --data-dir, FORAGE_HOME or HOME")]
    NoHome,
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid name {name:?}: use letters, digits, '-', '_' and '.', not starting with '.'")]
    BadName { name: String },
    #[error("{path} is not a private directory of this user ({detail}): QEMU's sockets carry guest memory; remove it or set XDG_RUNTIME_DIR")]
    NotPrivate { path: PathBuf, detail: String },
}

/// The root of everything forage stores on this host.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// Resolve the data directory from an explicit path or the environment, made absolute
    /// like [`DataDir::at`] (a FUSE view's symlinks and QEMU's backing files are resolved
    /// from other folders than the working one).
    pub fn resolve(explicit: Option<&Path>) -> Result<Self, DataDirError> {
        let root = if let Some(p) = explicit {
            p.to_path_buf()
        } else if let Some(p) = non_empty_env("FORAGE_HOME") {
            PathBuf::from(p)
        } else if let Some(p) = non_empty_env("XDG_DATA_HOME") {
            PathBuf::from(p).join("forage")
        } else if let Some(p) = non_empty_env("HOME") {
            PathBuf::from(p).join(".local/share/forage")
        } else {
            return Err(DataDirError::NoHome);
        };
        Ok(Self::at(root))
    }

    /// The data folder at `root`, made absolute (QEMU resolves a relative backing file
    /// against the overlay's own folder, and VMs outlive the working directory).
    pub fn at(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        Self { root: std::path::absolute(&root).unwrap_or(root) }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn deb_cache(&self) -> PathBuf {
        self.root.join("cache/debs")
    }

    pub fn extract_cache(&self) -> PathBuf {
        self.root.join("cache/extract")
    }

    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }

    pub fn image(&self, name: &str) -> Result<PathBuf, DataDirError> {
        Ok(self.images().join(checked_name(name)?))
    }

    pub fn bases(&self) -> PathBuf {
        self.root.join("bases")
    }

    pub fn base(&self, name: &str) -> Result<PathBuf, DataDirError> {
        Ok(self.bases().join(checked_name(name)?))
    }

    /// The service VM repository (`forage service`), one folder per service id.
    pub fn services(&self) -> PathBuf {
        self.root.join("services")
    }

    /// The cloudlet's authority (CA, server certificate, issued credentials, codes).
    pub fn trust_cloudlet(&self) -> PathBuf {
        self.root.join("trust").join("cloudlet")
    }

    /// This host's pairings with cloudlets (as a device, or as a cloudlet for handoff).
    pub fn trust_peers(&self) -> PathBuf {
        self.root.join("trust").join("peers")
    }

    /// Debian packages that overlays of format 3 name blocks of, and the volumes made of
    /// them (`forage packages`).
    pub fn packages(&self) -> PathBuf {
        self.root.join("packages")
    }

    /// Scratch space for work in progress (launch VMs, profiling runs).
    pub fn work(&self) -> PathBuf {
        self.root.join("work")
    }

    /// Remove the scratch folders of processes that are gone (a `forage overlay create`,
    /// `substrate dock` or bench killed half-way): the entries of `work/` whose name ends
    /// in `-PID` for a PID with no process. Cloudlet sessions (`session-PID-N`) are not
    /// touched: a restarted daemon adopts their instances or settles them itself. Best
    /// effort; logs and returns what was removed.
    pub fn sweep_scratch(&self) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        for e in std::fs::read_dir(self.work()).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("session-") || !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Some(pid) = name.rsplit_once('-').and_then(|(_, p)| p.parse::<u32>().ok()) else { continue };
            if process_gone(pid) && std::fs::remove_dir_all(e.path()).is_ok() {
                tracing::info!("removed {}: scratch of a process that is gone", e.path().display());
                removed.push(e.path());
            }
        }
        removed
    }

    /// The cloudlet's cache of launch VMs, one snapshot folder per overlay digest.
    pub fn launch_cache(&self) -> PathBuf {
        self.root.join("cache").join("launch")
    }

    /// The cloudlet daemon's state database.
    pub fn cloudlet_state(&self) -> PathBuf {
        self.root.join("cloudlet").join("state.db")
    }

    pub fn vms(&self) -> PathBuf {
        self.root.join("vms")
    }

    pub fn vm(&self, name: &str) -> Result<PathBuf, DataDirError> {
        Ok(self.vms().join(checked_name(name)?))
    }

    /// A short directory for unix sockets belonging to this data directory, created if
    /// missing: `$XDG_RUNTIME_DIR/forage/<hash of root>` or `/tmp/forage-<uid>/<hash of
    /// root>`. Both levels are mode 0700 and must be directories (not links) owned by this
    /// user: QEMU streams guest memory through sockets here, and another user who made
    /// `/tmp/forage-<uid>` first must not be able to read or replace them.
    pub fn runtime_dir(&self) -> Result<PathBuf, DataDirError> {
        let base = match non_empty_env("XDG_RUNTIME_DIR") {
            Some(d) => PathBuf::from(d).join("forage"),
            None => std::env::temp_dir().join(format!("forage-{}", current_uid())),
        };
        let digest = Sha256::digest(self.root.as_os_str().as_encoded_bytes());
        let dir = base.join(hex::encode(&digest[..6]));
        private_dir(&base)?;
        private_dir(&dir)?;
        Ok(dir)
    }

    /// Create `path` and its parents, naming it in the error.
    pub fn ensure(path: &Path) -> Result<(), DataDirError> {
        std::fs::create_dir_all(path).map_err(|source| DataDirError::Create { path: path.to_path_buf(), source })
    }

    /// Create the root (mode 0700: overlays, guest memory, keys and the state database
    /// live under it) or make an existing one private; returns it.
    pub fn ensure_root(&self) -> Result<&Path, DataDirError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let create = |source| DataDirError::Create { path: self.root.clone(), source };
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.root).map_err(create)?;
        let meta = std::fs::metadata(&self.root).map_err(create)?;
        if meta.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700)).map_err(create)?;
        }
        Ok(&self.root)
    }
}

/// No process `pid` runs on this host (the writer of a file named after it is gone).
/// Never for this process, and never where `/proc` cannot tell.
pub fn process_gone(pid: u32) -> bool {
    pid != std::process::id() && Path::new("/proc/self").exists() && !Path::new("/proc").join(pid.to_string()).exists()
}

/// Names of images and VMs become folder names: keep them plain.
pub fn checked_name(name: &str) -> Result<&str, DataDirError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(name)
    } else {
        Err(DataDirError::BadName { name: name.to_string() })
    }
}

/// Create `path` (one level) with mode 0700 if missing; then it must be a directory, not
/// a link, owned by this user, with no access for group or others.
fn private_dir(path: &Path) -> Result<(), DataDirError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => return Err(DataDirError::Create { path: path.to_path_buf(), source }),
    }
    let not_private = |detail: String| DataDirError::NotPrivate { path: path.to_path_buf(), detail };
    let meta = std::fs::symlink_metadata(path).map_err(|e| not_private(e.to_string()))?;
    if !meta.file_type().is_dir() {
        return Err(not_private("not a directory".into()));
    }
    if meta.uid() != current_uid() {
        return Err(not_private(format!("owned by uid {}", meta.uid())));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| not_private(format!("mode {:o}, cannot change it: {e}", meta.permissions().mode() & 0o777)))?;
    }
    Ok(())
}

fn non_empty_env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

fn current_uid() -> u32 {
    // /proc/self is owned by the process's uid; avoids a libc dependency for one call.
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain() {
        assert!(checked_name("tiny").is_ok());
        assert!(checked_name("demo-1.2_x").is_ok());
        for bad in ["", ".hidden", "a/b", "../x", "sp ace", &"x".repeat(65)] {
            assert!(checked_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn scratch_of_dead_processes_is_swept_and_the_rest_kept() {
        let t = tempfile::tempdir().unwrap();
        let d = DataDir::at(t.path());
        // A pid above Linux's highest (2^22) names no process.
        let dead = ["overlay-99999999", "substrate-a-b-99999999"];
        let kept = [
            format!("overlay-{}", std::process::id()),
            "session-99999999-1".to_string(),
            "notes".to_string(),
            "x-1".to_string(),
        ];
        for n in dead.iter().map(|s| s.to_string()).chain(kept.iter().cloned()) {
            std::fs::create_dir_all(d.work().join(n).join("run")).unwrap();
        }
        std::fs::write(d.work().join("bench-99999999.log"), b"").unwrap();
        let mut removed = d.sweep_scratch();
        removed.sort();
        assert_eq!(removed, dead.map(|n| d.work().join(n)));
        for n in &kept {
            assert!(d.work().join(n).exists(), "{n} kept");
        }
        assert!(d.work().join("bench-99999999.log").exists(), "files are not scratch folders");
    }

    #[test]
    fn a_relative_data_dir_is_made_absolute() {
        let d = DataDir::resolve(Some(Path::new("target/x"))).unwrap();
        assert!(d.root().is_absolute(), "{:?}", d.root());
        assert!(d.root().ends_with("target/x"));
    }

    #[test]
    fn layout_is_under_root() {
        let d = DataDir::at("/srv/forage");
        assert_eq!(d.image("tiny").unwrap(), Path::new("/srv/forage/images/tiny"));
        assert_eq!(d.vm("a").unwrap(), Path::new("/srv/forage/vms/a"));
        assert!(d.vm("../etc").is_err());
    }

    #[test]
    fn runtime_dir_is_short_stable_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let long = DataDir::at(format!("/tmp/{}", "x".repeat(200)));
        let rt = long.runtime_dir().unwrap();
        assert!(rt.as_os_str().len() < 80, "{rt:?}");
        assert_eq!(rt, long.runtime_dir().unwrap());
        assert_ne!(rt, DataDir::at("/other").runtime_dir().unwrap());
        for d in [&rt, rt.parent().unwrap()] {
            assert_eq!(std::fs::metadata(d).unwrap().permissions().mode() & 0o777, 0o700, "{d:?}");
        }
    }

    #[test]
    fn a_runtime_dir_that_is_not_ours_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(matches!(private_dir(&link), Err(DataDirError::NotPrivate { .. })), "a link in place of the directory");
        let file = t.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(private_dir(&file), Err(DataDirError::NotPrivate { .. })));
        // Someone else's directory (owned by nobody): only root can make one here.
        if current_uid() == 0 {
            let theirs = t.path().join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            assert!(matches!(private_dir(&theirs), Err(DataDirError::NotPrivate { .. })));
        }
    }
}
