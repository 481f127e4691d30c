//! Overlays that name blocks of Debian packages (format 3), on synthetic VMs and a .deb
//! built here with `dpkg-deb --build`: the chunks holding the package's files travel as
//! references, the overlay applies bit-exactly where the .deb is held, is refused (and
//! leaves nothing) where it is not, and the early-start assembly serves those chunks
//! without any segment.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use forage_assembly::Assembly;
use forage_datadir::DataDir;
use forage_format::{ChunkRef, OverlayReader, Space, CHUNK_SIZE, PACKAGES_FORMAT};
use forage_synth::deb_volume::{PackageIndex, PackageStore};
use forage_synth::SynthError;
use forage_testkit::synthetic::*;
use forage_vm::Accel;

const C: usize = CHUNK_SIZE;

/// A .deb holding `a.bin` (blocks pattern(300), pattern(301)) and `b.txt` (one short
/// line: a partial block, zero-padded in the volume).
fn make_deb(dir: &Path) -> PathBuf {
    let root = dir.join("pkg");
    std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(root.join("usr/share/forage-test")).unwrap();
    std::fs::write(
        root.join("DEBIAN/control"),
        "Package: forage-test\nVersion: 1:1.0-1\nArchitecture: all\nMaintainer: forage <forage@example.org>\nDescription: test\n",
    )
    .unwrap();
    let a: Vec<u8> = [pattern(300), pattern(301)].concat();
    std::fs::write(root.join("usr/share/forage-test/a.bin"), a).unwrap();
    std::fs::write(root.join("usr/share/forage-test/b.txt"), b"hello from a package\n").unwrap();
    let deb = dir.join("forage-test_1.0-1_all.deb");
    let out = Command::new("dpkg-deb").args(["--root-owner-group", "--build"]).arg(&root).arg(&deb).output().unwrap();
    assert!(out.status.success(), "dpkg-deb: {}", String::from_utf8_lossy(&out.stderr));
    deb
}

fn short_block() -> Vec<u8> {
    let mut b = b"hello from a package\n".to_vec();
    b.resize(C, 0);
    b
}

#[test]
fn package_blocks_travel_as_references_and_apply_bit_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let data = DataDir::at(tmp.path().join("data"));
    let base = make_base(&data, "b", 0);
    let launch = make_launch(&tmp.path().join("launch"));
    // A page of the short file in the page cache.
    put(&launch.snap.memory_path(), 14, &short_block());
    let deb = make_deb(tmp.path());
    let index = PackageIndex::build(std::slice::from_ref(&deb)).unwrap();
    assert_eq!(index.set.blocks, 3);
    assert_eq!((index.set.debs[0].package.as_str(), index.set.debs[0].version.as_str()), ("forage-test", "1:1.0-1"));

    let out = tmp.path().join("o.ovl");
    let o = forage_synth::create::CreateOptions { packages: Some(Arc::new(index)), ..opts() };
    let m = forage_synth::create::create(&base, &input(&launch), &o, &out).unwrap().manifest;
    assert_eq!(m.format, PACKAGES_FORMAT);
    let kinds = m.ref_counts();
    // Memory 12, 13 and disk 5 hold pattern(300), disk 6 pattern(301), memory 14 the short
    // file: all references; what is left as a blob is the changed base chunk (memory 2).
    assert_eq!(kinds.get("package").copied(), Some(5), "{kinds:?}");
    assert_eq!(kinds.get("new").copied(), Some(1), "{kinds:?}");
    let at = |space, index| m.chunks.iter().find(|c| (c.space, c.index) == (space, index)).unwrap().reference;
    assert_eq!(at(Space::Memory, 14), ChunkRef::Package(2));
    assert_eq!(at(Space::Disk, 6), ChunkRef::Package(1));

    // Without the .deb: refused, and nothing left behind.
    let applied = tmp.path().join("applied");
    let err = forage_synth::apply::apply(&out, &base, &applied, Accel::Tcg).unwrap_err();
    assert!(matches!(err, SynthError::MissingPackages { count: 1, of: 1, .. }), "{err}");
    assert!(err.to_string().contains("forage-test=1:1.0-1"), "{err}");
    assert_nothing_left(tmp.path(), &applied);

    // With it: bit-exact, free chunks aside.
    let store = PackageStore::open(&data);
    store.add(&deb).unwrap();
    assert_eq!(store.list().unwrap().len(), 1);
    let (snap, _) = forage_synth::apply::apply(&out, &base, &applied, Accel::Tcg).unwrap();
    assert_rebuilt(&snap, &launch, &m);

    // Early start: the assembly serves package chunks at once, with no segment.
    let set = m.packages.clone().unwrap();
    let volume = store.volume(&set).unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let prefix = std::fs::read(&out).unwrap();
    let manifest = OverlayReader::open(&prefix[..]).unwrap().manifest().clone();
    let no_fetch = Box::new(|s: u32| panic!("segment {s} fetched for a package chunk"));
    let a = Assembly::new(manifest, &base.memory_path(), &base.disk_path(), Some(&volume), &work, no_fetch).unwrap();
    let wait = Duration::from_secs(5);
    assert_eq!(a.read(Space::Memory, 14 * C as u64, C as u64, wait).unwrap(), short_block());
    assert_eq!(a.read(Space::Disk, 6 * C as u64, C as u64, wait).unwrap(), pattern(301));
}

#[test]
fn a_deb_changed_in_the_store_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = DataDir::at(tmp.path().join("data"));
    let deb = make_deb(tmp.path());
    let store = PackageStore::open(&data);
    let r = store.add(&deb).unwrap();
    let set = PackageIndex::build(std::slice::from_ref(&deb)).unwrap().set;
    // A volume other than the one its .debs make (another SHA-256, or length) is refused.
    for edit in [
        |s: &mut forage_format::PackageSet| s.volume_sha256 = "00".repeat(32),
        |s: &mut forage_format::PackageSet| s.blocks += 1,
    ] {
        let mut other = set.clone();
        edit(&mut other);
        assert!(matches!(store.volume(&other), Err(SynthError::VolumeMismatch { .. })));
    }
    assert!(std::fs::read_dir(data.packages().join("volumes")).unwrap().next().is_none(), "nothing half-written");
    // The store's copy, tampered with after it was added.
    let held = data.packages().join("debs").join(format!("{}.deb", r.sha256));
    let mut bytes = std::fs::read(&held).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&held, bytes).unwrap();
    let err = store.volume(&set).unwrap_err().to_string();
    assert!(err.contains("no longer matches"), "{err}");
    assert!(std::fs::read_dir(data.packages().join("volumes")).unwrap().next().is_none(), "nothing half-written");
    // Something that is not a .deb is not added.
    let not = tmp.path().join("x.deb");
    std::fs::write(&not, b"not a package").unwrap();
    assert!(store.add(&not).is_err());
}
