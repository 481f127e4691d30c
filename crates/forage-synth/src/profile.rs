//! Access profiling of a launch VM: which chunks of its memory and disk a resume reads
//! until the service's first response, in first-read order. The overlay puts the blobs of
//! those chunks first, so an early-start synthesis finds them early in the bulk stream.
//!
//! The launch VM's files are served to a restored QEMU through a `forage-assembly` FUSE
//! mount in profiling mode: every read is recorded, and every read-ahead is declined so
//! that only pages really read count (QEMU marks guest RAM `MADV_HUGEPAGE`, and the kernel
//! then reads 2 MiB around each fault; `mincore` on a page-cache copy, the earlier method,
//! saw all of that as touched). Writes go to the assembly's own files: the launch VM is
//! not changed.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use forage_assembly::{Assembly, Mount};
use forage_datadir::DataDir;
use forage_format::manifest::{BaseRef, DeviceState, Stats};
use forage_format::{Manifest, Order, Space, CHUNK_SIZE};
use forage_vm::{Accel, RestoreOptions, Snapshot, Vm};

use crate::launch::AccessProfile;
use crate::SynthError;

fn io(p: &Path) -> impl FnOnce(std::io::Error) -> SynthError + '_ {
    move |source| SynthError::Io { path: p.to_path_buf(), source }
}

/// A manifest that changes nothing: the assembly then serves `launch`'s own files.
fn identity_manifest(launch: &Snapshot) -> Manifest {
    let m = launch.manifest();
    Manifest {
        format: forage_format::OVERLAY_FORMAT,
        base: BaseRef { digest: String::new(), name: "launch VM".into() },
        parent: None,
        disk_size: m.disks[0].size,
        memory_size: m.memory.size,
        chunk_size: CHUNK_SIZE as u32,
        chunks: Vec::new(),
        blobs: Vec::new(),
        segments: Vec::new(),
        order: Order::Offset,
        device_state: DeviceState { segment: 0, size: 0, sha256: String::new() },
        vm: serde_json::Value::Null,
        service: None,
        stats: Stats::default(),
        created_unix: 0,
        creator: String::new(),
    }
}

pub async fn profile_access(data: &DataDir, launch: &Snapshot, app: &forage_agent::app::AppManifest, accel: Accel, work: &Path) -> Result<AccessProfile, SynthError> {
    let dir = work.join("profile");
    let _ = std::fs::remove_dir_all(&dir);
    let (files, mnt, snap_dir, run) = (dir.join("assembly"), dir.join("mnt"), dir.join("launch"), dir.join("run"));
    for d in [&files, &mnt, &snap_dir, &run] {
        DataDir::ensure(d)?;
    }
    let assembly = Arc::new(
        Assembly::new(identity_manifest(launch), &launch.memory_path(), &launch.disk_paths()[0], &files, Box::new(|_| {}))
            .map_err(|e| SynthError::BadFile { path: launch.dir().to_path_buf(), detail: e.to_string() })?,
    );
    assembly.start_profiling();
    let mount = Mount::new(assembly.clone(), &mnt, 4096).map_err(|e| SynthError::BadFile { path: mnt.clone(), detail: e.to_string() })?;
    let result = async {
        // The launch snapshot, with its memory and disk replaced by links to the mount.
        let m = launch.manifest();
        for (name, target) in [(&m.memory.file, mount.memory_path()), (&m.disks[0].file, mount.disk_path())] {
            std::os::unix::fs::symlink(&target, snap_dir.join(name)).map_err(io(&snap_dir))?;
        }
        for name in [&m.state.file, &forage_vm::snapshot::MANIFEST_FILE.to_string()] {
            std::fs::copy(launch.dir().join(name), snap_dir.join(name)).map_err(io(&snap_dir))?;
        }
        let snap = Snapshot::open(&snap_dir)?;
        let qmp = data.runtime_dir().join(format!("profile-{}.qmp", std::process::id()));
        let forwards = forage_image::loopback_forwards([forage_agent::AGENT_PORT, app.port]).map_err(io(Path::new("127.0.0.1")))?;
        let app_port = forwards[1].host_port;
        let mut spec = snap.relocated_spec(&run, &qmp, Some(forwards));
        spec.memory_file = snap.memory_path();
        spec.disks[0].path = snap.disk_paths()[0].clone();
        let start = Instant::now();
        let opts = RestoreOptions { copy_disks: false, evict_cache: false };
        let vm = Vm::restore_with(&snap, spec, accel, &run.join("qemu.log"), opts).await?;
        let line = app.probe.clone().unwrap_or_else(|| "\n".to_string());
        let answer = tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            loop {
                match crate::launch::probe(SocketAddr::from((Ipv4Addr::LOCALHOST, app_port)), &line) {
                    Ok(a) => return Ok(a),
                    Err(e) if t.elapsed() > Duration::from_secs(60) => return Err(e),
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        })
        .await
        .expect("probe does not panic")
        .map_err(|source| SynthError::Io { path: "profiling probe".into(), source });
        let first_response = start.elapsed();
        let log = assembly.access_log();
        vm.shutdown().await?;
        let answer = answer?;
        let pick = |space: Space| log.iter().filter(|(s, _)| *s == space).map(|(_, i)| *i).collect::<Vec<u64>>();
        tracing::info!(memory = pick(Space::Memory).len(), disk = pick(Space::Disk).len(), ?first_response, "access profile");
        Ok(AccessProfile { memory: pick(Space::Memory), disk: pick(Space::Disk), first_response, answer })
    }
    .await;
    assembly.fail("profiling done");
    drop(mount);
    let _ = std::fs::remove_dir_all(&dir);
    result
}
