//! A built image, and VMs booted from it: the VM spec of a fresh run (a sparse copy of the
//! image's disk, loopback port forwards, the qemu-ga channel when the image has one), and
//! a boot that waits for the ready marker on the serial console.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forage_datadir::DataDir;
use forage_vm::{BalloonSpec, DirectBoot, DiskSpec, GuestAgentSpec, NicSpec, PortForward, VmSpec};

use crate::manifest::ImageManifest;
use crate::ImageError;

/// A built guest image.
#[derive(Debug, Clone)]
pub struct GuestImage {
    dir: PathBuf,
    manifest: ImageManifest,
}

/// Where one run of an image keeps its files. The guest-agent socket (when the image has
/// qemu-ga) is the QMP socket's path with the extension `qga`.
#[derive(Debug, Clone)]
pub struct RunPaths {
    pub dir: PathBuf,
    pub qmp_socket: PathBuf,
}

impl RunPaths {
    pub fn guest_agent_socket(&self) -> PathBuf {
        self.qmp_socket.with_extension("qga")
    }
}

impl GuestImage {
    /// Open a built image by name.
    pub fn open(data: &DataDir, name: &str) -> Result<Self, ImageError> {
        let dir = data.image(name)?;
        Self::open_dir(&dir).map_err(|e| match e {
            ImageError::Io { .. } => ImageError::NotBuilt { name: name.to_string(), dir: dir.clone() },
            e => e,
        })
    }

    /// Open the image in `dir`.
    pub fn open_dir(dir: &Path) -> Result<Self, ImageError> {
        let path = dir.join("image.json");
        let text = std::fs::read(&path).map_err(|source| ImageError::Io { path: path.clone(), source })?;
        let manifest = ImageManifest::parse(&path, &text)?;
        Ok(Self { dir: dir.to_path_buf(), manifest })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &ImageManifest {
        &self.manifest
    }

    pub fn disk(&self) -> PathBuf {
        self.dir.join(&self.manifest.disk)
    }

    /// A VM spec that boots this image in `run`, with a fresh copy of the disk (made here,
    /// holes kept) and the given extra guest ports forwarded to loopback. Returns the spec
    /// and the host port of the agent, then of each extra port.
    pub fn fresh_run(&self, name: &str, run: &RunPaths, guest_ports: &[u16]) -> Result<(VmSpec, Vec<u16>), ImageError> {
        std::fs::create_dir_all(&run.dir).map_err(|source| ImageError::Io { path: run.dir.clone(), source })?;
        let disk = run.dir.join("disk0.raw");
        forage_vm::sparse::copy_sparse(&self.disk(), &disk)
            .map_err(|source| ImageError::Io { path: disk.clone(), source })?;
        let forwards = loopback_forwards(std::iter::once(self.manifest.agent_port).chain(guest_ports.iter().copied()))
            .map_err(|source| ImageError::Io { path: "127.0.0.1".into(), source })?;
        let host_ports = forwards.iter().map(|f| f.host_port).collect();
        let spec = VmSpec {
            name: name.to_string(),
            machine: "pc".into(),
            cpu_model: None,
            vcpus: 1,
            max_vcpus: None,
            memory_mib: self.manifest.memory_mib,
            memory_tail_kib: forage_vm::spec::RAM_TAIL_KIB,
            memory_file: run.dir.join(forage_vm::snapshot::MEMORY_FILE),
            boot: Some(DirectBoot {
                kernel: self.dir.join(&self.manifest.kernel),
                initrd: self.dir.join(&self.manifest.initrd),
                cmdline: self.manifest.cmdline.clone(),
            }),
            disks: vec![DiskSpec { path: disk, format: forage_vm::DiskFormat::Raw, read_only: false, discard: true }],
            nic: Some(NicSpec { forwards, pci_slot: None }),
            balloon: Some(BalloonSpec { free_page_reporting: true }),
            guest_agent: self.manifest.guest_agent.then(|| GuestAgentSpec { socket: run.guest_agent_socket() }),
            virtio_rng: self.manifest.virtio_rng,
            virtio_blk_queues: None,
            cdrom: None,
            serial_log: run.dir.join("serial.log"),
            serial_socket: None,
            qmp_socket: run.qmp_socket.clone(),
            control_socket: Some(run.qmp_socket.with_extension("ctl")),
        };
        // The memory file must not exist yet: QEMU creates it at the configured size.
        let _ = std::fs::remove_file(&spec.memory_file);
        Ok((spec, host_ports))
    }
}

/// Forwards from free loopback ports to the given guest ports; QEMU binds them moments
/// later (see [`forwards_on`] for how they are chosen).
pub fn loopback_forwards(guest_ports: impl IntoIterator<Item = u16>) -> std::io::Result<Vec<PortForward>> {
    forwards_on(std::net::Ipv4Addr::LOCALHOST, guest_ports)
}

/// Forwards from free ports of `host_addr` to the given guest ports.
///
/// The ports come from below the kernel's ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`), starting at a random place. Between our
/// choosing a port and QEMU binding it the port is free; a port from the ephemeral range
/// could be taken in that window by any outgoing connection on the host (CI saw
/// "Could not set up host forwarding rule" that way), one below it only by another
/// listener that chose it on purpose.
pub fn forwards_on(
    host_addr: std::net::Ipv4Addr,
    guest_ports: impl IntoIterator<Item = u16>,
) -> std::io::Result<Vec<PortForward>> {
    let mut held = Vec::new();
    let mut out = Vec::new();
    let mut candidates = ForwardPorts::new();
    for guest_port in guest_ports {
        let l = candidates.bind_next(host_addr)?;
        out.push(PortForward { host_addr, host_port: l.local_addr()?.port(), guest_port });
        held.push(l); // keep bound until all are chosen, so none repeats
    }
    Ok(out)
}

/// Lowest port handed to forwards; below it live well-known services.
const FORWARD_PORT_FLOOR: u16 = 20_000;

/// Walks the ports between [`FORWARD_PORT_FLOOR`] and the ephemeral range from a random
/// start; falls back to a kernel-chosen port when that span is small or used up.
struct ForwardPorts {
    span: Option<(u16, u16)>,
    next: u32,
    tried: u32,
}

impl ForwardPorts {
    fn new() -> Self {
        let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|w| w.parse::<u16>().ok()));
        let span = match ephemeral_low {
            Some(low) if low > FORWARD_PORT_FLOOR + 1000 => Some((FORWARD_PORT_FLOOR, low)),
            _ => None,
        };
        let start = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            h.finish() as u32
        };
        ForwardPorts { span, next: start, tried: 0 }
    }

    fn bind_next(&mut self, host_addr: std::net::Ipv4Addr) -> std::io::Result<std::net::TcpListener> {
        if let Some((low, high)) = self.span {
            let width = u32::from(high - low);
            while self.tried < width.min(2000) {
                let port = low + (self.next % width) as u16;
                self.next = self.next.wrapping_add(1);
                self.tried += 1;
                if let Ok(l) = std::net::TcpListener::bind((host_addr, port)) {
                    return Ok(l);
                }
            }
        }
        std::net::TcpListener::bind((host_addr, 0))
    }
}

