//! The Debian packages an app names (`"debs"` in its `app.json`), installed into a running
//! Debian guest that has no network:
//!
//! ```text
//! host                                              guest (through the forage agent)
//!   | exec: os-release, dpkg arch, df /, gzip < /var/lib/dpkg/status | base64
//!   |<--------------------------------------------- facts + the guest's package status
//!   apt-get -s / --download-only install DEBS, against that status (crate::apt),
//!   .debs kept in DATA/cache/apt/archives
//!   | put /var/cache/forage-debs/*.deb ------------>|
//!   | exec: apt-get install DIR/*.deb ------------>|  offline: every .deb is local
//!   | exec: rm -r /var/cache/forage-debs; apt-get clean   (no garbage in the overlay)
//!   | exec: dpkg-query: every requested package installed
//! ```

use std::io::Read;
use std::time::{Duration, Instant};

use base64::Engine;
use forage_agent::app::{AppError, AppPackage};
use forage_agent::{AgentClient, AgentError};
use forage_datadir::DataDir;

use crate::apt::{AptError, GuestApt};

/// Where the .debs wait in the guest while they are installed.
pub const GUEST_DEB_DIR: &str = "/var/cache/forage-debs";
/// Longest an installation may take (hundreds of packages under TCG).
const INSTALL_TIMEOUT: Duration = Duration::from_secs(3 * 3600);
const LAST_LINES: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum AppDebsError {
    #[error("app {app}: the guest agent failed while installing its Debian packages")]
    Agent {
        app: String,
        #[source]
        source: AgentError,
    },
    #[error("app {app} needs Debian packages {packages}, but the guest is {found}: use a Debian 12 guest (forage image build debian-12; forage base create NAME --image debian-12)")]
    NotDebian { app: String, packages: String, found: String },
    #[error("app {app}: resolving and downloading its Debian packages on the host")]
    Apt {
        app: String,
        #[source]
        source: AptError,
    },
    #[error("app {app}: the guest's package status is unreadable: {detail}")]
    BadStatus { app: String, detail: String },
    #[error("app {app}: installing {count} Debian packages in the guest failed (apt-get exit {code}); it ended with:\n{last_lines}")]
    Install { app: String, count: usize, code: i32, last_lines: String },
    #[error("app {app}: after the installation, dpkg does not list {missing:?} as installed in the guest")]
    NotInstalled { app: String, missing: Vec<String> },
}

/// What an installation did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DebsInstalled {
    /// The packages the app asked for.
    pub requested: Vec<String>,
    /// Everything installed or upgraded (`name=version`), dependencies included.
    pub installed: Vec<String>,
    /// Size of the .deb files copied into the guest.
    pub download_bytes: u64,
    /// The .deb files on this host (DATA/cache/apt/archives), in the order installed:
    /// what an overlay naming the packages' files lists (`forage overlay create --packages`).
    #[serde(default)]
    pub files: Vec<std::path::PathBuf>,
    /// Growth of the guest's used disk space (`df /`), after `apt-get clean`.
    pub disk_growth_bytes: i64,
    pub took: Duration,
}

