//! VM residue and merge on synthetic VMs (no QEMU): a residue carries only what the
//! instance changed; merged into its parent it rebuilds the instance bit-exactly (free
//! chunks aside) with its device state; wrong, lone or cut residues are refused and leave
//! nothing behind; a merged overlay takes a residue of its own.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use forage_datadir::DataDir;
use forage_format::manifest::Service;
use forage_format::{ChunkRef, Manifest, Order, Space, CHUNK_SIZE};
use forage_synth::create::{CreateOptions, LaunchInput};
use forage_synth::residue::{create_residue, merge, read_prefix, INHERITED_FREE};
use forage_synth::{BaseVm, SynthError};
use forage_testkit::synthetic::*;
use forage_vm::{Accel, Snapshot};

struct Fixture {
    tmp: tempfile::TempDir,
    base: BaseVm,
    parent: PathBuf,
    launch: Launch,
}

fn service() -> Service {
    Service { name: "svc".into(), port: 8080, probe: Some("ping".into()) }
}

/// A base, a launch VM and its overlay (access order, with a service).
fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let data = DataDir::at(tmp.path().join("data"));
    let base = make_base(&data, "b", 0);
    let launch = make_launch(&tmp.path().join("launch"));
    let parent = tmp.path().join("parent.ovl");
    let input = LaunchInput { service: Some(service()), accessed: Some((&[12, 2], &[6])), ..input(&launch) };
    forage_synth::create::create(&base, &input, &opts(), &parent).unwrap();
    Fixture { tmp, base, parent, launch }
}

/// An instance of the launch VM that the overlay `ovl` rebuilds, changed by `edit`
/// (memory file, disk file), with a new device state.
fn instance(base: &BaseVm, ovl: &Path, dir: &Path, state: &[u8], edit: impl FnOnce(&Path, &Path)) -> Snapshot {
    let (snap, _) = forage_synth::apply::apply(ovl, base, dir, Accel::Tcg).unwrap();
    edit(&snap.memory_path(), &snap.disk_paths()[0]);
    std::fs::write(snap.state_path(), state).unwrap();
    describe_snapshot(dir)
}

fn punch(path: &Path, index: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let flags = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
    rustix::fs::fallocate(&f, flags, index * CHUNK_SIZE as u64, CHUNK_SIZE as u64).unwrap();
}

fn digest(ovl: &Path) -> (String, Manifest) {
    let (h, m) = read_prefix(ovl).unwrap();
    (h.digest(), m)
}

fn chunk_set(m: &Manifest) -> BTreeSet<(Space, u64)> {
    m.chunks.iter().map(|c| (c.space, c.index)).collect()
}

fn reference(m: &Manifest, space: Space, index: u64) -> ChunkRef {
    m.chunks
        .iter()
        .find(|c| c.space == space && c.index == index)
        .unwrap_or_else(|| panic!("{space:?} {index} not listed"))
        .reference
}

/// Apply `ovl` and compare with `want`: every chunk equal except the overlay's free chunks
/// (zeros), and the same device state.
fn assert_rebuilds(base: &BaseVm, ovl: &Path, want: &Snapshot, scratch: &Path) {
    let m = digest(ovl).1;
    let _ = std::fs::remove_dir_all(scratch);
    let (got, _) = forage_synth::apply::apply(ovl, base, scratch, Accel::Tcg).unwrap();
    let free: BTreeSet<(Space, u64)> =
        m.chunks.iter().filter(|c| c.reference == ChunkRef::Free).map(|c| (c.space, c.index)).collect();
    for (space, g, w) in [
        (Space::Memory, got.memory_path(), want.memory_path()),
        (Space::Disk, got.disk_paths()[0].clone(), want.disk_paths()[0].clone()),
    ] {
        let (g, w) = (read_all(&g), read_all(&w));
        assert_eq!(g.len(), w.len());
        for (i, (g, w)) in g.chunks(CHUNK_SIZE).zip(w.chunks(CHUNK_SIZE)).enumerate() {
            if free.contains(&(space, i as u64)) {
                assert!(g.iter().all(|b| *b == 0), "free {space:?} chunk {i} not zero");
            } else {
                assert!(g == w, "{space:?} chunk {i} differs after applying {}", ovl.display());
            }
        }
    }
    assert_eq!(read_all(&got.state_path()), read_all(&want.state_path()), "device state");
    std::fs::remove_dir_all(scratch).unwrap();
}

/// The first instance: changes of every reference kind, a freed page, repeats in the lists.
fn first_instance(f: &Fixture) -> (Snapshot, Vec<u64>, Vec<u64>) {
    let inst =
        instance(&f.base, &f.parent, &f.tmp.path().join("instance"), b"QEVM\0\0\0\x03instance-state", |mem, disk| {
            put(mem, 12, &pattern(600)); // was a blob -> new
            put(mem, 20, &pattern(601)); // was base (zero) -> new
            put(mem, 13, &vec![0u8; CHUNK_SIZE]); // was same_space -> zero
            put(mem, 40, &pattern(201)); // = base disk 1
            punch(mem, 2); // the guest freed it (reported) -> free
            put(disk, 5, &pattern(602)); // was cross_space -> new
            put(disk, 10, &pattern(102)); // = base memory 2
        });
    (inst, vec![20, 12, 13, 40, 2, 12], vec![10, 5])
}

