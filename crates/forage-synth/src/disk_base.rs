//! A base from a disk image brought from elsewhere (`forage base create NAME --disk FILE`):
//! a cloud image, a disk an operator built. Nothing forage-specific is inside it.
//!
//! ```text
//! check FILE (disk_image.rs)          format as claimed, no other files named, size capped
//! qemu-img convert -> run/disk0.raw   streaming, sparse
//! NoCloud seed -> run/seed.iso        user, SSH key, a ready line on the serial console
//! QEMU: SeaBIOS boots the disk's own bootloader (or -kernel/-initrd/-append when asked),
//!       the seed in an IDE CD drive, qemu-ga's virtio-serial channel, user networking
//! ready: the seed's line on the serial console, or a named guest port answers
//! qemu-ga there?  yes: guest-fstrim, guest-fsfreeze-freeze/thaw   no: one line, and ext4
//!                 introspection stays off for this base's overlays
//! eject the seed, save, index             all in bases/.NAME.partial-PID, renamed at the end
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forage_image::cloud_seed::NoCloudSeed;
use forage_vm::qga::{GuestAgent, QgaError};
use forage_vm::{Accel, BalloonSpec, CdromSpec, DirectBoot, DiskSpec, GuestAgentSpec, NicSpec, Vm, VmSpec};

pub use crate::disk_error::DiskBaseError;
use crate::disk_image::{self, CheckedDisk, InputFormat};
use crate::{BaseVm, DataDir};

/// How the base's guest says it is ready to be saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// The seed's line on the serial console (cloud-init's final stage ran).
    SerialMarker,
    /// This guest port answers (a connection forwarded to it stays open or gets data).
    Port(u16),
}

/// Kernel and initramfs booted by QEMU instead of the disk's bootloader.
#[derive(Debug, Clone)]
pub struct KernelBoot {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
}

#[derive(Debug, Clone)]
pub struct DiskBaseRequest {
    pub disk: PathBuf,
    /// As the operator said; `None`: raw or qcow2 by its header.
    pub format: Option<InputFormat>,
    pub max_disk_bytes: u64,
    pub ready: Readiness,
    pub kernel: Option<KernelBoot>,
    pub user: String,
    pub ssh_key: Option<String>,
    pub memory_mib: u64,
    pub accel: Accel,
    pub timeout: Duration,
}

/// What qemu-ga did before the save.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestAgentUse {
    /// File systems trimmed (`paths`) and frozen then thawed; what `cloud-init status`
    /// said (e.g. `status: done`, or `status: error` when a module failed).
    Used { trimmed: Vec<String>, frozen: u32, cloud_init: String },
    /// No qemu-ga answered on its channel (`waited`).
    Absent { waited: Duration },
}

impl std::fmt::Display for GuestAgentUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuestAgentUse::Used { trimmed, frozen, cloud_init } => write!(
                f,
                "qemu-guest-agent: trimmed {} and froze/thawed {frozen} file system(s) before the save; cloud-init says {cloud_init:?}",
                if trimmed.is_empty() { "nothing".to_string() } else { trimmed.join(", ") }
            ),
            GuestAgentUse::Absent { waited } => write!(
                f,
                "no qemu-guest-agent in the guest (no answer on org.qemu.guest_agent.0 in {:.0} s): no freeze or trim before the save, ext4 introspection off for this base",
                waited.as_secs_f64()
            ),
        }
    }
}

#[derive(Debug)]
pub struct DiskBaseReport {
    pub base: BaseVm,
    pub input: CheckedDisk,
    pub boot_time: Duration,
    pub guest_agent: GuestAgentUse,
    pub took: Duration,
}

