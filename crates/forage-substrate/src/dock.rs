//! Docking: a running VM becomes a substrate. The VM is either booted from a guest image
//! as one that can grow later (one vCPU of `max_vcpus`, its full memory behind a balloon),
//! optionally with an app installed (the service), or restored from a saved VM (a service
//! of the repository, a base VM) as it was saved ([`DockSource`]). Then the one shrink
//! path: guest caches synced and dropped, balloon inflated to what the guest uses (the
//! encoder leaves the freed pages out), saved with forage-vm's snapshot, memory, disk and
//! device state encoded into a substrate in the pool.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use forage_agent::app::AppPackage;
use forage_agent::{AgentClient, AgentError};
use forage_datadir::DataDir;
use forage_image::{GuestImage, RunPaths};
use forage_vm::{Accel, Snapshot, Vm};
use serde::Serialize;

use crate::format::{self, DetachedNic, SectionInput, SubstrateManifest};
use crate::pool::{Pool, PoolError};

/// Memory the guest keeps above what it uses when docked (page cache for the service,
/// the agent's buffers); the balloon takes the rest.
pub const DOCK_HEADROOM: u64 = 24 << 20;

/// How long after pages are freed the guest's free page reporting reports them (Linux's
/// `PAGE_REPORTING_DELAY`, 2 s), with a margin.
const REPORTING_DELAY: Duration = Duration::from_millis(2200);

/// The kernel argument of VMs booted to be docked: their guest brings up a NIC plugged in
/// later (the tiny guest's init watches for one only with it).
pub const NIC_HOTPLUG_ARG: &str = "forage.nichotplug=1";

pub struct DockRequest {
    pub name: String,
    /// The guest image the VM runs: its kernel and initramfs boot it (and an activation),
    /// its disk is the base the substrate's disk is kept as a difference over.
    pub image: GuestImage,
    pub source: DockSource,
    /// A public substrate: activations renew the guest's identity (host name,
    /// machine-id, SSH host keys).
    pub public: bool,
    /// Unplug the NIC before the save (activation plugs one in). The tiny guest brings a
    /// plugged NIC up; a Debian guest did not within 30 s in the one try
    /// (`docs/substrates.md`), so it is asked for, not the default.
    pub detach_nic: bool,
    /// zstd level of the substrate ([`crate::format::DEFAULT_LEVEL`] unless asked).
    pub zstd_level: i32,
    pub accel: Accel,
    pub ready_timeout: Duration,
}

