//! Overlay creation and application on synthetic VMs (no QEMU): every reference kind
//! round-trips bit-exactly, free chunks come back as zeros, bad overlays are refused and
//! leave nothing behind.

use forage_datadir::DataDir;
use forage_format::{DeltaCodec, SegmentCodec, Space, CHUNK_SIZE};
use forage_synth::create::CreateOptions;
use forage_synth::ext4::{Checkpoint, Introspection};
use forage_synth::{BaseVm, SynthError};
use forage_testkit::synthetic::*;
use forage_vm::Accel;

#[test]
fn every_reference_kind_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let data = DataDir::at(tmp.path());
    let base = make_base(&data, "b", 0);
    let launch = make_launch(&tmp.path().join("launch"));
    for (delta, codec) in [
        (Some(DeltaCodec::Bsdiff), SegmentCodec::Zstd { level: 3 }),
        (Some(DeltaCodec::Xor), SegmentCodec::Lzma { level: 1 }),
        (None, SegmentCodec::None),
    ] {
        let out = tmp.path().join("o.ovl");
        let report =
            forage_synth::create::create(&base, &input(&launch), &CreateOptions { delta, codec, ..opts() }, &out)
                .unwrap();
        let m = &report.manifest;
        let kinds = m.ref_counts();
        for (k, n) in [
            ("zero", 1),
            ("free", 2),
            ("base_disk", 1),
            ("base_memory", 1),
            ("new", 3),
            ("same_space", 1),
            ("cross_space", 1),
        ] {
            assert_eq!(kinds.get(k).copied().unwrap_or(0), n, "{k} with {delta:?}: {kinds:?}");
        }
        assert_eq!(m.stats.free_by_source["reported"], 1);
        assert_eq!(m.stats.free_by_source["trim"], 1);
        assert!(!m.chunks.iter().any(|c| c.space == Space::Disk && c.index == 8), "unchanged chunk listed");
        if delta.is_some() {
            assert_eq!(m.stats.blobs_delta, 1, "the slightly changed chunk is a delta");
        }

        let applied = tmp.path().join("applied");
        let _ = std::fs::remove_dir_all(&applied);
        let (snap, _) = forage_synth::apply::apply(&out, &base, &applied, Accel::Tcg).unwrap();
        assert_rebuilt(&snap, &launch, m);
        assert_eq!(read_all(&snap.state_path()), read_all(&launch.snap.state_path()));
        std::fs::remove_file(&out).unwrap();
    }
}

#[test]
fn without_dedup_or_semantics_every_modified_chunk_is_carried() {
    let tmp = tempfile::tempdir().unwrap();
    let data = DataDir::at(tmp.path());
    let base = make_base(&data, "b", 0);
    let launch = make_launch(&tmp.path().join("launch"));
    let out = tmp.path().join("o.ovl");
    let o = CreateOptions { dedup: false, semantic_disk: false, semantic_memory: false, ..opts() };
    let m = forage_synth::create::create(&base, &input(&launch), &o, &out).unwrap().manifest;
    assert_eq!(m.ref_counts().keys().copied().collect::<Vec<_>>(), ["new"]);
    assert_eq!(m.chunks.len(), 10);
}

#[test]
fn bad_overlays_are_refused_and_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = DataDir::at(tmp.path());
    let base = make_base(&data, "b", 0);
    let other = make_base(&data, "other", 1);
    assert_ne!(base.digest(), other.digest());
    let launch = make_launch(&tmp.path().join("launch"));
    let good = tmp.path().join("good.ovl");
    forage_synth::create::create(&base, &input(&launch), &opts(), &good).unwrap();
    let bytes = read_all(&good);
    let outdir = tmp.path().join("outs");
    std::fs::create_dir_all(&outdir).unwrap();
    let out = outdir.join("launch");

    // Wrong base.
    let err = forage_synth::apply::apply(&good, &other, &out, Accel::Tcg).unwrap_err();
    assert!(matches!(err, SynthError::WrongBase { .. }), "{err}");
    assert!(err.to_string().contains("other"), "{err}");
    assert_nothing_left(&outdir, &out);

    let bad = tmp.path().join("bad.ovl");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated in a segment", bytes[..bytes.len() - 10].to_vec(), "truncated"),
        ("truncated in the manifest", bytes[..80].to_vec(), "truncated"),
        (
            "newer format",
            {
                let mut b = bytes.clone();
                b[8] = 7;
                b
            },
            "newer",
        ),
        (
            "flipped byte in the last segment",
            {
                let mut b = bytes.clone();
                let n = b.len();
                b[n - 20] ^= 1;
                b
            },
            "checksum",
        ),
        (
            "flipped byte in the manifest",
            {
                let mut b = bytes.clone();
                b[70] ^= 1;
                b
            },
            "checksum",
        ),
        ("not an overlay", b"hello".repeat(20), "magic"),
        ("trailing bytes", [bytes.clone(), b"x".to_vec()].concat(), "after the last segment"),
    ];
    for (what, content, want) in cases {
        std::fs::write(&bad, &content).unwrap();
        let err = forage_synth::apply::apply(&bad, &base, &out, Accel::Tcg).unwrap_err().to_string();
        assert!(err.contains(want) && err.contains("bad.ovl"), "{what}: {err}");
        assert_nothing_left(&outdir, &out);
    }

    // A folder the user already has is never replaced.
    let mine = outdir.join("mine");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), b"keep me").unwrap();
    assert!(matches!(forage_synth::apply::apply(&good, &base, &mine, Accel::Tcg), Err(SynthError::Exists { .. })));
    assert_eq!(std::fs::read(mine.join("notes.txt")).unwrap(), b"keep me");

    // The good one still applies; applying over an existing result is refused.
    forage_synth::apply::apply(&good, &base, &out, Accel::Tcg).unwrap();
    assert!(matches!(forage_synth::apply::apply(&good, &base, &out, Accel::Tcg), Err(SynthError::Exists { .. })));
}