impl BaseVm {
    /// Boot the disk image of `req` with a cloud-init seed until it is ready, save it and
    /// index it as base `name`. Nothing is left behind on failure.
    pub async fn from_disk(data: &DataDir, name: &str, req: &DiskBaseRequest) -> Result<DiskBaseReport, DiskBaseError> {
        let start = Instant::now();
        let final_dir = data.base(name)?;
        if final_dir.exists() {
            return Err(DiskBaseError::Exists { name: name.to_string(), path: final_dir });
        }
        let input = disk_image::check(&req.disk, req.format, req.max_disk_bytes)?;
        if let Some(k) = &req.kernel {
            for f in [&k.kernel, &k.initrd] {
                if !std::fs::metadata(f).map_err(|source| DiskBaseError::Io { path: f.clone(), source })?.is_file() {
                    return Err(DiskBaseError::NotAFile { path: f.clone() });
                }
            }
        }
        let work = data.bases().join(format!(".{name}.partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        let made = build(data, name, req, &input, &work, &final_dir).await;
        let (boot_time, guest_agent) = match made {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&work);
                return Err(e);
            }
        };
        std::fs::rename(&work, &final_dir).map_err(|source| DiskBaseError::Io { path: final_dir.clone(), source })?;
        let base = BaseVm::open(data, name).map_err(DiskBaseError::Index)?;
        Ok(DiskBaseReport { base, input, boot_time, guest_agent, took: start.elapsed() })
    }
}

async fn build(
    data: &DataDir,
    name: &str,
    req: &DiskBaseRequest,
    input: &CheckedDisk,
    work: &Path,
    final_dir: &Path,
) -> Result<(Duration, GuestAgentUse), DiskBaseError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DiskBaseError::Io { path, source }
    };
    let run = work.join("run");
    std::fs::create_dir_all(&run).map_err(io(&run))?;
    let disk = run.join("disk0.raw");
    disk_image::convert(input, &disk)?;
    let boot = match &req.kernel {
        Some(k) => {
            let dir = work.join("boot");
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            std::fs::copy(&k.kernel, dir.join("vmlinuz")).map_err(io(&k.kernel))?;
            std::fs::copy(&k.initrd, dir.join("initrd.img")).map_err(io(&k.initrd))?;
            Some(DirectBoot { kernel: dir.join("vmlinuz"), initrd: dir.join("initrd.img"), cmdline: k.append.clone() })
        }
        None => None,
    };
    let nonce = &nonce();
    let seed = NoCloudSeed {
        instance_id: format!("{name}-{nonce}"),
        hostname: name.replace(['_', '.'], "-"),
        user: req.user.clone(),
        ssh_key: req.ssh_key.clone(),
        ready_marker: format!("cloud-init-configured-{nonce}"),
    };
    let iso = run.join("seed.iso");
    seed.write_iso(&iso).map_err(DiskBaseError::Seed)?;
    let qmp_socket = data.runtime_dir()?.join(format!("base-{name}.qmp"));
    let ports: Vec<u16> = match req.ready {
        Readiness::Port(p) => vec![p],
        Readiness::SerialMarker => Vec::new(),
    };
    let forwards = forage_image::loopback_forwards(ports).map_err(io(Path::new("127.0.0.1")))?;
    let host_port = forwards.first().map(|f| f.host_port);
    let spec = VmSpec {
        name: format!("base-{name}"),
        machine: "pc".into(),
        cpu_model: None,
        vcpus: 1,
        max_vcpus: None,
        memory_mib: req.memory_mib,
        memory_tail_kib: forage_vm::spec::RAM_TAIL_KIB,
        memory_file: run.join(forage_vm::snapshot::MEMORY_FILE),
        boot,
        disks: vec![DiskSpec { path: disk, format: forage_vm::DiskFormat::Raw, read_only: false, discard: true }],
        nic: Some(NicSpec { forwards, pci_slot: None }),
        balloon: Some(BalloonSpec { free_page_reporting: true }),
        guest_agent: Some(GuestAgentSpec { socket: qmp_socket.with_extension("qga") }),
        virtio_rng: true,
        virtio_blk_queues: None,
        cdrom: Some(CdromSpec { medium: Some(iso) }),
        serial_log: run.join("serial.log"),
        serial_socket: None,
        qmp_socket: qmp_socket.clone(),
        control_socket: None,
    };
    let t = Instant::now();
    let mut vm = Vm::boot(spec, req.accel, &run.join("qemu.log")).await.map_err(DiskBaseError::Boot)?;
    match host_port {
        Some(port) => wait_port(&vm, port, req.timeout).await?,
        None => {
            vm.wait_for_serial(&seed.ready_marker, req.timeout).await.map_err(|e| match e {
                forage_vm::VmError::ReadyTimeout { waited, serial_tail, .. } => DiskBaseError::NotReady {
                    what: "no cloud-init line on the serial console: is cloud-init in the image?".into(),
                    waited,
                    serial_tail,
                },
                e => DiskBaseError::Boot(e),
            })?;
        }
    }
    let boot_time = t.elapsed();
    let agent = checkpoint(&qmp_socket.with_extension("qga")).await?;
    vm.eject_cdrom().await.map_err(DiskBaseError::Boot)?;
    let snapshot = vm.save(&work.join("snapshot")).await.map_err(DiskBaseError::Save)?;
    drop(vm);
    let _ = std::fs::remove_dir_all(&run);
    let mut snapshot = snapshot;
    if req.kernel.is_some() {
        // Where the boot files will be once the folder has its final name.
        let boot = final_dir.join("boot");
        snapshot
            .set_direct_boot(boot.join("vmlinuz"), boot.join("initrd.img"))
            .map_err(|e| DiskBaseError::Index(e.into()))?;
    }
    let label = format!("disk:{}", input.path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
    let introspect = matches!(agent, GuestAgentUse::Used { .. });
    crate::base::finish(work, name, &label, &snapshot, introspect).map_err(DiskBaseError::Index)?;
    Ok((boot_time, agent))
}

