//! Activation: a substrate becomes a running VM of the requested size.
//!
//! 1. The pool hands over the substrate file (read back into memory if it was spilled).
//! 2. Its manifest is read and checked (caps, the request against the docked VM's
//!    limits); this host's image of the substrate's name and recipe gives kernel and
//!    initramfs.
//! 3. One pass over the file verifies it whole (structure, caps, every zstd frame, the
//!    checksum) while decoding it: memory and device state into the activation's folder,
//!    the base disk (once per substrate: this host's image disk with the substrate's
//!    differences written over it, read-only) into a partial folder. If the file does not
//!    check out, both are removed before QEMU starts: a corrupted substrate runs nothing.
//! 4. The activation gets a qcow2 copy-on-write layer over the base disk.
//! 5. QEMU restores the VM with a NIC whose forwards are fresh loopback ports, then the
//!    VM grows: vCPUs hot-plugged (and onlined in the guest through the agent, once its
//!    ping, the first response, has come back), balloon deflated to the requested memory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forage_agent::AgentError;
use forage_datadir::DataDir;
use forage_image::{GuestImage, RunPaths};
use forage_vm::{Accel, DiskFormat, RestoreOptions, Snapshot, Vm};
use serde::Serialize;

use crate::dock::{meminfo, with_agent};
use crate::format::{self, DecodeError, SubstrateManifest, ToFiles};
use crate::pool::{Pool, PoolError};

pub struct ActivateRequest {
    pub substrate: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub accel: Accel,
    /// The VM's run folder and QMP socket.
    pub run: RunPaths,
    pub vm_name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("substrate {name} is refused: {source}")]
    Refused {
        name: String,
        #[source]
        source: DecodeError,
    },
    #[error("substrate {name} was docked for {what}")]
    TooBig { name: String, what: String },
    #[error("substrate {name} runs image {image} of recipe {wanted}; this host's is {found}")]
    ImageMismatch { name: String, image: String, wanted: String, found: String },
    #[error("substrate {name} needs guest image {image}")]
    Image {
        name: String,
        image: String,
        #[source]
        source: forage_image::ImageError,
    },
    #[error("qemu-img could not make the copy-on-write disk {path}: {detail}")]
    CowDisk { path: PathBuf, detail: String },
    #[error("restoring substrate {name}")]
    Restore {
        name: String,
        #[source]
        source: forage_vm::RestoreError,
    },
    #[error("growing the activated VM")]
    Expand(#[source] forage_vm::VmError),
    #[error("the activated VM's guest agent")]
    Agent(#[source] AgentError),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ActivateError {
    let path = path.to_path_buf();
    move |source| ActivateError::Io { path, source }
}

#[derive(Debug, Clone, Serialize)]
pub struct ActivationReport {
    pub substrate: String,
    pub vm: String,
    /// The file from the pool (read back if it was spilled), its manifest, the image and
    /// the request checked.
    pub manifest_seconds: f64,
    /// The one pass that verifies the whole file while decoding it.
    pub decode_seconds: f64,
    pub restore_seconds: f64,
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

    // One pass over the file verifies it and decodes it: memory and device state into the
    // activation's folder, the base disks (once per substrate) into a partial folder. Only
    // when the checksum at the end matched do they become real; otherwise both are removed
    // and nothing has run.
    let manifest_seconds = start.elapsed().as_secs_f64();
    let t = Instant::now();
    let base_dir = pool.disks_dir(&name)?;
    let snap_dir = req.run.dir.join("substrate");
    let _ = std::fs::remove_dir_all(&req.run.dir);
    std::fs::create_dir_all(&snap_dir).map_err(io(&snap_dir))?;
    let decoded = decode_once(&file, &manifest, &snap_dir, &base_dir, &image.disk(), &req.vm_name);
    let bases = match decoded {
        Ok(b) => b,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&req.run.dir);
            return Err(e);
        }
    };
    // Absolute: a symlink and a qcow2 backing file name are read relative to their folder.
    let bases = bases.iter().map(|b| std::fs::canonicalize(b).map_err(io(b))).collect::<Result<Vec<_>, _>>()?;
    for (rec, base) in snap.disks.iter().zip(&bases) {
        std::os::unix::fs::symlink(base, snap_dir.join(&rec.file)).map_err(io(&snap_dir))?;
    }
    std::fs::write(snap_dir.join(forage_vm::snapshot::MANIFEST_FILE), serde_json::to_vec_pretty(snap).expect("json"))
        .map_err(io(&snap_dir))?;
    let snapshot = Snapshot::open(&snap_dir)
        .map_err(|e| ActivateError::Restore { name: name.clone(), source: forage_vm::RestoreError::from(e) })?;
    let guest_ports: Vec<u16> =
        snap.spec.nic.as_ref().map(|n| n.forwards.iter().map(|f| f.guest_port).collect()).unwrap_or_default();
    let forwards = forage_image::loopback_forwards(guest_ports).map_err(io(Path::new("127.0.0.1")))?;
    let mut spec = snapshot.relocated_spec(&req.run.dir, &req.run.qmp_socket, Some(forwards.clone()));
    spec.name = req.vm_name.clone();
    spec.memory_file = snapshot.memory_path(); // restored in place: no copy
    if let Some(boot) = spec.boot.as_mut() {
        boot.kernel = image.dir().join(&image.manifest().kernel);
        boot.initrd = image.dir().join(&image.manifest().initrd);
    }
    for (i, (disk, base)) in spec.disks.iter_mut().zip(&bases).enumerate() {
        let layer = req.run.dir.join(format!("disk{i}.qcow2"));
        cow_layer(base, &layer)?;
        disk.path = layer;
        disk.format = DiskFormat::Qcow2;
    }
    let decode_seconds = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let opts = RestoreOptions { copy_disks: false, ..RestoreOptions::default() };
    let vm = Vm::restore_with(&snapshot, spec, req.accel, &req.run.dir.join("qemu.log"), opts)
        .await
        .map_err(|source| ActivateError::Restore { name: name.clone(), source })?;
    let restore_seconds = t.elapsed().as_secs_f64();

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
    let agent_port = forwards.iter().find(|f| f.guest_port == forage_agent::AGENT_PORT).map(|f| f.host_port);
    let agent_port = agent_port.unwrap_or(0);
    let want = req.vcpus;
    let online = format!(
        "i=0; while [ $(ls -d /sys/devices/system/cpu/cpu[0-9]* | wc -l) -lt {want} ] && [ $i -lt 200 ]; do \
         sleep 0.05; i=$((i+1)); done; for c in /sys/devices/system/cpu/cpu[0-9]*; do \
         [ -f $c/online ] && [ $(cat $c/online) = 0 ] && echo 1 > $c/online; done; nproc"
    );
    // The agent's ping (inside the connect) is the first response; onlining the vCPUs
    // follows on the same connection.
    let (first_response_seconds, out) = with_agent(agent_port, Duration::from_secs(30), move |a| {
        let first = start.elapsed().as_secs_f64();
        Ok((first, a.exec_ok(&["sh", "-c", &online], Duration::from_secs(30))?))
    })
    .await
    .map_err(ActivateError::Agent)?;
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
    let report = ActivationReport {
        substrate: name,
        vm: req.vm_name,
        manifest_seconds,
        decode_seconds,
        restore_seconds,
        first_response_seconds,
        total_seconds,
        agent_port,
        service_port,
        guest_vcpus,
        guest_mem_total_bytes: meminfo(&mem.stdout).0,
        reloaded_from_disk: reloaded,
    };
    Ok(Activated { vm, manifest, report })
}

