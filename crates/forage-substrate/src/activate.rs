//! Activation: a substrate becomes a running VM of the requested size.
//!
//! 1. The pool hands over the substrate file (read back into memory if it was spilled).
//! 2. Its manifest is read and checked (caps, the request against the docked VM's
//!    limits); this host's image of the substrate's name and recipe gives kernel and
//!    initramfs.
//! 3. The substrate is decoded once ([`crate::decoded`]): the first activation's one pass
//!    over the file verifies it whole (structure, caps, every zstd frame, the checksum)
//!    while decoding base disks, memory and device state into a partial folder, which
//!    becomes the substrate's decoded folder only if the file checked out (else it is
//!    removed before QEMU starts: a corrupted substrate runs nothing). Each activation
//!    copies memory and device state from there into its own folder.
//! 4. The activation gets a qcow2 copy-on-write layer over the base disk.
//! 5. QEMU restores the VM; a substrate docked without its NIC gets one plugged in
//!    (`netdev_add` with fresh loopback forwards, `device_add`), which the guest brings
//!    up on its own (a substrate that kept its NIC gets the fresh forwards on the
//!    restore's command line). The guest agent's answer to a ping, through that NIC, is
//!    the first response.
//! 6. A public substrate's guest renews its identity ([`crate::generalize`]).
//! 7. The VM grows: vCPUs hot-plugged (and onlined in the guest through the agent),
//!    balloon deflated to the requested memory.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use forage_agent::{AgentClient, AgentError};
use forage_datadir::DataDir;
use forage_image::{GuestImage, RunPaths};
use forage_vm::{Accel, DiskFormat, NicSpec, PortForward, RestoreOptions, Snapshot, Vm};
use serde::Serialize;

use crate::activate_error::io;
pub use crate::activate_error::ActivateError;
use crate::dock::{meminfo, with_agent};
use crate::format::{self, plain_name, DecodeError, SubstrateManifest};
use crate::pool::Pool;

