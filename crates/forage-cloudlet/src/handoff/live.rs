//! A movable instance's life: held for its device, and moved when the API orders it.

use forage_proto::asynchronous::write;
use forage_proto::DeviceMessage;

use super::order::HandoffError;
use super::source;
use crate::error::SessionError;
use crate::instance::{checkpoints, hold, Ending, Instance, Place};
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
            Some(stream) => hold(stream, control, instance.gone(), checkpoints(place)).await?,
            None => tokio::select! {
                _ = control.notified() => return Err(control.error()),
                _ = control.ordered() => Ending::Moving,
                _ = instance.gone() => return Err(crate::error::refused(forage_proto::ErrorCode::Internal, "the instance's VM stopped")),
            },
        };
        if ending != Ending::Moving {
            return Ok(ending);
        }
        let Some(mut order) = control.take_order() else { continue };
        tracing::info!(instance = place.id, to = %order.to, "handoff starts");
        let board = &place.cloudlet.handoffs;
        let hid = board.start(place.id, order.to, order.options.mode.clone());
        order.sink = Some(board.sink(&hid));
        let sent = source::send(place, instance, &order).await;
        board.end(&hid, sent.as_ref().map(|(report, _)| report).map_err(|e| e.to_string()));
        match sent {
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