/// Decode the substrate `file` (whose manifest `m` was read from it) in one pass that
/// verifies it: memory and device state into `snap_dir`, and, unless an earlier activation
/// left them in `base_dir`, the disks (over this host's `image_disk`) into a partial folder
/// that becomes `base_dir` only once the whole file checked out. On failure the partial
/// folder is removed; the caller removes `snap_dir`. Returns the base disks, read-only:
/// the backing files of every activation's copy-on-write layer.
fn decode_once(
    file: &Path,
    m: &SubstrateManifest,
    snap_dir: &Path,
    base_dir: &Path,
    image_disk: &Path,
    tag: &str,
) -> Result<Vec<PathBuf>, ActivateError> {
    let refused = |source| ActivateError::Refused { name: m.name.clone(), source };
    let paths: Vec<PathBuf> = (0..m.snapshot.disks.len()).map(|i| base_dir.join(format!("disk{i}.raw"))).collect();
    let mut targets = vec![
        ("memory".to_string(), snap_dir.join(&m.snapshot.memory.file)),
        ("state".to_string(), snap_dir.join(&m.snapshot.state.file)),
    ];
    targets.retain(|(_, p)| p.parent() == Some(snap_dir));
    let partial = base_dir.with_extension(format!("partial-{}-{tag}", std::process::id()));
    let need_bases = !paths.iter().all(|p| p.is_file());
    if need_bases {
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial).map_err(io(&partial))?;
        targets.extend((0..paths.len()).map(|i| (format!("disk{i}"), partial.join(format!("disk{i}.raw")))));
    }
    let f = std::fs::File::open(file).map_err(io(file))?;
    let mut sink = ToFiles::new(targets).with_base("disk0", image_disk.to_path_buf());
    let decoded = format::decode(std::io::BufReader::with_capacity(1 << 20, f), &mut sink);
    let decoded = match decoded {
        // The file may have been replaced since its manifest was read: then it is not the
        // substrate the request was checked against.
        Ok(d) if serde_json::to_value(&d).ok() == serde_json::to_value(m).ok() => Ok(()),
        Ok(_) => Err(refused(DecodeError::Manifest("the file changed while it was activated".into()))),
        Err(e) => Err(refused(e)),
    };
    if let Err(e) = decoded {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e);
    }
    if !need_bases {
        return Ok(paths);
    }
    for i in 0..paths.len() {
        let p = partial.join(format!("disk{i}.raw"));
        let mut perm = std::fs::metadata(&p).map_err(io(&p))?.permissions();
        perm.set_readonly(true);
        std::fs::set_permissions(&p, perm).map_err(io(&p))?;
    }
    // The folder only ever appears whole (a rename). If another activation got there
    // first (a rename onto a non-empty folder fails), its copy is used and ours dropped:
    // VMs may already run on it.
    if let Err(e) = std::fs::rename(&partial, base_dir) {
        let _ = std::fs::remove_dir_all(&partial);
        if !paths.iter().all(|p| p.is_file()) {
            return Err(io(base_dir)(e));
        }
    }
    Ok(paths)
}

fn cow_layer(base: &Path, layer: &Path) -> Result<(), ActivateError> {
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(layer)
        .output()
        .map_err(io(layer))?;
    if !out.status.success() {
        return Err(ActivateError::CowDisk {
            path: layer.to_path_buf(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}
