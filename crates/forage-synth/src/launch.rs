//! Launch VMs: a base VM resumed, an application installed and started inside it, the
//! service answering, then suspended. The disk runs on a qcow2 layer (4 KiB clusters) over
//! the read-only base disk, so every write of the VM is recorded in the layer; memory is
//! compared with the base after the save.
//!
//! The app's Debian packages, if it names any, are resolved and downloaded on the host and
//! installed offline in the guest first (`forage_image::app_debs`).
//!
//! Semantic gap, both switchable: disk: `fstrim` in the guest (discards become zero
//! clusters in the layer), and a freeze/thaw so the on-disk ext4 bitmaps are current for
//! introspection; memory: the guest's free page reporting (virtio-balloon) punches freed
//! pages out of the memory file; switched off, the balloon driver is unloaded first. A
//! guest with qemu-ga (debian-12) is trimmed, frozen and thawed through it
//! (`guest-fstrim`, `guest-fsfreeze-*`: every mounted file system); the tiny guest through
//! the forage agent (`fstrim`, `fsfreeze` on `/data`).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use forage_agent::app::AppPackage;
use forage_agent::AgentClient;
use forage_datadir::DataDir;
use forage_format::CHUNK_SIZE;
use forage_image::app_debs::{self, DebsInstalled};
use forage_vm::qga::GuestAgent;
use forage_vm::{Accel, DiskFormat, RestoreOptions, Snapshot, Vm};

use crate::base::BaseVm;
use crate::ext4::Checkpoint;
use crate::{run_tool, SynthError};

#[derive(Debug, Clone)]
pub struct LaunchOptions {
    pub semantic_disk: bool,
    pub semantic_memory: bool,
    /// Longest wait for free page reporting to settle.
    pub settle: Duration,
    pub app_ready: Duration,
    /// Drop the guest's clean page cache, dentries and inodes before the save.
    pub drop_caches: bool,
}

impl Default for LaunchOptions {
    fn default() -> Self {
        Self {
            semantic_disk: true,
            semantic_memory: true,
            settle: Duration::from_secs(10),
            app_ready: Duration::from_secs(120),
            drop_caches: false,
        }
    }
}

/// A suspended launch VM and what the disk layer recorded.
#[derive(Debug)]
pub struct LaunchVm {
    pub snapshot: Snapshot,
    /// Disk chunks the VM wrote (sorted).
    pub written_disk_chunks: Vec<u64>,
    /// Disk chunks the VM discarded (zero clusters in the layer; sorted).
    pub discarded_disk_chunks: Vec<u64>,
    pub app: forage_agent::app::AppManifest,
    pub install_time: Duration,
    /// The app's Debian packages installed in the guest, if it names any.
    pub debs: Option<DebsInstalled>,
    /// What is known of the disk's file system at the save (for ext4 introspection).
    pub checkpoint: Checkpoint,
}

