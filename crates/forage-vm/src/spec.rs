//! `VmSpec`: everything that describes one QEMU VM, and its QEMU command line.
//!
//! Guest RAM always lives in a plain file (`memory-backend-file`, `share=on`, RAMBlock id
//! `ram0`) so that a save writes memory to that file and only a small device-state stream
//! to a separate file (QEMU's `x-ignore-shared` capability).

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::accel::Accel;

/// The RAMBlock id of guest memory; both sides of a save/restore must use it.
pub const RAM_ID: &str = "ram0";

/// KiB of RAM every new VM gets past its size in MiB, so that its RAM is not a whole
/// number of 256 KiB.
///
/// Why: QEMU 7.2 (Debian's 7.2.22 too) loses guest writes under TCG when a migration
/// re-syncs its dirty bitmap while the VM runs. `cpu_physical_memory_sync_dirty_bitmap`
/// (include/exec/ram_addr.h) takes a fast path for a RAM block whose start and length are
/// whole 64-page words: it swaps the dirty words to zero but does not re-arm the TCG TLB
/// entries (`tlb_reset_dirty_range_all`), so a page the guest had written before the
/// sync is written again through a TLB entry that no longer marks it dirty, and that
/// write never reaches the destination. QEMU 9.0 fixed it (commit 03bfc2188f, "physmem:
/// Fix migration dirty bitmap coherency with TCG memory access"). With a length that is
/// not a whole word, QEMU 7.2 takes the slow path, page by page
/// (`cpu_physical_memory_test_and_clear_dirty`), which re-arms the TLB. 8 KiB is the
/// least `-m` accepts; the guest sees 8 KiB more RAM.
pub const RAM_TAIL_KIB: u64 = 8;

/// The alignment of the RAM length that sends QEMU 7.2 down the fast path: 64 pages.
const DIRTY_FAST_PATH_ALIGN: u64 = 64 * 4096;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Used in logs and error messages.
    pub name: String,
    /// QEMU machine type, e.g. `pc`.
    pub machine: String,
    /// QEMU CPU model; `None` keeps QEMU's default, which migrates anywhere.
    #[serde(default)]
    pub cpu_model: Option<String>,
    pub vcpus: u32,
    /// vCPUs that may be hot-plugged later (`-smp VCPUS,maxcpus=N`): a docked substrate
    /// runs on one and grows on activation. Absent from older specs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u32>,
    pub memory_mib: u64,
    /// KiB of guest RAM past `memory_mib` (new VMs: [`RAM_TAIL_KIB`]; 0 in older specs).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub memory_tail_kib: u64,
    /// The file that holds guest RAM.
    pub memory_file: PathBuf,
    #[serde(default)]
    pub boot: Option<DirectBoot>,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    #[serde(default)]
    pub nic: Option<NicSpec>,
    #[serde(default)]
    pub balloon: Option<BalloonSpec>,
    /// A virtio-serial channel to the QEMU guest agent (`qemu-ga`) in the guest, served by
    /// QEMU on a unix socket (see [`crate::qga`]). Absent from older specs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_agent: Option<GuestAgentSpec>,
    /// A virtio-rng device fed from the host's `/dev/urandom`: without it a guest under
    /// TCG has almost no entropy, and anything that waits for the kernel's random pool
    /// (systemd-networkd, Python's `os.urandom`) stalls for seconds. Absent from older specs.
    #[serde(default, skip_serializing_if = "is_false")]
    pub virtio_rng: bool,
    /// Queues of each virtio-blk device (`num-queues`); `None` keeps QEMU's default, one
    /// per vCPU the VM starts with. A VM saved with vCPUs plugged in after its start
    /// restores with them all, and keeps the queues it started with (its saved PCI
    /// configuration says how many MSI-X vectors it has). Absent from older specs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtio_blk_queues: Option<u32>,
    /// An IDE CD drive (`ide-cd` on the `pc` machine's secondary channel), e.g. for a
    /// cloud-init NoCloud seed at first boot; ejected before a save, so saved VMs have an
    /// empty drive. Absent from older specs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cdrom: Option<CdromSpec>,
    /// Where the guest's serial console is written.
    pub serial_log: PathBuf,
    /// Also offer the serial console on this unix socket (QEMU listens; one client at a
    /// time), for an operator's terminal; the log is still written. Not guest-visible:
    /// outside the hardware fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_socket: Option<PathBuf>,
    /// QMP unix socket of the process that supervises QEMU (at most 107 bytes of path).
    pub qmp_socket: PathBuf,
    /// A second QMP socket for other processes (`forage vm save` from another terminal):
    /// a QMP socket serves one client at a time.
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
}

