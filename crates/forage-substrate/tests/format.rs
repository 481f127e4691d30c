//! The substrate file: a round trip keeps every byte and every hole; any damage is refused
//! with one line before a sink sees a byte it would have to undo.

use forage_substrate::format::{self, DecodeError, ToFiles};
use forage_testkit::synthetic;

#[test]
fn round_trip_keeps_data_and_holes_and_damage_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let (file, m) = synthetic::substrate(t.path(), "s1", 20);
    let mem = &m.sections[0];
    assert_eq!((mem.name.as_str(), mem.extents, mem.data_bytes), ("memory", 20, 20 * 4096));
    assert_eq!(format::verify(&file).unwrap().name, "s1");

    let out = t.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let targets = vec![("memory".into(), out.join("memory.raw")), ("disk0".into(), out.join("disk0.raw"))];
    format::decode(std::fs::File::open(&file).unwrap(), &mut ToFiles::new(targets)).unwrap();
    let src = t.path().join("s1-snapshot");
    for f in ["memory.raw", "disk0.raw"] {
        assert_eq!(std::fs::read(out.join(f)).unwrap(), std::fs::read(src.join(f)).unwrap(), "{f}");
    }
    let holes = forage_vm::sparse::allocated_bytes(&out.join("memory.raw")).unwrap();
    assert!(holes <= 24 * 4096, "only data is written: {holes} bytes allocated");

    let bytes = std::fs::read(&file).unwrap();
    // A flipped byte anywhere (manifest, extent, checksum) is refused.
    for at in [10, 40, bytes.len() / 2, bytes.len() - 40, bytes.len() - 1] {
        let mut bad = bytes.clone();
        bad[at] ^= 0x55;
        let e = format::decode(&bad[..], &mut format::Discard).unwrap_err();
        assert!(!e.to_string().contains('\n'), "one line: {e}");
    }
    // Truncated at every kind of boundary, or with bytes after the end.
    for len in [0, 7, 23, 100, bytes.len() - 33, bytes.len() - 1] {
        assert!(format::decode(&bytes[..len], &mut format::Discard).is_err(), "truncated at {len}");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(format::decode(&longer[..], &mut format::Discard), Err(DecodeError::Trailing)));
    let mut newer = bytes.clone();
    newer[8] = 9;
    assert!(matches!(format::decode(&newer[..], &mut format::Discard), Err(DecodeError::NewerFormat(9))));
    assert_eq!(synthetic::MEM_CHUNKS * 4096, mem.raw_size);
}