/// Build a launch VM from `base` and `app` in `work` (created; the caller removes it).
pub async fn build(
    data: &DataDir,
    base: &BaseVm,
    app: &AppPackage,
    accel: Accel,
    opts: &LaunchOptions,
    work: &Path,
) -> Result<LaunchVm, SynthError> {
    let run = work.join("run");
    DataDir::ensure(&run)?;
    let layer = run.join("disk0.qcow2");
    // qemu-img resolves a relative backing file against the layer's folder: name it absolutely.
    let backing =
        std::fs::canonicalize(base.disk_path()).map_err(|source| SynthError::Io { path: base.disk_path(), source })?;
    run_tool(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-F", "raw", "-b"])
            .arg(&backing)
            .arg(&layer),
    )?;
    let qmp = data.runtime_dir()?.join(format!("launch-{}.qmp", std::process::id()));
    let guest_ports = [forage_agent::AGENT_PORT, app.manifest().port];
    let forwards = forage_image::loopback_forwards(guest_ports)
        .map_err(|source| SynthError::Io { path: "127.0.0.1".into(), source })?;
    let (agent_port, app_port) = (forwards[0].host_port, forwards[1].host_port);
    let mut spec = base.snapshot().relocated_spec(&run, &qmp, Some(forwards));
    spec.name = format!("launch-{}", app.manifest().name);
    spec.disks[0].path = layer.clone();
    spec.disks[0].format = DiskFormat::Qcow2;
    let opts_restore = RestoreOptions { copy_disks: false, evict_cache: false, ..Default::default() };
    let start = Instant::now();
    let vm = Vm::restore_with(base.snapshot(), spec, accel, &run.join("qemu.log"), opts_restore).await?;

    let agent_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, agent_port));
    let qga_socket = vm.spec().guest_agent.as_ref().map(|g| g.socket.clone());
    let app2 = app.clone();
    let data2 = data.clone();
    let trim_with_agent = opts.semantic_disk && qga_socket.is_none();
    let (semantic_disk, semantic_memory, ready) = (opts.semantic_disk, opts.semantic_memory, opts.app_ready);
    let debs = tokio::task::spawn_blocking(move || -> Result<Option<DebsInstalled>, SynthError> {
        let mut agent = AgentClient::connect(agent_addr, Duration::from_secs(60))?;
        let t = Duration::from_secs(60);
        if !semantic_memory {
            // Without the driver the guest reports nothing: freed pages keep their contents.
            agent.exec_ok(&["rmmod", "virtio_balloon"], t)?;
        }
        if !semantic_disk {
            // The image mounts its disk with online discard; without it deleted blocks
            // keep theirs. The disk is /data (tiny) or / (debian-12).
            let remount = "m=/data; grep -q ' /data ' /proc/mounts || m=/; mount -o remount,nodiscard $m";
            agent.exec_ok(&["sh", "-c", remount], t)?;
        }
        let debs = app_debs::install_app(&data2, &mut agent, &app2)?;
        wait_for_service(&mut agent, app2.manifest(), app_port, ready)?;
        if trim_with_agent {
            agent.exec_ok(&["fstrim", "/data"], t)?;
        }
        Ok(debs)
    })
    .await
    .expect("launch steps do not panic")?;
    let mut qga = match &qga_socket {
        Some(socket) => Some(GuestAgent::connect(socket, Duration::from_secs(60)).await?),
        None => None,
    };
    if let (true, Some(ga)) = (opts.semantic_disk, qga.as_mut()) {
        ga.fstrim(None).await?;
    }
    if opts.semantic_memory {
        settle_reporting(&vm.spec().memory_file, opts.settle).await;
    }
    if opts.drop_caches {
        tokio::task::spawn_blocking(move || -> Result<(), SynthError> {
            let mut agent = AgentClient::connect(agent_addr, Duration::from_secs(60))?;
            agent.exec_ok(&["sh", "-c", "sync && echo 3 > /proc/sys/vm/drop_caches"], Duration::from_secs(120))?;
            Ok(())
        })
        .await
        .expect("drop caches does not panic")?;
        if opts.semantic_memory {
            settle_reporting(&vm.spec().memory_file, opts.settle).await;
        }
    }
    // Last step before the save: freeze the file system (its on-disk state complete, the
    // journal checkpointed), let QEMU record disk writes from then on, thaw, stop the VM.
    // The save follows; ext4 introspection trusts the bitmaps only if nothing but the
    // thaw's superblock reached the disk after the freeze (`ext4::Checkpoint`).
    let checkpoint = freeze_thaw_stop(&vm, qga.as_mut(), agent_addr).await?;
    drop(qga);
    let install_time = start.elapsed();
    let mut snapshot = vm.save(&work.join("snapshot")).await?;
    drop(vm);

    let saved_layer = snapshot.disk_paths()[0].clone();
    let (written, discarded) = layer_chunks(&saved_layer)?;
    let flat = work.join("disk0.raw");
    run_tool(
        Command::new("qemu-img").args(["convert", "-q", "-f", "qcow2", "-O", "raw"]).arg(&saved_layer).arg(&flat),
    )?;
    snapshot.replace_disk_with_raw(0, &flat)?;
    let _ = std::fs::remove_dir_all(&run);
    Ok(LaunchVm {
        snapshot: Snapshot::open(&work.join("snapshot"))?,
        checkpoint,
        written_disk_chunks: written,
        discarded_disk_chunks: discarded,
        app: app.manifest().clone(),
        install_time,
        debs,
    })
}

