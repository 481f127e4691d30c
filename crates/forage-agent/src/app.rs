//! Application packages: a folder with `app.json` and the files the app needs, installed
//! into a running guest through the agent (never baked into a guest image).
//!
//! ```json
//! { "format": 1, "name": "hashsearch", "port": 8080, "start": ["./hashsearch", "8080"] }
//! ```
//! Optional `"install": ["./setup.sh"]` runs once, in the app folder, before the start;
//! optional `"probe": "count"` is a request line whose answer shows the service works, and
//! `"probe_expect": "ok "` what that answer must contain to count as correct.
//! Optional `"debs": ["tesseract-ocr"]` names Debian packages the app needs: the host
//! resolves and downloads them against the guest's own package status and installs them
//! offline before the app (`forage_image::app_debs`); [`AppPackage::install`] itself only
//! checks that they are there.
//! Files land in `/data/apps/NAME/`; a generated `start` script there runs the `start`
//! command (the guest's init starts it again at every cold boot); output goes to `log`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{AgentClient, AgentError};

pub const APP_MANIFEST: &str = "app.json";
pub const APP_FORMAT: u32 = 1;
/// Where apps live in the guest.
pub const GUEST_APPS_DIR: &str = "/data/apps";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AppManifest {
    pub format: u32,
    pub name: String,
    /// The TCP port the service listens on in the guest.
    pub port: u16,
    /// Command (run in the app folder) that serves in the foreground.
    pub start: Vec<String>,
    #[serde(default)]
    pub install: Option<Vec<String>>,
    /// A request line whose one-line answer shows the service works (first response).
    #[serde(default)]
    pub probe: Option<String>,
    /// What the answer to `probe` must contain for the service to count as working
    /// correctly (without it, any answer does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_expect: Option<String>,
    /// Debian packages to install in the guest before the app (names as Debian spells
    /// them: `[a-z0-9][a-z0-9+.-]+`, no versions, no paths).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub debs: Vec<String>,
}

impl AppManifest {
    /// Whether `answer` (to [`probe`](Self::probe)) shows the service working correctly.
    pub fn probe_answer_ok(&self, answer: &str) -> bool {
        self.probe_expect.as_deref().is_none_or(|want| answer.contains(want))
    }
}

/// Whether `name` is a Debian package name (Debian Policy 5.6.1: lower-case letters,
/// digits, `+`, `-`, `.`; at least two characters, starting with a letter or digit). Such
/// a name is safe on a command line and in a file name.
pub fn is_debian_package_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() >= 2
        && b.len() <= 128
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"+.-".contains(&c))
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{path}: {detail}")]
    Manifest { path: PathBuf, detail: String },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("app {app} needs the Debian packages {missing:?}, not installed in the guest ({detail}): forage installs them from the host when it installs the app into a Debian guest (forage vm boot --app, forage overlay create)")]
    DebsMissing { app: String, missing: Vec<String>, detail: String },
    #[error("installing {app}")]
    Agent {
        app: String,
        #[source]
        source: AgentError,
    },
}

/// An application folder on the host.
#[derive(Debug, Clone)]
pub struct AppPackage {
    dir: PathBuf,
    manifest: AppManifest,
}

impl AppPackage {
    pub fn open(dir: &Path) -> Result<Self, AppError> {
        let path = dir.join(APP_MANIFEST);
        let text = std::fs::read(&path).map_err(|source| AppError::Io { path: path.clone(), source })?;
        let bad = |detail: String| AppError::Manifest { path: path.clone(), detail };
        let manifest: AppManifest = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        if manifest.format != APP_FORMAT {
            return Err(bad(format!("app format {} is not {APP_FORMAT}", manifest.format)));
        }
        let plain = |s: &str| {
            !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && !s.starts_with('.')
        };
        if !plain(&manifest.name) {
            return Err(bad(format!("app name {:?} must be letters, digits, '-', '_', '.'", manifest.name)));
        }
        if manifest.start.is_empty() {
            return Err(bad("start command is empty".into()));
        }
        if let Some(deb) = manifest.debs.iter().find(|d| !is_debian_package_name(d)) {
            return Err(bad(format!(
                "{deb:?} in debs is not a Debian package name (lower-case letters, digits, '+', '-', '.')"
            )));
        }
        Ok(Self { dir: dir.to_path_buf(), manifest })
    }

    pub fn manifest(&self) -> &AppManifest {
        &self.manifest
    }

    pub fn guest_dir(&self) -> String {
        format!("{GUEST_APPS_DIR}/{}", self.manifest.name)
    }

