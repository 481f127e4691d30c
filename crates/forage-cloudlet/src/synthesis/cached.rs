//! A session whose launch VM the cloudlet has cached: resume a copy of it, nothing sent.

use forage_proto::asynchronous::write;
use forage_proto::{DeviceMessage, ErrorCode};

use super::context::Ctx;
use super::residue::{send_residue, LaunchRef};
use crate::cache::CachedLaunch;
use crate::error::{refused, SessionError};
use crate::instance::{checkpoints, hold, prepare, Ending, Outcome, Ports, Source};

pub(crate) async fn run(
    stream: &mut crate::DeviceStream,
    ctx: &Ctx<'_>,
    cached: CachedLaunch,
) -> Result<Outcome, SessionError> {
    let ports = Ports { service: cached.service().map(|s| s.port), ..Default::default() };
    let prepared = prepare(ctx.place(), Source::Copies, &cached.snapshot.manifest().spec, ports).await?;
    let instance = prepared.resume(&cached.snapshot, true, true).await?;
    let served = async {
        write(stream, &instance.ready()).await?;
        write(stream, &DeviceMessage::Complete { segments: 0, bytes: 0, apply_ms: 0, decompress_ms: 0 }).await?;
        hold(stream, &instance.control, instance.gone(), checkpoints(ctx.place())).await
    }
    .await;
    match served {
        Ok(Ending::Residue) => {
            let parent = cached
                .manifest
                .as_ref()
                .ok_or_else(|| refused(ErrorCode::Internal, "this cache entry predates residues"))?;
            send_residue(stream, ctx, instance, parent, &cached.digest, LaunchRef::Files(&cached.snapshot)).await?;
        }
        other => {
            instance.finish(ctx.cloudlet).await;
            other?;
        }
    }
    Ok(Outcome { bytes: 0 })
}
