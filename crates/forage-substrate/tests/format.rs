//! The substrate file: a round trip keeps every byte and every hole; any damage is refused
//! with one line before a sink sees a byte it would have to undo.

use forage_substrate::format::{self, DecodeError, ToFiles};
use forage_testkit::synthetic;

#[test]
fn round_trip_keeps_data_and_holes_and_damage_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let (file, m) = synthetic::substrate(t.path(), "s1", 20);
    let mem = &m.sections[0];
    // 20 pages, each followed by a hole, in one 1 MiB window (format 3).
    assert_eq!((mem.name.as_str(), mem.extents, mem.data_bytes), ("memory", 1, 20 * 4096));
    assert_eq!(format::verify(&file).unwrap().name, "s1");
    // A seed for the fuzz target (docs/fuzzing.md): a whole, valid substrate.
    if let Some(seeds) = std::env::var_os("FORAGE_FUZZ_SEEDS") {
        std::fs::create_dir_all(&seeds).unwrap();
        std::fs::copy(&file, std::path::Path::new(&seeds).join("synthetic.substrate")).unwrap();
    }

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

#[test]
fn a_disk_kept_over_the_image_holds_only_its_differences() {
    let t = tempfile::tempdir().unwrap();
    let (_, mut m) = synthetic::substrate(t.path(), "s2", 2);
    let snap = t.path().join("s2-snapshot");
    // The image's disk, and the VM's: one page changed, one zeroed (discarded), one new.
    let image = t.path().join("image-disk.raw");
    std::fs::copy(snap.join("disk0.raw"), &image).unwrap();
    for i in 0..8 {
        synthetic::put(&image, i, &synthetic::pattern(500 + i));
    }
    let disk = snap.join("disk0.raw");
    std::fs::copy(&image, &disk).unwrap();
    synthetic::put(&disk, 2, &synthetic::pattern(77));
    synthetic::put(&disk, 5, &[0u8; 4096]);
    synthetic::put(&disk, 20, &synthetic::pattern(78));
    let inputs = [
        format::SectionInput { name: "memory".into(), path: snap.join("memory.raw"), base: None },
        format::SectionInput { name: "disk0".into(), path: disk.clone(), base: Some(image.clone()) },
        format::SectionInput { name: "state".into(), path: snap.join("state"), base: None },
    ];
    let file = t.path().join("s2.substrate");
    format::encode(&file, &mut m, &inputs, t.path(), format::DEFAULT_LEVEL).unwrap();
    let d = &m.sections[1];
    assert!(d.over_image && d.data_bytes == 3 * 4096, "only the three pages that differ: {d:?}");

    let out = t.path().join("decoded.raw");
    let targets = || vec![("disk0".to_string(), out.clone())];
    let sink = ToFiles::new(targets()).with_base("disk0", image.clone());
    format::decode(std::fs::File::open(&file).unwrap(), &mut { sink }).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&disk).unwrap());
    // Without the image at hand it is refused, not decoded against zeros.
    let e = format::decode(std::fs::File::open(&file).unwrap(), &mut ToFiles::new(targets())).unwrap_err();
    assert!(e.to_string().contains("reading") || matches!(e, DecodeError::Io(_)), "{e}");
}