    /// The files of the package (relative paths), app.json included.
    pub fn files(&self) -> Result<Vec<PathBuf>, AppError> {
        let mut out = Vec::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let abs = self.dir.join(&rel);
            let entries = std::fs::read_dir(&abs).map_err(|source| AppError::Io { path: abs.clone(), source })?;
            for e in entries.flatten() {
                let r = rel.join(e.file_name());
                if e.path().is_dir() {
                    stack.push(r);
                } else {
                    out.push(r);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Copy the app into the guest, run its install step, and start it. The app's Debian
    /// packages must already be installed (`forage_image::app_debs` does that).
    pub fn install(&self, agent: &mut AgentClient) -> Result<(), AppError> {
        let name = self.manifest.name.clone();
        let err = |source| AppError::Agent { app: name.clone(), source };
        self.check_debs_installed(agent)?;
        let gdir = self.guest_dir();
        for rel in self.files()? {
            agent.put_file(&self.dir.join(&rel), &format!("{gdir}/{}", rel.display())).map_err(err)?;
        }
        if let Some(install) = &self.manifest.install {
            let script = format!("cd {} && {}", sh_quote(&gdir), sh_join(install));
            agent.exec_ok(&["sh", "-c", &script], Duration::from_secs(300)).map_err(err)?;
        }
        let start = format!("#!/bin/sh\ncd {} && exec {}\n", sh_quote(&gdir), sh_join(&self.manifest.start));
        agent.put_bytes(start.as_bytes(), &format!("{gdir}/start"), 0o755).map_err(err)?;
        agent.spawn(&[&format!("{gdir}/start")], &format!("{gdir}/log")).map_err(err)?;
        // Make the files durable before anyone saves the VM.
        agent.exec_ok(&["sync"], Duration::from_secs(60)).map_err(err)?;
        Ok(())
    }
}

impl AppPackage {
    /// Refuse to install an app whose Debian packages are not in the guest.
    fn check_debs_installed(&self, agent: &mut AgentClient) -> Result<(), AppError> {
        let debs = &self.manifest.debs;
        if debs.is_empty() {
            return Ok(());
        }
        let mut argv = vec!["dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\\n"];
        argv.extend(debs.iter().map(String::as_str));
        let missing_all =
            |detail: String| AppError::DebsMissing { app: self.manifest.name.clone(), missing: debs.clone(), detail };
        let out = match agent.exec(&argv, Duration::from_secs(60)) {
            Ok(out) => out,
            Err(AgentError::Refused { message, .. }) => {
                return Err(missing_all(format!("the guest has no dpkg: {message}")))
            }
            Err(source) => return Err(AppError::Agent { app: self.manifest.name.clone(), source }),
        };
        let installed: Vec<&str> = out.stdout.lines().filter_map(|l| l.strip_suffix(" installed")).collect();
        let missing: Vec<String> = debs.iter().filter(|d| !installed.contains(&d.as_str())).cloned().collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(AppError::DebsMissing {
            app: self.manifest.name.clone(),
            missing,
            detail: "dpkg-query does not list them as installed".into(),
        })
    }
}

/// Send one request line to an app's service and read its one-line answer (how forage
/// probes services and takes first responses).
pub fn request_line(addr: std::net::SocketAddr, line: &str, read_timeout: Duration) -> std::io::Result<String> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(read_timeout))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    if answer.is_empty() {
        return Err(std::io::Error::other("connection closed without an answer"));
    }
    Ok(answer.trim_end().to_string())
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn sh_join(argv: &[String]) -> String {
    argv.iter().map(|a| sh_quote(a)).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_is_checked() {
        let dir = std::env::temp_dir().join(format!("forage-app-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/f"), b"x").unwrap();
        let write = |v: serde_json::Value| std::fs::write(dir.join(APP_MANIFEST), v.to_string()).unwrap();
        write(serde_json::json!({"format":1,"name":"a","port":80,"start":["./a"]}));
        let app = AppPackage::open(&dir).unwrap();
        assert_eq!(app.guest_dir(), "/data/apps/a");
        assert_eq!(app.files().unwrap(), [PathBuf::from("app.json"), PathBuf::from("sub/f")]);
        write(serde_json::json!({"format":1,"name":"../x","port":80,"start":["./a"]}));
        assert!(AppPackage::open(&dir).unwrap_err().to_string().contains("app name"));
        write(serde_json::json!({"format":2,"name":"a","port":80,"start":["./a"]}));
        assert!(AppPackage::open(&dir).is_err());
        write(serde_json::json!({"format":1,"name":"a","port":80,"start":[]}));
        assert!(AppPackage::open(&dir).is_err());
        write(
            serde_json::json!({"format":1,"name":"a","port":80,"start":["./a"],"debs":["tesseract-ocr","libstdc++6","python3.11"]}),
        );
        assert_eq!(AppPackage::open(&dir).unwrap().manifest().debs.len(), 3);
        for bad in ["../etc", "-oDir=/", "Foo", "a", "tesseract-ocr=5.3", "x y", "pkg;rm", "pkg/x", "pkg:amd64", ""] {
            write(serde_json::json!({"format":1,"name":"a","port":80,"start":["./a"],"debs":[bad]}));
            let err = AppPackage::open(&dir).unwrap_err().to_string();
            assert!(err.contains("not a Debian package name"), "{bad:?}: {err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn probe_expectation() {
        let mut m: AppManifest = serde_json::from_value(
            serde_json::json!({"format":1,"name":"a","port":80,"start":["./a"],"probe":"ocr x"}),
        )
        .unwrap();
        assert!(m.probe_answer_ok("anything"));
        m.probe_expect = Some("words=HELLO".into());
        assert!(m.probe_answer_ok("ok words=HELLO,WORLD"));
        assert!(!m.probe_answer_ok("error no text"));
        // Written back, an app without the new fields looks as before.
        let plain: AppManifest =
            serde_json::from_value(serde_json::json!({"format":1,"name":"a","port":80,"start":["./a"]})).unwrap();
        let v = serde_json::to_value(&plain).unwrap();
        assert!(v.get("debs").is_none() && v.get("probe_expect").is_none());
    }

    #[test]
    fn quoting() {
        assert_eq!(sh_join(&["./a b".into(), "it's".into()]), r"'./a b' 'it'\''s'");
    }
}
