//! Applying an overlay to its base: rebuilds the launch VM as a forage-vm snapshot folder
//! (memory.raw, disk0.raw, state, snapshot.json) that `forage vm restore` resumes.
//!
//! Streaming: the manifest first, then one segment at a time; the output folder is built
//! as `.NAME.partial-PID` and renamed into place only when every segment checked out, so a
//! truncated or corrupted overlay leaves nothing that looks complete.
//!
//! An overlay naming blocks of Debian packages (format 3) reads them from the package
//! volume of the data folder holding the base ([`BaseVm::packages`]), built from its .debs
//! the first time; without the .debs it is refused before anything is written (the
//! volume is found right after the manifest is read, before the base is copied).
//!
//! A residue (`Manifest::parent` set) is refused here: it only makes sense on top of its
//! parent's launch VM; `residue::merge` folds it into its parent overlay.

use std::fs::{File, OpenOptions};
use std::io::BufReader;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forage_format::{BlobEncoding, ChunkRef, Manifest, OverlayReader, SegmentKind, Space, CHUNK_SIZE};
use forage_vm::cpu::CpuNeeds;
use forage_vm::snapshot::{
    FileRecord, SnapshotManifest, StateRecord, MANIFEST_FILE, MEMORY_FILE, SNAPSHOT_FORMAT, SNAPSHOT_KIND, STATE_FILE,
};
use forage_vm::{Accel, Snapshot, VmSpec};
use rustix::fs::FallocateFlags;
use sha2::{Digest, Sha256};

use crate::base::BaseVm;
use crate::pack::{read_chunk, slot};
use crate::package::short;
use crate::SynthError;

#[derive(Debug, Clone)]
pub struct ApplyReport {
    pub took: Duration,
    /// Of which finding or building the package volume (format 3; zero otherwise).
    pub package_volume: Duration,
    /// Of which copying the base's files (synthesis with early start does not copy).
    pub base_copy: Duration,
    /// Bytes of launch VM state rebuilt (modified chunks x 4 KiB).
    pub rebuilt_bytes: u64,
    pub segments: usize,
    pub free_chunks: u64,
    /// Of `took`, checking and decompressing segments (includes waiting for them when
    /// they come over a network).
    pub decompress: Duration,
}

