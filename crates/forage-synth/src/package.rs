//! Base VM packages: `forage base export` / `import`. A zstd-compressed tar whose first
//! entry, `package.json`, lists every file with its size and SHA-256, and the base's
//! description; then `snapshot/...` files. Import checks every file, rebuilds the index,
//! recomputes the digest, and only then moves the base into place. Streaming both ways;
//! holes are recreated on import (all-zero 4 KiB blocks are skipped).

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use forage_datadir::DataDir;
use forage_vm::Snapshot;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::base::{BaseManifest, BaseVm};
use crate::SynthError;

pub const PACKAGE_KIND: &str = "forage-base-package";
pub const PACKAGE_FORMAT: u32 = 1;
const MAX_PACKAGE_JSON: u64 = 1 << 20;
/// The entries a base package may hold after package.json.
const ALLOWED: &[&str] = &["snapshot/snapshot.json", "snapshot/memory.raw", "snapshot/state", "snapshot/disk0.raw"];

/// One file of a package, as `package.json` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageFile {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// The files of a saved VM, as package entries `snapshot/...`.
pub fn snapshot_files(snap: &Snapshot) -> Vec<(String, PathBuf)> {
    let mut paths = vec![snap.dir().join(forage_vm::snapshot::MANIFEST_FILE), snap.memory_path(), snap.state_path()];
    paths.extend(snap.disk_paths());
    paths.into_iter().map(|p| (format!("snapshot/{}", p.file_name().unwrap().to_string_lossy()), p)).collect()
}

/// Write a package to `out` (through `out.partial`, renamed when complete): a zstd tar
/// whose first entry `package.json` is `{"kind", "format", <key>: meta, "files": [...]}`
/// and then `files` (entry name, local path) in order. Returns the package's size.
pub fn write_package(
    out: &Path,
    kind: &str,
    format: u32,
    key: &str,
    meta: serde_json::Value,
    files: &[(String, PathBuf)],
) -> Result<u64, SynthError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SynthError::Io { path, source }
    };
    let mut listed = Vec::new();
    for (name, p) in files {
        let mut f = File::open(p).map_err(io(p))?;
        let mut h = Sha256::new();
        let size = std::io::copy(&mut f, &mut h).map_err(io(p))?;
        listed.push(PackageFile { name: name.clone(), size, sha256: hex::encode(h.finalize()) });
    }
    let pkg = serde_json::json!({ "kind": kind, "format": format, key: meta, "files": listed });
    let partial = out.with_extension("partial");
    let result = (|| -> std::io::Result<u64> {
        let enc = zstd::stream::write::Encoder::new(File::create(&partial)?, 3)?;
        let mut tar = tar::Builder::new(enc);
        let json = serde_json::to_vec_pretty(&pkg)?;
        let mut header = tar::Header::new_gnu();
        header.set_size(json.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, "package.json", &json[..])?;
        for ((_, p), f) in files.iter().zip(&listed) {
            let mut header = tar::Header::new_gnu();
            header.set_size(f.size);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(&mut header, &f.name, File::open(p)?)?;
        }
        let file = tar.into_inner()?.finish()?;
        file.sync_all()?;
        Ok(file.metadata()?.len())
    })();
    match result {
        Ok(size) => {
            std::fs::rename(&partial, out).map_err(io(out))?;
            Ok(size)
        }
        Err(source) => {
            let _ = std::fs::remove_file(&partial);
            Err(SynthError::Io { path: out.to_path_buf(), source })
        }
    }
}