/// Where the VM to dock comes from.
pub enum DockSource {
    /// Boot `image` as a VM that can grow to `max_vcpus` and `max_memory_mib`, optionally
    /// install an app (the substrate is then that service).
    Boot {
        app: Option<AppPackage>,
        /// vCPUs an activation may ask for.
        max_vcpus: u32,
        /// Memory an activation may ask for (the VM's RAM size).
        max_memory_mib: u64,
    },
    /// Restore a saved VM (a service of the repository, a base VM) and dock it as it
    /// runs. Its hardware stays as saved: activations may ask for up to its vCPUs
    /// (`max_vcpus` if it was saved with hot-plug slots) and its memory.
    Saved {
        snapshot: Box<Snapshot>,
        /// Guest port of its service, if it has one.
        service_port: Option<u16>,
        /// What it is, for the manifest's `source` (`service:ID`, `base:NAME`).
        label: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum DockError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("booting the VM to dock")]
    Boot(#[source] forage_image::BootError),
    #[error("restoring {label} to dock it")]
    Restore {
        label: String,
        #[source]
        source: forage_vm::RestoreError,
    },
    #[error("{label} has no balloon device, so it cannot be shrunk (saved before forage gave VMs one)")]
    NoBalloon { label: String },
    #[error("{label} keeps a disk as a qcow2 layer; only saved VMs with raw disks are docked")]
    NotRaw { label: String },
    #[error("{label} has no NIC, so its guest agent cannot be reached")]
    NoNic { label: String },
    #[error("the guest agent of the VM to dock")]
    Agent(#[source] AgentError),
    #[error("installing the app")]
    Install(#[source] forage_image::app_debs::AppInstallError),
    #[error("shrinking the VM")]
    Shrink(#[source] forage_vm::VmError),
    #[error("unplugging the VM's NIC")]
    Unplug(#[source] forage_vm::VmError),
    #[error("saving the shrunk VM")]
    Save(#[source] forage_vm::SaveError),
    #[error("writing the substrate")]
    Encode(#[source] crate::format::EncodeError),
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
    /// Shrink + NIC unplug + save + encode: the dock itself.
    pub dock_seconds: f64,
    pub shrink_seconds: f64,
    /// The guest letting its NIC go (0 when the NIC stays: a saved VM's on an automatic
    /// PCI slot).
    pub unplug_seconds: f64,
    /// The substrate holds no NIC (activation plugs one in).
    pub nic_detached: bool,
    pub save_seconds: f64,
    pub encode_seconds: f64,
    pub memory_bytes: u64,
    pub docked_memory_bytes: u64,
    /// Bytes of guest memory kept in the substrate (non-zero pages after the shrink), as
    /// data or as references to the image's disk blocks.
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
    data.sweep_scratch();
    let work = data.work().join(format!("substrate-{}-{}", req.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|source| DockError::Io { path: work.clone(), source })?;
    let memory = pool.dock_memory(&req.name)?;
    let result = dock_in(data, pool, &req, &work, &memory, &staging).await;
    let _ = std::fs::remove_dir_all(&work);
    let _ = std::fs::remove_file(&memory);
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
    memory: &Path,
    staging: &Path,
) -> Result<DockReport, DockError> {
    let qmp_socket = data
        .runtime_dir()
        .map_err(|e| DockError::Io { path: data.root().into(), source: std::io::Error::other(e) })?
        .join(format!("dock-{}.qmp", std::process::id()));
    let run = RunPaths { dir: work.join("run"), qmp_socket };
    let boot_start = Instant::now();
    let (vm, agent_port, service_port, source) = match &req.source {
        DockSource::Boot { app, max_vcpus, max_memory_mib } => {
            let (vm, agent_port) = boot(data, req, app.as_ref(), *max_vcpus, *max_memory_mib, &run, memory).await?;
            let source = match app {
                Some(a) => format!("image:{}+app:{}", req.image.manifest().name, a.manifest().name),
                None => format!("image:{}", req.image.manifest().name),
            };
            (vm, agent_port, app.as_ref().map(|a| a.manifest().port), source)
        }
        DockSource::Saved { snapshot, service_port, label } => {
            let (vm, agent_port) = restore_saved(req, snapshot, label, &run, memory).await?;
            (vm, agent_port, *service_port, label.clone())
        }
    };
    let boot_seconds = boot_start.elapsed().as_secs_f64();
    shrink_save_encode(pool, req, vm, agent_port, service_port, source, boot_seconds, work, staging).await
}

/// Boot the image as a VM that can grow, wait until it is ready, install the app: the VM
/// and the host port of its guest agent.
async fn boot(
    data: &DataDir,
    req: &DockRequest,
    app: Option<&AppPackage>,
    max_vcpus: u32,
    max_memory_mib: u64,
    run: &RunPaths,
    memory: &Path,
) -> Result<(Vm, u16), DockError> {
    let service_port = app.map(|a| a.manifest().port);
    let (mut spec, ports) = req
        .image
        .fresh_run(&req.name, run, &service_port.into_iter().collect::<Vec<_>>())
        .map_err(|e| DockError::Boot(forage_image::BootError::Image(e)))?;
    spec.max_vcpus = Some(max_vcpus.max(1));
    spec.memory_mib = max_memory_mib;
    spec.memory_file = memory.to_path_buf();
    // On a fixed slot, so that the dock can unplug it and a restore without it keeps
    // every other device where it was.
    if let Some(nic) = spec.nic.as_mut() {
        nic.pci_slot = Some(forage_vm::spec::NIC_HOTPLUG_SLOT);
    }
    // Tells the tiny guest's init to watch for a new NIC (Debian's systemd-networkd
    // configures one by itself).
    if let Some(boot) = spec.boot.as_mut() {
        boot.cmdline.push(' ');
        boot.cmdline.push_str(NIC_HOTPLUG_ARG);
    }
    let vm = Vm::boot(spec, req.accel, &run.dir.join("qemu.log"))
        .await
        .map_err(|e| DockError::Boot(forage_image::BootError::Vm(e)))?;
    vm.wait_for_serial(&req.image.manifest().ready_marker, req.ready_timeout)
        .await
        .map_err(|e| DockError::Boot(forage_image::BootError::Vm(e)))?;
    let agent_port = ports[0];
    if let Some(app) = app.cloned() {
        let data = data.clone();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, agent_port));
        tokio::task::spawn_blocking(move || {
            let mut agent = AgentClient::connect(addr, Duration::from_secs(60)).map_err(DockError::Agent)?;
            forage_image::app_debs::install_app(&data, &mut agent, &app).map_err(DockError::Install)
        })
        .await
        .expect("the install does not panic")?;
    }
    Ok((vm, agent_port))
}

/// Restore a saved VM with fresh loopback forwards, booting the image's kernel: the VM
/// and the host port of its guest agent, once the agent answers.
async fn restore_saved(
    req: &DockRequest,
    snapshot: &Snapshot,
    label: &str,
    run: &RunPaths,
    memory: &Path,
) -> Result<(Vm, u16), DockError> {
    let saved = &snapshot.manifest().spec;
    if saved.disks.iter().any(|d| d.format != forage_vm::DiskFormat::Raw) {
        return Err(DockError::NotRaw { label: label.into() });
    }
    if saved.balloon.is_none() {
        return Err(DockError::NoBalloon { label: label.into() });
    }
    let Some(nic) = &saved.nic else {
        return Err(DockError::NoNic { label: label.into() });
    };
    let guest_ports: Vec<u16> = nic.forwards.iter().map(|f| f.guest_port).collect();
    let forwards = forage_image::loopback_forwards(guest_ports)
        .map_err(|source| DockError::Io { path: "127.0.0.1".into(), source })?;
    let agent_port = forwards
        .iter()
        .find(|f| f.guest_port == forage_agent::AGENT_PORT)
        .map(|f| f.host_port)
        .ok_or_else(|| DockError::NoNic { label: label.into() })?;
    std::fs::create_dir_all(&run.dir).map_err(|source| DockError::Io { path: run.dir.clone(), source })?;
    let mut spec = snapshot.relocated_spec(&run.dir, &run.qmp_socket, Some(forwards));
    spec.name = req.name.clone();
    spec.memory_file = memory.to_path_buf();
    if let Some(boot) = spec.boot.as_mut() {
        boot.kernel = req.image.dir().join(&req.image.manifest().kernel);
        boot.initrd = req.image.dir().join(&req.image.manifest().initrd);
    }
    let vm = Vm::restore(snapshot, spec, req.accel, &run.dir.join("qemu.log"))
        .await
        .map_err(|source| DockError::Restore { label: label.into(), source })?;
    // The agent answers once the restored guest runs again.
    with_agent(agent_port, req.ready_timeout, |_| Ok(())).await.map_err(DockError::Agent)?;
    Ok((vm, agent_port))
}

/// The one shrink path, whatever the VM came from: caches out, balloon in, save, encode.
#[allow(clippy::too_many_arguments)]
async fn shrink_save_encode(
    pool: &Pool,
    req: &DockRequest,
    mut vm: Vm,
    agent_port: u16,
    service_port: Option<u16>,
    source: String,
    boot_seconds: f64,
    work: &Path,
    staging: &Path,
) -> Result<DockReport, DockError> {
    // Shrink: caches out, balloon in.
    let t = Instant::now();
    let script = "sync; echo 3 > /proc/sys/vm/drop_caches; cat /proc/meminfo";
    let out = with_agent(agent_port, Duration::from_secs(60), move |a| {
        a.exec_ok(&["sh", "-c", script], Duration::from_secs(60))
    })
    .await
    .map_err(DockError::Agent)?;
    let caches_seconds = t.elapsed().as_secs_f64();
    let (total, available) = meminfo(&out.stdout);
    let ram = vm.spec().memory_bytes();
    // What the kernel keeps for itself (RAM minus MemTotal) + what is in use + headroom.
    let target = (ram.saturating_sub(total) + total.saturating_sub(available) + DOCK_HEADROOM).min(ram);
    let target = target.div_ceil(1 << 20) << 20;
    // The balloon takes most of what the dropped caches freed: the guest zeroes the pages
    // it gives the balloon (init_on_alloc) and QEMU punches them out of the memory file.
    let caches_dropped = Instant::now();
    let docked = vm.set_balloon(target, Duration::from_secs(60)).await.map_err(DockError::Shrink)?;
    let balloon_seconds = caches_dropped.elapsed().as_secs_f64();
    // The free pages left beside the balloon still hold what the caches held until free
    // page reporting punches them, about 2 s after they were freed (the kernel's delay):
    // wait for that, then until the file stops shrinking.
    let mem_file = vm.spec().memory_file.clone();
    tokio::time::sleep(REPORTING_DELAY.saturating_sub(caches_dropped.elapsed())).await;
    let mut last = forage_vm::sparse::allocated_bytes(&mem_file).unwrap_or(0);
    for _ in 0..16 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = forage_vm::sparse::allocated_bytes(&mem_file).unwrap_or(0);
        if now + (1 << 20) >= last && now <= last {
            break;
        }
        last = now;
    }
    let shrink_seconds = t.elapsed().as_secs_f64();
    tracing::info!(
        caches = caches_seconds,
        balloon = balloon_seconds,
        reporting = shrink_seconds - caches_seconds - balloon_seconds,
        balloon_mib = ram.saturating_sub(target) >> 20,
        "dock {}: shrink (seconds)",
        req.name
    );

    // No NIC in the substrate: the guest lets it go, activation plugs in a new one. A
    // saved VM's NIC on an automatic PCI slot stays (a restore without it would move the
    // devices after it); activation gives it new forwards.
    let t = Instant::now();
    let nic = match req.detach_nic && vm.spec().nic.as_ref().is_some_and(|n| n.pci_slot.is_some()) {
        true => {
            let nic = vm.unplug_nic(Duration::from_secs(30)).await.map_err(DockError::Unplug)?;
            let pci_slot = nic.pci_slot.expect("checked above");
            Some(DetachedNic { pci_slot, guest_ports: nic.forwards.iter().map(|f| f.guest_port).collect() })
        }
        false => None,
    };
    let unplug_seconds = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let snap = vm.save(&work.join("snapshot")).await.map_err(DockError::Save)?;
    let save_seconds = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let mut manifest = SubstrateManifest {
        kind: format::KIND.into(),
        format: format::FORMAT,
        name: req.name.clone(),
        source,
        image: req.image.manifest().name.clone(),
        image_recipe: req.image.manifest().recipe_digest.clone(),
        service_port,
        docked_memory_bytes: docked,
        docked_at_unix: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        snapshot: snap.manifest().clone(),
        sections: Vec::new(),
        nic: nic.clone(),
        public: req.public,
    };
    // The disk started as a copy of the image's (a VM booted from it, or a service or base
    // VM made from it): only what differs is kept. A disk of another size (imported) is
    // kept whole.
    let mut inputs = vec![SectionInput { name: "memory".into(), path: snap.memory_path(), base: None }];
    let image_disk = req.image.disk();
    let image_disk_len = std::fs::metadata(&image_disk).map(|m| m.len()).ok();
    for (i, p) in snap.disk_paths().into_iter().enumerate() {
        let same_size = std::fs::metadata(&p).map(|m| Some(m.len()) == image_disk_len).unwrap_or(false);
        let base = (i == 0 && same_size).then(|| image_disk.clone());
        inputs.push(SectionInput { name: format!("disk{i}"), path: p, base });
    }
    inputs.push(SectionInput { name: "state".into(), path: snap.state_path(), base: None });
    let compressed =
        format::encode(staging, &mut manifest, &inputs, work, req.zstd_level).map_err(DockError::Encode)?;
    let encode_seconds = t.elapsed().as_secs_f64();
    let raw_bytes = manifest.sections.iter().map(|s| s.raw_size).sum();
    let memory = &manifest.sections[0];
    let memory_data_bytes = memory.data_bytes + memory.image_pages * format::PAGE as u64;
    let spilled = pool.insert(&req.name, staging)?;
    Ok(DockReport {
        name: req.name.clone(),
        boot_seconds,
        dock_seconds: shrink_seconds + unplug_seconds + save_seconds + encode_seconds,
        shrink_seconds,
        unplug_seconds,
        nic_detached: nic.is_some(),
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