/// Apply the overlay at `path` to `base`, creating the snapshot folder `out`.
/// `out` must not exist (or be an empty folder): nothing the user has is replaced.
pub fn apply(path: &Path, base: &BaseVm, out: &Path, accel: Accel) -> Result<(Snapshot, ApplyReport), SynthError> {
    let occupied = match std::fs::read_dir(out) {
        Ok(mut entries) => entries.next().is_some(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(_) => true, // a file, or unreadable
    };
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned());
    let (Some(name), false) = (name, occupied) else {
        return Err(SynthError::Exists {
            what: "something (give a new folder for the launch VM)".into(),
            path: out.to_path_buf(),
        });
    };
    let file = File::open(path).map_err(|source| SynthError::Io { path: path.to_path_buf(), source })?;
    let partial = out.with_file_name(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    let result = apply_into(BufReader::with_capacity(1 << 20, file), path, base, &partial, accel)
        .and_then(|report| Ok((Snapshot::open(&partial)?, report)));
    match result {
        Ok((_, report)) => {
            let _ = std::fs::remove_dir(out); // only if it is an empty folder
            std::fs::rename(&partial, out).map_err(|source| SynthError::Io { path: out.to_path_buf(), source })?;
            Ok((Snapshot::open(out)?, report))
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            Err(e)
        }
    }
}

/// Apply from any reader (a file, or bytes arriving over the network) into `dir`.
pub fn apply_into(
    reader: impl std::io::Read,
    path: &Path,
    base: &BaseVm,
    dir: &Path,
    accel: Accel,
) -> Result<ApplyReport, SynthError> {
    let start = Instant::now();
    let ov = |source| SynthError::Overlay { path: path.to_path_buf(), source };
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| SynthError::Io { path: p, source }
    };
    let r = OverlayReader::open(reader).map_err(ov)?;
    if let Some(parent) = &r.manifest().parent {
        return Err(SynthError::Residue { path: path.to_path_buf(), parent: short(parent).into() });
    }
    check_base(r.manifest(), path, base)?;
    let spec = launch_spec(r.manifest(), base, path)?;
    let volume = package_volume(r.manifest(), base)?;
    let package_volume = start.elapsed();
    crate::DataDir::ensure(dir)?;
    let (mem_out, disk_out) = (dir.join(MEMORY_FILE), dir.join("disk0.raw"));
    forage_vm::sparse::copy_sparse(&base.memory_path(), &mem_out).map_err(io(&mem_out))?;
    forage_vm::sparse::copy_sparse(&base.disk_path(), &disk_out).map_err(io(&disk_out))?;
    let base_copy = start.elapsed() - package_volume;
    let outs = [open_rw(&mem_out)?, open_rw(&disk_out)?];
    let written = write_chunks(r, path, base, volume.as_ref(), &outs, dir)?;
    for f in &outs {
        f.sync_all().map_err(io(dir))?;
    }

    let m = &written.manifest;
    let state = dir.join(STATE_FILE);
    write_launch_snapshot(dir, m, spec, &mem_out, &disk_out, &state, accel)?;
    Ok(ApplyReport {
        took: start.elapsed(),
        package_volume,
        base_copy,
        rebuilt_bytes: m.chunks.len() as u64 * CHUNK_SIZE as u64,
        segments: written.segments,
        free_chunks: written.free_chunks,
        decompress: written.decompress,
    })
}

/// The overlay (or residue) at `path` is for `base`: same digest, same sizes.
pub(crate) fn check_base(m: &Manifest, path: &Path, base: &BaseVm) -> Result<(), SynthError> {
    if m.base.digest != base.digest() {
        return Err(SynthError::WrongBase {
            path: path.to_path_buf(),
            wanted: short(&m.base.digest).into(),
            wanted_name: m.base.name.clone(),
            have: short(base.digest()).into(),
            have_name: base.manifest().name.clone(),
        });
    }
    if m.memory_size != base.manifest().memory_size || m.disk_size != base.manifest().disk_size {
        return Err(SynthError::BadFile { path: path.to_path_buf(), detail: "sizes differ from the base's".into() });
    }
    Ok(())
}

/// Format 3: the package volume the overlay's chunks name, found or built here from this
/// host's .debs, open; before anything is written.
pub(crate) fn package_volume(m: &Manifest, base: &BaseVm) -> Result<Option<File>, SynthError> {
    let Some(set) = &m.packages else { return Ok(None) };
    let p = base.packages().volume(set)?;
    File::open(&p).map(Some).map_err(|source| SynthError::Io { path: p, source })
}

/// What [`write_chunks`] did.
pub(crate) struct Written {
    pub manifest: Manifest,
    pub segments: usize,
    pub free_chunks: u64,
    pub decompress: Duration,
}

