//! A movable instance's life: held for its device, and moved when the API orders it.

use forage_proto::asynchronous::write;
use forage_proto::DeviceMessage;

use super::order::HandoffError;
use super::source;
use crate::error::SessionError;
use crate::instance::{hold, no_usage, Ending, Instance, Place};
use crate::DeviceStream;

/// The life of a movable instance: as `hold` (with its device, if it has one), and
/// handoffs when ordered. A handoff that fails leaves the instance running and its life
/// goes on; one that succeeds tells the device where its service went and ends it.
pub(crate) async fn live(
    mut device: Option<&mut DeviceStream>,
    place: Place<'_>,
    instance: &Instance,
) -> Result<Ending, SessionError> {
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
        let Some(moved) = carry_out(place, instance).await else { continue };
        if let Some(stream) = device.as_deref_mut() {
            let _ = write(stream, &moved).await;
        }
        return Ok(Ending::Moved);
    }
}

/// Carry out the move order the instance was given, if any: the message that tells its
/// device where it went when it moved; none when it did not (it runs on here, and the
/// order's caller has heard why).
pub(crate) async fn carry_out(place: Place<'_>, instance: &Instance) -> Option<DeviceMessage> {
    let order = instance.control.take_order()?;
    tracing::info!(instance = place.id, to = %order.to, "handoff starts");
    match source::send(place, instance, &order).await {
        Ok((report, service)) => {
            tracing::info!(instance = place.id, to = %order.to, total_s = report.total_s, downtime_s = report.downtime_s, bytes = report.bytes, "handoff done");
            let _ = order.reply.send(Ok(report));
            Some(DeviceMessage::Moved { cloudlet: order.to.to_string(), service })
        }
        Err(cause) => {
            tracing::warn!(instance = place.id, to = %order.to, "handoff failed, the instance runs on here: {cause}");
            let _ = order.reply.send(Err(HandoffError::Failed { instance: place.id.into(), to: order.to, cause }));
            None
        }
    }
}
