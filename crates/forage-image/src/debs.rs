//! Debian packages fetched with `apt-get download` into forage's cache, and unpacked with
//! `dpkg-deb -x`. Both tools are on every Debian host; a package already in the cache is
//! not fetched again.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::ImageError;

/// A fetched and unpacked package.
#[derive(Debug, Clone)]
pub struct UnpackedDeb {
    /// The `.deb` file name, e.g. `busybox-static_1%3a1.35.0-4_amd64.deb`.
    pub file: String,
    /// Where its contents were unpacked.
    pub root: PathBuf,
}

/// The concrete package a metapackage depends on first, e.g. `linux-image-cloud-amd64` ->
/// `linux-image-6.1.0-56-cloud-amd64`. Falls back to a cached `.deb` when apt knows nothing
/// (no `apt-get update` yet) but an earlier build fetched one.
pub fn resolve_meta(meta: &str, prefix: &str, cache: &Path) -> Result<String, ImageError> {
    let out = Command::new("apt-cache").args(["depends", "--important", meta]).output();
    if let Ok(out) = out {
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines() {
            let dep = line.trim().trim_start_matches("Depends:").trim();
            if line.trim().starts_with("Depends:") && dep.starts_with(prefix) {
                return Ok(dep.to_string());
            }
        }
    }
    if let Some(file) = cached(cache, prefix)? {
        let name = file.split('_').next().unwrap_or_default().to_string();
        return Ok(name);
    }
    Err(ImageError::PackageUnknown { package: meta.to_string(), hint: "run `apt-get update` first".to_string() })
}

/// Fetch `package` into `cache` (unless a `.deb` of it is there) and unpack it under
/// `extract`.
pub fn fetch_and_unpack(package: &str, cache: &Path, extract: &Path) -> Result<UnpackedDeb, ImageError> {
    mkdir(cache)?;
    mkdir(extract)?;
    let file = match cached(cache, &format!("{package}_"))? {
        Some(f) => f,
        None => {
            tracing::info!(package, "apt-get download");
            let out = Command::new("apt-get")
                .args(["download", "-q", package])
                .current_dir(cache)
                .output()
                .map_err(|e| ImageError::Tool { tool: "apt-get", detail: e.to_string() })?;
            if !out.status.success() {
                return Err(ImageError::Download { package: package.to_string(), apt_said: last_line(&out.stderr) });
            }
            cached(cache, &format!("{package}_"))?.ok_or_else(|| ImageError::Download {
                package: package.to_string(),
                apt_said: "apt-get reported success but no .deb appeared".into(),
            })?
        }
    };
    let stem = file.trim_end_matches(".deb");
    let root = extract.join(stem);
    let done = extract.join(format!("{stem}.unpacked"));
    if !done.exists() {
        let _ = std::fs::remove_dir_all(&root);
        mkdir(&root)?;
        let out = Command::new("dpkg-deb")
            .arg("-x")
            .arg(cache.join(&file))
            .arg(&root)
            .output()
            .map_err(|e| ImageError::Tool { tool: "dpkg-deb", detail: e.to_string() })?;
        if !out.status.success() {
            return Err(ImageError::Unpack { file: cache.join(&file), detail: last_line(&out.stderr) });
        }
        std::fs::write(&done, b"").map_err(|source| ImageError::Io { path: done.clone(), source })?;
    }
    Ok(UnpackedDeb { file, root })
}

/// The newest-named cached `.deb` starting with `prefix`.
fn cached(cache: &Path, prefix: &str) -> Result<Option<String>, ImageError> {
    let entries = match std::fs::read_dir(cache) {
        Ok(e) => e,
        Err(_) => return Ok(None),
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix) && n.ends_with(".deb"))
        .collect();
    names.sort();
    Ok(names.pop())
}

fn mkdir(p: &Path) -> Result<(), ImageError> {
    std::fs::create_dir_all(p).map_err(|source| ImageError::Io { path: p.to_path_buf(), source })
}

fn last_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    text.lines().rev().find(|l| !l.trim().is_empty() && !l.starts_with("W:")).unwrap_or("").to_string()
}