/// Write the chunks of the overlay (or residue) being read by `r` into `outs` (memory,
/// disk; any previous content of those chunks is replaced) and its device state as
/// `dir/state`, streaming its segments; then check that nothing follows. The base and
/// sizes must have been checked; `volume` is the package volume of a format-3 overlay.
pub(crate) fn write_chunks<R: std::io::Read>(
    mut r: OverlayReader<R>,
    path: &Path,
    base: &BaseVm,
    volume: Option<&File>,
    outs: &[File; 2],
    dir: &Path,
) -> Result<Written, SynthError> {
    let ov = |source| SynthError::Overlay { path: path.to_path_buf(), source };
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| SynthError::Io { path: p, source }
    };
    let m = r.manifest().clone();
    let bases = [
        File::open(base.memory_path()).map_err(io(&base.memory_path()))?,
        File::open(base.disk_path()).map_err(io(&base.disk_path()))?,
    ];
    let volume = match (&m.packages, volume) {
        (None, _) => None,
        (Some(_), Some(v)) => Some(v),
        (Some(_), None) => {
            return Err(SynthError::BadFile {
                path: path.to_path_buf(),
                detail: "names Debian packages (format 3)".into(),
            })
        }
    };

    // Chunks that need no segment; blob positions for the rest.
    let mut positions: Vec<Vec<(Space, u64)>> = vec![Vec::new(); m.blobs.len()];
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut free_chunks = 0;
    for c in &m.chunks {
        let off = c.index * CHUNK_SIZE as u64;
        let out = &outs[slot(c.space)];
        match c.reference {
            ChunkRef::Zero | ChunkRef::Free => {
                free_chunks += (c.reference == ChunkRef::Free) as u64;
                rustix::fs::fallocate(
                    out,
                    FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                    off,
                    CHUNK_SIZE as u64,
                )
                .map_err(|e| SynthError::Io { path: dir.to_path_buf(), source: e.into() })?;
            }
            ChunkRef::BaseDisk(i) | ChunkRef::BaseMemory(i) => {
                let from = if matches!(c.reference, ChunkRef::BaseDisk(_)) { &bases[1] } else { &bases[0] };
                read_chunk(from, i, &mut buf).map_err(io(base.dir()))?;
                out.write_all_at(&buf, off).map_err(io(dir))?;
            }
            ChunkRef::Package(i) => {
                // The manifest was validated: a Package reference comes with its packages.
                let volume = volume.expect("format 3 lists its packages");
                read_chunk(volume, i, &mut buf).map_err(io(dir))?;
                out.write_all_at(&buf, off).map_err(io(dir))?;
            }
            r => positions[r.blob().expect("blob ref") as usize].push((c.space, c.index)),
        }
    }
    let mut by_segment: Vec<Vec<u32>> = vec![Vec::new(); m.segments.len()];
    for (id, b) in m.blobs.iter().enumerate() {
        by_segment[b.segment as usize].push(id as u32);
    }

    // Segments, as they come.
    let mut state_written = false;
    let mut segments = 0;
    let mut decompress = Duration::ZERO;
    loop {
        let t = Instant::now();
        let next = r.next_segment().map_err(ov)?;
        decompress += t.elapsed();
        let Some(seg) = next else { break };
        segments += 1;
        if m.segments[seg.index].kind == SegmentKind::DeviceState {
            if seg.index as u32 == m.device_state.segment {
                if hex::encode(Sha256::digest(&seg.data)) != m.device_state.sha256 {
                    return Err(ov(forage_format::FormatError::corrupt("device state fails its checksum")));
                }
                let p = dir.join(STATE_FILE);
                std::fs::write(&p, &seg.data).map_err(io(&p))?;
                state_written = true;
            }
            continue;
        }
        for &id in &by_segment[seg.index] {
            let blob = &m.blobs[id as usize];
            let payload = seg.blob(blob).map_err(ov)?;
            let content: Vec<u8> = match blob.encoding {
                BlobEncoding::Raw => payload.to_vec(),
                BlobEncoding::Delta { codec, space, index } => {
                    read_chunk(&bases[slot(space)], index, &mut buf).map_err(io(base.dir()))?;
                    codec.decode(&buf, payload).map_err(ov)?
                }
            };
            for &(space, index) in &positions[id as usize] {
                outs[slot(space)].write_all_at(&content, index * CHUNK_SIZE as u64).map_err(io(dir))?;
            }
        }
    }
    r.finish().map_err(ov)?;
    if !state_written {
        return Err(ov(forage_format::FormatError::corrupt("no device state segment")));
    }
    Ok(Written { manifest: m, segments, free_chunks, decompress })
}