#[test]
fn base_packages_round_trip_and_refuse_tampering() {
    let tmp = tempfile::tempdir().unwrap();
    let data = DataDir::at(tmp.path());
    let base = make_base(&data, "b", 0);
    let pkg = tmp.path().join("b.fbase");
    forage_synth::package::export(&base, &pkg).unwrap();
    let back = forage_synth::package::import(&data, &pkg, Some("copy")).unwrap();
    assert_eq!(back.digest(), base.digest());
    assert!(forage_synth::package::import(&data, &pkg, Some("copy")).is_err(), "existing name");

    // Cut short, or a changed byte inside (re-compressed so zstd itself is fine).
    let bytes = read_all(&pkg);
    std::fs::write(&pkg, &bytes[..bytes.len() / 2]).unwrap();
    assert!(forage_synth::package::import(&data, &pkg, Some("cut")).is_err());
    let mut tar = zstd::decode_all(&bytes[..]).unwrap();
    let pos = tar.windows(4).position(|w| w == b"QEVM").unwrap();
    tar[pos + 9] ^= 1;
    std::fs::write(&pkg, zstd::encode_all(&tar[..], 1).unwrap()).unwrap();
    let err = forage_synth::package::import(&data, &pkg, Some("tampered")).unwrap_err().to_string();
    assert!(err.contains("checksum"), "{err}");
    assert!(!data.base("cut").unwrap().exists() && !data.base("tampered").unwrap().exists());
}

#[test]
fn ext4_free_blocks_are_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let data = DataDir::at(tmp.path());
    // A base whose disk is a real 16 MiB ext4 with one small file (the smallest size that
    // mkfs gives a journal: without one a clean image cannot be told from a mounted one).
    let content = tmp.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("f"), pattern(7)).unwrap();
    let fs = tmp.path().join("fs.img");
    let ok = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-E", "nodiscard", "-d"])
        .arg(&content)
        .arg(&fs)
        .arg("16M")
        .status()
        .expect("mkfs.ext4 (e2fsprogs, installed by scripts/deps.sh) is needed by this test");
    assert!(ok.success());
    let found = forage_synth::ext4::introspect(&fs, CHUNK_SIZE as u64, Checkpoint::Unknown).unwrap();
    let Introspection::Known(free) = found else { panic!("a clean ext4 image is introspected: {found:?}") };
    let garbage_at = (16 << 20) / CHUNK_SIZE as u64 - 10; // near the end: free
    assert!(free.is_free(garbage_at));

    let bdir = data.base("e").unwrap().join("snapshot");
    snapshot_dir(&bdir, b"QEVM\0\0\0\x03base-state");
    std::fs::copy(&fs, bdir.join("disk0.raw")).unwrap();
    let snap = describe_snapshot(&bdir);
    forage_synth::base::finish(bdir.parent().unwrap(), "e", "synthetic", &snap, true).unwrap();
    let base = BaseVm::open(&data, "e").unwrap();

    // The launch VM left garbage in a block the file system has free (a deleted file).
    let ldir = tmp.path().join("launch");
    snapshot_dir(&ldir, b"QEVM\0\0\0\x03launch-state");
    std::fs::copy(&fs, ldir.join("disk0.raw")).unwrap();
    put(&ldir.join("disk0.raw"), garbage_at, &pattern(9));
    let launch = Launch { snap: describe_snapshot(&ldir), written: vec![garbage_at], discarded: vec![] };
    let out = tmp.path().join("o.ovl");
    let m = forage_synth::create::create(&base, &input(&launch), &opts(), &out).unwrap().manifest;
    assert_eq!(m.stats.free_by_source.get("ext4"), Some(&1), "{:?}", m.stats);
    let off = CreateOptions { semantic_disk: false, ..opts() };
    let m = forage_synth::create::create(&base, &input(&launch), &off, &out).unwrap().manifest;
    assert_eq!(m.ref_counts().get("new"), Some(&1), "without the semantic gap it is carried");
}

#[test]
fn package_entries_cannot_escape() {
    let tmp = tempfile::tempdir().unwrap();
    let data = DataDir::at(tmp.path().join("data"));
    let base = make_base(&data, "b", 0);
    let pkg = tmp.path().join("b.fbase");
    forage_synth::package::export(&base, &pkg).unwrap();
    // Rewrite the package with one entry renamed to climb out of the import folder.
    let tar_bytes = zstd::decode_all(&std::fs::read(&pkg).unwrap()[..]).unwrap();
    let mut out = tar::Builder::new(Vec::new());
    for e in tar::Archive::new(&tar_bytes[..]).entries().unwrap() {
        let mut e = e.unwrap();
        let mut name = e.path().unwrap().to_string_lossy().into_owned();
        if name == "snapshot/state" {
            name = "snapshot/../../../../escaped".into();
        }
        let mut h = e.header().clone();
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut body).unwrap();
        h.set_size(body.len() as u64);
        // set_path refuses "..": write the name bytes directly, as an attacker would.
        let raw = h.as_old_mut();
        raw.name = [0; 100];
        raw.name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        out.append(&h, &body[..]).unwrap();
    }
    std::fs::write(&pkg, zstd::encode_all(&out.into_inner().unwrap()[..], 1).unwrap()).unwrap();
    let err = forage_synth::package::import(&data, &pkg, Some("evil")).unwrap_err().to_string();
    assert!(err.contains("unexpected entry"), "{err}");
    assert!(!tmp.path().join("escaped").exists() && !data.root().join("escaped").exists());
    assert!(!data.base("evil").unwrap().exists());
}
