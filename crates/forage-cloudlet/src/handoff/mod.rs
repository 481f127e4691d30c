//! VM handoff: a running copy-on-write instance moves to another cloudlet (the VM
//! handoff paper). The source drives QEMU's own live migration into a local socket,
//! parses the stream page by page, and sends guest RAM and the disk chunks written since
//! launch through the adaptive pipeline of `forage-handoff` (dedup against the base,
//! delta, compression, in segments of about 1 MiB). QEMU's dirty tracking drives the
//! iterations and its `downtime-limit` (default 2 s) ends them; its bandwidth estimate
//! counts the unchanged pages we skip, so it tends to stop the VM early (see
//! `docs/handoff-protocol.md` for why forage does not hold it back). The rest of the
//! stream (ROM blocks, device state) is sent last; the destination rebuilds the VM from
//! its base (or from nothing) and resumes it only once everything has arrived and applied.
//!
//! The messages are the peer protocol's (`forage_proto::peer`, with its sequence
//! diagram); afterwards the source tells the device Moved {cloudlet, service}.
//!
//! Any failure before HandoffDone (link cut, destination gone, bad stream): the source
//! cancels the migration and its VM runs on (`cont` if QEMU had stopped it); the
//! destination's session folder, with every partial file, is removed.

mod destination;
mod source;

use std::net::SocketAddr;

use forage_api::HandoffReport;
use forage_proto::asynchronous::write;
use forage_proto::DeviceMessage;
use tokio::sync::oneshot;

use crate::error::SessionError;
use crate::instance::{control::MoveOrder, hold, no_usage, Ending, Instance, Place};
use crate::{Cloudlet, DeviceStream};

pub(crate) use destination::receive;
pub use source::HandoffFailure;

/// How to hand off.
#[derive(Debug, Clone)]
pub struct HandoffOptions {
    /// A static operating mode (e.g. `xor+zstd-1`); none: adaptive.
    pub mode: Option<String>,
    /// QEMU's `downtime-limit`: iterations stop once the rest would take this long.
    pub downtime_limit_ms: u64,
}

impl Default for HandoffOptions {
    fn default() -> Self {
        Self { mode: None, downtime_limit_ms: 2000 }
    }
}

/// Why a handoff did not happen.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("no running instance {0} on this cloudlet")]
    NoInstance(String),
    #[error("instance {0} cannot be handed off: only copy-on-write instances of service VMs move (cached VM, push, on-demand, app, handed-off), not synthesized or shared ones")]
    NotMovable(String),
    #[error("instance {0} is already being handed off")]
    Busy(String),
    #[error("operating mode {mode:?}: {detail}")]
    BadMode { mode: String, detail: String },
    #[error("handoff of {instance} to {to} failed (the instance keeps running here)")]
    Failed {
        instance: String,
        to: SocketAddr,
        #[source]
        cause: HandoffFailure,
    },
    #[error("instance {0} ended before its handoff")]
    Ended(String),
}

impl Cloudlet {
    /// Move instance `id` to the cloudlet at `to` (paired with this one as a cloudlet).
    /// Returns when the instance runs there, or has failed to move and runs on here.
    pub async fn handoff(&self, id: &str, to: SocketAddr, options: HandoffOptions) -> Result<HandoffReport, HandoffError> {
        if let Some(m) = &options.mode {
            forage_handoff::adapt::parse_mode(m).map_err(|detail| HandoffError::BadMode { mode: m.clone(), detail })?;
        }
        let control = self.instance_control(id).ok_or_else(|| HandoffError::NoInstance(id.into()))?;
        if !control.movable() {
            return Err(HandoffError::NotMovable(id.into()));
        }
        let (reply, answer) = oneshot::channel();
        if control.order(MoveOrder { to, options, reply }).is_err() {
            return Err(HandoffError::Busy(id.into()));
        }
        answer.await.map_err(|_| HandoffError::Ended(id.into()))?
    }
}

/// The life of a movable instance: as `hold` (with its device, if it has one), and
/// handoffs when ordered. A handoff that fails leaves the instance running and its life
/// goes on; one that succeeds tells the device where its service went and ends it.
pub(crate) async fn live(mut device: Option<&mut DeviceStream>, place: Place<'_>, instance: &Instance) -> Result<Ending, SessionError> {
    let control = &instance.control;
    loop {
        let ending = match device.as_deref_mut() {
            Some(stream) => hold(stream, control, instance.gone(), no_usage).await?,
            None => tokio::select! {
                _ = control.notified() => return Err(control.error()),
                _ = control.ordered() => Ending::Moving,
                _ = instance.gone() => return Err(crate::error::refused(forage_proto::ErrorCode::Internal, "the instance's VM stopped")),
            },
        };
        if ending != Ending::Moving {
            return Ok(ending);
        }
        let Some(order) = control.take_order() else { continue };
        tracing::info!(instance = place.id, to = %order.to, "handoff starts");
        match source::send(place, instance, &order).await {
            Ok((report, service)) => {
                tracing::info!(instance = place.id, to = %order.to, total_s = report.total_s, downtime_s = report.downtime_s, bytes = report.bytes, "handoff done");
                if let Some(stream) = device.as_deref_mut() {
                    let moved = DeviceMessage::Moved { cloudlet: order.to.to_string(), service };
                    let _ = write(stream, &moved).await;
                }
                let _ = order.reply.send(Ok(report));
                return Ok(Ending::Moved);
            }
            Err(cause) => {
                tracing::warn!(instance = place.id, to = %order.to, "handoff failed, the instance runs on here: {cause}");
                let _ = order.reply.send(Err(HandoffError::Failed { instance: place.id.into(), to: order.to, cause }));
            }
        }
    }
}
