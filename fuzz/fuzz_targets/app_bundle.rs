//! Packed applications arrive from devices (`Provision::App`): `AppBundle::open` reads
//! them (zstd, tar, app.json, checksums, then every ELF file's loader and libraries),
//! and the cloudlet then unpacks one. The fuzzed input is the bundle's bytes; a second
//! half of the corpus is ELF files alone, for `elf_deps`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = forage_service::appvirt::elf_deps(data);
    if let Ok(b) = forage_service::appvirt::AppBundle::open(data) {
        let _ = b.check_os("linux-x86_64");
        let dir = std::env::temp_dir().join(format!("forage-fuzz-app-{}", std::process::id()));
        let _ = b.unpack_as_app(&dir);
        let _ = std::fs::remove_dir_all(&dir);
    }
});