pub struct ActivateRequest {
    pub substrate: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub accel: Accel,
    /// The VM's run folder and QMP socket.
    pub run: RunPaths,
    pub vm_name: String,
    /// QEMU outlives this process (a cloudlet's instance, which outlives a restart of the
    /// daemon; see `forage_vm::RestoreOptions::detached`). Either way a failed activation
    /// stops the VM it started.
    pub detached: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ActivationReport {
    pub substrate: String,
    pub vm: String,
    /// The file from the pool (read back if it was spilled), its manifest, the image and
    /// the request checked.
    pub manifest_seconds: f64,
    /// The first activation of a substrate: the one pass that verifies the whole file while
    /// decoding it; every activation: memory and device state copied into its folder.
    pub decode_seconds: f64,
    /// This activation decoded the substrate (the first one since it entered the pool).
    pub decoded_now: bool,
    pub restore_seconds: f64,
    /// Plugging in a NIC with this activation's forwards (a substrate docked without one).
    pub plug_seconds: f64,
    pub nic_plugged: bool,
    /// What a public substrate's guest renewed (`hostname`, `machine-id`, `ssh-host-keys`).
    pub renewed: Vec<String>,
    /// From the start of the activation to the guest's first answer (the agent's ping).
    pub first_response_seconds: f64,
    /// Until the vCPUs are online and the balloon has given the guest its memory.
    pub total_seconds: f64,
    pub agent_port: u16,
    pub service_port: Option<(u16, u16)>,
    /// What the guest reports: online CPUs and MemTotal.
    pub guest_vcpus: u32,
    pub guest_mem_total_bytes: u64,
    pub reloaded_from_disk: bool,
}

pub struct Activated {
    pub vm: Vm,
    pub manifest: SubstrateManifest,
    pub report: ActivationReport,
    /// Every guest port's loopback forward (the agent's and the service's).
    pub forwards: Vec<PortForward>,
}

pub async fn activate(data: &DataDir, pool: &Pool, req: ActivateRequest) -> Result<Activated, ActivateError> {
    let start = Instant::now();
    let name = req.substrate.clone();
    let reloaded = pool.entry(&name)?.tier == crate::pool::Tier::Disk;
    let (file, _) = pool.get(&name)?;
    let refused = |source| ActivateError::Refused { name: name.clone(), source };
    // Header and manifest only: the whole file is verified by the decode below.
    let manifest = format::read_manifest(&file).map_err(refused)?;
    let snap = &manifest.snapshot;
    let max_vcpus = snap.spec.max_vcpus.unwrap_or(snap.spec.vcpus);
    if req.vcpus == 0 || req.vcpus > max_vcpus {
        return Err(ActivateError::TooBig { name, what: format!("1 to {max_vcpus} vCPUs, not {}", req.vcpus) });
    }
    let docked_mib = manifest.docked_memory_bytes.div_ceil(1 << 20);
    if req.memory_mib > snap.spec.memory_mib || req.memory_mib < docked_mib {
        return Err(ActivateError::TooBig {
            name,
            what: format!("{docked_mib} to {} MiB of memory, not {}", snap.spec.memory_mib, req.memory_mib),
        });
    }
    let image = GuestImage::open(data, &manifest.image).map_err(|source| ActivateError::Image {
        name: name.clone(),
        image: manifest.image.clone(),
        source,
    })?;
    if image.manifest().recipe_digest != manifest.image_recipe {
        return Err(ActivateError::ImageMismatch {
            name,
            image: manifest.image.clone(),
            wanted: manifest.image_recipe.clone(),
            found: image.manifest().recipe_digest.clone(),
        });
    }

    // Decoded once per substrate (`crate::decoded`): the first activation's one pass over
    // the file verifies and decodes it into a folder that only appears whole; every
    // activation copies memory and device state from there into its own folder.
    let manifest_seconds = start.elapsed().as_secs_f64();
    let t = Instant::now();
    let decoded_dir = pool.disks_dir(&name)?;
    let snap_dir = req.run.dir.join("substrate");
    let _ = std::fs::remove_dir_all(&req.run.dir);
    // From here the VM's folder is this activation's: a failure leaves none of it behind
    // (until the VM runs, dropped with this; then removed once the VM is stopped).
    let scratch = RemovedUnlessKept(Some(req.run.dir.clone()));
    let own_files = [&snap.memory.file, &snap.state.file].iter().all(|f| plain_name(f));
    if !own_files {
        return Err(ActivateError::Refused {
            name,
            source: DecodeError::Manifest("the snapshot's memory and state files are not plain names".into()),
        });
    }
    // The decode (first activation) and the copies read and write the whole memory: on a
    // thread of the blocking pool, not the session's.
    let d = {
        let (file, m, dir, disk, vm) =
            (file.clone(), manifest.clone(), decoded_dir.clone(), image.disk(), req.vm_name.clone());
        let snap_dir = snap_dir.clone();
        tokio::task::spawn_blocking(move || {
            let d = crate::decoded::ensure(&file, &m, &dir, &disk, &vm)?;
            std::fs::create_dir_all(&snap_dir).map_err(io(&snap_dir))?;
            Ok::<_, ActivateError>(d)
        })
        .await
        .expect("the decode does not panic")?
    };
    let decoded_now = d.fresh;
    // Absolute: a symlink and a qcow2 backing file name are read relative to their folder.
    let bases = d.disks.iter().map(|b| std::fs::canonicalize(b).map_err(io(b))).collect::<Result<Vec<_>, _>>()?;
    // qemu-img makes each disk's copy-on-write layer while memory and device state are
    // copied.
    let mut layers = Vec::new();
    for (i, base) in bases.iter().enumerate() {
        let layer = req.run.dir.join(format!("disk{i}.qcow2"));
        layers.push((cow_layer(base, &layer)?, layer));
    }
    {
        let files = [snap.memory.file.clone(), snap.state.file.clone()];
        let (memory, state, snap_dir) = (d.memory.clone(), d.state.clone(), snap_dir.clone());
        tokio::task::spawn_blocking(move || {
            for (from, to) in [(&memory, &files[0]), (&state, &files[1])] {
                let to = snap_dir.join(to);
                crate::decoded::copy_data(from, &to).map_err(io(&to))?;
            }
            Ok::<_, ActivateError>(())
        })
        .await
        .expect("the copy does not panic")?;
    }
    for (child, layer) in &mut layers {
        cow_layer_made(child, layer).await?;
    }
    for (rec, base) in snap.disks.iter().zip(&bases) {
        std::os::unix::fs::symlink(base, snap_dir.join(&rec.file)).map_err(io(&snap_dir))?;
    }
    std::fs::write(snap_dir.join(forage_vm::snapshot::MANIFEST_FILE), serde_json::to_vec_pretty(snap).expect("json"))
        .map_err(io(&snap_dir))?;
    let snapshot = Snapshot::open(&snap_dir)
        .map_err(|e| ActivateError::Restore { name: name.clone(), source: forage_vm::RestoreError::from(e) })?;
    // A NIC detached at dock is plugged in after the restore; a NIC the docked VM kept
    // gets fresh forwards on the restore's command line.
    let guest_ports: Vec<u16> = match &manifest.nic {
        Some(n) => n.guest_ports.clone(),
        None => snap.spec.nic.as_ref().map(|n| n.forwards.iter().map(|f| f.guest_port).collect()).unwrap_or_default(),
    };
    let forwards = forage_image::loopback_forwards(guest_ports).map_err(io(Path::new("127.0.0.1")))?;
    let mut spec = snapshot.relocated_spec(&req.run.dir, &req.run.qmp_socket, Some(forwards.clone()));
    spec.name = req.vm_name.clone();
    spec.memory_file = snapshot.memory_path(); // restored in place: no copy
    if let Some(boot) = spec.boot.as_mut() {
        boot.kernel = image.dir().join(&image.manifest().kernel);
        boot.initrd = image.dir().join(&image.manifest().initrd);
    }
    for (disk, (_, layer)) in spec.disks.iter_mut().zip(layers) {
        disk.path = layer;
        disk.format = DiskFormat::Qcow2;
    }
    let decode_seconds = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let opts = RestoreOptions { copy_disks: false, detached: req.detached, ..RestoreOptions::default() };
    let mut vm = Vm::restore_with(&snapshot, spec, req.accel, &req.run.dir.join("qemu.log"), opts)
        .await
        .map_err(|source| ActivateError::Restore { name: name.clone(), source })?;
    let restore_seconds = t.elapsed().as_secs_f64();
    scratch.keep();
    let run_dir = req.run.dir.clone();
    let before = Before { start, reloaded, manifest_seconds, decode_seconds, decoded_now, restore_seconds };
    // From here on the VM runs: a failure stops it (a detached QEMU would outlive us).
    match grow(&mut vm, &manifest, &forwards, req, before).await {
        Ok(report) => Ok(Activated { vm, manifest, report, forwards }),
        Err(e) => {
            let _ = vm.shutdown().await;
            let _ = std::fs::remove_dir_all(run_dir);
            Err(e)
        }
    }
}

/// A folder removed when this is dropped, unless kept.
struct RemovedUnlessKept(Option<std::path::PathBuf>);

impl RemovedUnlessKept {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for RemovedUnlessKept {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// What the activation measured before the VM ran.
struct Before {
    start: Instant,
    reloaded: bool,
    manifest_seconds: f64,
    decode_seconds: f64,
    decoded_now: bool,
    restore_seconds: f64,
}

/// The restored VM gets its NIC (if docked without), answers, renews its identity (if
/// public) and grows to the request.
async fn grow(
    vm: &mut Vm,
    manifest: &SubstrateManifest,
    forwards: &[PortForward],
    req: ActivateRequest,
    before: Before,
) -> Result<ActivationReport, ActivateError> {
    let Before { start, reloaded, manifest_seconds, decode_seconds, decoded_now, restore_seconds } = before;
    let t = Instant::now();
    if let Some(n) = &manifest.nic {
        let nic = NicSpec { forwards: forwards.to_vec(), pci_slot: Some(n.pci_slot) };
        vm.plug_nic(nic).await.map_err(ActivateError::PlugNic)?;
    }
    let plug_seconds = t.elapsed().as_secs_f64();

    // The first response: the guest agent answers its ping (inside the connect). The VM
    // still runs on its docked size; growing follows.
    let agent_port = forwards.iter().find(|f| f.guest_port == forage_agent::AGENT_PORT).map(|f| f.host_port);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, agent_port.unwrap_or(0)));
    let mut agent = tokio::task::spawn_blocking(move || first_answer(addr, Duration::from_secs(30)))
        .await
        .expect("the agent's connect does not panic")
        .map_err(ActivateError::Agent)?;
    let first_response_seconds = start.elapsed().as_secs_f64();