/// Freeze the disk's file system, start QEMU's dirty bitmap on the disk, thaw, stop the VM
/// and count the chunks written since the freeze; a few attempts when more than the
/// thaw's own superblock write got through (the guest runs between the thaw and the stop).
async fn freeze_thaw_stop(
    vm: &Vm,
    mut qga: Option<&mut GuestAgent>,
    agent_addr: SocketAddr,
) -> Result<Checkpoint, SynthError> {
    const ATTEMPTS: usize = 3;
    const BITMAP: &str = "forage-freeze";
    let node = forage_vm::dirty::disk_node(0);
    let agent = |cmd: &'static [&'static str]| async move {
        tokio::task::spawn_blocking(move || -> Result<(), SynthError> {
            let mut agent = AgentClient::connect(agent_addr, Duration::from_secs(60))?;
            agent.exec_ok(cmd, Duration::from_secs(120))?;
            Ok(())
        })
        .await
        .expect("agent call does not panic")
    };
    let mut written = u64::MAX;
    for attempt in 1..=ATTEMPTS {
        match qga.as_deref_mut() {
            Some(ga) => {
                ga.fsfreeze_freeze().await?;
            }
            None => agent(&["sh", "-c", "sync && fsfreeze --freeze /data"]).await?,
        }
        let started = vm.dirty_bitmap_start(&node, BITMAP, CHUNK_SIZE as u32).await;
        match qga.as_deref_mut() {
            Some(ga) => {
                ga.fsfreeze_thaw().await?;
            }
            None => agent(&["fsfreeze", "--unfreeze", "/data"]).await?,
        }
        started?;
        vm.pause().await?;
        written = vm.dirty_bitmap_units(&node, BITMAP).await?;
        vm.dirty_bitmap_stop(&node, BITMAP).await?;
        if written <= 1 || attempt == ATTEMPTS {
            break;
        }
        tracing::info!(written, attempt, "disk written between the freeze and the stop; again");
        vm.resume().await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(Checkpoint::Frozen { chunks_written_after: written })
}

/// Until the service answers: its probe through the forwarded port (the answer must be
/// what `probe_expect` says, if the app says), or else a TCP connect from inside the guest.
fn wait_for_service(
    agent: &mut AgentClient,
    app: &forage_agent::app::AppManifest,
    host_port: u16,
    wait: Duration,
) -> Result<(), SynthError> {
    let start = Instant::now();
    let mut last_answer = None;
    while start.elapsed() < wait {
        let up = match &app.probe {
            Some(line) => match probe(SocketAddr::from((Ipv4Addr::LOCALHOST, host_port)), line) {
                Ok(answer) if app.probe_answer_ok(&answer) => true,
                Ok(answer) => {
                    last_answer = Some(answer);
                    false
                }
                Err(_) => false,
            },
            None => agent.listening(app.port).unwrap_or(false),
        };
        if up {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if let (Some(answer), Some(expected)) = (last_answer, &app.probe_expect) {
        return Err(SynthError::AppWrongAnswer { app: app.name.clone(), answer, expected: expected.clone() });
    }
    Err(SynthError::AppNotReady { app: app.name.clone(), port: app.port, waited: wait })
}

/// Send one request line and read one answer line.
pub fn probe(addr: SocketAddr, line: &str) -> std::io::Result<String> {
    forage_agent::app::request_line(addr, line, Duration::from_secs(60))
}

/// Wait until the memory file's allocated size stops shrinking (reported pages punched).
async fn settle_reporting(memory: &Path, max: Duration) {
    let start = Instant::now();
    let mut last = forage_vm::sparse::allocated_bytes(memory).unwrap_or(0);
    let mut stable_since = Instant::now();
    // The kernel reports free pages about 2 s after they are freed.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    while start.elapsed() < max {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = forage_vm::sparse::allocated_bytes(memory).unwrap_or(0);
        if now != last {
            last = now;
            stable_since = Instant::now();
        } else if stable_since.elapsed() >= Duration::from_millis(1500) {
            return;
        }
    }
}

/// Chunks written and chunks discarded in a qcow2 layer (`qemu-img map`, depth 0).
pub(crate) fn layer_chunks(layer: &Path) -> Result<(Vec<u64>, Vec<u64>), SynthError> {
    let out = run_tool(Command::new("qemu-img").args(["map", "--output=json", "-f", "qcow2"]).arg(layer))?;
    let ranges: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)
        .map_err(|e| SynthError::Tool { tool: "qemu-img map".into(), detail: e.to_string() })?;
    let mut written = Vec::new();
    let mut discarded = Vec::new();
    for r in ranges {
        if r["depth"].as_u64() != Some(0) {
            continue;
        }
        let (start, len) = (r["start"].as_u64().unwrap_or(0), r["length"].as_u64().unwrap_or(0));
        let zero = r["zero"].as_bool().unwrap_or(false) && !r["data"].as_bool().unwrap_or(false);
        let target = if zero { &mut discarded } else { &mut written };
        let cs = CHUNK_SIZE as u64;
        target.extend(start / cs..(start + len).div_ceil(cs));
    }
    written.sort_unstable();
    discarded.sort_unstable();
    Ok((written, discarded))
}
