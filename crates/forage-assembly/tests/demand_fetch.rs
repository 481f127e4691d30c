//! The assembly on a synthetic overlay: reads of chunks whose segment has not arrived
//! block and ask for that segment; writes are copy-on-write; bad segments are refused.

use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use forage_assembly::{Assembly, Mount};
use forage_format::manifest::{BaseRef, DeviceState, Order, Segment, SegmentKind, Stats};
use forage_format::{Blob, BlobEncoding, ChunkEntry, ChunkRef, Manifest, SegmentCodec, Space, CHUNK_SIZE};
use sha2::Digest;

const C: usize = CHUNK_SIZE;
const WAIT: Duration = Duration::from_secs(10);

fn chunk(fill: u8) -> Vec<u8> {
    vec![fill; C]
}

fn segment(kind: SegmentKind, raw: &[u8]) -> (Segment, Vec<u8>) {
    let codec = SegmentCodec::Zstd { level: 3 };
    let bytes = codec.compress(raw);
    let seg = Segment {
        kind,
        codec,
        compressed_len: bytes.len() as u64,
        raw_len: raw.len() as u64,
        sha256: hex::encode(sha2::Sha256::digest(&bytes)),
    };
    (seg, bytes)
}

/// Base: 8 memory chunks filled 0x10+i, 8 disk chunks filled 0x20+i.
/// Launch VM: memory 1 = blob 0 (0xA1, segment 1), memory 2 = base disk 3, memory 3 zero,
/// disk 5 = blob 1 (0xB5, segment 2), disk 6 = blob 0 again (cross-space).
fn fixture(dir: &Path) -> (Manifest, Vec<Vec<u8>>) {
    let mem: Vec<u8> = (0..8).flat_map(|i| chunk(0x10 + i)).collect();
    let disk: Vec<u8> = (0..8).flat_map(|i| chunk(0x20 + i)).collect();
    std::fs::write(dir.join("base-memory"), mem).unwrap();
    std::fs::write(dir.join("base-disk"), disk).unwrap();
    let state = b"QEVM device state".to_vec();
    let (s0, b0) = segment(SegmentKind::DeviceState, &state);
    let (s1, b1) = segment(SegmentKind::Chunks, &chunk(0xA1));
    let (s2, b2) = segment(SegmentKind::Chunks, &chunk(0xB5));
    let m = Manifest {
        format: 1,
        base: BaseRef { digest: "d".into(), name: "b".into() },
        parent: None,
        disk_size: 8 * C as u64,
        memory_size: 8 * C as u64,
        chunk_size: C as u32,
        chunks: vec![
            ChunkEntry { space: Space::Disk, index: 5, reference: ChunkRef::New(1) },
            ChunkEntry { space: Space::Disk, index: 6, reference: ChunkRef::CrossSpace(0) },
            ChunkEntry { space: Space::Memory, index: 1, reference: ChunkRef::New(0) },
            ChunkEntry { space: Space::Memory, index: 2, reference: ChunkRef::BaseDisk(3) },
            ChunkEntry { space: Space::Memory, index: 3, reference: ChunkRef::Zero },
        ],
        blobs: vec![
            Blob { segment: 1, offset: 0, len: C as u32, encoding: BlobEncoding::Raw },
            Blob { segment: 2, offset: 0, len: C as u32, encoding: BlobEncoding::Raw },
        ],
        segments: vec![s0, s1, s2],
        order: Order::Offset,
        device_state: DeviceState {
            segment: 0,
            size: state.len() as u64,
            sha256: hex::encode(sha2::Sha256::digest(&state)),
        },
        vm: serde_json::Value::Null,
        service: None,
        stats: Stats::default(),
        created_unix: 0,
        creator: String::new(),
        packages: None,
    };
    m.validate().unwrap();
    (m, vec![b0, b1, b2])
}