/// Kernel + initramfs booted directly by QEMU (`-kernel`, `-initrd`, `-append`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectBoot {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// The image file.
    pub path: PathBuf,
    #[serde(default)]
    pub format: DiskFormat,
    #[serde(default)]
    pub read_only: bool,
    /// Pass guest discards (TRIM) down as holes in the file.
    #[serde(default = "yes")]
    pub discard: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    #[default]
    Raw,
    /// A qcow2 layer (e.g. over a read-only raw base: the layer records every write).
    Qcow2,
}

impl DiskFormat {
    pub fn driver(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// User-mode networking with TCP ports of the guest forwarded to the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    #[serde(default)]
    pub forwards: Vec<PortForward>,
    /// A fixed PCI slot on the `pc` machine's root bus (`addr=`). Without one QEMU gives
    /// the NIC the next free slot in command-line order, so the devices after it move
    /// when it is left out; with one it can be hot-unplugged before a save and the VM
    /// restored without it (every other device keeps its slot), then plugged back in
    /// ([`crate::Vm::unplug_nic`], [`crate::Vm::plug_nic`]). Absent from older specs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_slot: Option<u8>,
}

/// The slot VMs that may lose their NIC (docked substrates) give it: far above the slots
/// QEMU hands out in order to the few other devices, below the last (31).
pub const NIC_HOTPLUG_SLOT: u8 = 0x10;

/// The NIC's QEMU ids: its netdev (host side) and its device (guest side).
pub const NETDEV_ID: &str = "net0";
pub const NIC_ID: &str = "nic0";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    pub host_addr: Ipv4Addr,
    pub host_port: u16,
    pub guest_port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonSpec {
    /// The guest reports free pages, which QEMU punches out of the memory file.
    pub free_page_reporting: bool,
}

/// The QEMU guest agent's channel: a `virtserialport` named [`QGA_CHANNEL`] on a
/// `virtio-serial-pci` controller, its host end a unix socket QEMU listens on (one client
/// at a time, at most 107 bytes of path).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestAgentSpec {
    pub socket: PathBuf,
}

/// A CD drive and its medium (an ISO image, read-only), if one is inserted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CdromSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub medium: Option<PathBuf>,
}

/// The qdev id of the CD drive (QMP `eject` names it).
pub const CDROM_ID: &str = "cd0";

/// The port name qemu-ga looks for (`/dev/virtio-ports/org.qemu.guest_agent.0`).
pub const QGA_CHANNEL: &str = "org.qemu.guest_agent.0";

fn yes() -> bool {
    true
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !b
}