#[cfg(test)]
mod forward_port_tests {
    use super::*;

    #[test]
    fn forwards_get_distinct_ports_below_the_ephemeral_range() {
        let fw = loopback_forwards([1, 2, 3, 4]).unwrap();
        let mut ports: Vec<u16> = fw.iter().map(|f| f.host_port).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 4, "{fw:?}");
        let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        if low > FORWARD_PORT_FLOOR + 1000 {
            assert!(ports.iter().all(|&p| (FORWARD_PORT_FLOOR..low).contains(&p)), "{ports:?} vs {low}");
        }
    }
}

/// A booted guest, ready on its serial console, with loopback ports for its agent and
/// any extra guest ports.
pub struct ReadyGuest {
    pub vm: forage_vm::Vm,
    pub agent_port: u16,
    /// Host ports, in the order of the requested guest ports.
    pub ports: Vec<u16>,
    /// From QEMU start to the ready marker.
    pub boot_time: Duration,
}

impl GuestImage {
    /// Boot this image in `run` and wait for its ready marker (`timeout`). On timeout the
    /// error carries the serial console's last lines and QEMU is killed.
    pub async fn boot(
        &self,
        name: &str,
        run: &RunPaths,
        guest_ports: &[u16],
        accel: forage_vm::Accel,
        timeout: Duration,
    ) -> Result<ReadyGuest, BootError> {
        self.boot_from(name, run, None, guest_ports, accel, timeout).await
    }

    /// [`boot`](Self::boot) with `disk` (raw, used in place) as the disk instead of a copy
    /// of the image's: a cold boot of a disk brought from elsewhere.
    pub async fn boot_from(
        &self,
        name: &str,
        run: &RunPaths,
        disk: Option<&Path>,
        guest_ports: &[u16],
        accel: forage_vm::Accel,
        timeout: Duration,
    ) -> Result<ReadyGuest, BootError> {
        let start = Instant::now();
        let (mut spec, mut ports) = self.fresh_run(name, run, guest_ports)?;
        if let Some(disk) = disk {
            let _ = std::fs::remove_file(&spec.disks[0].path);
            spec.disks[0].path = disk.to_path_buf();
        }
        let vm = forage_vm::Vm::boot(spec, accel, &run.dir.join("qemu.log")).await?;
        vm.wait_for_serial(&self.manifest.ready_marker, timeout).await?;
        let agent_port = ports.remove(0);
        Ok(ReadyGuest { vm, agent_port, ports, boot_time: start.elapsed() })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Vm(#[from] forage_vm::VmError),
}
