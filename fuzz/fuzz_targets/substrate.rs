//! Substrate files (from the pool, or received by multicast from another host): the whole
//! decoder (header, manifest checks, extents or windows of pages, zstd, checksum, end of file), once into a
//! sink that only checks and, when that accepts it, once into files as an activation
//! would (a disk kept over the guest image's disk decoded against a stand-in image).
//!
//! A fuzzer cannot forge a sha256, so inputs whose first byte is odd get the right
//! checksum appended to the rest: those reach everything after the checksum (the end of
//! file, the decode into files) with arbitrary manifests and extents.
#![no_main]
use std::sync::OnceLock;

use forage_substrate::format::{self, Discard, ToFiles};
use sha2::{Digest, Sha256};

fn dir() -> &'static std::path::Path {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("forage-fuzz-substrate-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let owned;
    let data = match data.split_first() {
        Some((first, rest)) if first & 1 == 1 => {
            let mut v = rest.to_vec();
            v.extend_from_slice(&Sha256::digest(rest));
            owned = v;
            &owned[..]
        }
        _ => data,
    };
    let Ok(m) = format::decode(data, &mut Discard) else { return };
    let d = dir();
    let mut targets = Vec::new();
    let mut sink_bases = Vec::new();
    for s in &m.sections {
        let path = d.join(format!("{}.raw", s.name));
        if s.over_image {
            let base = d.join(format!("{}.image", s.name));
            let f = std::fs::File::create(&base).unwrap();
            f.set_len(s.raw_size).unwrap();
            sink_bases.push((s.name.clone(), base));
        }
        targets.push((s.name.clone(), path));
    }
    let mut sink = ToFiles::new(targets);
    for (name, base) in sink_bases {
        sink = sink.with_base(&name, base);
    }
    let again = format::decode(data, &mut sink);
    // Memory pages kept as references to the image's disk are checked against its blocks
    // (SHA-256): against the stand-in image of zeros only a reference to a zero block
    // decodes; any other is refused.
    let refs = m.sections.iter().any(|s| s.image_pages > 0);
    match again {
        Ok(again) => assert_eq!(again.sections, m.sections),
        Err(e) => {
            let other_image = matches!(&e, format::DecodeError::Io(io) if io.kind() == std::io::ErrorKind::InvalidData);
            assert!(refs && other_image, "an input that verified decodes into files: {e}")
        }
    }
    for s in &m.sections {
        let path = d.join(format!("{}.raw", s.name));
        if !refs {
            assert_eq!(std::fs::metadata(&path).unwrap().len(), s.raw_size, "{}", s.name);
        }
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_file(d.join(format!("{}.image", s.name)));
    }
});