/// What an overlay's `vm` records: the launch VM's spec and the accelerator it was saved
/// under.
#[derive(serde::Deserialize)]
struct LaunchRecord {
    spec: VmSpec,
    accel: Accel,
}

/// The CPU model and accelerator the overlay's launch VM needs (from its `vm` record).
pub fn cpu_needs(m: &Manifest) -> Result<CpuNeeds, serde_json::Error> {
    let r: LaunchRecord = serde_json::from_value(m.vm.clone())?;
    Ok(CpuNeeds::of(&r.spec, r.accel))
}

/// The launch VM's spec: the base's hardware (its boot files are this host's), with the
/// overlay's name and guest ports; the overlay's own description must agree with it.
pub fn launch_spec(m: &forage_format::Manifest, base: &BaseVm, path: &Path) -> Result<VmSpec, SynthError> {
    let claimed: VmSpec = serde_json::from_value(m.vm["spec"].clone())
        .map_err(|e| SynthError::BadFile { path: path.to_path_buf(), detail: format!("launch VM description: {e}") })?;
    let mut spec = base.snapshot().manifest().spec.clone();
    if claimed.hardware_fingerprint() != spec.hardware_fingerprint() {
        return Err(SynthError::BadFile {
            path: path.to_path_buf(),
            detail: format!("its launch VM's hardware differs from base {}'s", base.manifest().name),
        });
    }
    spec.name = claimed.name;
    // Guest ports come from the overlay; host sides are chosen at restore, on loopback.
    spec.nic = claimed.nic.filter(|_| spec.nic.is_some()).map(|mut n| {
        for f in &mut n.forwards {
            f.host_addr = std::net::Ipv4Addr::LOCALHOST;
        }
        n
    });
    Ok(spec)
}

/// Describe a rebuilt launch VM as a forage-vm snapshot in `dir`: memory and disk may be
/// anywhere (absolute paths are kept, e.g. files of an early-start assembly), the device
/// state is `state`.
pub fn write_launch_snapshot(
    dir: &Path,
    m: &forage_format::Manifest,
    mut spec: VmSpec,
    memory: &Path,
    disk: &Path,
    state: &Path,
    accel: Accel,
) -> Result<(), SynthError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| SynthError::Io { path: p, source }
    };
    let relative = |p: &Path| match p.parent() == Some(dir) {
        true => PathBuf::from(p.file_name().expect("a file")),
        false => p.to_path_buf(),
    };
    spec.memory_file = memory.to_path_buf();
    spec.disks[0].path = disk.to_path_buf();
    spec.disks[0].format = forage_vm::DiskFormat::Raw;
    let saved_accel = serde_json::from_value(m.vm["accel"].clone()).unwrap_or(accel);
    let manifest = SnapshotManifest {
        kind: SNAPSHOT_KIND.into(),
        format: SNAPSHOT_FORMAT,
        hardware_fingerprint: spec.hardware_fingerprint(),
        spec,
        accel: saved_accel,
        memory: FileRecord { file: relative(memory).to_string_lossy().into_owned(), size: m.memory_size },
        disks: vec![FileRecord { file: relative(disk).to_string_lossy().into_owned(), size: m.disk_size }],
        state: StateRecord {
            file: relative(state).to_string_lossy().into_owned(),
            size: m.device_state.size,
            sha256: forage_vm::snapshot::sha256_file(state).map_err(io(state))?,
        },
        saved_at_unix: m.created_unix,
    };
    let p = dir.join(MANIFEST_FILE);
    std::fs::write(&p, serde_json::to_vec_pretty(&manifest).expect("serializes")).map_err(io(&p))?;
    Ok(())
}

fn open_rw(p: &PathBuf) -> Result<File, SynthError> {
    OpenOptions::new().read(true).write(true).open(p).map_err(|source| SynthError::Io { path: p.clone(), source })
}
