//! Overlay creation and application on synthetic VMs (no QEMU): every reference kind
//! round-trips bit-exactly, free chunks come back as zeros, bad overlays are refused and
//! leave nothing behind.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use forage_datadir::DataDir;
use forage_format::{ChunkRef, DeltaCodec, SegmentCodec, Space, CHUNK_SIZE};
use forage_synth::create::{CreateOptions, LaunchInput};
use forage_synth::{BaseVm, SynthError};
use forage_vm::snapshot::{FileRecord, SnapshotManifest, StateRecord};
use forage_vm::{Accel, DiskSpec, Snapshot, VmSpec};

const MEM_CHUNKS: u64 = 256; // 1 MiB: guest RAM comes in whole MiB
const DISK_CHUNKS: u64 = 32;

fn pattern(seed: u64) -> Vec<u8> {
    // xorshift: incompressible, distinct per seed
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..CHUNK_SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn put(path: &Path, index: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, index * CHUNK_SIZE as u64).unwrap();
}

/// A snapshot folder with the given memory and disk (sparse, sized) and a fake state.
fn snapshot_dir(dir: &Path, state: &[u8]) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let (mem, disk) = (dir.join("memory.raw"), dir.join("disk0.raw"));
    std::fs::File::create(&mem).unwrap().set_len(MEM_CHUNKS * CHUNK_SIZE as u64).unwrap();
    std::fs::File::create(&disk).unwrap().set_len(DISK_CHUNKS * CHUNK_SIZE as u64).unwrap();
    std::fs::write(dir.join("state"), state).unwrap();
    (mem, disk)
}

fn describe_snapshot(dir: &Path) -> Snapshot {
    let spec = VmSpec {
        name: "synthetic".into(),
        machine: "pc".into(),
        cpu_model: None,
        vcpus: 1,
        memory_mib: (MEM_CHUNKS * CHUNK_SIZE as u64) >> 20,
        memory_file: dir.join("memory.raw"),
        boot: None,
        disks: vec![DiskSpec { path: dir.join("disk0.raw"), format: forage_vm::DiskFormat::Raw, read_only: false, discard: true }],
        nic: None,
        balloon: None,
        serial_log: dir.join("serial.log"),
        qmp_socket: dir.join("q.sock"),
        control_socket: None,
    };
    let state = dir.join("state");
    let m = SnapshotManifest {
        kind: "forage-vm-snapshot".into(),
        format: 1,
        hardware_fingerprint: spec.hardware_fingerprint(),
        spec,
        accel: Accel::Tcg,
        memory: FileRecord { file: "memory.raw".into(), size: MEM_CHUNKS * CHUNK_SIZE as u64 },
        disks: vec![FileRecord { file: "disk0.raw".into(), size: std::fs::metadata(dir.join("disk0.raw")).unwrap().len() }],
        state: StateRecord {
            file: "state".into(),
            size: std::fs::metadata(&state).unwrap().len(),
            sha256: forage_vm::snapshot::sha256_file(&state).unwrap(),
        },
        saved_at_unix: 0,
    };
    std::fs::write(dir.join("snapshot.json"), serde_json::to_vec(&m).unwrap()).unwrap();
    Snapshot::open(dir).unwrap()
}

fn make_base(data: &DataDir, name: &str, salt: u64) -> BaseVm {
    let dir = data.base(name).unwrap();
    let (mem, disk) = snapshot_dir(&dir.join("snapshot"), b"QEVM\0\0\0\x03base-state");
    put(&mem, 0, &pattern(100 + salt));
    put(&mem, 1, &pattern(101));
    put(&mem, 2, &pattern(102));
    put(&disk, 0, &pattern(200));
    put(&disk, 1, &pattern(201));
    let snap = describe_snapshot(&dir.join("snapshot"));
    forage_synth::base::finish(&dir, name, "synthetic", &snap).unwrap();
    BaseVm::open(data, name).unwrap()
}

struct Launch {
    snap: Snapshot,
    written: Vec<u64>,
    discarded: Vec<u64>,
}

