//! forage-vm: real QEMU VMs on stock QEMU 7.2.
//!
//! - [`VmSpec`]: what a VM is (machine, memory file, disks, NIC, balloon, serial, QMP)
//!   and its QEMU command line.
//! - [`accel::detect`]: KVM where it runs ordinary guests, TCG otherwise.
//! - [`Vm`]: boot, pause, resume, save to a [`Snapshot`] (raw memory file + small device
//!   state), restore, shutdown; QEMU supervised by [`process::QemuProcess`].
//! - [`qmp::Qmp`]: the asynchronous QMP client underneath.
//! - [`cpu`]: the CPU model and accelerator a saved VM needs, and whether this host's
//!   QEMU can provide them.
//! - [`dirty`]: which parts of a running VM's disk were written since a point (a QEMU
//!   dirty bitmap).
//! - [`Vm::plug_vcpus`], [`Vm::set_balloon`]: grow or shrink a running VM;
//!   [`Vm::unplug_nic`], [`Vm::plug_nic`]: take its NIC away and give it one back.
//! - [`qga::GuestAgent`]: a typed client of the QEMU guest agent (qemu-ga) over the VM's
//!   virtio-serial channel ([`GuestAgentSpec`]).

pub mod accel;
pub mod cpu;
pub mod dirty;
mod error;
pub mod import;
mod nic;
pub mod process;
pub mod qga;
pub mod qmp;
mod resize;
pub mod snapshot;
pub mod sparse;
pub mod spec;
mod vm;

pub use accel::{Accel, AccelChoice};
pub use error::{RestoreError, SaveError, VmError};
pub use snapshot::{HostCapacity, Snapshot, SnapshotError};
pub use spec::{
    BalloonSpec, CdromSpec, DirectBoot, DiskFormat, DiskSpec, GuestAgentSpec, NicSpec, PortForward, VmSpec,
};
pub use vm::RestoreOptions;
pub use vm::Vm;
