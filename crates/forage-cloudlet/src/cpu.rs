//! Whether this cloudlet can give a base's (and an overlay's) VMs the CPU they need: the
//! CPU model and accelerator they were saved with (`forage_vm::cpu`). Checked when a
//! device offers an overlay (the base's) and when its manifest arrives (the overlay's own
//! launch VM), before any segment is received: a VM this host cannot resume is refused
//! with what it needs and what is missing, not after its transfer with QEMU's error.

use std::sync::Arc;

use forage_format::Manifest;
use forage_proto::ErrorCode;
use forage_synth::BaseVm;
use forage_vm::cpu::{CpuNeeds, HostCpu};
use forage_vm::AccelChoice;

use crate::error::{refused, SessionError};
use crate::Cloudlet;

/// What this cloudlet's QEMU gives, asked once per daemon.
fn host(cloudlet: &Cloudlet) -> Result<&HostCpu, SessionError> {
    let probed = cloudlet.host_cpu.get_or_init(|| {
        let detected = forage_vm::accel::detect();
        let why_not_kvm = if cloudlet.accel == forage_vm::Accel::Tcg { detected.why_not_kvm } else { None };
        HostCpu::probe(AccelChoice { accel: cloudlet.accel, why_not_kvm }).map_err(Arc::new)
    });
    probed.as_ref().map_err(|e| {
        tracing::error!("CPU models of this host: {e}");
        refused(ErrorCode::Internal, format!("the cloudlet cannot tell which CPUs it provides: {e}"))
    })
}

/// The base's VMs can resume here (refused as `no_base`: the cloudlet holds it but
/// cannot run it).
pub(crate) fn check_base(cloudlet: &Cloudlet, base: &BaseVm) -> Result<(), SessionError> {
    let needs = base.cpu_needs();
    host(cloudlet)?.check(&needs).map_err(|why| {
        refused(
            ErrorCode::NoBase,
            format!(
                "base {} ({}) needs {needs}, which cloudlet {} cannot provide: {why}",
                base.manifest().name,
                forage_trust::short(base.digest()),
                cloudlet.name
            ),
        )
    })
}

/// The overlay's launch VM can resume here (its `vm`: the spec's CPU model, the
/// accelerator it was saved under).
pub(crate) fn check_overlay(cloudlet: &Cloudlet, manifest: &Manifest) -> Result<(), SessionError> {
    let needs: CpuNeeds = forage_synth::apply::cpu_needs(manifest)
        .map_err(|e| refused(ErrorCode::BadOverlay, format!("the overlay's launch VM description: {e}")))?;
    host(cloudlet)?.check(&needs).map_err(|why| {
        refused(
            ErrorCode::BadOverlay,
            format!("the overlay's launch VM needs {needs}, which cloudlet {} cannot provide: {why}", cloudlet.name),
        )
    })
}
