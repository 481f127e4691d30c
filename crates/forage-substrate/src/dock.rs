//! Docking: boot a guest image as a VM that can grow later (one vCPU of `max_vcpus`, its
//! full memory behind a balloon), optionally install an app (the service), then shrink it
//! (guest caches synced and dropped, balloon inflated to what the guest uses, so QEMU
//! punches everything else out of the memory file), save it with forage-vm's snapshot and
//! encode memory, disk and device state into a substrate in the pool.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use forage_agent::app::AppPackage;
use forage_agent::{AgentClient, AgentError};
use forage_datadir::DataDir;
use forage_image::{GuestImage, RunPaths};
use forage_vm::{Accel, Vm};
use serde::Serialize;

use crate::format::{self, SectionInput, SubstrateManifest};
use crate::pool::{Pool, PoolError};

/// Memory the guest keeps above what it uses when docked (page cache for the service,
/// the agent's buffers); the balloon takes the rest.
pub const DOCK_HEADROOM: u64 = 24 << 20;

pub struct DockRequest {
    pub name: String,
    pub image: GuestImage,
    pub app: Option<AppPackage>,
    /// vCPUs an activation may ask for.
    pub max_vcpus: u32,
    /// Memory an activation may ask for (the VM's RAM size).
    pub max_memory_mib: u64,
    pub accel: Accel,
    pub ready_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DockError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("booting the VM to dock")]
    Boot(#[source] forage_image::BootError),
    #[error("the guest agent of the VM to dock")]
    Agent(#[source] AgentError),
    #[error("installing the app")]
    Install(#[source] forage_image::app_debs::AppInstallError),
    #[error("shrinking the VM")]
    Shrink(#[source] forage_vm::VmError),
    #[error("saving the shrunk VM")]
    Save(#[source] forage_vm::SaveError),
    #[error("writing the substrate to {path}")]
    Encode {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct DockReport {
    pub name: String,
    pub boot_seconds: f64,
    /// Shrink + save + encode: the dock itself.
    pub dock_seconds: f64,
    pub shrink_seconds: f64,
    pub save_seconds: f64,
    pub encode_seconds: f64,
    pub memory_bytes: u64,
    pub docked_memory_bytes: u64,
    /// Bytes of guest memory kept in the substrate (non-zero pages after the shrink).
    pub memory_data_bytes: u64,
    pub raw_bytes: u64,
    pub compressed_bytes: u64,
    pub spilled: Vec<String>,
}

/// Run a blocking agent session on the guest agent behind `port`.
pub async fn with_agent<T: Send + 'static>(
    port: u16,
    wait: Duration,
    f: impl FnOnce(&mut AgentClient) -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    tokio::task::spawn_blocking(move || f(&mut AgentClient::connect(addr, wait)?))
        .await
        .expect("the agent session does not panic")
}

/// `MemTotal` and `MemAvailable` of `/proc/meminfo`, in bytes.
pub fn meminfo(text: &str) -> (u64, u64) {
    let field = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|kib| kib << 10)
            .unwrap_or(0)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

pub async fn dock(data: &DataDir, pool: &Pool, req: DockRequest) -> Result<DockReport, DockError> {
    let staging = pool.staging(&req.name)?;
    let work = data.work().join(format!("substrate-{}-{}", req.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|source| DockError::Io { path: work.clone(), source })?;
    let result = dock_in(data, pool, &req, &work, &staging).await;
    let _ = std::fs::remove_dir_all(&work);
    if result.is_err() {
        let _ = std::fs::remove_file(&staging);
    }
    result
}

async fn dock_in(
    data: &DataDir,
    pool: &Pool,
    req: &DockRequest,
    work: &Path,
    staging: &Path,
) -> Result<DockReport, DockError> {
    let qmp_socket = data
        .runtime_dir()
        .map_err(|e| DockError::Io { path: data.root().into(), source: std::io::Error::other(e) })?
        .join(format!("dock-{}.qmp", std::process::id()));
    let run = RunPaths { dir: work.join("run"), qmp_socket };
    let boot_start = Instant::now();
    let service_port = req.app.as_ref().map(|a| a.manifest().port);
    let (mut spec, ports) = req
        .image
        .fresh_run(&req.name, &run, &service_port.into_iter().collect::<Vec<_>>())
        .map_err(|e| DockError::Boot(forage_image::BootError::Image(e)))?;
    spec.max_vcpus = Some(req.max_vcpus.max(1));
    spec.memory_mib = req.max_memory_mib;
    let mut vm = Vm::boot(spec, req.accel, &run.dir.join("qemu.log"))
        .await
        .map_err(|e| DockError::Boot(forage_image::BootError::Vm(e)))?;
    vm.wait_for_serial(&req.image.manifest().ready_marker, req.ready_timeout)
        .await
        .map_err(|e| DockError::Boot(forage_image::BootError::Vm(e)))?;
    let agent_port = ports[0];
    if let Some(app) = req.app.clone() {
        let data = data.clone();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, agent_port));
        tokio::task::spawn_blocking(move || {
            let mut agent = AgentClient::connect(addr, Duration::from_secs(60)).map_err(DockError::Agent)?;
            forage_image::app_debs::install_app(&data, &mut agent, &app).map_err(DockError::Install)
        })
        .await
        .expect("the install does not panic")?;
    }
    let boot_seconds = boot_start.elapsed().as_secs_f64();

    // Shrink: caches out, balloon in.
    let t = Instant::now();
    let script = "sync; echo 3 > /proc/sys/vm/drop_caches; cat /proc/meminfo";
    let out = with_agent(agent_port, Duration::from_secs(60), move |a| {
        a.exec_ok(&["sh", "-c", script], Duration::from_secs(60))
    })
    .await
    .map_err(DockError::Agent)?;
    let (total, available) = meminfo(&out.stdout);
    let ram = vm.spec().memory_bytes();
    // What the kernel keeps for itself (RAM minus MemTotal) + what is in use + headroom.
    let target = (ram.saturating_sub(total) + total.saturating_sub(available) + DOCK_HEADROOM).min(ram);
    let target = target.div_ceil(1 << 20) << 20;
    // Free page reporting punches what the guest just freed out of the memory file a
    // couple of seconds later: wait until the file stops shrinking.
    let mem_file = vm.spec().memory_file.clone();
    let mut last = forage_vm::sparse::allocated_bytes(&mem_file).unwrap_or(0);
    for _ in 0..16 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = forage_vm::sparse::allocated_bytes(&mem_file).unwrap_or(0);
        if now + (1 << 20) >= last && now <= last {
            break;
        }
        last = now;
    }
    // The guest zeroes the pages it gives the balloon (init_on_alloc): they are zero pages
    // in the file, which the encoder leaves out.
    let docked = vm.set_balloon(target, Duration::from_secs(60)).await.map_err(DockError::Shrink)?;
    let shrink_seconds = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let snap = vm.save(&work.join("snapshot")).await.map_err(DockError::Save)?;
    let save_seconds = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let mut manifest = SubstrateManifest {
        kind: format::KIND.into(),
        format: format::FORMAT,
        name: req.name.clone(),
        source: match &req.app {
            Some(a) => format!("image:{}+app:{}", req.image.manifest().name, a.manifest().name),
            None => format!("image:{}", req.image.manifest().name),
        },
        image: req.image.manifest().name.clone(),
        image_recipe: req.image.manifest().recipe_digest.clone(),
        service_port,
        docked_memory_bytes: docked,
        docked_at_unix: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        snapshot: snap.manifest().clone(),
        sections: Vec::new(),
    };
    // The disk started as a copy of the image's: only what differs is kept.
    let mut inputs = vec![SectionInput { name: "memory".into(), path: snap.memory_path(), base: None }];
    for (i, p) in snap.disk_paths().into_iter().enumerate() {
        let base = (i == 0).then(|| req.image.disk());
        inputs.push(SectionInput { name: format!("disk{i}"), path: p, base });
    }
    inputs.push(SectionInput { name: "state".into(), path: snap.state_path(), base: None });
    let compressed = format::encode(staging, &mut manifest, &inputs, work)
        .map_err(|source| DockError::Encode { path: staging.to_path_buf(), source })?;
    let encode_seconds = t.elapsed().as_secs_f64();
    let raw_bytes = manifest.sections.iter().map(|s| s.raw_size).sum();
    let memory_data_bytes = manifest.sections[0].data_bytes;
    let spilled = pool.insert(&req.name, staging)?;
    Ok(DockReport {
        name: req.name.clone(),
        boot_seconds,
        dock_seconds: shrink_seconds + save_seconds + encode_seconds,
        shrink_seconds,
        save_seconds,
        encode_seconds,
        memory_bytes: ram,
        docked_memory_bytes: docked,
        memory_data_bytes,
        raw_bytes,
        compressed_bytes: compressed,
        spilled,
    })
}