fn assembly(dir: &Path) -> (Arc<Assembly>, Vec<Vec<u8>>, mpsc::Receiver<u32>) {
    let (m, segs) = fixture(dir);
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let work = dir.join("work");
    std::fs::create_dir(&work).unwrap();
    let fetch = Box::new(move |s: u32| tx.lock().unwrap().send(s).unwrap());
    let a = Assembly::new(m, &dir.join("base-memory"), &dir.join("base-disk"), None, &work, fetch).unwrap();
    (Arc::new(a), segs, rx)
}

#[test]
fn chunks_that_need_no_segment_read_at_once() {
    let t = tempfile::tempdir().unwrap();
    let (a, _, fetches) = assembly(t.path());
    assert_eq!(a.read(Space::Memory, 0, C as u64, WAIT).unwrap(), chunk(0x10));
    assert_eq!(a.read(Space::Memory, 2 * C as u64, C as u64, WAIT).unwrap(), chunk(0x23), "base disk reference");
    assert_eq!(a.read(Space::Memory, 3 * C as u64, C as u64, WAIT).unwrap(), chunk(0));
    assert_eq!(a.read(Space::Disk, 7 * C as u64 + 100, 10, WAIT).unwrap(), vec![0x27; 10]);
    assert!(fetches.try_recv().is_err(), "nothing was fetched");
}

#[test]
fn a_read_blocks_until_its_segment_comes_and_fetches_it_first() {
    let t = tempfile::tempdir().unwrap();
    let (a, segs, fetches) = assembly(t.path());
    let (done_tx, done) = mpsc::channel();
    let reader = a.clone();
    // Spans memory chunks 0..2: chunk 1 waits for segment 1.
    std::thread::spawn(move || done_tx.send(reader.read(Space::Memory, 2048, C as u64, WAIT)).unwrap());
    assert_eq!(fetches.recv_timeout(WAIT).unwrap(), 1, "the read asked for segment 1");
    assert!(done.recv_timeout(Duration::from_millis(300)).is_err(), "the read waits for its segment");
    // The bulk stream's segment 2 does not release it.
    assert!(a.add_segment(2, &segs[2]).unwrap());
    assert!(done.recv_timeout(Duration::from_millis(200)).is_err());
    assert!(a.add_segment(1, &segs[1]).unwrap());
    let got = done.recv_timeout(WAIT).unwrap().unwrap();
    assert_eq!(&got[..2048], &chunk(0x10)[..2048]);
    assert_eq!(&got[2048..], &chunk(0xA1)[..2048]);
    assert!(fetches.try_recv().is_err(), "segment 1 was asked for once");
    assert!(!a.add_segment(1, &segs[1]).unwrap(), "a repeated segment is ignored");
    assert_eq!(a.read(Space::Disk, 6 * C as u64, C as u64, WAIT).unwrap(), chunk(0xA1), "cross-space duplicate");
    let s = a.stats();
    assert_eq!((s.demand_fetches, s.reads_waited, s.blobs_accessed), (1, 1, 1));
}

#[test]
fn writes_are_copy_on_write_and_win_over_late_segments() {
    let t = tempfile::tempdir().unwrap();
    let (a, segs, _fetches) = assembly(t.path());
    let before = std::fs::read(t.path().join("base-disk")).unwrap();
    // A whole-chunk write to a pending chunk needs no segment.
    a.write(Space::Disk, 5 * C as u64, &chunk(0xEE), WAIT).unwrap();
    a.write(Space::Disk, 0, b"hello", WAIT).unwrap();
    a.add_segment(2, &segs[2]).unwrap();
    assert_eq!(a.read(Space::Disk, 5 * C as u64, C as u64, WAIT).unwrap(), chunk(0xEE));
    let head = a.read(Space::Disk, 0, C as u64, WAIT).unwrap();
    assert_eq!(&head[..5], b"hello");
    assert_eq!(&head[5..], &chunk(0x20)[5..]);
    a.punch(Space::Disk, 7 * C as u64, C as u64, WAIT).unwrap();
    assert_eq!(a.read(Space::Disk, 7 * C as u64, C as u64, WAIT).unwrap(), chunk(0));
    assert_eq!(std::fs::read(t.path().join("base-disk")).unwrap(), before, "the base is never written");
    assert_eq!(a.written_chunks(Space::Disk), vec![0, 5, 7]);
    // Rounds of change tracking (handoff iterations): what changed after a mark.
    let m1 = a.mark();
    assert!(a.written_since(Space::Disk, m1).is_empty());
    a.write(Space::Disk, 5 * C as u64, &chunk(0xAB), WAIT).unwrap();
    a.write(Space::Disk, 6 * C as u64, &chunk(0x11), WAIT).unwrap();
    let m2 = a.mark();
    a.punch(Space::Disk, 0, C as u64, WAIT).unwrap();
    assert_eq!(a.written_since(Space::Disk, m1), vec![0, 5, 6]);
    assert_eq!(a.written_since(Space::Disk, m2), vec![0]);
    assert_eq!(a.written_chunks(Space::Disk), vec![0, 5, 6, 7]);
    assert!(a.written_since(Space::Memory, m1).is_empty());
}

