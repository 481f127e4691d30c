//! forage-service: what a tactical cloudlet holds besides base VMs.
//!
//! - The **service VM repository** ([`Repository`]): saved VMs with a service installed and
//!   answering (memory, disk, device state) plus their description ([`ServiceManifest`]:
//!   service id, OS, port, client apps). A service without a port is the *baseline* VM of
//!   its OS: on-demand provisioning and packed applications start from a copy of it.
//!   Versioned packages move services between cloudlets ([`package`]).
//! - The **app store**: client apps for the services, filed with their service, listed and
//!   served filtered by the device's platform ([`Repository::apps`]).
//! - **Packed applications** ([`appvirt`]): a program with its dynamic-library closure, run
//!   in a VM of the same OS without installing anything.
//!
//! A service folder is `services/ID/` with `service.json` and `snapshot/` (a VM snapshot,
//! `docs/vm-snapshot.md`) and `apps/` (client app files). Folders are written under a
//! temporary name and renamed into place, so a half-written service is never listed.

pub mod appvirt;
pub mod create;
pub mod package;

use std::path::{Path, PathBuf};

use forage_datadir::DataDir;
use forage_vm::Snapshot;
use serde::{Deserialize, Serialize};

pub const SERVICE_KIND: &str = "forage-service";
pub const SERVICE_FORMAT: u32 = 1;
pub const SERVICE_FILE: &str = "service.json";
/// Platform name of client apps that run anywhere (e.g. a script).
pub const ANY_PLATFORM: &str = "any";

/// `service.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceManifest {
    pub kind: String,
    pub format: u32,
    /// Service id: letters, digits, '-', '_', '.'.
    pub id: String,
    /// Guest OS (`forage_image::GUEST_OS` for forage images), matched against packed
    /// applications and on-demand requests.
    pub os: String,
    /// The guest image whose kernel and initramfs it boots (a local image of that name is
    /// used after an import).
    #[serde(default = "default_image")]
    pub image: String,
    /// Guest TCP port the service answers on; none for a baseline VM.
    #[serde(default)]
    pub port: Option<u16>,
    /// A request line whose one-line answer shows the service works.
    #[serde(default)]
    pub probe: Option<String>,
    #[serde(default)]
    pub description: String,
    /// Where it came from (an app on a base, a cold-booted disk, a package).
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub client_apps: Vec<ClientApp>,
    #[serde(default)]
    pub created_unix: u64,
}

/// A client app for a service, offered to devices of `platform`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientApp {
    /// App id, unique on the cloudlet: letters, digits, '-', '_', '.'.
    pub id: String,
    /// `os-arch` of the device (`linux-x86_64`, `android-aarch64`), or `any`.
    pub platform: String,
    /// File name under the service's `apps/`.
    pub file: String,
    pub size: u64,
    pub sha256: String,
}

fn default_image() -> String {
    "tiny".into()
}

impl ServiceManifest {
    pub fn is_baseline(&self) -> bool {
        self.port.is_none()
    }

    /// Check a manifest read from untrusted bytes.
    pub fn parse(json: &[u8]) -> Result<Self, String> {
        let m: ServiceManifest = serde_json::from_slice(json).map_err(|e| e.to_string())?;
        if m.kind != SERVICE_KIND {
            return Err(format!("kind {:?} is not {SERVICE_KIND}", m.kind));
        }
        if m.format == 0 || m.format > SERVICE_FORMAT {
            return Err(format!("service format {} is not one this forage reads (1..={SERVICE_FORMAT})", m.format));
        }
        for (what, name) in std::iter::once(("service id", &m.id)).chain(std::iter::once(("os", &m.os))) {
            if !plain(name) {
                return Err(format!("{what} {name:?} must be letters, digits, '-', '_', '.'"));
            }
        }
        for a in &m.client_apps {
            if !plain(&a.id) || !plain(&a.file) || !plain(&a.platform) {
                return Err(format!("client app {:?}: id, file and platform must be plain names", a.id));
            }
        }
        Ok(m)
    }
}

