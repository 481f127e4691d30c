//! A disk image brought from elsewhere (`forage base create NAME --disk FILE`): what it is,
//! checked before anything reads it as a disk, and its conversion into a base's disk (raw,
//! sparse, a whole number of 4 KiB chunks) by `qemu-img convert`, which streams.
//!
//! The file is untrusted. Its format is read from its first bytes and must be what the
//! operator said (raw or qcow2); any other image format is named and refused. A qcow2
//! header names other files QEMU would open (a backing file, an external data file):
//! refused, those could read the host's files into the base. The virtual size is capped.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::disk_error::DiskBaseError;

/// Largest virtual disk taken by default (64 GiB); `--max-disk-gib` raises it.
pub const DEFAULT_MAX_DISK_BYTES: u64 = 64 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    Raw,
    Qcow2,
}

impl InputFormat {
    pub fn name(self) -> &'static str {
        match self {
            InputFormat::Raw => "raw",
            InputFormat::Qcow2 => "qcow2",
        }
    }
}

/// A disk image that passed the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedDisk {
    pub path: PathBuf,
    pub format: InputFormat,
    pub virtual_size: u64,
}

/// Magic numbers of image formats forage does not take as raw: (offset, bytes, name).
const OTHER_FORMATS: &[(usize, &[u8], &str)] = &[
    (0, b"QED\0", "QED"),
    (0, b"KDMV", "VMDK"),
    (0, b"# Disk DescriptorFile", "VMDK descriptor"),
    (0, b"conectix", "VHD"),
    (0, b"vhdxfile", "VHDX"),
    (0, b"<<< ", "VDI"),
    (0, b"LUKS\xba\xbe", "LUKS"),
    (0, b"OOOM", "QCOW1"),
];
const QCOW2_MAGIC: &[u8] = b"QFI\xfb";

/// Check `path` is a regular file of the format claimed (or, with none claimed, raw or
/// qcow2 by its magic), with no other files named inside and a virtual size of at most
/// `max_bytes`.
pub fn check(path: &Path, claimed: Option<InputFormat>, max_bytes: u64) -> Result<CheckedDisk, DiskBaseError> {
    let io = |source| DiskBaseError::Io { path: path.to_path_buf(), source };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(DiskBaseError::NotAFile { path: path.to_path_buf() });
    }
    let mut head = vec![0u8; 512];
    let mut f = std::fs::File::open(path).map_err(io)?;
    let n = read_up_to(&mut f, &mut head).map_err(io)?;
    head.truncate(n);
    let (format, header_size) = sniff(path, &head, claimed)?;
    let virtual_size = match header_size {
        None => meta.len(),
        Some(size) => qcow2_info_agrees(path, size)?,
    };
    if virtual_size == 0 || !virtual_size.is_multiple_of(512) {
        return Err(DiskBaseError::BadSize { path: path.to_path_buf(), size: virtual_size });
    }
    if virtual_size > max_bytes {
        return Err(DiskBaseError::TooBig { path: path.to_path_buf(), size: virtual_size, max: max_bytes });
    }
    Ok(CheckedDisk { path: path.to_path_buf(), format, virtual_size })
}