impl VmSpec {
    /// The full QEMU argument list (without the program name).
    /// `incoming` adds `-S -incoming defer` for a restore.
    pub fn qemu_args(&self, accel: Accel, incoming: bool) -> Vec<OsString> {
        let mut a = Args::default();
        a.pair("-name", format!("{},debug-threads=on", self.name));
        a.flag("-nodefaults");
        a.flag("-no-user-config");
        // Least privilege: seccomp denies obsolete system calls, privilege changes and
        // resource control. Spawning stays allowed: saves and restores run `cat` through
        // QEMU's `exec:` migration URI.
        a.pair("-sandbox", "on,obsolete=deny,elevateprivileges=deny,resourcecontrol=deny");
        a.pair("-display", "none");
        a.pair("-machine", format!("{},accel={},memory-backend={RAM_ID}", self.machine, accel));
        if let Some(cpu) = &self.cpu_model {
            a.pair("-cpu", cpu);
        }
        match self.max_vcpus {
            Some(max) => a.pair("-smp", format!("{},maxcpus={max}", self.vcpus)),
            None => a.pair("-smp", self.vcpus.to_string()),
        }
        let kib = self.memory_bytes() >> 10;
        a.pair("-m", format!("{kib}k"));
        let mut ram = OsString::from(format!("memory-backend-file,id={RAM_ID},size={kib}K,share=on,mem-path="));
        ram.push(escape_commas(self.memory_file.as_os_str()));
        a.pair("-object", ram);
        if let Some(boot) = &self.boot {
            a.pair("-kernel", &boot.kernel);
            a.pair("-initrd", &boot.initrd);
            a.pair("-append", &boot.cmdline);
        }
        for (i, disk) in self.disks.iter().enumerate() {
            let discard = if disk.discard { "unmap" } else { "ignore" };
            let mut file = OsString::from(format!(
                "driver=file,node-name=disk{i}-file,discard={discard},read-only={},filename=",
                on_off(disk.read_only)
            ));
            file.push(escape_commas(disk.path.as_os_str()));
            a.pair("-blockdev", file);
            a.pair(
                "-blockdev",
                format!(
                    "driver={},node-name=disk{i},file=disk{i}-file,discard={discard},read-only={}",
                    disk.format.driver(),
                    on_off(disk.read_only)
                ),
            );
            let queues = self.virtio_blk_queues.map(|q| format!(",num-queues={q}")).unwrap_or_default();
            a.pair(
                "-device",
                format!("virtio-blk-pci,drive=disk{i},id=vd{i},discard={}{queues}", on_off(disk.discard)),
            );
        }
        if let Some(nic) = &self.nic {
            a.pair("-netdev", nic.netdev());
            a.pair("-device", nic.device());
        }
        if let Some(b) = &self.balloon {
            a.pair(
                "-device",
                format!("virtio-balloon-pci,id=balloon0,free-page-reporting={}", on_off(b.free_page_reporting)),
            );
        }
        if let Some(ga) = &self.guest_agent {
            let mut chardev = OsString::from("socket,id=qga0,server=on,wait=off,path=");
            chardev.push(escape_commas(ga.socket.as_os_str()));
            a.pair("-chardev", chardev);
            a.pair("-device", "virtio-serial-pci,id=vserial0");
            a.pair("-device", format!("virtserialport,bus=vserial0.0,chardev=qga0,id=qga0port,name={QGA_CHANNEL}"));
        }
        if self.virtio_rng {
            a.pair("-object", "rng-random,id=rng0,filename=/dev/urandom");
            a.pair("-device", "virtio-rng-pci,rng=rng0,id=rng0dev");
        }
        if let Some(cd) = &self.cdrom {
            let mut device = format!("ide-cd,bus=ide.1,unit=0,id={CDROM_ID}");
            if let Some(medium) = &cd.medium {
                let mut file = OsString::from("driver=file,node-name=cd0-file,read-only=on,filename=");
                file.push(escape_commas(medium.as_os_str()));
                a.pair("-blockdev", file);
                a.pair("-blockdev", "driver=raw,node-name=cd0-medium,file=cd0-file,read-only=on");
                device.push_str(",drive=cd0-medium");
            }
            a.pair("-device", device);
        }
        let mut serial = match &self.serial_socket {
            Some(sock) => {
                let mut c = OsString::from("socket,id=serial0,server=on,wait=off,path=");
                c.push(escape_commas(sock.as_os_str()));
                c.push(",logfile=");
                c
            }
            None => OsString::from("file,id=serial0,path="),
        };
        serial.push(escape_commas(self.serial_log.as_os_str()));
        a.pair("-chardev", serial);
        a.pair("-serial", "chardev:serial0");
        let mut qmp = OsString::from("socket,id=qmp0,server=on,wait=off,path=");
        qmp.push(escape_commas(self.qmp_socket.as_os_str()));
        a.pair("-chardev", qmp);
        a.pair("-mon", "chardev=qmp0,mode=control");
        if let Some(ctl) = &self.control_socket {
            let mut c = OsString::from("socket,id=qmp1,server=on,wait=off,path=");
            c.push(escape_commas(ctl.as_os_str()));
            a.pair("-chardev", c);
            a.pair("-mon", "chardev=qmp1,mode=control");
        }
        if incoming {
            a.flag("-S");
            a.pair("-incoming", "defer");
        }
        a.0
    }

