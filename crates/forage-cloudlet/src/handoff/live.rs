//! A movable instance's life: held for its device, and moved when the API orders it.

use forage_proto::asynchronous::write;
use forage_proto::DeviceMessage;

use super::order::HandoffError;
use super::source;
use forage_proto::ErrorCode;

use crate::error::{refused, SessionError};
use crate::instance::dock::{self, Docked};
use crate::instance::{checkpoints, hold, Ending, Instance, Place};
use crate::DeviceStream;

/// The life of a movable instance: as `hold` (with its device, if it has one), and
/// handoffs and docks when ordered. A handoff that fails leaves the instance running and
/// its life goes on; one that succeeds tells the device where its service went and ends
/// it. A dock ends it once its VM is saved (`instance::dock`).
pub(crate) async fn live(
    device: Option<&mut DeviceStream>,
    place: Place<'_>,
    instance: &Instance,
) -> Result<Ending, SessionError> {
    instance.control.set_dockable(true);
    let lived = live_docking(device, place, instance).await;
    instance.control.set_dockable(false);
    lived
}

async fn live_docking(
    mut device: Option<&mut DeviceStream>,
    place: Place<'_>,
    instance: &Instance,
) -> Result<Ending, SessionError> {
    let control = &instance.control;
    loop {
        let ending = match device.as_deref_mut() {
            Some(stream) => hold(stream, control, instance.gone(), checkpoints(place), true).await?,
            None => tokio::select! {
                _ = control.notified() => return Err(control.error()),
                _ = control.ordered() => Ending::Moving,
                _ = control.dock_ordered() => Ending::Docking,
                _ = instance.gone() => return Err(crate::error::refused(forage_proto::ErrorCode::Internal, "the instance's VM stopped")),
            },
        };
        match ending {
            Ending::Moving => {}
            Ending::Docking => match dock::carry_out(place, instance).await {
                Docked::Stayed => continue,
                Docked::Ended(e) => return Err(e),
            },
            other => return Ok(other),
        }
        match carry_out(place, instance).await {
            Carried::Moved(moved) => {
                if let Some(stream) = device.as_deref_mut() {
                    let _ = write(stream, &moved).await;
                }
                return Ok(Ending::Moved);
            }
            Carried::Stayed => {
                if let (Some(stream), Some(message)) = (device.as_deref_mut(), control.not_followed()) {
                    write(stream, &DeviceMessage::NotFollowed { message }).await?;
                }
            }
            Carried::Stopped(e) => return Err(e),
        }
    }
}

/// What became of a move order.
pub(crate) enum Carried {
    /// The instance runs at the destination: this tells its device where.
    Moved(DeviceMessage),
    /// It runs on here (no order, or the handoff failed; the order's caller heard why).
    Stayed,
    /// Its VM was stopped here without knowing whether the destination runs it (the link
    /// failed after the commit and the destination never answered): the instance ends.
    Stopped(SessionError),
}

/// Carry out the move order the instance was given, if any.
pub(crate) async fn carry_out(place: Place<'_>, instance: &Instance) -> Carried {
    let Some(mut order) = instance.control.take_order() else { return Carried::Stayed };
    tracing::info!(instance = place.id, to = %order.to, reason = %order.options.reason, "handoff starts");
    // The operator's view: the handoff and its trace as it runs (the web UI's chart).
    let board = &place.cloudlet.handoffs;
    let hid = board.start(place.id, order.to, order.options.mode.clone());
    order.sink = Some(board.sink(&hid));
    let sent = source::send(place, instance, &order).await;
    board.end(&hid, sent.as_ref().map(|(report, _)| report).map_err(|e| forage_api::one_line(e)));
    match sent {
        Ok((report, service)) => {
            tracing::info!(instance = place.id, to = %order.to, total_s = report.total_s, downtime_s = report.downtime_s, bytes = report.bytes, "handoff done");
            let _ = order.reply.send(Ok(report));
            Carried::Moved(DeviceMessage::Moved { cloudlet: order.to.to_string(), service })
        }
        Err(cause) if cause.vm_runs_here() => {
            tracing::warn!(instance = place.id, to = %order.to, "handoff failed, the instance runs on here: {cause}");
            let _ = order.reply.send(Err(HandoffError::Failed { instance: place.id.into(), to: order.to, cause }));
            Carried::Stayed
        }
        Err(cause) => {
            tracing::error!(instance = place.id, to = %order.to, "handoff unresolved, the instance is stopped here: {cause}");
            let stopped = refused(ErrorCode::Handoff, cause.to_string());
            let _ = order.reply.send(Err(HandoffError::Unresolved { instance: place.id.into(), to: order.to, cause }));
            Carried::Stopped(stopped)
        }
    }
}