#[test]
fn memory_equal_to_the_images_disk_is_kept_as_references_checked_on_decode() {
    let t = tempfile::tempdir().unwrap();
    let (_, mut m) = synthetic::substrate(t.path(), "s3", 4);
    let snap = t.path().join("s3-snapshot");
    let image = t.path().join("image-disk.raw");
    std::fs::copy(snap.join("disk0.raw"), &image).unwrap();
    // Memory pages 0 and 2 hold patterns 0 and 1 (`synthetic::substrate`); the image's disk
    // holds pattern 1 at block 7: that page becomes a reference, the other stays data.
    synthetic::put(&image, 7, &synthetic::pattern(1));
    let disk = snap.join("disk0.raw");
    std::fs::copy(&image, &disk).unwrap();
    let inputs = [
        format::SectionInput { name: "memory".into(), path: snap.join("memory.raw"), base: None },
        format::SectionInput { name: "disk0".into(), path: disk.clone(), base: Some(image.clone()) },
        format::SectionInput { name: "state".into(), path: snap.join("state"), base: None },
    ];
    let file = t.path().join("s3.substrate");
    format::encode(&file, &mut m, &inputs, t.path(), format::DEFAULT_LEVEL).unwrap();
    let mem = &m.sections[0];
    assert_eq!((mem.image_pages, mem.data_bytes), (1, 3 * 4096), "{mem:?}");
    assert_eq!(format::verify(&file).unwrap().sections, m.sections);
    // A seed for the fuzz target (docs/fuzzing.md), in the form whose checksum the target
    // appends (an odd first byte, the file without its checksum): format 3 windows and an
    // image block, under the fuzzer's 64 KiB length limit.
    if let Some(seeds) = std::env::var_os("FORAGE_FUZZ_SEEDS") {
        let bytes = std::fs::read(&file).unwrap();
        let seed = [&[1u8][..], &bytes[..bytes.len() - 32]].concat();
        std::fs::create_dir_all(&seeds).unwrap();
        std::fs::write(std::path::Path::new(&seeds).join("image-blocks.substrate"), seed).unwrap();
    }

    let out = t.path().join("memory.out");
    let targets = || vec![("memory".to_string(), out.clone())];
    let sink = ToFiles::new(targets()).with_base("disk0", image.clone());
    format::decode(std::fs::File::open(&file).unwrap(), &mut { sink }).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(snap.join("memory.raw")).unwrap());
    // Another image (the block differs) is refused with one line naming it.
    synthetic::put(&image, 7, &synthetic::pattern(2));
    let sink = ToFiles::new(targets()).with_base("disk0", image.clone());
    let e = format::decode(std::fs::File::open(&file).unwrap(), &mut { sink }).unwrap_err();
    let line = forage_proto::one_line(&e);
    assert!(line.contains("image differs") && !line.contains('\n'), "{line}");
}

#[test]
fn a_manifest_claiming_more_than_its_sections_hold_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let (_, m) = synthetic::substrate(t.path(), "s4", 3);
    format::check_manifest(&m, format::FORMAT).unwrap();
    let mem = m.sections[0].raw_size;
    type Claim = fn(&mut format::SectionRecord, u64);
    let claims: [(&str, Claim); 4] = [
        // One record per 1 MiB window at most.
        ("extents", |s, raw| s.extents = raw.div_ceil(1 << 20) + 1),
        ("data bytes", |s, raw| s.data_bytes = raw + 1),
        ("image blocks without an image", |s, _| s.image_pages = 1),
        ("encoded bytes", |s, _| s.encoded_bytes = s.extents * (2 << 20)),
    ];
    for (what, claim) in claims {
        let mut bad = m.clone();
        claim(&mut bad.sections[0], mem);
        let e = format::check_manifest(&bad, format::FORMAT).expect_err(what);
        assert!(e.contains("section memory") && !e.contains('\n'), "{what}: {e}");
    }
    // Image blocks: in format 3 only, in memory only, over an image's disk only.
    let mut over = m.clone();
    over.sections[1].over_image = true;
    over.sections[0].image_pages = 1;
    over.sections[0].data_bytes -= 4096;
    format::check_manifest(&over, 3).unwrap();
    assert!(format::check_manifest(&over, 2).is_err());
    let mut full = over.clone();
    full.sections[0].data_bytes = mem;
    assert!(format::check_manifest(&full, 3).unwrap_err().contains("1 image blocks"));
    let mut state = over.clone();
    state.sections[2].image_pages = 1;
    assert!(format::check_manifest(&state, 3).unwrap_err().contains("section state"));
}