#[test]
fn residue_carries_only_the_changes_and_merges_back_exactly() {
    let f = fixture();
    let (p_digest, p) = digest(&f.parent);
    assert_eq!(read_all(&f.parent)[8], 1, "plain overlays stay format 1");
    assert!(matches!(p.order, Order::Access { accessed_blobs, .. } if accessed_blobs > 0));
    let (inst, mem, disk) = first_instance(&f);
    let residue = f.tmp.path().join("residue.ovl");
    let r = create_residue(&f.base, &p, &p_digest, &inst, &mem, &disk, &opts(), &residue).unwrap().manifest;

    // Only the listed chunks, against the base; format 2 naming the parent.
    assert_eq!(r.format, 2);
    assert_eq!(read_all(&residue)[8], 2);
    assert_eq!(r.parent.as_deref(), Some(&p_digest[..]));
    let want: BTreeSet<(Space, u64)> =
        [2, 12, 13, 20, 40].map(|i| (Space::Memory, i)).into_iter().chain([5, 10].map(|i| (Space::Disk, i))).collect();
    assert_eq!(chunk_set(&r), want);
    assert_eq!(reference(&r, Space::Memory, 2), ChunkRef::Free);
    assert_eq!(reference(&r, Space::Memory, 13), ChunkRef::Zero);
    assert_eq!(reference(&r, Space::Memory, 40), ChunkRef::BaseDisk(1));
    assert_eq!(reference(&r, Space::Disk, 10), ChunkRef::BaseMemory(2));
    assert_eq!(r.ref_counts()["new"], 3);
    assert_eq!((r.stats.modified_memory_chunks, r.stats.modified_disk_chunks), (5, 2));
    assert_eq!(r.stats.free_by_source["reported"], 1);
    assert_eq!(r.service, Some(service()));
    assert_eq!(r.blobs.len(), 3, "only the changed chunks' contents travel");

    // Merged: an ordinary overlay that rebuilds the instance, with the parent's description.
    let outs = f.tmp.path().join("outs");
    std::fs::create_dir_all(&outs).unwrap();
    let merged = outs.join("merged.ovl");
    let m = merge(&f.base, &f.parent, &residue, &opts(), &merged, Accel::Tcg).unwrap().manifest;
    assert_eq!((m.format, m.parent.as_ref()), (1, None));
    assert_eq!(read_all(&merged)[8], 1);
    assert_eq!((&m.service, &m.vm), (&p.service, &p.vm));
    assert!(
        matches!(m.order, Order::Access { accessed_blobs, profiled_chunks } if accessed_blobs > 0 && profiled_chunks == 3),
        "{:?}",
        m.order
    );
    // Parent's entries, residue's overriding.
    assert_eq!(reference(&m, Space::Memory, 2), ChunkRef::Free);
    assert!(!chunk_set(&m).contains(&(Space::Memory, 13)), "zero again, as in the base: not a modification");
    assert_eq!(reference(&m, Space::Memory, 11), ChunkRef::BaseMemory(1), "untouched parent entry kept");
    assert_eq!(reference(&m, Space::Disk, 1), ChunkRef::Free, "parent's trimmed chunk stays free");
    assert!(m.stats.free_by_source[INHERITED_FREE] >= 3, "{:?}", m.stats.free_by_source);
    assert_rebuilds(&f.base, &merged, &inst, &f.tmp.path().join("check"));
    assert_nothing_left(&outs, &outs.join("none"));
    assert!(std::fs::read_dir(&outs).unwrap().flatten().all(|e| e.file_name() == "merged.ovl"));
    // The launch VM's content is not what the instance has any more.
    assert_ne!(read_all(&inst.memory_path()), read_all(&f.launch.snap.memory_path()));
}