/// Names that become file names or match keys.
pub fn plain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// The platform of this machine, as client apps name it.
pub fn this_platform() -> String {
    format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH)
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("no service {id} on this cloudlet (see `forage service list`)")]
    NotFound { id: String },
    #[error("no client app {id} in the app store (see `forage apps`)")]
    NoApp { id: String },
    #[error(
        "no baseline VM for OS {os} on this cloudlet (create one: `forage service create baseline-{os} --base NAME`)"
    )]
    NoBaseline { os: String },
    #[error("no server code component {name} on this cloudlet (see `forage service component`)")]
    NoComponent { name: String },
    #[error("service {id} already exists at {}", path.display())]
    Exists { id: String, path: PathBuf },
    #[error("{}: {detail}", path.display())]
    Bad { path: PathBuf, detail: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Synth(#[from] forage_synth::SynthError),
    #[error(transparent)]
    Snapshot(#[from] forage_vm::SnapshotError),
    #[error(transparent)]
    DataDir(#[from] forage_datadir::DataDirError),
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ServiceError + '_ {
    move |source| ServiceError::Io { path: path.to_path_buf(), source }
}

/// A service VM in the repository.
#[derive(Debug, Clone)]
pub struct ServiceVm {
    dir: PathBuf,
    manifest: ServiceManifest,
}

/// What `forage service list --json` prints of a service VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSummary {
    pub id: String,
    pub os: String,
    /// Guest port of its service; none for a baseline VM.
    pub port: Option<u16>,
    pub baseline: bool,
    pub description: String,
    pub source: String,
    /// Its client apps, as `ID (PLATFORM)`.
    pub client_apps: Vec<String>,
    pub dir: PathBuf,
}

impl ServiceVm {
    pub fn summary(&self) -> ServiceSummary {
        let m = &self.manifest;
        ServiceSummary {
            id: m.id.clone(),
            os: m.os.clone(),
            port: m.port,
            baseline: m.is_baseline(),
            description: m.description.clone(),
            source: m.source.clone(),
            client_apps: m.client_apps.iter().map(|a| format!("{} ({})", a.id, a.platform)).collect(),
            dir: self.dir.clone(),
        }
    }

    /// What the app store says of client app `a` of this service (the device protocol and
    /// the HTTP API share the type).
    pub fn app_info(&self, a: &ClientApp) -> forage_proto::AppInfo {
        forage_proto::AppInfo {
            id: a.id.clone(),
            service: self.id().to_string(),
            platform: a.platform.clone(),
            file: a.file.clone(),
            size: a.size,
            sha256: a.sha256.clone(),
        }
    }
}

impl ServiceVm {
    pub fn open(dir: &Path) -> Result<Self, ServiceError> {
        let path = dir.join(SERVICE_FILE);
        let json = std::fs::read(&path).map_err(io(&path))?;
        let manifest = ServiceManifest::parse(&json).map_err(|detail| ServiceError::Bad { path, detail })?;
        Ok(Self { dir: dir.to_path_buf(), manifest })
    }

    pub fn manifest(&self) -> &ServiceManifest {
        &self.manifest
    }

    pub fn id(&self) -> &str {
        &self.manifest.id
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn snapshot_dir(&self) -> PathBuf {
        self.dir.join("snapshot")
    }

    pub fn snapshot(&self) -> Result<Snapshot, ServiceError> {
        Ok(Snapshot::open(&self.snapshot_dir())?)
    }

    pub fn app_path(&self, app: &ClientApp) -> PathBuf {
        self.dir.join("apps").join(&app.file)
    }
}

/// The cloudlet's service VMs (`DATA/services`).
#[derive(Debug, Clone)]
pub struct Repository {
    root: PathBuf,
}

impl Repository {
    pub fn new(data: &DataDir) -> Self {
        Self { root: data.services() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every readable service, by id; unreadable folders are logged and skipped.
    pub fn list(&self) -> Vec<ServiceVm> {
        let mut out: Vec<ServiceVm> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| match ServiceVm::open(&e.path()) {
                Ok(s) => Some(s),
                Err(err) => {
                    tracing::warn!("skipping {}: {err}", e.path().display());
                    None
                }
            })
            .collect();
        out.sort_by(|a, b| a.id().cmp(b.id()));
        out
    }

    pub fn open(&self, id: &str) -> Result<ServiceVm, ServiceError> {
        if !plain(id) {
            return Err(ServiceError::NotFound { id: id.to_string() });
        }
        let dir = self.root.join(id);
        if !dir.join(SERVICE_FILE).exists() {
            return Err(ServiceError::NotFound { id: id.to_string() });
        }
        ServiceVm::open(&dir)
    }

    pub fn remove(&self, id: &str) -> Result<(), ServiceError> {
        let s = self.open(id)?;
        // Rename first so that a half-removed folder is never listed.
        let gone = self.root.join(format!(".{id}.removing-{}", std::process::id()));
        std::fs::rename(s.dir(), &gone).map_err(io(s.dir()))?;
        std::fs::remove_dir_all(&gone).map_err(io(&gone))
    }

    /// Server code components on-demand provisioning scripts may ask for: a file or a
    /// folder under `DATA/components/NAME` (beside the service folders).
    pub fn component(&self, name: &str) -> Result<PathBuf, ServiceError> {
        let path = self.root.parent().unwrap_or(&self.root).join("components").join(name);
        if !plain(name) || !path.exists() {
            return Err(ServiceError::NoComponent { name: name.to_string() });
        }
        Ok(path)
    }

    /// Add a component (copied).
    pub fn add_component(&self, name: &str, from: &Path) -> Result<PathBuf, ServiceError> {
        let dir = self.root.parent().unwrap_or(&self.root).join("components");
        DataDir::ensure(&dir)?;
        if !plain(name) {
            return Err(ServiceError::Bad {
                path: from.to_path_buf(),
                detail: format!("component name {name:?} must be letters, digits, '-', '_', '.'"),
            });
        }
        let target = dir.join(name);
        let _ = std::fs::remove_dir_all(&target);
        let _ = std::fs::remove_file(&target);
        // A single file lands inside the component's folder, under its own name.
        let into = match from.is_file() {
            true => target.join(from.file_name().unwrap_or_default()),
            false => target.clone(),
        };
        if from.is_file() {
            DataDir::ensure(&target)?;
        }
        copy_tree(from, &into)?;
        Ok(target)
    }

    /// The baseline VM of `os` (a service without a port), by id order.
    pub fn baseline(&self, os: &str) -> Result<ServiceVm, ServiceError> {
        self.list()
            .into_iter()
            .find(|s| s.manifest.is_baseline() && s.manifest.os == os)
            .ok_or_else(|| ServiceError::NoBaseline { os: os.to_string() })
    }

    /// The app store: client apps for `platform` (all with `None`), with their service.
    pub fn apps(&self, platform: Option<&str>) -> Vec<(ServiceVm, ClientApp)> {
        let mut out = Vec::new();
        for s in self.list() {
            for a in &s.manifest.client_apps {
                if platform.is_none_or(|p| a.platform == p || a.platform == ANY_PLATFORM) {
                    out.push((s.clone(), a.clone()));
                }
            }
        }
        out
    }

    pub fn app(&self, id: &str) -> Result<(ServiceVm, ClientApp), ServiceError> {
        self.apps(None).into_iter().find(|(_, a)| a.id == id).ok_or_else(|| ServiceError::NoApp { id: id.to_string() })
    }

    /// A fresh staging folder for a service being built or imported.
    pub fn staging(&self, id: &str) -> Result<PathBuf, ServiceError> {
        let dir = self.root.join(format!(".{id}.staging-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        DataDir::ensure(&dir)?;
        Ok(dir)
    }

    /// Move a staged service (with `snapshot/` and `apps/` in place) into the repository:
    /// client app files are checked and recorded, `service.json` written, and the folder
    /// renamed. On error the staging folder is removed.
    pub fn install(
        &self,
        staging: &Path,
        mut manifest: ServiceManifest,
        apps: &[(String, String, PathBuf)],
    ) -> Result<ServiceVm, ServiceError> {
        let result = (|| {
            let final_dir = self.root.join(&manifest.id);
            if !plain(&manifest.id) {
                return Err(ServiceError::Bad {
                    path: final_dir,
                    detail: "service id must be letters, digits, '-', '_', '.'".into(),
                });
            }
            if final_dir.exists() {
                return Err(ServiceError::Exists { id: manifest.id.clone(), path: final_dir });
            }
            Snapshot::open(&staging.join("snapshot"))?;
            let taken: Vec<String> = self.apps(None).into_iter().map(|(_, a)| a.id).collect();
            let app_dir = staging.join("apps");
            DataDir::ensure(&app_dir)?;
            for (id, platform, file) in apps {
                if !plain(id)
                    || !plain(platform)
                    || taken.contains(id)
                    || manifest.client_apps.iter().any(|a| &a.id == id)
                {
                    return Err(ServiceError::Bad {
                        path: file.clone(),
                        detail: format!("client app id {id:?} is taken or not a plain name"),
                    });
                }
                let name =
                    file.file_name().map(|n| n.to_string_lossy().into_owned()).filter(|n| plain(n)).ok_or_else(
                        || ServiceError::Bad { path: file.clone(), detail: "not a plain file name".into() },
                    )?;
                let target = app_dir.join(&name);
                std::fs::copy(file, &target).map_err(io(file))?;
                let (size, sha256) = file_digest(&target)?;
                manifest.client_apps.push(ClientApp {
                    id: id.clone(),
                    platform: platform.clone(),
                    file: name,
                    size,
                    sha256,
                });
            }
            let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
            ServiceManifest::parse(&json)
                .map_err(|detail| ServiceError::Bad { path: staging.join(SERVICE_FILE), detail })?;
            std::fs::write(staging.join(SERVICE_FILE), json).map_err(io(staging))?;
            std::fs::rename(staging, &final_dir).map_err(io(&final_dir))?;
            ServiceVm::open(&final_dir)
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(staging);
        }
        result
    }
}

/// Files under `path` (itself if a file), as (path, path relative to `path`).
pub fn files_under(path: &Path) -> Vec<(PathBuf, PathBuf)> {
    if path.is_file() {
        return vec![(path.to_path_buf(), PathBuf::from(path.file_name().unwrap_or_default()))];
    }
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(path.join(&rel)).into_iter().flatten().flatten() {
            let r = rel.join(e.file_name());
            if e.path().is_dir() {
                stack.push(r);
            } else {
                out.push((e.path(), r));
            }
        }
    }
    out.sort();
    out
}

fn copy_tree(from: &Path, to: &Path) -> Result<(), ServiceError> {
    if from.is_file() {
        std::fs::copy(from, to).map_err(io(from))?;
        return Ok(());
    }
    for (abs, rel) in files_under(from) {
        let target = to.join(rel);
        DataDir::ensure(target.parent().expect("joined"))?;
        std::fs::copy(&abs, &target).map_err(io(&abs))?;
    }
    Ok(())
}

/// Size and SHA-256 of a file.
pub fn file_digest(path: &Path) -> Result<(u64, String), ServiceError> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut h = sha2::Sha256::new();
    let size = std::io::copy(&mut f, &mut h).map_err(io(path))?;
    Ok((size, hex::encode(h.finalize())))
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> serde_json::Value {
        serde_json::json!({"kind": SERVICE_KIND, "format": 1, "id": "hashsearch", "os": "linux-x86_64", "port": 8080,
            "client_apps": [{"id": "hs-client", "platform": "any", "file": "client.sh", "size": 3, "sha256": "00"}]})
    }

    #[test]
    fn manifests_are_checked() {
        let ok = ServiceManifest::parse(manifest().to_string().as_bytes()).unwrap();
        assert!(!ok.is_baseline());
        for (field, value) in [("id", "../x"), ("os", "a b"), ("kind", "other")] {
            let mut m = manifest();
            m[field] = value.into();
            assert!(ServiceManifest::parse(m.to_string().as_bytes()).is_err(), "{field}={value} accepted");
        }
        let mut m = manifest();
        m["format"] = 2.into();
        assert!(ServiceManifest::parse(m.to_string().as_bytes()).unwrap_err().contains("format 2"));
        let mut m = manifest();
        m["client_apps"][0]["file"] = "../../etc/passwd".into();
        assert!(ServiceManifest::parse(m.to_string().as_bytes()).is_err());
        let mut m = manifest();
        m["extra"] = 1.into();
        assert!(ServiceManifest::parse(m.to_string().as_bytes()).is_err());
    }
}
