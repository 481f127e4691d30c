//! apt on the host, for a guest: resolve Debian packages against the *guest's* package
//! status (its `/var/lib/dpkg/status`) and download them, so that the guest installs them
//! without any network. The host is bookworm too, but nothing of its own apt state is used
//! or touched: sources, lists, caches and locks all live in `DATA/cache/apt/`, the sources
//! being the guest's ([`crate::debian::APT_SOURCES`]).
//!
//! ```text
//! DATA/cache/apt/
//!   sources.list   the guest image's sources     lists/     apt-get update (a day at most)
//!   archives/      downloaded .debs (kept)        cache/     apt's binary caches
//!   run-PID/       the guest's status for one resolution, and dpkg's lock beside it
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use forage_datadir::DataDir;

/// Package lists older than this are refreshed before a resolution.
pub const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// The guests' architecture.
pub const ARCH: &str = "amd64";

#[derive(Debug, thiserror::Error)]
pub enum AptError {
    #[error("cannot run apt-get")]
    Spawn(#[source] std::io::Error),
    #[error("apt-get update for the guest's sources ({sources}) failed: {apt_said}")]
    Update { sources: PathBuf, apt_said: String },
    #[error("Debian bookworm has no package {package:?} (apt: unable to locate it)")]
    UnknownPackage { package: String },
    #[error("apt cannot install {packages} in the guest: {apt_said}")]
    Unresolvable { packages: String, apt_said: String },
    #[error("downloading the packages for {packages} failed: {apt_said}")]
    Download { packages: String, apt_said: String },
    #[error("apt said it downloaded {file}, but it is not in {dir}")]
    NotDownloaded { file: String, dir: PathBuf },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One package a resolution installs (or upgrades).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedDeb {
    pub package: String,
    pub version: String,
    pub arch: String,
}

impl PlannedDeb {
    /// The file name apt gives it in its archives (`:` of an epoch written `%3a`).
    pub fn file_name(&self) -> String {
        format!("{}_{}_{}.deb", self.package, self.version.replace(':', "%3a"), self.arch)
    }
}

/// Downloaded packages, ready to copy into the guest.
#[derive(Debug, Clone)]
pub struct DownloadedDebs {
    pub planned: Vec<PlannedDeb>,
    pub files: Vec<PathBuf>,
    pub bytes: u64,
}

/// apt for guests, in `DATA/cache/apt/`.
#[derive(Debug, Clone)]
pub struct GuestApt {
    root: PathBuf,
}

impl GuestApt {
    pub fn new(data: &DataDir) -> Self {
        Self { root: data.root().join("cache").join("apt") }
    }

    pub fn archives(&self) -> PathBuf {
        self.root.join("archives")
    }

    fn sources(&self) -> PathBuf {
        self.root.join("sources.list")
    }

    /// Folders and the sources list.
    fn prepare(&self) -> Result<(), AptError> {
        for d in ["lists/partial", "archives/partial", "cache", "empty", "log"] {
            let p = self.root.join(d);
            std::fs::create_dir_all(&p).map_err(|source| AptError::Io { path: p, source })?;
        }
        let text: String = crate::debian::APT_SOURCES.iter().map(|l| format!("{l}\n")).collect();
        let sources = self.sources();
        if std::fs::read_to_string(&sources).ok().as_deref() != Some(text.as_str()) {
            std::fs::write(&sources, text).map_err(|source| AptError::Io { path: sources, source })?;
        }
        Ok(())
    }

    /// apt options that point every file apt reads or writes into our folder, except the
    /// dpkg status (`status`), which is the guest's.
    fn options(&self, status: &Path) -> Vec<String> {
        let r = |p: &str| self.root.join(p).display().to_string();
        let o = |k: &str, v: String| ["-o".to_string(), format!("{k}={v}")];
        [
            o("Dir::Etc::SourceList", self.sources().display().to_string()),
            o("Dir::Etc::SourceParts", r("empty")),
            o("Dir::Etc::Preferences", r("empty/preferences")),
            o("Dir::Etc::PreferencesParts", r("empty")),
            o("Dir::State", self.root.display().to_string()),
            o("Dir::State::Lists", r("lists")),
            o("Dir::State::extended_states", r("extended_states")),
            o("Dir::State::status", status.display().to_string()),
            o("Dir::Cache", r("cache")),
            o("Dir::Cache::Archives", r("archives")),
            o("Dir::Log", r("log")),
            o("APT::Architecture", ARCH.to_string()),
            o("APT::Architectures", ARCH.to_string()),
            o("APT::Install-Recommends", "false".to_string()),
            o("APT::Install-Suggests", "false".to_string()),
            o("Acquire::Languages", "none".to_string()),
            // Our folder is root's; apt's sandbox user could not write to it.
            o("APT::Sandbox::User", "root".to_string()),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    fn apt_get(&self, status: &Path, args: &[&str]) -> Result<Output, AptError> {
        Command::new("apt-get")
            .args(self.options(status))
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("LC_ALL", "C")
            .output()
            .map_err(AptError::Spawn)
    }

    /// Whether the lists are there and younger than `max_age`.
    fn lists_fresh(&self, max_age: Duration) -> bool {
        let Ok(entries) = std::fs::read_dir(self.root.join("lists")) else {
            return false;
        };
        entries
            .flatten()
            .filter(|e| {
                e.file_name().to_string_lossy().ends_with("_Packages")
                    || e.file_name().to_string_lossy().contains("_Packages.")
            })
            .filter_map(|e| e.metadata().ok()?.modified().ok())
            .any(|t| SystemTime::now().duration_since(t).unwrap_or_default() < max_age)
    }

    fn has_lists(&self) -> bool {
        self.lists_fresh(Duration::MAX)
    }

    /// `apt-get update` for the guest's sources. A failure with older lists at hand only
    /// warns: a builder may be offline and its lists good enough.
    pub fn update(&self) -> Result<(), AptError> {
        self.prepare()?;
        let status = self.root.join("empty/status");
        let out = self.apt_get(&status, &["update", "-q"])?;
        if !out.status.success() {
            let said = apt_errors(&out);
            if self.has_lists() {
                tracing::warn!(apt_said = %said, "apt-get update failed; using the package lists at hand");
                return Ok(());
            }
            return Err(AptError::Update { sources: self.sources(), apt_said: said });
        }
        Ok(())
    }

    /// What installing `packages` into a guest whose dpkg status is `guest_status` takes,
    /// and the packages downloaded into the archives.
    pub fn download(&self, guest_status: &[u8], packages: &[String]) -> Result<DownloadedDebs, AptError> {
        self.prepare()?;
        if !self.lists_fresh(LISTS_MAX_AGE) {
            self.update()?;
        }
        // dpkg's lock file goes beside the status: one folder per resolution.
        let run = self.root.join(format!("run-{}", std::process::id()));
        std::fs::create_dir_all(&run).map_err(|source| AptError::Io { path: run.clone(), source })?;
        let status = run.join("status");
        let result = std::fs::write(&status, guest_status)
            .map_err(|source| AptError::Io { path: status.clone(), source })
            .and_then(|()| self.plan_and_fetch(&status, packages));
        let _ = std::fs::remove_dir_all(&run);
        result
    }

    fn plan_and_fetch(&self, status: &Path, packages: &[String]) -> Result<DownloadedDebs, AptError> {
        let names = packages.join(" ");
        let mut install = vec!["install", "-q", "-y", "--no-install-recommends"];
        install.extend(packages.iter().map(String::as_str));
        let mut simulate = install.clone();
        simulate.insert(1, "-s");
        let mut out = self.apt_get(status, &simulate)?;
        if !out.status.success() && unknown_package(&out).is_some() && !self.lists_fresh(Duration::from_secs(60)) {
            // Maybe a package newer than our lists: refresh once.
            self.update()?;
            out = self.apt_get(status, &simulate)?;
        }
        if !out.status.success() {
            if let Some(package) = unknown_package(&out) {
                return Err(AptError::UnknownPackage { package });
            }
            return Err(AptError::Unresolvable { packages: names, apt_said: apt_errors(&out) });
        }
        let planned = parse_simulation(&String::from_utf8_lossy(&out.stdout));
        if planned.is_empty() {
            return Ok(DownloadedDebs { planned, files: Vec::new(), bytes: 0 });
        }
        let mut download = install.clone();
        download.insert(1, "--download-only");
        let out = self.apt_get(status, &download)?;
        if !out.status.success() {
            return Err(AptError::Download { packages: names, apt_said: apt_errors(&out) });
        }
        let archives = self.archives();
        let mut files = Vec::new();
        let mut bytes = 0;
        for p in &planned {
            let file = archives.join(p.file_name());
            match std::fs::metadata(&file) {
                Ok(m) => bytes += m.len(),
                Err(_) => return Err(AptError::NotDownloaded { file: p.file_name(), dir: archives }),
            }
            files.push(file);
        }
        Ok(DownloadedDebs { planned, files, bytes })
    }
}

/// The packages of an `apt-get -s install` (its `Inst` lines):
/// `Inst name [old] (version release [arch])`.
pub fn parse_simulation(stdout: &str) -> Vec<PlannedDeb> {
    stdout
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("Inst ")?;
            let package = rest.split_whitespace().next()?.to_string();
            let paren = rest[rest.find('(')? + 1..].split(')').next()?;
            let version = paren.split_whitespace().next()?.to_string();
            let arch = paren[paren.rfind('[')? + 1..].split(']').next()?.to_string();
            let plain = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "+.-:~_".contains(c));
            (forage_agent::app::is_debian_package_name(&package) && plain(&version) && plain(&arch))
                .then_some(PlannedDeb { package, version, arch })
        })
        .collect()
}

/// The package of apt's "Unable to locate package X".
fn unknown_package(out: &Output) -> Option<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .find_map(|l| l.strip_prefix("E: Unable to locate package ").map(|p| p.trim().to_string()))
}

