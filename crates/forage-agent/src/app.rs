//! Application packages: a folder with `app.json` and the files the app needs, installed
//! into a running guest through the agent (never baked into a guest image).
//!
//! ```json
//! { "format": 1, "name": "hashsearch", "port": 8080, "start": ["./hashsearch", "8080"] }
//! ```
//! Optional `"install": ["./setup.sh"]` runs once, in the app folder, before the start;
//! optional `"probe": "count"` is a request line whose answer shows the service works.
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
        let text = std::fs::read(&path).map_err(|source| AppError::Io {
            path: path.clone(),
            source,
        })?;
        let bad = |detail: String| AppError::Manifest {
            path: path.clone(),
            detail,
        };
        let manifest: AppManifest = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        if manifest.format != APP_FORMAT {
            return Err(bad(format!("app format {} is not {APP_FORMAT}", manifest.format)));
        }
        let plain = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && !s.starts_with('.');
        if !plain(&manifest.name) {
            return Err(bad(format!("app name {:?} must be letters, digits, '-', '_', '.'", manifest.name)));
        }
        if manifest.start.is_empty() {
            return Err(bad("start command is empty".into()));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
        })
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

    /// Copy the app into the guest, run its install step, and start it.
    pub fn install(&self, agent: &mut AgentClient) -> Result<(), AppError> {
        let name = self.manifest.name.clone();
        let err = |source| AppError::Agent { app: name.clone(), source };
        let gdir = self.guest_dir();
        for rel in self.files()? {
            agent
                .put_file(&self.dir.join(&rel), &format!("{gdir}/{}", rel.display()))
                .map_err(err)?;
        }
        if let Some(install) = &self.manifest.install {
            let script = format!("cd {} && {}", sh_quote(&gdir), sh_join(install));
            agent
                .exec_ok(&["sh", "-c", &script], Duration::from_secs(300))
                .map_err(err)?;
        }
        let start = format!("#!/bin/sh\ncd {} && exec {}\n", sh_quote(&gdir), sh_join(&self.manifest.start));
        agent
            .put_bytes(start.as_bytes(), &format!("{gdir}/start"), 0o755)
            .map_err(err)?;
        agent
            .spawn(&[&format!("{gdir}/start")], &format!("{gdir}/log"))
            .map_err(err)?;
        // Make the files durable before anyone saves the VM.
        agent.exec_ok(&["sync"], Duration::from_secs(60)).map_err(err)?;
        Ok(())
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
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn quoting() {
        assert_eq!(sh_join(&["./a b".into(), "it's".into()]), r"'./a b' 'it'\''s'");
    }
}
