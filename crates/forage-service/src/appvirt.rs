//! Application virtualization: a program packed with every file it needs (its dynamic
//! loader, the closure of its shared libraries, data files named by the packer), run in a
//! VM of the same OS through the packed loader (`ld.so --library-path`), so nothing is
//! installed in the guest and nothing of the guest's own libraries is used.
//!
//! A bundle (`.fapp`) is a zstd tar whose first entry `app.json` ([`BundleManifest`]) lists
//! every file with size, mode and SHA-256; files sit at their host path without the
//! leading `/`. At most [`MAX_BUNDLE`] bytes: it travels in one protocol frame and is
//! checked in memory. [`AppBundle::open`] reads untrusted bytes: every entry listed once
//! and matching, paths plain and relative, and every ELF file's loader and `DT_NEEDED`
//! libraries present in the bundle. `docs/app-virtualization.md` is the reference.

use std::collections::{BTreeMap, VecDeque};
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const BUNDLE_KIND: &str = "forage-app-bundle";
pub const BUNDLE_FORMAT: u32 = 1;
/// Largest bundle (compressed), and largest unpacked content.
pub const MAX_BUNDLE: usize = 32 << 20;
pub const MAX_UNPACKED: u64 = 256 << 20;
const MAX_MANIFEST: u64 = 1 << 20;
/// Where libraries are looked for when packing, after RPATH/RUNPATH and LD_LIBRARY_PATH
/// (Debian's multiarch layout first).
const SYSTEM_LIB_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
    "/usr/local/lib",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleManifest {
    pub kind: String,
    pub format: u32,
    pub name: String,
    /// OS the program was packed on (`linux-x86_64`): the VM's must match.
    pub os: String,
    /// Guest TCP port the program listens on.
    pub port: u16,
    #[serde(default)]
    pub probe: Option<String>,
    /// The dynamic loader inside the bundle; none for a static program.
    #[serde(default)]
    pub interpreter: Option<String>,
    /// Bundle folders holding libraries, in search order.
    #[serde(default)]
    pub library_path: Vec<String>,
    /// `argv[0]` is the program inside the bundle.
    pub argv: Vec<String>,
    pub files: Vec<BundleFile>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleFile {
    pub path: String,
    pub size: u64,
    pub mode: u32,
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AppVirtError {
    #[error("{program}: {detail}")]
    Pack { program: String, detail: String },
    #[error("{program} needs {library}, which is not in {searched}")]
    MissingLibrary { program: String, library: String, searched: String },
    #[error("app bundle: {0}")]
    Bad(String),
    #[error("app bundle is for {bundle}, this VM runs {vm}")]
    WrongOs { bundle: String, vm: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AppVirtError + '_ {
    move |source| AppVirtError::Io { path: path.to_path_buf(), source }
}

/// What an ELF file asks of the dynamic loader.
#[derive(Debug, Default, PartialEq)]
pub struct ElfDeps {
    pub interpreter: Option<String>,
    pub needed: Vec<String>,
    pub search: Vec<String>,
}

/// The loader and libraries an ELF file needs; `None` if `data` is not ELF (untrusted).
pub fn elf_deps(data: &[u8]) -> Result<Option<ElfDeps>, String> {
    use object::read::elf::{Dyn, FileHeader, ProgramHeader};
    if !data.starts_with(b"\x7fELF") {
        return Ok(None);
    }
    let header = object::elf::FileHeader64::<object::Endianness>::parse(data).map_err(|e| e.to_string())?;
    let endian = header.endian().map_err(|e| e.to_string())?;
    let mut deps = ElfDeps::default();
    for ph in header.program_headers(endian, data).map_err(|e| e.to_string())? {
        if let Some(interp) = ph.interpreter(endian, data).map_err(|e| e.to_string())? {
            deps.interpreter = Some(String::from_utf8_lossy(interp).into_owned());
        }
    }
    let sections = header.sections(endian, data).map_err(|e| e.to_string())?;
    if let Some((dyns, link)) = sections.dynamic(endian, data).map_err(|e| e.to_string())? {
        let strings = sections.strings(endian, data, link).map_err(|e| e.to_string())?;
        for d in dyns {
            let tag = d.tag32(endian);
            let text = || {
                d.string(endian, strings).map(|s| String::from_utf8_lossy(s).into_owned()).map_err(|e| e.to_string())
            };
            match tag {
                Some(object::elf::DT_NEEDED) => deps.needed.push(text()?),
                Some(object::elf::DT_RPATH) | Some(object::elf::DT_RUNPATH) => {
                    deps.search.extend(text()?.split(':').map(str::to_string))
                }
                _ => {}
            }
        }
    }
    Ok(Some(deps))
}

/// Pack `argv[0]` (found on PATH if it has no '/') with its closure and `data` files.
pub fn pack(
    argv: &[String],
    name: &str,
    port: u16,
    probe: Option<String>,
    data: &[PathBuf],
) -> Result<Vec<u8>, AppVirtError> {
    let program =
        argv.first().ok_or_else(|| AppVirtError::Pack { program: String::new(), detail: "no program given".into() })?;
    let exe = find_program(program).ok_or_else(|| AppVirtError::Pack {
        program: program.clone(),
        detail: "not found (give a path or a program on PATH)".into(),
    })?;
    let exe = std::fs::canonicalize(&exe).map_err(io(&exe))?;
    // Bundle path -> host file. BTreeMap: a stable order, each path once.
    let mut files: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut lib_dirs: Vec<String> = Vec::new();
    let mut interpreter = None;
    let mut queue = VecDeque::from([(exe.clone(), exe.to_string_lossy().into_owned())]);
    while let Some((host, at)) = queue.pop_front() {
        if files.contains_key(rel(&at)) {
            continue;
        }
        let bytes = std::fs::read(&host).map_err(io(&host))?;
        files.insert(rel(&at).to_string(), host.clone());
        let Some(deps) =
            elf_deps(&bytes).map_err(|detail| AppVirtError::Pack { program: host.display().to_string(), detail })?
        else {
            continue;
        };
        if let Some(i) = deps.interpreter {
            let real = std::fs::canonicalize(&i).map_err(io(Path::new(&i)))?;
            interpreter.get_or_insert_with(|| rel(&i).to_string());
            queue.push_back((real, i));
        }
        let origin = host.parent().unwrap_or(Path::new("/")).to_string_lossy().into_owned();
        let mut dirs: Vec<String> =
            deps.search.iter().map(|d| d.replace("$ORIGIN", &origin).replace("${ORIGIN}", &origin)).collect();
        dirs.extend(
            std::env::var("LD_LIBRARY_PATH")
                .unwrap_or_default()
                .split(':')
                .filter(|d| !d.is_empty())
                .map(str::to_string),
        );
        dirs.extend(SYSTEM_LIB_DIRS.iter().map(|d| d.to_string()));
        for lib in deps.needed {
            let found = dirs.iter().map(|d| Path::new(d).join(&lib)).find(|p| p.is_file()).ok_or_else(|| {
                AppVirtError::MissingLibrary {
                    program: host.display().to_string(),
                    library: lib.clone(),
                    searched: dirs.join(":"),
                }
            })?;
            let dir = found.parent().expect("joined").to_string_lossy().into_owned();
            if !lib_dirs.contains(&rel(&dir).to_string()) {
                lib_dirs.push(rel(&dir).to_string());
            }
            let real = std::fs::canonicalize(&found).map_err(io(&found))?;
            queue.push_back((real, found.to_string_lossy().into_owned()));
        }
    }
    for d in data {
        add_tree(d, &mut files)?;
    }
    let mut listed = Vec::new();
    for (path, host) in &files {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(host).map_err(io(host))?;
        let bytes = std::fs::read(host).map_err(io(host))?;
        listed.push(BundleFile {
            path: path.clone(),
            size: bytes.len() as u64,
            mode: meta.permissions().mode() & 0o777,
            sha256: hex::encode(Sha256::digest(&bytes)),
        });
    }
    let mut run = argv.to_vec();
    run[0] = rel(&exe.to_string_lossy()).to_string();
    let manifest = BundleManifest {
        kind: BUNDLE_KIND.into(),
        format: BUNDLE_FORMAT,
        name: name.to_string(),
        os: crate::this_platform(),
        port,
        probe,
        interpreter,
        library_path: lib_dirs,
        argv: run,
        files: listed,
    };
    let out = write_bundle(&manifest, |f| std::fs::read(&files[&f.path]))
        .map_err(|source| AppVirtError::Io { path: "app bundle".into(), source })?;
    if out.len() > MAX_BUNDLE {
        return Err(AppVirtError::Pack {
            program: program.clone(),
            detail: format!("bundle is {} MiB, over the limit of {} MiB", out.len() >> 20, MAX_BUNDLE >> 20),
        });
    }
    Ok(out)
}

fn write_bundle(
    manifest: &BundleManifest,
    read: impl Fn(&BundleFile) -> std::io::Result<Vec<u8>>,
) -> std::io::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(zstd::stream::write::Encoder::new(Vec::new(), 19)?);
    let json = serde_json::to_vec_pretty(manifest)?;
    let mut header = tar::Header::new_gnu();
    header.set_size(json.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, "app.json", &json[..])?;
    for f in &manifest.files {
        let bytes = read(f)?;
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(f.mode);
        header.set_cksum();
        tar.append_data(&mut header, &f.path, &bytes[..])?;
    }
    tar.into_inner()?.finish()
}

fn rel(path: &str) -> &str {
    path.trim_start_matches('/')
}

fn find_program(p: &str) -> Option<PathBuf> {
    if p.contains('/') {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    std::env::var("PATH").ok()?.split(':').map(|d| Path::new(d).join(p)).find(|c| c.is_file())
}

fn add_tree(path: &Path, files: &mut BTreeMap<String, PathBuf>) -> Result<(), AppVirtError> {
    let abs = std::fs::canonicalize(path).map_err(io(path))?;
    if abs.is_dir() {
        for e in std::fs::read_dir(&abs).map_err(io(&abs))?.flatten() {
            add_tree(&e.path(), files)?;
        }
    } else {
        files.insert(rel(&abs.to_string_lossy()).to_string(), abs);
    }
    Ok(())
}

/// A checked bundle, held in memory.
#[derive(Debug)]
pub struct AppBundle {
    pub manifest: BundleManifest,
    /// Contents by bundle path, in the manifest's order.
    pub files: Vec<Vec<u8>>,
}

impl AppBundle {
    /// Read and check a bundle (untrusted bytes): see the module doc.
    pub fn open(bytes: &[u8]) -> Result<Self, AppVirtError> {
        let bad = |d: String| AppVirtError::Bad(d);
        if bytes.len() > MAX_BUNDLE {
            return Err(bad(format!("{} bytes, over the limit of {MAX_BUNDLE}", bytes.len())));
        }
        let dec = zstd::stream::read::Decoder::new(bytes).map_err(|e| bad(e.to_string()))?;
        let mut tar = tar::Archive::new(dec.take(MAX_UNPACKED + MAX_MANIFEST + (1 << 20)));
        let mut entries = tar.entries().map_err(|e| bad(e.to_string()))?;
        let first = entries.next().ok_or_else(|| bad("empty".into()))?.map_err(|e| bad(e.to_string()))?;
        if first.path().map(|p| p.as_os_str() != "app.json").unwrap_or(true) || first.size() > MAX_MANIFEST {
            return Err(bad("app.json is not the first entry".into()));
        }
        let mut json = Vec::new();
        first.take(MAX_MANIFEST).read_to_end(&mut json).map_err(|e| bad(e.to_string()))?;
        let manifest: BundleManifest = serde_json::from_slice(&json).map_err(|e| bad(format!("app.json: {e}")))?;
        if manifest.kind != BUNDLE_KIND || manifest.format == 0 || manifest.format > BUNDLE_FORMAT {
            return Err(bad(format!(
                "{:?} format {} is not an app bundle this forage reads",
                manifest.kind, manifest.format
            )));
        }
        if !crate::plain(&manifest.name) {
            return Err(bad(format!("app name {:?} must be letters, digits, '-', '_', '.'", manifest.name)));
        }
        let mut total = 0u64;
        for f in &manifest.files {
            if !relative_plain(&f.path) {
                return Err(bad(format!("file path {:?} is not a plain relative path", f.path)));
            }
            total = total.saturating_add(f.size);
        }
        if total > MAX_UNPACKED {
            return Err(bad(format!("unpacks to {total} bytes, over the limit of {MAX_UNPACKED}")));
        }
        let mut files: Vec<Option<Vec<u8>>> = vec![None; manifest.files.len()];
        for entry in entries {
            let mut entry = entry.map_err(|e| bad(format!("cut or corrupted: {e}")))?;
            let path = entry.path().map_err(|e| bad(e.to_string()))?.to_string_lossy().into_owned();
            let i = manifest
                .files
                .iter()
                .position(|f| f.path == path)
                .ok_or_else(|| bad(format!("unlisted entry {path:?}")))?;
            let f = &manifest.files[i];
            if files[i].is_some() || entry.header().entry_type() != tar::EntryType::Regular || entry.size() != f.size {
                return Err(bad(format!("entry {path:?} is repeated, not a plain file, or not {} bytes", f.size)));
            }
            let mut data = Vec::with_capacity(f.size as usize);
            (&mut entry).take(f.size).read_to_end(&mut data).map_err(|e| bad(format!("{path}: {e}")))?;
            if hex::encode(Sha256::digest(&data)) != f.sha256 {
                return Err(bad(format!("{path} does not match its checksum (corrupted)")));
            }
            files[i] = Some(data);
        }
        let files: Vec<Vec<u8>> = files
            .into_iter()
            .zip(&manifest.files)
            .map(|(d, f)| d.ok_or_else(|| bad(format!("{} is missing (cut short?)", f.path))))
            .collect::<Result<_, _>>()?;
        let bundle = Self { manifest, files };
        bundle.check_closure()?;
        Ok(bundle)
    }

    fn has(&self, path: &str) -> bool {
        self.manifest.files.iter().any(|f| f.path == path)
    }

    /// The program, the loader and every library any ELF file needs are in the bundle.
    fn check_closure(&self) -> Result<(), AppVirtError> {
        let m = &self.manifest;
        let program = m.argv.first().ok_or_else(|| AppVirtError::Bad("argv is empty".into()))?;
        if !self.has(program) {
            return Err(AppVirtError::Bad(format!("the program {program} is not in the bundle")));
        }
        if let Some(i) = &m.interpreter {
            if !self.has(i) {
                return Err(AppVirtError::Bad(format!("the loader {i} is not in the bundle")));
            }
        }
        for (f, data) in m.files.iter().zip(&self.files) {
            let Some(deps) = elf_deps(data).map_err(|e| AppVirtError::Bad(format!("{}: {e}", f.path)))? else {
                continue;
            };
            if deps.interpreter.is_some() && m.interpreter.is_none() {
                return Err(AppVirtError::Bad(format!("{} needs a loader and the bundle names none", f.path)));
            }
            for lib in deps.needed {
                if !m.library_path.iter().any(|d| self.has(&format!("{d}/{lib}"))) {
                    return Err(AppVirtError::MissingLibrary {
                        program: f.path.clone(),
                        library: lib,
                        searched: format!("the bundle ({})", m.library_path.join(":")),
                    });
                }
            }
        }
        Ok(())
    }

    /// The bundle as bytes again (e.g. after changing it: tests of refusals).
    pub fn to_bytes(&self) -> std::io::Result<Vec<u8>> {
        write_bundle(&self.manifest, |f| {
            let i = self.manifest.files.iter().position(|g| g.path == f.path).expect("listed");
            Ok(self.files.get(i).cloned().unwrap_or_default())
        })
    }

    /// Refuse a VM of another OS.
    pub fn check_os(&self, vm_os: &str) -> Result<(), AppVirtError> {
        if self.manifest.os != vm_os {
            return Err(AppVirtError::WrongOs { bundle: self.manifest.os.clone(), vm: vm_os.to_string() });
        }
        Ok(())
    }

    /// Write the bundle out as an app folder (`forage_agent::app`): its files under
    /// `root/`, and an `app.json` whose start command runs the program through the packed
    /// loader with the packed libraries only.
    pub fn unpack_as_app(&self, dir: &Path) -> Result<(), AppVirtError> {
        use std::os::unix::fs::PermissionsExt;
        for (f, data) in self.manifest.files.iter().zip(&self.files) {
            let target = dir.join("root").join(&f.path);
            let parent = target.parent().expect("joined");
            std::fs::create_dir_all(parent).map_err(io(parent))?;
            std::fs::write(&target, data).map_err(io(&target))?;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(f.mode & 0o777)).map_err(io(&target))?;
        }
        let m = &self.manifest;
        let mut start: Vec<String> = Vec::new();
        if let Some(i) = &m.interpreter {
            let libs: Vec<String> = m.library_path.iter().map(|d| format!("root/{d}")).collect();
            start.extend([format!("./root/{i}"), "--library-path".into(), libs.join(":")]);
        }
        start.push(format!("./root/{}", m.argv[0]));
        start.extend(m.argv[1..].iter().cloned());
        let app = serde_json::json!({ "format": 1, "name": m.name, "port": m.port, "start": start, "probe": m.probe });
        let path = dir.join("app.json");
        std::fs::write(&path, app.to_string()).map_err(io(&path))
    }
}

fn relative_plain(p: &str) -> bool {
    !p.is_empty() && p.len() < 4096 && Path::new(p).components().all(|c| matches!(c, Component::Normal(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_deps_of_a_dynamic_program() {
        let deps = elf_deps(&std::fs::read("/bin/ls").unwrap()).unwrap().unwrap();
        assert!(deps.interpreter.unwrap().contains("ld-linux"));
        assert!(deps.needed.iter().any(|n| n.starts_with("libc.so")));
        assert!(elf_deps(b"#!/bin/sh\n").unwrap().is_none());
        assert!(elf_deps(b"\x7fELF\x02\x01").is_err());
    }

    #[test]
    fn pack_then_open_round_trips_and_checks_the_closure() {
        let bytes = pack(&["ls".into(), "-l".into()], "ls", 8080, None, &[]).unwrap();
        let b = AppBundle::open(&bytes).unwrap();
        assert_eq!(b.manifest.argv[1], "-l");
        assert!(b.manifest.files.iter().any(|f| f.path.ends_with("libc.so.6")));
        b.check_os(&crate::this_platform()).unwrap();
        assert!(matches!(b.check_os("android-aarch64"), Err(AppVirtError::WrongOs { .. })));
        let dir = tempfile::tempdir().unwrap();
        b.unpack_as_app(dir.path()).unwrap();
        let app: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("app.json")).unwrap()).unwrap();
        assert_eq!(app["start"][1], "--library-path");

        // The same bundle without libc: refused, naming the library.
        let libc = b.manifest.files.iter().position(|f| f.path.ends_with("libc.so.6")).unwrap();
        let mut cut = AppBundle { manifest: b.manifest.clone(), files: b.files.clone() };
        cut.manifest.files.remove(libc);
        cut.files.remove(libc);
        let cut = cut.to_bytes().unwrap();
        let err = AppBundle::open(&cut).unwrap_err().to_string();
        assert!(err.contains("libc.so.6"), "{err}");

        // Cut short and corrupted bundles are refused.
        assert!(AppBundle::open(&bytes[..bytes.len() / 2]).is_err());
        let mut flipped = bytes.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0xff;
        assert!(AppBundle::open(&flipped).is_err());
    }

    #[test]
    fn a_missing_library_fails_the_pack() {
        let e =
            AppVirtError::MissingLibrary { program: "p".into(), library: "libx.so.1".into(), searched: "/lib".into() };
        assert_eq!(e.to_string(), "p needs libx.so.1, which is not in /lib");
        assert!(pack(&["no-such-program-here".into()], "x", 1, None, &[]).is_err());
    }
}