/// Poll guest port forwarded to `host_port` until it answers. QEMU's user networking
/// accepts on the host side at once and closes when the guest refuses, so a connection
/// that stays open (or gets data) is the guest's.
async fn wait_port(vm: &Vm, host_port: u16, timeout: Duration) -> Result<(), DiskBaseError> {
    use tokio::io::AsyncReadExt;
    let start = Instant::now();
    let serial = vm.spec().serial_log.clone();
    let not_ready =
        |what: String| DiskBaseError::NotReady { what, waited: start.elapsed(), serial_tail: tail(&serial, 10) };
    loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", host_port)).await {
            let mut b = [0u8; 1];
            match tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await {
                Err(_) | Ok(Ok(1..)) => return Ok(()),
                _ => {}
            }
        }
        if vm.status().await.is_err() {
            return Err(not_ready("QEMU exited".into()));
        }
        if start.elapsed() > timeout {
            return Err(not_ready(format!("nothing answered on the guest's port (host 127.0.0.1:{host_port})")));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Eight hex digits from the kernel's random UUIDs (or the clock).
fn nonce() -> String {
    let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap_or_default();
    let hex: String = uuid.chars().filter(char::is_ascii_hexdigit).take(8).collect();
    if hex.len() == 8 {
        return hex;
    }
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("{:08x}", t.subsec_nanos() ^ std::process::id())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// How long qemu-ga gets to answer: it starts with the guest's udev, long before
/// cloud-init's last stage, so a guest that has it answers at once.
const AGENT_WAIT: Duration = Duration::from_secs(20);

/// With qemu-ga: trim, then freeze and thaw (everything written reaches the disk, the
/// journal checkpointed). Without: say so.
async fn checkpoint(socket: &Path) -> Result<GuestAgentUse, DiskBaseError> {
    let mut ga = match GuestAgent::connect(socket, AGENT_WAIT).await {
        Ok(ga) => ga,
        Err(QgaError::NoAnswer { .. }) | Err(QgaError::Connect { .. }) => {
            return Ok(GuestAgentUse::Absent { waited: AGENT_WAIT })
        }
        Err(e) => return Err(DiskBaseError::GuestAgent(e)),
    };
    // cloud-init's own verdict on the first boot (a module that failed, e.g. a user name
    // taken by a group, shows as `status: error`); the base is made either way.
    let cloud_init = match ga.run("cloud-init", &["status"], Duration::from_secs(120)).await {
        Ok(out) => String::from_utf8_lossy(&out.stdout).trim().replace('\n', "; "),
        Err(e) => format!("(cloud-init status did not run: {e})"),
    };
    let trimmed = ga.fstrim(None).await.map_err(DiskBaseError::GuestAgent)?;
    let frozen = ga.fsfreeze_freeze().await.map_err(DiskBaseError::GuestAgent)?;
    ga.fsfreeze_thaw().await.map_err(DiskBaseError::GuestAgent)?;
    let trimmed = trimmed.into_iter().filter(|p| p.error.is_none()).map(|p| p.path).collect();
    Ok(GuestAgentUse::Used { trimmed, frozen, cloud_init })
}
