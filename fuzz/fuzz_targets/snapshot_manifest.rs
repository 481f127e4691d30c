//! Descriptions read from disk that may come from elsewhere: VM snapshots and specs.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(m) = serde_json::from_slice::<forage_vm::snapshot::SnapshotManifest>(data) {
        let _ = m.spec.hardware_fingerprint();
        let _ = m.spec.qemu_args(forage_vm::Accel::Tcg, true);
    }
});