    // A public substrate becomes a machine of its own before the activation hands it over
    // (its service already runs: what it read of the old identity it keeps).
    let (renewed, agent) = match manifest.public {
        true => {
            let (renewed, agent) = tokio::task::spawn_blocking(move || {
                let out = crate::generalize::renew(&mut agent);
                (out, agent)
            })
            .await
            .expect("the agent session does not panic");
            (renewed.map_err(ActivateError::Agent)?, agent)
        }
        false => (Vec::new(), agent),
    };
    let mut agent = agent;

    // Grow. Plugging and ballooning are requests the guest acts on; the agent onlines the
    // vCPUs once the guest has them.
    vm.plug_vcpus(req.vcpus).await.map_err(ActivateError::Expand)?;
    // All of it means the RAM tail too (`forage_vm::spec::RAM_TAIL_KIB`): the balloon
    // then keeps nothing.
    let target = if req.memory_mib == manifest.snapshot.spec.memory_mib {
        manifest.snapshot.spec.memory_bytes()
    } else {
        req.memory_mib << 20
    };
    vm.qmp()
        .execute("balloon", Some(serde_json::json!({ "value": target })))
        .await
        .map_err(|e| ActivateError::Expand(forage_vm::VmError::from(e)))?;
    let want = req.vcpus;
    let online = format!(
        "i=0; while [ $(ls -d /sys/devices/system/cpu/cpu[0-9]* | wc -l) -lt {want} ] && [ $i -lt 200 ]; do \
         sleep 0.05; i=$((i+1)); done; for c in /sys/devices/system/cpu/cpu[0-9]*; do \
         [ -f $c/online ] && [ $(cat $c/online) = 0 ] && echo 1 > $c/online; done; nproc"
    );
    let out = tokio::task::spawn_blocking(move || agent.exec_ok(&["sh", "-c", &online], Duration::from_secs(30)))
        .await
        .expect("the agent session does not panic")
        .map_err(ActivateError::Agent)?;
    let agent_port = addr.port();
    let guest_vcpus = out.stdout.trim().parse().unwrap_or(0);
    vm.set_balloon(target, Duration::from_secs(60)).await.map_err(ActivateError::Expand)?;
    let total_seconds = start.elapsed().as_secs_f64();
    let mem = with_agent(agent_port, Duration::from_secs(30), |a| {
        a.exec_ok(&["cat", "/proc/meminfo"], Duration::from_secs(10))
    })
    .await
    .map_err(ActivateError::Agent)?;
    let service_port =
        manifest.service_port.and_then(|g| forwards.iter().find(|f| f.guest_port == g).map(|f| (g, f.host_port)));
    Ok(ActivationReport {
        substrate: req.substrate,
        vm: req.vm_name,
        manifest_seconds,
        decode_seconds,
        decoded_now,
        restore_seconds,
        plug_seconds,
        nic_plugged: manifest.nic.is_some(),
        first_response_seconds,
        renewed,
        total_seconds,
        agent_port,
        service_port,
        guest_vcpus,
        guest_mem_total_bytes: meminfo(&mem.stdout).0,
        reloaded_from_disk: reloaded,
    })
}

/// The guest agent at `addr`, connected and answering a ping, tried every 10 ms for up
/// to `wait` ([`AgentClient::connect`] waits 200 ms between tries, which a first try a
/// moment before the resumed guest answers would add to the first response). Each try
/// waits 50 ms for the ping's answer (after 2 s, longer with every try, up to 2 s, for a
/// guest that is slow rather than absent): a connection made before the guest brought
/// its newly plugged NIC up is only retransmitted seconds later, a new one is sent at
/// once.
fn first_answer(addr: SocketAddr, wait: Duration) -> Result<AgentClient, AgentError> {
    let start = Instant::now();
    let mut answer = Duration::from_millis(50);
    loop {
        match AgentClient::try_connect_within(addr, answer) {
            Ok(c) => return Ok(c),
            Err(_) if start.elapsed() < wait => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => return Err(AgentError::Unreachable { addr, waited: start.elapsed() }),
        }
        if start.elapsed() > Duration::from_secs(2) {
            answer = (answer * 2).min(Duration::from_secs(2));
        }
    }
}

/// Start qemu-img making a qcow2 layer over `base` ([`cow_layer_made`] waits for it).
fn cow_layer(base: &Path, layer: &Path) -> Result<tokio::process::Child, ActivateError> {
    tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(layer)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(io(layer))
}

async fn cow_layer_made(child: &mut tokio::process::Child, layer: &Path) -> Result<(), ActivateError> {
    let status = child.wait().await.map_err(io(layer))?;
    if !status.success() {
        let mut said = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut e, &mut said).await;
        }
        return Err(ActivateError::CowDisk { path: layer.to_path_buf(), detail: said.trim().to_string() });
    }
    Ok(())
}