    /// A digest of what the guest can see of this VM: machine, CPU, memory size, devices.
    /// A saved state only restores into a VM with the same hardware fingerprint; file
    /// paths and host port numbers do not count.
    pub fn hardware_fingerprint(&self) -> String {
        let mut hw = serde_json::json!({
            "machine": self.machine,
            "cpu": self.cpu_model,
            "vcpus": self.vcpus,
            "memory_mib": self.memory_mib,
            "direct_boot": self.boot.as_ref().map(|b| &b.cmdline),
            "disks": self.disks.iter().map(|d| (d.read_only, d.discard)).collect::<Vec<_>>(),
            // Port forwards live in the host's user-network stack, not in the guest.
            "nic": self.nic.is_some(),
            "balloon": self.balloon.map(|b| b.free_page_reporting),
        });
        // Only when present, so that the fingerprints of VMs without the channel (every
        // snapshot saved before it existed) stay what they were.
        if self.guest_agent.is_some() {
            hw["guest_agent"] = serde_json::Value::Bool(true);
        }
        if let Some(slot) = self.nic.as_ref().and_then(|n| n.pci_slot) {
            hw["nic_slot"] = slot.into();
        }
        if self.virtio_rng {
            hw["virtio_rng"] = serde_json::Value::Bool(true);
        }
        if let Some(q) = self.virtio_blk_queues {
            hw["virtio_blk_queues"] = q.into();
        }
        // The drive is hardware; its medium is not (it is ejected before a save).
        if self.cdrom.is_some() {
            hw["cdrom"] = serde_json::Value::Bool(true);
        }
        if self.memory_tail_kib != 0 {
            hw["memory_tail_kib"] = self.memory_tail_kib.into();
        }
        if let Some(max) = self.max_vcpus {
            hw["max_vcpus"] = max.into();
        }
        hex::encode(Sha256::digest(hw.to_string().as_bytes()))
    }

    /// Guest RAM in bytes: `memory_mib` MiB and the tail.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib.saturating_mul(1024 * 1024).saturating_add(self.memory_tail_kib.saturating_mul(1024))
    }

    /// Whether QEMU 7.2 tracks every guest write to this VM's RAM across its migration
    /// rounds (see [`RAM_TAIL_KIB`]): always with KVM; under TCG only when the RAM is
    /// not a whole number of 256 KiB.
    pub fn dirty_tracking_exact(&self, accel: Accel) -> bool {
        accel == Accel::Kvm || !self.memory_bytes().is_multiple_of(DIRTY_FAST_PATH_ALIGN)
    }
}

/// Words that go into QEMU option strings unescaped (machine type, CPU model) must be
/// plain: a comma would add options.
pub fn check_words(spec: &VmSpec) -> Result<(), String> {
    let plain =
        |s: &str| !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !plain(&spec.name) {
        return Err(format!("VM name {:?} is not a plain name", spec.name));
    }
    if !plain(&spec.machine) {
        return Err(format!("machine type {:?} is not a plain name", spec.machine));
    }
    if let Some(cpu) = &spec.cpu_model {
        if !plain(cpu) {
            return Err(format!("CPU model {cpu:?} is not a plain name"));
        }
    }
    Ok(())
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// QEMU option values separate keys with commas; a literal comma is written twice.
fn escape_commas(s: &std::ffi::OsStr) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut out = Vec::with_capacity(s.len());
    for &b in s.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn flag(&mut self, f: &str) {
        self.0.push(f.into());
    }
    fn pair(&mut self, k: &str, v: impl Into<OsString>) {
        self.0.push(k.into());
        self.0.push(v.into());
    }
}

#[cfg(test)]
#[path = "spec_tests.rs"]
mod tests;
