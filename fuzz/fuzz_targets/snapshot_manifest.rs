//! Saved-VM folders that may come from elsewhere: `snapshot.json` is the fuzzed input,
//! opened with `Snapshot::open` over a folder with small real files beside it, so the
//! description's checks (file names, sizes, state header and checksum) all run.
#![no_main]
use std::sync::OnceLock;

fn dir() -> &'static std::path::Path {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("forage-fuzz-snapshot-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("memory.raw"), vec![0u8; 1 << 20]).unwrap();
        std::fs::write(d.join("disk0.raw"), vec![0u8; 4096]).unwrap();
        std::fs::write(d.join("state"), b"QEVM\0\0\0\x03state").unwrap();
        d
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let d = dir();
    std::fs::write(d.join("snapshot.json"), data).unwrap();
    if let Ok(s) = forage_vm::Snapshot::open(d) {
        let spec = &s.manifest().spec;
        let _ = spec.hardware_fingerprint();
        let _ = spec.qemu_args(forage_vm::Accel::Tcg, true);
        let _ = s.relocated_spec(d, &d.join("q"), None);
    }
});