/// apt's explanation: the lines naming a package's problem, then its `E:` lines.
fn apt_errors(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains(" : Depends:") || l.contains(" : Conflicts:") || l.contains(" : Breaks:"))
        .map(str::trim)
        .collect();
    lines.extend(stderr.lines().filter(|l| l.starts_with("E:")));
    if lines.is_empty() {
        lines.extend(stderr.lines().rev().take(3));
    }
    lines.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulation_lines_become_packages() {
        let out = "Reading package lists...\n\
            Inst libc6 [2.36-9+deb12u9] (2.36-9+deb12u13 Debian-Security:12/stable-security [amd64])\n\
            Inst tesseract-ocr-eng (1:4.1.0-2 Debian:12.12/stable [all])\n\
            Inst libstdc++6 (12.2.0-14+deb12u1 Debian:12.12/stable [amd64]) []\n\
            Conf libc6 (2.36-9+deb12u13 Debian-Security:12/stable-security [amd64])\n\
            Inst evil/../x (1 Debian [amd64])\n";
        let p = parse_simulation(out);
        assert_eq!(p.len(), 3, "{p:?}");
        assert_eq!(
            p[0],
            PlannedDeb { package: "libc6".into(), version: "2.36-9+deb12u13".into(), arch: "amd64".into() }
        );
        assert_eq!(p[1].file_name(), "tesseract-ocr-eng_1%3a4.1.0-2_all.deb");
        assert_eq!(p[2].package, "libstdc++6");
    }

    #[test]
    fn every_apt_path_is_ours_but_the_status() {
        let apt = GuestApt { root: "/d/cache/apt".into() };
        let opts = apt.options(Path::new("/d/cache/apt/run-1/status")).join(" ");
        for key in
            ["SourceList", "SourceParts", "PreferencesParts", "Lists", "Cache::Archives", "Dir::Log", "extended_states"]
        {
            let v = opts.split(' ').find(|o| o.contains(key)).unwrap();
            assert!(v.contains("=/d/cache/apt"), "{v}");
        }
        assert!(opts.contains("Dir::State::status=/d/cache/apt/run-1/status"));
    }
}
