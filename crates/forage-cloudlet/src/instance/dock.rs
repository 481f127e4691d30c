//! Docking a running instance into a substrate (`POST /v1/instances/{id}/dock`,
//! `forage substrate dock NAME --from instance:ID`, `docs/substrates.md`).
//!
//! The instance belongs to its holder (the session that started it, or the life of an
//! adopted one), which alone owns its VM, so the API leaves an order in the instance's
//! [`Control`](super::Control) and waits for the holder's answer, as a handoff does:
//!
//! ```text
//! API -> Cloudlet::dock_instance: plain name, not in the pool, the instance runs here
//!        and its holder takes dock orders, no handoff ordered or under way
//!     -> DockOrder in the instance's Control -> hold() returns Ending::Docking
//!     -> carry_out: the VM saved into the session folder as a residue's is (QEMU exits:
//!        the instance ends here) -> vCPUs plugged in since its start written into the
//!        saved spec (it restores with them) -> a qcow2 disk flattened to raw
//!        -> forage_substrate::dock(DockSource::Saved), as
//!        a service's saved VM is docked -> the instance recorded stopped, its device
//!        told why (as for an operator's stop), the API answered with the dock's report
//! ```
//!
//! A failure before the save leaves the instance running (the API hears why); after it,
//! the instance has ended whether or not the dock succeeded.

use std::path::{Path, PathBuf};
use std::time::Duration;

use forage_image::GuestImage;
use forage_proto::ErrorCode;
use forage_substrate::{DockReport, DockRequest, DockSource, Pool, PoolError};
use forage_vm::{DiskFormat, Snapshot, VmSpec};
use tokio::sync::oneshot;

use super::dock_order::{DockInstanceError, DockOrder, DockRefusal};
use super::{Instance, Place};
use crate::error::SessionError;
use crate::Cloudlet;

/// How long the restored VM's guest agent may take to answer before its shrink.
const READY: Duration = Duration::from_secs(120);

impl Cloudlet {
    /// Dock running instance `id` as substrate `name` and wait for the outcome. The
    /// instance ends (it leaves the instance list; its device is told why); what runs
    /// afterwards is a new VM activated from the substrate.
    pub async fn dock_instance(&self, id: &str, name: &str, public: bool) -> Result<DockReport, DockInstanceError> {
        // Everything that refuses comes before the order: a refusal changes nothing.
        let pool = Pool::open(&self.data).map_err(DockInstanceError::Pool)?;
        match pool.entry(name) {
            Ok(_) => return Err(DockInstanceError::Exists(name.into())),
            Err(PoolError::NotFound(_)) => {}
            Err(PoolError::BadName(_)) => return Err(DockInstanceError::BadName(name.chars().take(80).collect())),
            Err(e) => return Err(DockInstanceError::Pool(e)),
        }
        let control = self.instance_control(id).ok_or_else(|| DockInstanceError::NoInstance(id.into()))?;
        let handed_off = self.handoffs.list().iter().any(|h| h.instance == id && h.ended_unix_ms.is_none());
        if handed_off {
            return Err(DockInstanceError::HandoffUnderWay(id.into()));
        }
        let (reply, answer) = oneshot::channel();
        control.order_dock(DockOrder { name: name.into(), public, reply }).map_err(|r| match r {
            DockRefusal::NotDockable => DockInstanceError::NotDockable(id.into()),
            DockRefusal::Moving => DockInstanceError::HandoffUnderWay(id.into()),
            DockRefusal::Docking => DockInstanceError::Busy(id.into()),
        })?;
        answer.await.map_err(|_| DockInstanceError::Ended(id.into()))?
    }
}

/// What became of a dock order.
pub(crate) enum Docked {
    /// The instance runs on (no order, or the dock failed before the VM was saved).
    Stayed,
    /// The VM was saved: the instance ended (docked or not); this tells its device why.
    Ended(SessionError),
}

/// Carry out the dock order the instance was given, if any.
pub(crate) async fn carry_out(place: Place<'_>, instance: &Instance) -> Docked {
    let Some(order) = instance.control.take_dock() else { return Docked::Stayed };
    tracing::info!(instance = place.id, substrate = order.name, "docking the instance");
    let saved = match save(place, instance).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(instance = place.id, "not docked, the instance runs on: {}", forage_api::one_line(&e));
            instance.control.dock_failed();
            let _ = order.reply.send(Err(e));
            return Docked::Stayed;
        }
    };
    // From here on the instance has ended: its QEMU exited with the save.
    if let Err(e) = place.cloudlet.state.instance_stopped(place.id) {
        tracing::debug!("{e}");
    }
    let docked = dock(place, instance, saved, &order).await;
    let why = match &docked {
        Ok(_) => format!("the cloudlet's operator docked this instance as substrate {}", order.name),
        Err(e) => format!("the cloudlet's operator docked this instance, which failed: {}", forage_api::one_line(e)),
    };
    match &docked {
        Ok(r) => {
            tracing::info!(instance = place.id, substrate = order.name, dock_s = r.dock_seconds, "instance docked")
        }
        Err(e) => tracing::warn!(instance = place.id, "docking failed: {}", forage_api::one_line(e)),
    }
    let _ = order.reply.send(docked);
    // Devices that joined it hear it too; whatever else was asked meanwhile (an idle
    // timeout), this is why it ended.
    instance.control.ended(ErrorCode::Internal, why);
    Docked::Ended(instance.control.error())
}

/// What the saved instance is docked with: its snapshot, the image it boots and the
/// vCPUs it had.
struct Saved {
    snapshot: Snapshot,
    image: GuestImage,
    vcpus: u32,
}