impl std::fmt::Display for DebsInstalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} Debian packages for {} installed offline ({} MiB of .debs, guest disk +{} MiB) in {:.1} s",
            self.installed.len(),
            self.requested.join(" "),
            self.download_bytes >> 20,
            self.disk_growth_bytes.max(0) >> 20,
            self.took.as_secs_f64()
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AppInstallError {
    #[error(transparent)]
    Debs(#[from] AppDebsError),
    #[error(transparent)]
    App(#[from] AppError),
}

/// Install `app` through `agent`: its Debian packages first (when it names any), then its
/// files and service ([`AppPackage::install`]).
pub fn install_app(
    data: &DataDir,
    agent: &mut AgentClient,
    app: &AppPackage,
) -> Result<Option<DebsInstalled>, AppInstallError> {
    let debs = install_debs(data, agent, app)?;
    app.install(agent)?;
    Ok(debs)
}

/// Install the Debian packages `app` names, if any, into the guest behind `agent`.
pub fn install_debs(
    data: &DataDir,
    agent: &mut AgentClient,
    app: &AppPackage,
) -> Result<Option<DebsInstalled>, AppDebsError> {
    let m = app.manifest();
    if m.debs.is_empty() {
        return Ok(None);
    }
    let start = Instant::now();
    let name = m.name.clone();
    let agent_err = |source| AppDebsError::Agent { app: name.clone(), source };
    let facts = GuestFacts::read(agent, &name, &m.debs)?;
    let apt = GuestApt::new(data);
    let downloaded =
        apt.download(&facts.status, &m.debs).map_err(|source| AppDebsError::Apt { app: name.clone(), source })?;
    if !downloaded.files.is_empty() {
        tracing::info!(app = %name, packages = downloaded.files.len(), bytes = downloaded.bytes, "installing Debian packages in the guest");
        for file in &downloaded.files {
            let base = file.file_name().and_then(|f| f.to_str()).unwrap_or_default();
            agent.put_file(file, &format!("{GUEST_DEB_DIR}/{base}")).map_err(agent_err)?;
        }
        // Every package comes from a local file: the guest has no package lists (and no
        // network), so apt has nothing to download from. (Not --no-download: with local
        // files, apt 2.6 then fails with "Pathname to install is not absolute".)
        let script = format!(
            "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
             -o Dpkg::Use-Pty=0 -o Dpkg::Options::=--force-confold {GUEST_DEB_DIR}/*.deb"
        );
        let installed = agent.exec(&["sh", "-c", &script], INSTALL_TIMEOUT);
        // Whatever happened: no .debs or apt caches left behind in the guest.
        let cleaned =
            agent.exec_ok(&["sh", "-c", &format!("rm -rf {GUEST_DEB_DIR} && apt-get clean")], Duration::from_secs(300));
        let out = installed.map_err(agent_err)?;
        if out.code != 0 || out.timed_out {
            return Err(AppDebsError::Install {
                app: name,
                count: downloaded.files.len(),
                code: out.code,
                last_lines: last_lines(&out.stdout, &out.stderr, out.timed_out),
            });
        }
        cleaned.map_err(agent_err)?;
    }
    let missing = not_installed(agent, &m.debs).map_err(agent_err)?;
    if !missing.is_empty() {
        return Err(AppDebsError::NotInstalled { app: name, missing });
    }
    let used_after = disk_used(agent).map_err(agent_err)?;
    Ok(Some(DebsInstalled {
        requested: m.debs.clone(),
        installed: downloaded.planned.iter().map(|p| format!("{}={}", p.package, p.version)).collect(),
        download_bytes: downloaded.bytes,
        files: downloaded.files.clone(),
        disk_growth_bytes: used_after as i64 - facts.disk_used as i64,
        took: start.elapsed(),
    }))
}

/// What the host needs to know of the guest to resolve packages for it.
struct GuestFacts {
    status: Vec<u8>,
    disk_used: u64,
}

impl GuestFacts {
    fn read(agent: &mut AgentClient, app: &str, debs: &[String]) -> Result<Self, AppDebsError> {
        let agent_err = |source| AppDebsError::Agent { app: app.to_string(), source };
        let script = "if [ -r /etc/os-release ]; then . /etc/os-release; fi; \
                      echo \"os=${ID:-unknown} ${VERSION_CODENAME:-}\"; \
                      echo \"arch=$(dpkg --print-architecture 2>/dev/null)\"";
        let out = agent.exec_ok(&["sh", "-c", script], Duration::from_secs(60)).map_err(agent_err)?;
        let value = |key: &str| {
            out.stdout.lines().find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string())).unwrap_or_default()
        };
        let (os, arch) = (value("os="), value("arch="));
        let wanted = format!("debian {}", crate::debian::SUITE);
        if os != wanted || arch != crate::apt::ARCH {
            return Err(AppDebsError::NotDebian {
                app: app.to_string(),
                packages: debs.join(" "),
                found: format!("{os:?} on {arch:?} (needs {wanted:?} on {})", crate::apt::ARCH),
            });
        }
        // The status can pass the agent's 1 MiB output limit on a guest with many packages.
        let out = agent
            .exec_ok(&["sh", "-c", "gzip -c /var/lib/dpkg/status | base64 -w 0"], Duration::from_secs(120))
            .map_err(agent_err)?;
        let bad = |detail: String| AppDebsError::BadStatus { app: app.to_string(), detail };
        let gz = base64::engine::general_purpose::STANDARD
            .decode(out.stdout.trim())
            .map_err(|e| bad(format!("not base64: {e}")))?;
        let mut status = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .take(256 << 20)
            .read_to_end(&mut status)
            .map_err(|e| bad(format!("not gzip: {e}")))?;
        if !status.starts_with(b"Package:") {
            return Err(bad("it does not start with a Package: field".into()));
        }
        let disk_used = disk_used(agent).map_err(agent_err)?;
        Ok(Self { status, disk_used })
    }
}

/// Bytes used on the guest's root file system.
fn disk_used(agent: &mut AgentClient) -> Result<u64, AgentError> {
    let out = agent.exec_ok(&["df", "-B1", "--output=used", "/"], Duration::from_secs(60))?;
    Ok(out.stdout.lines().filter_map(|l| l.trim().parse().ok()).next().unwrap_or(0))
}

/// Which of `packages` dpkg does not list as installed.
fn not_installed(agent: &mut AgentClient, packages: &[String]) -> Result<Vec<String>, AgentError> {
    let mut argv = vec!["dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\\n"];
    argv.extend(packages.iter().map(String::as_str));
    let out = agent.exec(&argv, Duration::from_secs(60))?;
    let installed: Vec<&str> = out.stdout.lines().filter_map(|l| l.strip_suffix(" installed")).collect();
    Ok(packages.iter().filter(|p| !installed.contains(&p.as_str())).cloned().collect())
}

fn last_lines(stdout: &str, stderr: &str, timed_out: bool) -> String {
    let mut lines: Vec<&str> = stdout.lines().chain(stderr.lines()).filter(|l| !l.trim().is_empty()).collect();
    let keep = lines.len().saturating_sub(LAST_LINES);
    lines.drain(..keep);
    let mut text = lines.join("\n");
    if timed_out {
        text.push_str(&format!("\n(killed after {INSTALL_TIMEOUT:?})"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_lines_keep_the_end_of_both_streams() {
        let out: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        let text = last_lines(&out, "E: Sub-process /usr/bin/dpkg returned an error code (1)\n", false);
        assert_eq!(text.lines().count(), LAST_LINES);
        assert!(text.starts_with("line 17") && text.ends_with("error code (1)"), "{text}");
    }
}