fn make_launch(dir: &Path) -> Launch {
    let (mem, disk) = snapshot_dir(dir, b"QEVM\0\0\0\x03launch-state");
    // Start from the base contents that stay.
    put(&mem, 0, &vec![0u8; CHUNK_SIZE]); // base had data: now zero (allocated) -> zero
    // mem 1: base had data, launch has a hole -> free (reported)
    put(&mem, 2, &{
        let mut c = pattern(102);
        c[100..110].copy_from_slice(b"0123456789");
        c
    }); // small change of base chunk -> new, as a delta
    put(&mem, 10, &pattern(200)); // = base disk 0 -> base_disk
    put(&mem, 11, &pattern(101)); // = base memory 1 -> base_memory
    put(&mem, 12, &pattern(300)); // new
    put(&mem, 13, &pattern(300)); // same_space
    put(&disk, 0, &pattern(200)); // unchanged
    // disk 1: base had data, discarded -> free (trim)
    put(&disk, 5, &pattern(300)); // cross_space
    put(&disk, 6, &pattern(301)); // new, raw
    // disk 8: written with what the base has (zeros): not a modification
    Launch { snap: describe_snapshot(dir), written: vec![0, 5, 6, 8], discarded: vec![1] }
}

fn input(l: &Launch) -> LaunchInput<'_> {
    LaunchInput { snapshot: &l.snap, written_disk_chunks: &l.written, discarded_disk_chunks: &l.discarded, service: None, accessed: None }
}

fn opts() -> CreateOptions {
    CreateOptions { codec: SegmentCodec::Zstd { level: 3 }, ..CreateOptions::default() }
}

fn read_all(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

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
        let report = forage_synth::create::create(&base, &input(&launch), &CreateOptions { delta, codec, ..opts() }, &out).unwrap();
        let m = &report.manifest;
        let kinds = m.ref_counts();
        for (k, n) in [("zero", 1), ("free", 2), ("base_disk", 1), ("base_memory", 1), ("new", 3), ("same_space", 1), ("cross_space", 1)] {
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
        let free: Vec<(Space, u64)> = m.chunks.iter().filter(|c| c.reference == ChunkRef::Free).map(|c| (c.space, c.index)).collect();
        for (space, got, want) in [
            (Space::Memory, snap.memory_path(), launch.snap.memory_path()),
            (Space::Disk, snap.disk_paths()[0].clone(), launch.snap.disk_paths()[0].clone()),
        ] {
            let (got, want) = (read_all(&got), read_all(&want));
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.chunks(CHUNK_SIZE).zip(want.chunks(CHUNK_SIZE)).enumerate() {
                if free.contains(&(space, i as u64)) {
                    assert!(g.iter().all(|b| *b == 0), "free {space:?} chunk {i} not zero");
                } else {
                    assert_eq!(g, w, "{space:?} chunk {i} differs ({delta:?})");
                }
            }
        }
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

fn assert_nothing_left(parent: &Path, out: &Path) {
    assert!(!out.exists(), "{} left behind", out.display());
    let leftovers: Vec<_> = std::fs::read_dir(parent).unwrap().flatten().map(|e| e.file_name()).filter(|n| n.to_string_lossy().contains("partial")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
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
        ("newer format", { let mut b = bytes.clone(); b[8] = 7; b }, "newer"),
        ("flipped byte in the last segment", { let mut b = bytes.clone(); let n = b.len(); b[n - 20] ^= 1; b }, "checksum"),
        ("flipped byte in the manifest", { let mut b = bytes.clone(); b[70] ^= 1; b }, "checksum"),
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
    // A base whose disk is a real 4 MiB ext4 with one small file.
    let content = tmp.path().join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("f"), pattern(7)).unwrap();
    let fs = tmp.path().join("fs.img");
    let ok = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-E", "nodiscard", "-d"])
        .arg(&content)
        .arg(&fs)
        .arg("4M")
        .status()
        .expect("mkfs.ext4 (e2fsprogs, installed by scripts/deps.sh) is needed by this test");
    assert!(ok.success());
    let free = forage_synth::ext4::free_chunks(&fs, CHUNK_SIZE as u64).unwrap().unwrap();
    let garbage_at = (free.len() - 10) as u64; // near the end: free
    assert!(free[garbage_at as usize]);

    let bdir = data.base("e").unwrap().join("snapshot");
    snapshot_dir(&bdir, b"QEVM\0\0\0\x03base-state");
    std::fs::copy(&fs, bdir.join("disk0.raw")).unwrap();
    let snap = describe_snapshot(&bdir);
    forage_synth::base::finish(bdir.parent().unwrap(), "e", "synthetic", &snap).unwrap();
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
