//! Synthetic VMs for tests (no QEMU): sparse memory and disk files, a fake device state,
//! a forage-vm snapshot description, a base with its index, and a launch VM that exercises
//! every chunk reference kind.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use forage_datadir::DataDir;
use forage_format::{SegmentCodec, CHUNK_SIZE};
use forage_synth::create::{CreateOptions, LaunchInput};
use forage_synth::BaseVm;
use forage_vm::snapshot::{FileRecord, SnapshotManifest, StateRecord};
use forage_vm::{Accel, DiskSpec, Snapshot, VmSpec};

pub const MEM_CHUNKS: u64 = 256; // 1 MiB: guest RAM comes in whole MiB
pub const DISK_CHUNKS: u64 = 32;

pub fn pattern(seed: u64) -> Vec<u8> {
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

pub fn put(path: &Path, index: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, index * CHUNK_SIZE as u64).unwrap();
}

/// A snapshot folder with the given memory and disk (sparse, sized) and a fake state.
pub fn snapshot_dir(dir: &Path, state: &[u8]) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let (mem, disk) = (dir.join("memory.raw"), dir.join("disk0.raw"));
    std::fs::File::create(&mem).unwrap().set_len(MEM_CHUNKS * CHUNK_SIZE as u64).unwrap();
    std::fs::File::create(&disk).unwrap().set_len(DISK_CHUNKS * CHUNK_SIZE as u64).unwrap();
    std::fs::write(dir.join("state"), state).unwrap();
    (mem, disk)
}

pub fn describe_snapshot(dir: &Path) -> Snapshot {
    let spec = VmSpec {
        name: "synthetic".into(),
        machine: "pc".into(),
        cpu_model: None,
        vcpus: 1,
        max_vcpus: None,
        memory_mib: (MEM_CHUNKS * CHUNK_SIZE as u64) >> 20,
        memory_tail_kib: 0,
        memory_file: dir.join("memory.raw"),
        boot: None,
        disks: vec![DiskSpec {
            path: dir.join("disk0.raw"),
            format: forage_vm::DiskFormat::Raw,
            read_only: false,
            discard: true,
        }],
        nic: None,
        balloon: None,
        guest_agent: None,
        virtio_rng: false,
        virtio_blk_queues: None,
        cdrom: None,
        serial_log: dir.join("serial.log"),
        serial_socket: None,
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
        disks: vec![FileRecord {
            file: "disk0.raw".into(),
            size: std::fs::metadata(dir.join("disk0.raw")).unwrap().len(),
        }],
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

/// A synthetic snapshot folder at `dir` (empty memory and disk, a fake state), described.
pub fn describe_snapshot_of(dir: &Path) -> Snapshot {
    snapshot_dir(dir, b"QEVM\0\0\0\x03synthetic");
    describe_snapshot(dir)
}

pub fn make_base(data: &DataDir, name: &str, salt: u64) -> BaseVm {
    let dir = data.base(name).unwrap();
    let (mem, disk) = snapshot_dir(&dir.join("snapshot"), b"QEVM\0\0\0\x03base-state");
    put(&mem, 0, &pattern(100 + salt));
    put(&mem, 1, &pattern(101));
    put(&mem, 2, &pattern(102));
    put(&disk, 0, &pattern(200));
    put(&disk, 1, &pattern(201));
    let snap = describe_snapshot(&dir.join("snapshot"));
    forage_synth::base::finish(&dir, name, "synthetic", &snap, true).unwrap();
    BaseVm::open(data, name).unwrap()
}

pub struct Launch {
    pub snap: Snapshot,
    pub written: Vec<u64>,
    pub discarded: Vec<u64>,
}

pub fn make_launch(dir: &Path) -> Launch {
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

pub fn input(l: &Launch) -> LaunchInput<'_> {
    LaunchInput {
        snapshot: &l.snap,
        written_disk_chunks: &l.written,
        discarded_disk_chunks: &l.discarded,
        // Synthetic disks are written by the test, never mounted: they show themselves.
        checkpoint: forage_synth::ext4::Checkpoint::Unknown,
        service: None,
        accessed: None,
    }
}

pub fn opts() -> CreateOptions {
    CreateOptions { codec: SegmentCodec::Zstd { level: 3 }, ..CreateOptions::default() }
}

/// `snap` (an applied overlay described by `m`) holds the launch VM's memory and disk:
/// every chunk equal, but the free ones, which are zero.
pub fn assert_rebuilt(snap: &Snapshot, launch: &Launch, m: &forage_format::Manifest) {
    use forage_format::{ChunkRef, Space};
    let free: Vec<(Space, u64)> =
        m.chunks.iter().filter(|c| c.reference == ChunkRef::Free).map(|c| (c.space, c.index)).collect();
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
                assert_eq!(g, w, "{space:?} chunk {i} differs");
            }
        }
    }
}

pub fn read_all(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// Nothing at `out`, and nothing half-written (`*partial*`) in `parent`.
pub fn assert_nothing_left(parent: &Path, out: &Path) {
    assert!(!out.exists(), "{} left behind", out.display());
    let leftovers: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A synthetic base named `name` in `data` and an overlay of the synthetic launch VM
/// (written to `dir/NAME.ovl`): what a cloudlet and a device hold for synthesis, without
/// QEMU (resuming it would fail; everything before the resume works).
pub fn make_overlay(data: &DataDir, name: &str, dir: &Path) -> (BaseVm, PathBuf) {
    let base = make_base(data, name, 0);
    let launch = make_launch(&dir.join(format!("{name}-launch")));
    let out = dir.join(format!("{name}.ovl"));
    forage_synth::create::create(&base, &input(&launch), &opts(), &out).unwrap();
    (base, out)
}

/// A substrate file `dir/NAME.substrate` made from a synthetic snapshot (no QEMU): its
/// memory holds `pages` incompressible 4 KiB pages, each followed by a hole, its disk one.
pub fn substrate(dir: &Path, name: &str, pages: u64) -> (PathBuf, forage_substrate::SubstrateManifest) {
    use forage_substrate::format::{self, SectionInput};
    let snap = describe_snapshot_of(&dir.join(format!("{name}-snapshot")));
    let mem = snap.memory_path();
    for i in 0..pages.min(MEM_CHUNKS / 2) {
        put(&mem, i * 2, &pattern(i));
    }
    put(&snap.disk_paths()[0], 3, &pattern(999));
    let mut m = forage_substrate::SubstrateManifest {
        kind: format::KIND.into(),
        format: format::FORMAT,
        name: name.into(),
        source: "synthetic".into(),
        image: "tiny".into(),
        image_recipe: "none".into(),
        service_port: None,
        docked_memory_bytes: 1 << 20,
        docked_at_unix: 0,
        snapshot: snap.manifest().clone(),
        sections: Vec::new(),
        nic: None,
        public: false,
    };
    let inputs = [
        SectionInput { name: "memory".into(), path: mem, base: None },
        SectionInput { name: "disk0".into(), path: snap.disk_paths()[0].clone(), base: None },
        SectionInput { name: "state".into(), path: snap.state_path(), base: None },
    ];
    let out = dir.join(format!("{name}.substrate"));
    format::encode(&out, &mut m, &inputs, dir, format::DEFAULT_LEVEL).unwrap();
    (out, m)
}