#[test]
fn bad_segments_are_refused_and_failure_wakes_readers() {
    let t = tempfile::tempdir().unwrap();
    let (a, segs, _fetches) = assembly(t.path());
    let mut bad = segs[1].clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let e = a.add_segment(1, &bad).unwrap_err();
    assert!(e.to_string().contains("segment 1 fails its checksum"), "{e}");
    assert!(a.add_segment(9, &segs[1]).unwrap_err().to_string().contains("segment 9 does not exist"));
    let reader = a.clone();
    let h = std::thread::spawn(move || reader.read(Space::Memory, C as u64, 16, WAIT));
    std::thread::sleep(Duration::from_millis(100));
    a.fail("device went silent");
    let e = h.join().unwrap().unwrap_err();
    assert!(e.to_string().contains("device went silent"), "{e}");
}

#[test]
fn device_state_comes_from_its_segment() {
    let t = tempfile::tempdir().unwrap();
    let (a, segs, fetches) = assembly(t.path());
    let e = a.wait_device_state(Duration::from_millis(100)).unwrap_err();
    assert!(e.to_string().contains("device state"), "{e}");
    assert_eq!(fetches.try_recv().unwrap(), 0);
    a.add_segment(0, &segs[0]).unwrap();
    let p = a.wait_device_state(WAIT).unwrap();
    assert_eq!(std::fs::read(p).unwrap(), b"QEVM device state");
}

/// The same through the kernel: a read(2) of the FUSE file blocks until the segment comes.
#[test]
fn fuse_reads_block_until_the_segment_comes() {
    if !Path::new("/dev/fuse").exists() {
        eprintln!("skipped: no /dev/fuse");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (a, segs, fetches) = assembly(t.path());
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mount = Mount::new(a.clone(), &mnt, 4096).unwrap();
    let mem = mount.memory_path();
    assert_eq!(std::fs::metadata(&mem).unwrap().len(), 8 * C as u64);
    let (done_tx, done) = mpsc::channel();
    let path = mem.clone();
    std::thread::spawn(move || {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(path).unwrap();
        let mut buf = vec![0u8; C];
        f.read_exact_at(&mut buf, C as u64).unwrap();
        done_tx.send(buf).unwrap();
    });
    assert_eq!(fetches.recv_timeout(WAIT).unwrap(), 1);
    assert!(done.recv_timeout(Duration::from_millis(300)).is_err(), "read(2) waits");
    a.add_segment(1, &segs[1]).unwrap();
    assert_eq!(done.recv_timeout(WAIT).unwrap(), chunk(0xA1));
    // Writes through the mount land in the assembly, not the base.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(mount.disk_path()).unwrap();
        f.write_all_at(&chunk(0x77), 2 * C as u64).unwrap();
    }
    assert_eq!(a.read(Space::Disk, 2 * C as u64, C as u64, WAIT).unwrap(), chunk(0x77));
    assert_eq!(std::fs::read(t.path().join("base-disk")).unwrap()[2 * C], 0x22);
    drop(mount);
}