/// The image whose kernel the VM boots (what a dock restores it with).
fn image_of(data: &forage_datadir::DataDir, id: &str, spec: &VmSpec) -> Result<GuestImage, DockInstanceError> {
    let Some(kernel) = spec.boot.as_ref().map(|b| b.kernel.clone()) else {
        return Err(DockInstanceError::NoKernel { id: id.into() });
    };
    let dir = kernel.parent().unwrap_or(Path::new("/"));
    let image = GuestImage::open_dir(dir).map_err(|source| DockInstanceError::NoImage {
        id: id.into(),
        kernel: kernel.clone(),
        source,
    })?;
    // An image of this cloudlet's data folder, by its own name (not any folder a record
    // may name).
    GuestImage::open(data, &image.manifest().name).map_err(|source| DockInstanceError::NoImage {
        id: id.into(),
        kernel,
        source,
    })
}

/// Save the instance's VM as a residue does (QEMU exits). An error leaves the instance
/// running.
async fn save(place: Place<'_>, instance: &Instance) -> Result<Saved, DockInstanceError> {
    let id = place.id.to_string();
    let image = image_of(&place.cloudlet.data, &id, instance.vm.spec())?;
    // An activation plugs vCPUs in, which the VM's spec does not say: the saved VM
    // restores with them all. (Unplugging them instead crashed QEMU 7.2 under TCG in the
    // save that followed, in 5 of 16 runs: glibc's "corrupted size vs. prev_size".)
    let vcpus =
        instance.vm.vcpus_present().await.map_err(|source| DockInstanceError::Vcpus { id: id.clone(), source })?;
    let dir = place.dir.join("docked");
    let _ = std::fs::remove_dir_all(&dir);
    // The shim ends when QEMU does, and with it the view the save copies memory and disk
    // out of: it keeps serving (the instance's holder shuts it down when it finishes).
    if let Err(e) = instance.shim.unwatch_qemu().await {
        tracing::warn!(instance = place.id, "the shim still watches QEMU (an older shim?): {e}");
    }
    match instance.vm.save(&dir).await {
        Ok(snapshot) => Ok(Saved { snapshot, image, vcpus }),
        Err(source) => {
            // The VM runs on (Vm::save resumes it when its state could not be written).
            let _ = instance.shim.watch_qemu(instance.vm.pid()).await;
            let _ = std::fs::remove_dir_all(&dir);
            let qemu_said = instance.vm.qemu_log_tail(3);
            Err(DockInstanceError::Save { id, qemu_said, source: Box::new(source) })
        }
    }
}

/// The saved VM as a dock takes it: the vCPUs it had in its spec, raw disks.
async fn raw_disks(id: &str, saved: &mut Saved) -> Result<(), DockInstanceError> {
    let saved_err = |source| DockInstanceError::Saved { id: id.into(), source };
    let snapshot = &mut saved.snapshot;
    if saved.vcpus > snapshot.manifest().spec.vcpus {
        snapshot.set_vcpus(saved.vcpus).map_err(saved_err)?;
    }
    // An activated substrate's disk is a qcow2 layer over the pool's base: docking keeps
    // raw disks (the substrate keeps their difference from the image's).
    let layers: Vec<(usize, PathBuf)> = snapshot
        .disk_paths()
        .into_iter()
        .enumerate()
        .filter(|(i, _)| snapshot.manifest().spec.disks[*i].format == DiskFormat::Qcow2)
        .collect();
    for (i, layer) in layers {
        let flat = snapshot.dir().join(format!("disk{i}.flat"));
        let out = tokio::process::Command::new("qemu-img")
            .args(["convert", "-q", "-f", "qcow2", "-O", "raw"])
            .arg(&layer)
            .arg(&flat)
            .output()
            .await;
        let detail = match out {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(String::from_utf8_lossy(&o.stderr).trim().to_string()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(detail) = detail {
            return Err(DockInstanceError::Flatten { id: id.into(), path: layer, detail });
        }
        snapshot.replace_disk_with_raw(i, &flat).map_err(saved_err)?;
    }
    Ok(())
}

/// Dock the saved instance as a service's saved VM is docked.
async fn dock(
    place: Place<'_>,
    instance: &Instance,
    mut saved: Saved,
    order: &DockOrder,
) -> Result<DockReport, DockInstanceError> {
    let result = async {
        raw_disks(place.id, &mut saved).await?;
        dock_saved(place, instance, saved, order).await
    }
    .await;
    let _ = std::fs::remove_dir_all(place.dir.join("docked"));
    result
}

async fn dock_saved(
    place: Place<'_>,
    instance: &Instance,
    saved: Saved,
    order: &DockOrder,
) -> Result<DockReport, DockInstanceError> {
    let cloudlet = place.cloudlet;
    let pool = Pool::open(&cloudlet.data).map_err(DockInstanceError::Pool)?;
    let req = DockRequest {
        name: order.name.clone(),
        image: saved.image,
        source: DockSource::Saved {
            snapshot: Box::new(saved.snapshot),
            service_port: instance.service_port,
            label: format!("instance:{}", place.id),
        },
        public: order.public,
        // Its NIC stays, on whatever PCI slot it has; an activation gives it new forwards.
        detach_nic: false,
        zstd_level: forage_substrate::format::DEFAULT_LEVEL,
        accel: cloudlet.accel,
        ready_timeout: READY,
    };
    forage_substrate::dock(&cloudlet.data, &pool, req).await.map_err(|e| DockInstanceError::Dock {
        id: place.id.into(),
        name: order.name.clone(),
        source: Box::new(e),
    })
}
