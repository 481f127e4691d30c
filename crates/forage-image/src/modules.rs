//! Kernel modules for the initramfs: the closure of what virtio devices need, in load
//! order. Debian's kernel package ships no `modules.dep` (depmod runs at install time), so
//! dependencies are read from each module's `.modinfo` section (`depends=a,b`).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use object::{Object, ObjectSection};

use crate::ImageError;

/// A module to load: its name and its `.ko` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    pub name: String,
    pub path: PathBuf,
}

/// The modules needed for `wanted`, dependencies first. Modules built into the kernel
/// (listed in `modules.builtin`) are left out.
pub fn closure(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<Module>, ImageError> {
    let index = index(modules_dir)?;
    let builtin = builtin(modules_dir);
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    for w in wanted {
        visit(&normalize(w), &index, &builtin, &mut seen, &mut order, 0)?;
    }
    Ok(order)
}

fn visit(
    name: &str,
    index: &BTreeMap<String, PathBuf>,
    builtin: &HashSet<String>,
    seen: &mut HashSet<String>,
    order: &mut Vec<Module>,
    depth: usize,
) -> Result<(), ImageError> {
    if depth > 32 || !seen.insert(name.to_string()) || builtin.contains(name) {
        return Ok(());
    }
    let path = index.get(name).ok_or_else(|| ImageError::ModuleMissing { module: name.to_string() })?;
    for dep in depends(path)? {
        visit(&dep, index, builtin, seen, order, depth + 1)?;
    }
    order.push(Module { name: name.to_string(), path: path.clone() });
    Ok(())
}

/// Module names use '_' and '-' interchangeably; the kernel folds them to '_'.
fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

fn index(dir: &Path) -> Result<BTreeMap<String, PathBuf>, ImageError> {
    let mut map = BTreeMap::new();
    let mut stack = vec![dir.join("kernel")];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|source| ImageError::Io { path: d.clone(), source })?;
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(stem) = p.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".ko")) {
                map.insert(normalize(stem), p);
            }
        }
    }
    Ok(map)
}

fn builtin(dir: &Path) -> HashSet<String> {
    std::fs::read_to_string(dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .filter_map(|f| f.strip_suffix(".ko"))
        .map(normalize)
        .collect()
}

/// The `depends=` entry of a module's `.modinfo` section.
pub fn depends(ko: &Path) -> Result<Vec<String>, ImageError> {
    let bad = |detail: String| ImageError::BadModule { path: ko.to_path_buf(), detail };
    let data = std::fs::read(ko).map_err(|source| ImageError::Io { path: ko.to_path_buf(), source })?;
    let file = object::File::parse(&*data).map_err(|e| bad(e.to_string()))?;
    let section = file.section_by_name(".modinfo").ok_or_else(|| bad("no .modinfo section".into()))?;
    let info = section.data().map_err(|e| bad(e.to_string()))?;
    Ok(parse_depends(info))
}

fn parse_depends(modinfo: &[u8]) -> Vec<String> {
    modinfo
        .split(|&b| b == 0)
        .filter_map(|field| field.strip_prefix(b"depends="))
        .flat_map(|deps| String::from_utf8_lossy(deps).split(',').map(str::to_string).collect::<Vec<_>>())
        .filter(|d| !d.is_empty())
        .map(|d| normalize(&d))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_field_is_split_and_normalized() {
        let info = b"license=GPL\0depends=virtio_ring,virtio,net-failover\0intree=Y\0";
        assert_eq!(parse_depends(info), ["virtio_ring", "virtio", "net_failover"]);
        assert!(parse_depends(b"depends=\0").is_empty());
        assert!(parse_depends(b"").is_empty());
    }
}