/// Read a package written by [`write_package`] (untrusted bytes) into `work` (which must
/// exist): every entry must be allowed, listed once, of its listed size and checksum, and
/// every listed file present; holes are recreated. Returns the `key` part of package.json.
/// On error `work` may hold partial files: the caller removes it.
pub fn read_package(
    file: &Path,
    kind: &str,
    format: u32,
    key: &str,
    allowed: &dyn Fn(&str) -> bool,
    work: &Path,
) -> Result<serde_json::Value, SynthError> {
    let bad = |detail: String| SynthError::BadFile { path: file.to_path_buf(), detail };
    let mut tar = open_archive(file)?;
    let mut entries = tar.entries().map_err(|e| bad(e.to_string()))?;
    let json = package_json(&mut entries, file)?;
    let (meta, listed) = parse_package_json(&json, kind, format, key).map_err(|e| bad(format!("package.json: {e}")))?;
    let mut seen: Vec<String> = Vec::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("cut or corrupted: {e}")))?;
        let ename = entry.path().map_err(|e| bad(e.to_string()))?.to_string_lossy().into_owned();
        // Only allowed plain files: nothing may land elsewhere.
        if !allowed(&ename) || entry.header().entry_type() != tar::EntryType::Regular {
            return Err(bad(format!("unexpected entry {ename:?}")));
        }
        let listed = listed.iter().find(|f| f.name == ename).ok_or_else(|| bad(format!("unlisted entry {ename}")))?;
        if seen.contains(&ename) {
            return Err(bad(format!("{ename} appears twice")));
        }
        if entry.size() != listed.size {
            return Err(bad(format!("{ename} is {} bytes, package.json says {}", entry.size(), listed.size)));
        }
        let target = work.join(&listed.name);
        if let Some(dir) = target.parent() {
            DataDir::ensure(dir)?;
        }
        let (size, sha) =
            write_sparse((&mut entry).take(listed.size), &target).map_err(|e| bad(format!("{ename}: {e}")))?;
        if size != listed.size || sha != listed.sha256 {
            return Err(bad(format!("{ename} does not match its checksum (corrupted)")));
        }
        seen.push(ename);
    }
    if let Some(missing) = listed.iter().find(|f| !seen.contains(&f.name)) {
        return Err(bad(format!("{} is missing (package cut short?)", missing.name)));
    }
    Ok(meta)
}

/// The SHA-256 (hex) of a package's `package.json`, which lists every file's SHA-256:
/// what a package's signature signs.
pub fn package_digest(file: &Path) -> Result<String, SynthError> {
    let mut tar = open_archive(file)?;
    let mut entries =
        tar.entries().map_err(|e| SynthError::BadFile { path: file.to_path_buf(), detail: e.to_string() })?;
    Ok(hex::encode(Sha256::digest(package_json(&mut entries, file)?)))
}

type Archive = tar::Archive<zstd::stream::read::Decoder<'static, std::io::BufReader<File>>>;

fn open_archive(file: &Path) -> Result<Archive, SynthError> {
    let f = File::open(file).map_err(|source| SynthError::Io { path: file.to_path_buf(), source })?;
    let dec = zstd::stream::read::Decoder::new(f)
        .map_err(|e| SynthError::BadFile { path: file.to_path_buf(), detail: e.to_string() })?;
    Ok(tar::Archive::new(dec))
}

/// The first entry, which must be `package.json` (at most 1 MiB).
fn package_json<R: Read>(entries: &mut tar::Entries<'_, R>, file: &Path) -> Result<Vec<u8>, SynthError> {
    let bad = |detail: String| SynthError::BadFile { path: file.to_path_buf(), detail };
    let first = entries.next().ok_or_else(|| bad("empty package".into()))?.map_err(|e| bad(e.to_string()))?;
    if first.path().map(|p| p.as_os_str() != "package.json").unwrap_or(true) || first.size() > MAX_PACKAGE_JSON {
        return Err(bad("package.json is not the first entry".into()));
    }
    let mut json = Vec::new();
    first.take(MAX_PACKAGE_JSON).read_to_end(&mut json).map_err(|e| bad(e.to_string()))?;
    Ok(json)
}

/// package.json of a package: exactly `kind`, `format`, `key` and `files` (untrusted).
pub fn parse_package_json(
    json: &[u8],
    kind: &str,
    format: u32,
    key: &str,
) -> Result<(serde_json::Value, Vec<PackageFile>), String> {
    let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    let got_kind = v.remove("kind").and_then(|k| k.as_str().map(str::to_string)).unwrap_or_default();
    let got_format = v.remove("format").and_then(|f| f.as_u64()).unwrap_or(0);
    if got_kind != kind || got_format == 0 || got_format > format as u64 {
        return Err(format!("{got_kind:?} format {got_format} is not a {kind} this forage reads"));
    }
    let meta = v.remove(key).ok_or_else(|| format!("no {key:?}"))?;
    let files: Vec<PackageFile> =
        serde_json::from_value(v.remove("files").ok_or("no \"files\"")?).map_err(|e| e.to_string())?;
    if let Some(extra) = v.keys().next() {
        return Err(format!("unknown field {extra:?}"));
    }
    Ok((meta, files))
}

