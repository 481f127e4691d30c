//! Substrate files (from the pool, or received by multicast from another host): the whole
//! decoder (header, manifest checks, extents, zstd, checksum, end of file), once into a
//! sink that only checks and once into files, as an activation would after a verify.
#![no_main]
use std::sync::OnceLock;

use forage_substrate::format::{self, Discard, ToFiles};

fn dir() -> &'static std::path::Path {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("forage-fuzz-substrate-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if format::decode(data, &mut Discard).is_ok() {
        let d = dir();
        let targets = vec![("memory".to_string(), d.join("memory.raw")), ("disk0".to_string(), d.join("disk0.raw"))];
        format::decode(data, &mut ToFiles::new(targets)).expect("verified input decodes again");
    }
});
