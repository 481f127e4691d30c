//! A peer cloudlet's VM description (HandoffBegin's `vm`, JSON) is checked before the
//! destination looks anything up or writes anything: parsed, then `check_fits` against a
//! small host. What passes must be safe to turn into a QEMU command line and paths.
#![no_main]
use forage_vm::snapshot::SnapshotManifest;
use forage_vm::HostCapacity;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(vm) = serde_json::from_slice::<SnapshotManifest>(data) else { return };
    let host = HostCapacity { vcpus: 4, memory_bytes: 8 << 30, disk_bytes: 64 << 30 };
    if vm.check_fits(&host, &["pc"]).is_err() {
        return;
    }
    assert!(vm.spec.memory_mib as u64 * (1 << 20) <= host.memory_bytes, "check_fits let too much memory through");
    let _ = vm.spec.qemu_args(forage_vm::Accel::Tcg, true);
    let _ = vm.hardware_fingerprint.len();
});