fn read_up_to(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The format of a disk image from its first bytes (up to 512), as `claimed` or, with
/// nothing claimed, by its magic; for a qcow2, the virtual size its header says. Pure: the
/// fuzz target `disk_header` runs it on any bytes.
///
/// The qcow2 header (QEMU's docs/interop/qcow2.txt): version at 4, backing file offset at
/// 8 and size at 16, virtual size at 24, incompatible features at 72 (version 3; bit 2:
/// an external data file).
pub fn sniff(
    path: &Path,
    head: &[u8],
    claimed: Option<InputFormat>,
) -> Result<(InputFormat, Option<u64>), DiskBaseError> {
    let is_qcow2 = head.starts_with(QCOW2_MAGIC);
    if let Some((_, _, name)) = OTHER_FORMATS.iter().find(|(off, m, _)| head.get(*off..*off + m.len()) == Some(*m)) {
        if claimed != Some(InputFormat::Raw) || head.starts_with(b"# Disk DescriptorFile") {
            return Err(DiskBaseError::OtherFormat { path: path.to_path_buf(), found: name });
        }
    }
    let bad =
        |claimed: &'static str, found: String| DiskBaseError::NotAsClaimed { path: path.to_path_buf(), claimed, found };
    match (claimed, is_qcow2) {
        (Some(InputFormat::Raw), true) => Err(bad("raw", "a qcow2 image (pass --format qcow2)".into())),
        (Some(InputFormat::Qcow2), false) => Err(bad("qcow2", "no qcow2 header (QFI\\xfb)".into())),
        (_, false) => Ok((InputFormat::Raw, None)),
        (_, true) => {
            if head.len() < 104 {
                return Err(bad("qcow2", "a qcow2 header cut short".into()));
            }
            let version = be32(head, 4);
            if !(2..=3).contains(&version) {
                return Err(bad("qcow2", format!("qcow2 version {version} (2 or 3 expected)")));
            }
            if be64(head, 8) != 0 || be32(head, 16) != 0 {
                return Err(DiskBaseError::NamesHostFile { path: path.to_path_buf(), what: "a backing file" });
            }
            if version == 3 && be64(head, 72) & 0x4 != 0 {
                return Err(DiskBaseError::NamesHostFile { path: path.to_path_buf(), what: "an external data file" });
            }
            Ok((InputFormat::Qcow2, Some(be64(head, 24))))
        }
    }
}

/// `qemu-img info` must read the qcow2, name no other file, and agree on its size.
fn qcow2_info_agrees(path: &Path, size: u64) -> Result<u64, DiskBaseError> {
    let bad =
        |detail: String| DiskBaseError::NotAsClaimed { path: path.to_path_buf(), claimed: "qcow2", found: detail };
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "qcow2"])
        .arg(path)
        .output()
        .map_err(|e| DiskBaseError::Tool { tool: "qemu-img info", detail: e.to_string() })?;
    if !out.status.success() {
        return Err(bad(format!("qemu-img cannot read it: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| DiskBaseError::Tool { tool: "qemu-img info", detail: e.to_string() })?;
    if info.get("backing-filename").is_some() || info["format-specific"]["data"].get("data-file").is_some() {
        return Err(DiskBaseError::NamesHostFile { path: path.to_path_buf(), what: "another file" });
    }
    if info["virtual-size"].as_u64() != Some(size) {
        return Err(bad(format!("its header says {size} bytes, qemu-img says {}", info["virtual-size"])));
    }
    Ok(size)
}

/// Convert the checked disk into a raw, sparse file `out` of a whole number of 4 KiB
/// (`qemu-img convert` streams; the tail, if any, is zeros). A qcow2 is opened with no
/// backing file whatever its header says (`backing: null`).
pub fn convert(disk: &CheckedDisk, out: &Path) -> Result<u64, DiskBaseError> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-q", "-O", "raw", "-S", "4k"]);
    match disk.format {
        InputFormat::Raw => {
            cmd.args(["-f", "raw"]).arg(&disk.path);
        }
        InputFormat::Qcow2 => {
            let spec = serde_json::json!({
                "driver": "qcow2", "backing": null,
                "file": {"driver": "file", "filename": disk.path.to_string_lossy()},
            });
            cmd.arg(format!("json:{spec}"));
        }
    }
    let o =
        cmd.arg(out).output().map_err(|e| DiskBaseError::Tool { tool: "qemu-img convert", detail: e.to_string() })?;
    if !o.status.success() {
        let _ = std::fs::remove_file(out);
        return Err(DiskBaseError::Tool {
            tool: "qemu-img convert",
            detail: String::from_utf8_lossy(&o.stderr).trim().to_string(),
        });
    }
    let size = disk.virtual_size.div_ceil(4096) * 4096;
    let io = |source| DiskBaseError::Io { path: out.to_path_buf(), source };
    std::fs::OpenOptions::new().write(true).open(out).and_then(|f| f.set_len(size)).map_err(io)?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_img() -> bool {
        Command::new("qemu-img").arg("--version").output().is_ok_and(|o| o.status.success())
    }

    fn mk(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
        let p = dir.join(name);
        let st = Command::new("qemu-img").args(["create", "-q"]).args(args).arg(&p).arg("8M").status().unwrap();
        assert!(st.success());
        p
    }

    #[test]
    fn formats_are_what_was_claimed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("d.raw");
        std::fs::write(&raw, vec![7u8; 1 << 20]).unwrap();
        let c = check(&raw, None, 1 << 30).unwrap();
        assert_eq!((c.format, c.virtual_size), (InputFormat::Raw, 1 << 20));
        let err = check(&raw, Some(InputFormat::Qcow2), 1 << 30).unwrap_err().to_string();
        assert!(err.contains("is not qcow2") && err.contains("no qcow2 header"), "{err}");
        let vmdk = dir.path().join("d.vmdk");
        std::fs::write(&vmdk, b"# Disk DescriptorFile\nRW 8 FLAT \"/etc/shadow\" 0\n").unwrap();
        for claimed in [None, Some(InputFormat::Raw)] {
            let err = check(&vmdk, claimed, 1 << 30).unwrap_err().to_string();
            assert!(err.contains("VMDK descriptor image"), "{err}");
        }
        assert!(check(&raw, None, 4096).unwrap_err().to_string().contains("over the cap"));
        assert!(matches!(check(dir.path(), None, 1 << 30), Err(DiskBaseError::NotAFile { .. })));
        std::fs::write(&raw, b"short").unwrap();
        assert!(matches!(check(&raw, None, 1 << 30), Err(DiskBaseError::BadSize { .. })));
    }

    #[test]
    fn qcow2_naming_other_files_is_refused() {
        if !qemu_img() {
            eprintln!("no qemu-img: skipped");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let plain = mk(dir.path(), "p.qcow2", &["-f", "qcow2"]);
        let c = check(&plain, Some(InputFormat::Qcow2), 1 << 30).unwrap();
        assert_eq!((c.format, c.virtual_size), (InputFormat::Qcow2, 8 << 20));
        let err = check(&plain, Some(InputFormat::Raw), 1 << 30).unwrap_err().to_string();
        assert!(err.contains("pass --format qcow2"), "{err}");
        let out = dir.path().join("out.raw");
        assert_eq!(convert(&c, &out).unwrap(), 8 << 20);
        let backed = mk(dir.path(), "b.qcow2", &["-f", "qcow2", "-F", "raw", "-b", "/etc/passwd"]);
        let err = check(&backed, None, 1 << 30).unwrap_err().to_string();
        assert!(err.contains("names a backing file"), "{err}");
        // A size over the cap, claimed by a tiny file.
        let big = dir.path().join("big.qcow2");
        let st = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&big).arg("100T").status().unwrap();
        assert!(st.success());
        let err = check(&big, None, DEFAULT_MAX_DISK_BYTES).unwrap_err().to_string();
        assert!(err.contains("over the cap"), "{err}");
    }
}