#[test]
fn a_merged_overlay_takes_a_residue_of_its_own() {
    let f = fixture();
    let (p_digest, p) = digest(&f.parent);
    let (inst, mem, disk) = first_instance(&f);
    let residue = f.tmp.path().join("residue.ovl");
    create_residue(&f.base, &p, &p_digest, &inst, &mem, &disk, &opts(), &residue).unwrap();
    let merged = f.tmp.path().join("merged.ovl");
    merge(&f.base, &f.parent, &residue, &opts(), &merged, Accel::Tcg).unwrap();

    // A second session, from the merged overlay.
    let (m_digest, m) = digest(&merged);
    let inst2 =
        instance(&f.base, &merged, &f.tmp.path().join("instance2"), b"QEVM\0\0\0\x03second-state", |mem, disk| {
            put(mem, 12, &pattern(700));
            put(mem, 2, &pattern(702)); // was free: used again
            put(disk, 7, &pattern(701));
            put(disk, 5, &vec![0u8; CHUNK_SIZE]);
        });
    let residue2 = f.tmp.path().join("residue2.ovl");
    let r2 = create_residue(&f.base, &m, &m_digest, &inst2, &[2, 12], &[5, 7], &opts(), &residue2).unwrap().manifest;
    assert_eq!(r2.parent.as_deref(), Some(&m_digest[..]));
    assert_eq!(r2.chunks.len(), 4);
    // The first residue does not fit the merged overlay.
    let err = merge(&f.base, &merged, &residue, &opts(), &f.tmp.path().join("x.ovl"), Accel::Tcg).unwrap_err();
    assert!(matches!(err, SynthError::NotParent { .. }), "{err}");

    let merged2 = f.tmp.path().join("merged2.ovl");
    let m2 = merge(&f.base, &merged, &residue2, &opts(), &merged2, Accel::Tcg).unwrap().manifest;
    assert!(matches!(reference(&m2, Space::Memory, 20), ChunkRef::New(_)), "the first residue's change is kept");
    assert!(matches!(reference(&m2, Space::Memory, 2), ChunkRef::New(_)));
    assert_rebuilds(&f.base, &merged2, &inst2, &f.tmp.path().join("check"));
}

#[test]
fn wrong_lone_and_cut_residues_are_refused_and_leave_nothing() {
    let f = fixture();
    let (p_digest, p) = digest(&f.parent);
    let (inst, mem, disk) = first_instance(&f);
    let residue = f.tmp.path().join("residue.ovl");
    create_residue(&f.base, &p, &p_digest, &inst, &mem, &disk, &opts(), &residue).unwrap();
    let outs = f.tmp.path().join("outs");
    std::fs::create_dir_all(&outs).unwrap();
    let out = outs.join("merged.ovl");

    // Another overlay of the same launch VM is not the parent.
    let other = f.tmp.path().join("other.ovl");
    forage_synth::create::create(&f.base, &input(&f.launch), &CreateOptions { dedup: false, ..opts() }, &other)
        .unwrap();
    let err = merge(&f.base, &other, &residue, &opts(), &out, Accel::Tcg).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, SynthError::NotParent { .. }) && msg.contains("other.ovl") && msg.contains("residue.ovl"),
        "{msg}"
    );
    assert_nothing_left(&outs, &out);

    // Swapped arguments: the "parent" is a residue; the "residue" is a plain overlay.
    let msg = merge(&f.base, &residue, &f.parent, &opts(), &out, Accel::Tcg).unwrap_err().to_string();
    assert!(msg.contains("merge it first"), "{msg}");
    let msg = merge(&f.base, &f.parent, &other, &opts(), &out, Accel::Tcg).unwrap_err().to_string();
    assert!(msg.contains("not a residue"), "{msg}");

    // Another base.
    let data = DataDir::at(f.tmp.path().join("data"));
    let other_base = make_base(&data, "other", 1);
    let err = merge(&other_base, &f.parent, &residue, &opts(), &out, Accel::Tcg).unwrap_err();
    assert!(matches!(err, SynthError::WrongBase { .. }), "{err}");
    let err = create_residue(&other_base, &p, &p_digest, &inst, &mem, &disk, &opts(), &out).unwrap_err();
    assert!(err.to_string().contains("not base"), "{err}");
    assert_nothing_left(&outs, &out);

    // Bad chunk lists and digests.
    let err = create_residue(&f.base, &p, &p_digest, &inst, &[MEM_CHUNKS], &[], &opts(), &out).unwrap_err();
    assert!(err.to_string().contains("past the end"), "{err}");
    let err = create_residue(&f.base, &p, "nope", &inst, &mem, &disk, &opts(), &out).unwrap_err();
    assert!(err.to_string().contains("hex"), "{err}");
    assert_nothing_left(&outs, &out);

    // A residue alone is not a launch VM.
    let lone = outs.join("lone");
    let err = forage_synth::apply::apply(&residue, &f.base, &lone, Accel::Tcg).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, SynthError::Residue { .. }) && msg.contains("merge it first") && msg.contains(&p_digest[..12]),
        "{msg}"
    );
    assert_nothing_left(&outs, &lone);

    // Cut short: refused once the parent is materialized; the scratch folder goes too.
    let bytes = read_all(&residue);
    for cut in [bytes.len() - 10, 100] {
        let cut_file = f.tmp.path().join("cut.ovl");
        std::fs::write(&cut_file, &bytes[..cut]).unwrap();
        let msg = merge(&f.base, &f.parent, &cut_file, &opts(), &out, Accel::Tcg).unwrap_err().to_string();
        assert!(msg.contains("truncated") && msg.contains("cut.ovl"), "{msg}");
        assert_nothing_left(&outs, &out);
        assert_eq!(std::fs::read_dir(&outs).unwrap().count(), 0, "scratch left in {}", outs.display());
    }
    // Still fine afterwards.
    merge(&f.base, &f.parent, &residue, &opts(), &out, Accel::Tcg).unwrap();
}
