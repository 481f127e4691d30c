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
use std::time::{Duration, Instant};

use forage_datadir::DataDir;
use forage_format::Space;
use forage_vm::{Accel, RestoreOptions, Snapshot, Vm};

use crate::cow::CowView;
use crate::SynthError;

fn io(p: &Path) -> impl FnOnce(std::io::Error) -> SynthError + '_ {
    move |source| SynthError::Io { path: p.to_path_buf(), source }
}

pub async fn profile_access(
    data: &DataDir,
    launch: &Snapshot,
    app: &forage_agent::app::AppManifest,
    accel: Accel,
    work: &Path,
) -> Result<AccessProfile, SynthError> {
    let dir = work.join("profile");
    let _ = std::fs::remove_dir_all(&dir);
    let run = dir.join("run");
    DataDir::ensure(&run)?;
    let view = CowView::mount(launch, &dir.join("view"), 4096)?;
    let assembly = view.assembly.clone();
    assembly.start_profiling();
    let result = async {
        let snap = &view.snapshot;
        let qmp = data.runtime_dir()?.join(format!("profile-{}.qmp", std::process::id()));
        let forwards = forage_image::loopback_forwards([forage_agent::AGENT_PORT, app.port])
            .map_err(io(Path::new("127.0.0.1")))?;
        let app_port = forwards[1].host_port;
        let mut spec = snap.relocated_spec(&run, &qmp, Some(forwards));
        spec.memory_file = snap.memory_path();
        spec.disks[0].path = snap.disk_paths()[0].clone();
        let start = Instant::now();
        let opts = RestoreOptions { copy_disks: false, evict_cache: false, ..Default::default() };
        let vm = Vm::restore_with(snap, spec, accel, &run.join("qemu.log"), opts).await?;
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
        tracing::info!(
            memory = pick(Space::Memory).len(),
            disk = pick(Space::Disk).len(),
            ?first_response,
            "access profile"
        );
        Ok(AccessProfile { memory: pick(Space::Memory), disk: pick(Space::Disk), first_response, answer })
    }
    .await;
    drop(view);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// What a profiling resume touched.
#[derive(Debug, Clone, Default)]
pub struct AccessProfile {
    pub memory: Vec<u64>,
    pub disk: Vec<u64>,
    pub first_response: Duration,
    pub answer: String,
}
