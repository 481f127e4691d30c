//! A substrate made from a synthetic snapshot (no QEMU): for the format and push tests.

use std::path::{Path, PathBuf};

use forage_substrate::format::{self, SectionInput, SubstrateManifest};
use forage_testkit::synthetic;

/// Encode a synthetic snapshot whose memory holds `pages` incompressible 4 KiB pages
/// (and a hole after each) into `dir/NAME.substrate`.
#[allow(dead_code)]
pub fn synthetic_substrate(dir: &Path, name: &str, pages: u64) -> (PathBuf, SubstrateManifest) {
    let snap_dir = dir.join(format!("{name}-snapshot"));
    let snap = synthetic::describe_snapshot_of(&snap_dir);
    let mem = snap.memory_path();
    for i in 0..pages.min(synthetic::MEM_CHUNKS / 2) {
        synthetic::put(&mem, i * 2, &synthetic::pattern(i));
    }
    synthetic::put(&snap.disk_paths()[0], 3, &synthetic::pattern(999));
    let mut m = SubstrateManifest {
        kind: format::KIND.into(),
        format: format::FORMAT,
        name: name.into(),
        source: "synthetic".into(),
        image: "tiny".into(),
        image_recipe: "none".into(),
        service_port: None,
        docked_memory_bytes: 1 << 20,
        docked_at_unix: 0,
        snapshot: snap.manifest().clone(),
        sections: Vec::new(),
    };
    let inputs = [
        SectionInput { name: "memory".into(), path: mem },
        SectionInput { name: "disk0".into(), path: snap.disk_paths()[0].clone() },
        SectionInput { name: "state".into(), path: snap.state_path() },
    ];
    let out = dir.join(format!("{name}.substrate"));
    format::encode(&out, &mut m, &inputs, dir).unwrap();
    (out, m)
}
