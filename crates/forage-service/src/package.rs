//! Service packages: `forage service export` / `import`. The same container as base
//! packages (`forage_synth::package`, `docs/service-repository.md`): a zstd tar whose first
//! entry `package.json` holds `kind: "forage-service-package"`, `format`, `service` (the
//! service's `service.json`) and every file's size and SHA-256; then `snapshot/...` and
//! `apps/...`. Import checks everything in a staging folder and only then renames it into
//! the repository: a cut or corrupted package leaves nothing behind.

use std::path::Path;

use forage_datadir::DataDir;
use forage_synth::package::{read_package, snapshot_files, write_package};

use crate::{file_digest, Repository, ServiceError, ServiceManifest, ServiceVm};

pub const PACKAGE_KIND: &str = "forage-service-package";
pub const PACKAGE_FORMAT: u32 = 1;
const SNAPSHOT_ENTRIES: &[&str] =
    &["snapshot/snapshot.json", "snapshot/memory.raw", "snapshot/state", "snapshot/disk0.raw"];

/// Write `service` to `out`; returns the package's size.
pub fn export(service: &ServiceVm, out: &Path) -> Result<u64, ServiceError> {
    let mut files = snapshot_files(&service.snapshot()?);
    for a in &service.manifest().client_apps {
        files.push((format!("apps/{}", a.file), service.app_path(a)));
    }
    let meta = serde_json::to_value(service.manifest()).expect("manifest serializes");
    Ok(write_package(out, PACKAGE_KIND, PACKAGE_FORMAT, "service", meta, &files)?)
}

/// Import a package into `repo` under its id (or `rename`).
pub fn import(data: &DataDir, repo: &Repository, file: &Path, rename: Option<&str>) -> Result<ServiceVm, ServiceError> {
    let bad = |detail: String| ServiceError::Bad { path: file.to_path_buf(), detail };
    let staging = repo.staging("import")?;
    let result = (|| {
        DataDir::ensure(&staging.join("snapshot"))?;
        let allowed = |n: &str| SNAPSHOT_ENTRIES.contains(&n) || n.strip_prefix("apps/").is_some_and(crate::plain);
        let meta = read_package(file, PACKAGE_KIND, PACKAGE_FORMAT, "service", &allowed, &staging)?;
        let mut manifest =
            ServiceManifest::parse(meta.to_string().as_bytes()).map_err(|e| bad(format!("service: {e}")))?;
        for a in &manifest.client_apps {
            let (size, sha) = file_digest(&staging.join("apps").join(&a.file))
                .map_err(|_| bad(format!("client app {} has no file", a.id)))?;
            if size != a.size || sha != a.sha256 {
                return Err(bad(format!("client app {} does not match its checksum", a.id)));
            }
        }
        if let Some(id) = rename {
            manifest.id = id.to_string();
        }
        let mut snapshot = forage_vm::Snapshot::open(&staging.join("snapshot"))?;
        // The creator's kernel paths mean nothing here: boot from the local image of that name.
        let image = forage_image::GuestImage::open(data, &manifest.image)
            .map_err(|e| bad(format!("guest image {}: {e}", manifest.image)))?;
        snapshot
            .set_direct_boot(image.dir().join(&image.manifest().kernel), image.dir().join(&image.manifest().initrd))?;
        manifest.source = format!("package {}", file.display());
        Ok(manifest)
    })();
    match result {
        Ok(manifest) => repo.install(&staging, manifest, &[]),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}