/// Write `base` to `out` (through `out.partial`, renamed when complete). Returns its size.
pub fn export(base: &BaseVm, out: &Path) -> Result<u64, SynthError> {
    let meta = serde_json::to_value(base.manifest()).expect("manifest serializes");
    write_package(out, PACKAGE_KIND, PACKAGE_FORMAT, "base", meta, &snapshot_files(base.snapshot()))
}

/// Import a package into the data directory under the name it carries (or `rename`).
pub fn import(data: &DataDir, file: &Path, rename: Option<&str>) -> Result<BaseVm, SynthError> {
    import_expecting(data, file, rename, None)
}

/// [`import`], refusing (before the base is moved into place) a base whose digest is not
/// `expect`: a base fetched by digest from a peer.
pub fn import_expecting(
    data: &DataDir,
    file: &Path,
    rename: Option<&str>,
    expect: Option<&str>,
) -> Result<BaseVm, SynthError> {
    let bad = |detail: String| SynthError::BadFile { path: file.to_path_buf(), detail };
    let work = data.bases().join(format!(".import-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let result = (|| -> Result<String, SynthError> {
        DataDir::ensure(&work.join("snapshot"))?;
        let meta = read_package(file, PACKAGE_KIND, PACKAGE_FORMAT, "base", &|n| ALLOWED.contains(&n), &work)?;
        let base: BaseManifest = serde_json::from_value(meta).map_err(|e| bad(format!("package.json: {e}")))?;
        let name = rename.unwrap_or(&base.name).to_string();
        let final_dir = data.base(&name)?;
        if final_dir.exists() {
            return Err(SynthError::Exists { what: format!("base {name}"), path: final_dir });
        }
        let mut snapshot = Snapshot::open(&work.join("snapshot"))?;
        // The creator's image paths mean nothing here: boot from the local image of that name.
        if let Ok(image) = forage_image::GuestImage::open(data, &base.image) {
            snapshot.set_direct_boot(
                image.dir().join(&image.manifest().kernel),
                image.dir().join(&image.manifest().initrd),
            )?;
        }
        let manifest = crate::base::finish(&work, &name, &base.image, &snapshot, base.disk_introspection)?;
        if let Some(want) = expect.filter(|w| !w.eq_ignore_ascii_case(&manifest.digest)) {
            return Err(bad(format!(
                "contents give digest {}, {} was asked for",
                short(&manifest.digest),
                short(want)
            )));
        }
        if manifest.digest != base.digest {
            return Err(bad(format!(
                "contents give digest {}, the package claims {}",
                short(&manifest.digest),
                short(&base.digest)
            )));
        }
        std::fs::rename(&work, &final_dir).map_err(|source| SynthError::Io { path: final_dir, source })?;
        Ok(name)
    })();
    match result {
        Ok(name) => BaseVm::open(data, &name),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work);
            Err(e)
        }
    }
}

/// The first 12 characters of a digest (any string: digests in files are untrusted).
pub fn short(digest: &str) -> &str {
    digest.char_indices().nth(12).map(|(i, _)| &digest[..i]).unwrap_or(digest)
}

/// Copy `r` into `target`, leaving all-zero 4 KiB blocks as holes; returns size and SHA-256.
fn write_sparse(mut r: impl Read, target: &PathBuf) -> std::io::Result<(u64, String)> {
    let f = File::create(target)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let mut n = 0;
        while n < buf.len() {
            let k = r.read(&mut buf[n..])?;
            if k == 0 {
                break;
            }
            n += k;
        }
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        for (i, block) in buf[..n].chunks(4096).enumerate() {
            if !forage_format::chunk::is_zero(block) {
                f.write_all_at(block, off + (i * 4096) as u64)?;
            }
        }
        off += n as u64;
    }
    f.set_len(off)?;
    let mut f = f;
    f.flush()?;
    f.sync_all()?;
    Ok((off, hex::encode(h.finalize())))
}
