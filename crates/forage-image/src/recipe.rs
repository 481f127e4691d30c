//! What every recipe shares: its options and outcome, the cache check, the folder a build
//! happens in and its renaming into place, ext4 images, the guest agent binary.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forage_datadir::DataDir;

use crate::error::ImageError;
use crate::manifest::ImageManifest;
use crate::run::GuestImage;

/// How to build an image.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The static guest agent binary (see [`locate_guest_binary`]).
    pub agent_binary: PathBuf,
    /// Size of the disk; `None`: the recipe's (tiny 64 MiB, debian-12 4 GiB).
    pub disk_mib: Option<u64>,
    /// Guest RAM; `None`: the recipe's (tiny 256 MiB, debian-12 1 GiB).
    pub memory_mib: Option<u64>,
    /// Rebuild even if the recipe matches the cached image.
    pub force: bool,
}

impl BuildOptions {
    /// The recipe's sizes and the given agent.
    pub fn new(agent_binary: PathBuf) -> Self {
        Self { agent_binary, disk_mib: None, memory_mib: None, force: false }
    }
}

#[derive(Debug)]
pub struct BuildOutcome {
    pub image: GuestImage,
    pub cached: bool,
    pub took: Duration,
}

/// The cached image `name` if its recipe digest is `recipe` (and no rebuild is forced).
pub(crate) fn cached(
    data: &DataDir,
    name: &str,
    recipe: &str,
    opts: &BuildOptions,
    start: Instant,
) -> Option<BuildOutcome> {
    if opts.force {
        return None;
    }
    let image = GuestImage::open(data, name).ok()?;
    (image.manifest().recipe_digest == recipe).then(|| BuildOutcome { image, cached: true, took: start.elapsed() })
}

/// A fresh folder to build image `name` in.
pub(crate) fn partial_dir(data: &DataDir, name: &str) -> Result<PathBuf, ImageError> {
    let work = data.images().join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    DataDir::ensure(&work)?;
    Ok(work)
}

/// Write `image.json` into the finished `work` folder and move it into place.
pub(crate) fn finish(
    data: &DataDir,
    work: &Path,
    manifest: ImageManifest,
    start: Instant,
) -> Result<BuildOutcome, ImageError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ImageError::Io { path, source }
    };
    let final_dir = data.image(&manifest.name)?;
    let mpath = work.join("image.json");
    std::fs::write(&mpath, serde_json::to_vec_pretty(&manifest).expect("serializes")).map_err(io(&mpath))?;
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(work, &final_dir).map_err(io(&final_dir))?;
    Ok(BuildOutcome { image: GuestImage::open(data, &manifest.name)?, cached: false, took: start.elapsed() })
}

/// The first entry of `dir` whose name starts with `prefix`.
pub(crate) fn find_prefixed(dir: &Path, prefix: &str) -> Result<Option<PathBuf>, ImageError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ImageError::Io { path: dir.to_path_buf(), source })?;
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(prefix)))
        .collect();
    found.sort();
    Ok(found.pop())
}

/// An ext4 file system of `mib` MiB in `path` (sparse), holding the tree `from`. 4 KiB
/// blocks, so that file data lines up with 4 KiB chunks and guest pages (mkfs would pick
/// 1 KiB blocks for a small disk, and no file page would ever match a disk chunk).
pub(crate) fn make_ext4(path: &Path, from: &Path, label: &str, mib: u64) -> Result<(), ImageError> {
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", label, "-b", "4096", "-E", "root_owner=0:0,nodiscard", "-d"])
        .arg(from)
        .arg(path)
        .arg(format!("{mib}M"))
        .output()
        .map_err(|e| ImageError::Tool { tool: "mkfs.ext4 (e2fsprogs)", detail: e.to_string() })?;
    if !out.status.success() {
        return Err(ImageError::Mkfs {
            path: path.to_path_buf(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// The agent must run without a dynamic loader (the tiny initramfs has none): refuse
/// binaries that need one.
pub(crate) fn check_static(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    use object::Object;
    let file = object::File::parse(data).map_err(|e| ImageError::NotStatic {
        path: path.to_path_buf(),
        detail: format!("not an ELF executable: {e}"),
    })?;
    if file.section_by_name(".interp").is_some() {
        return Err(ImageError::NotStatic {
            path: path.to_path_buf(),
            detail: "it is dynamically linked (build it with `make guest`)".into(),
        });
    }
    Ok(())
}

/// Find a static guest binary (or app folder) built by `make guest`: `$FORAGE_GUEST_DIR`,
/// then `../guest` and `../../guest` from the running executable (cargo's target layout:
/// `target/release/forage` and `target/debug/deps/<test>` both find `target/guest/`), then
/// `../lib/forage/guest` (an installed layout). Never the executable's own folder: cargo
/// puts dynamically linked builds of the same binaries there.
pub fn locate_guest_binary(name: &str) -> Result<PathBuf, ImageError> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("FORAGE_GUEST_DIR").filter(|d| !d.is_empty()) {
        dirs.push(PathBuf::from(d));
    }
    if let Some(exe_dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        dirs.push(exe_dir.join("../guest"));
        dirs.push(exe_dir.join("../../guest"));
        dirs.push(exe_dir.join("../lib/forage/guest"));
    }
    dirs.iter().map(|d| d.join(name)).find(|p| p.exists()).ok_or_else(|| ImageError::GuestBinaryMissing {
        name: name.to_string(),
        looked: dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "),
    })
}
