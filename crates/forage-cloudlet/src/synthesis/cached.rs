//! A session whose launch VM the cloudlet has cached: resume a copy-on-write view of it,
//! nothing sent. The instance can move (its lineage: the base and the overlay's chunks).

use forage_proto::asynchronous::write;
use forage_proto::{DeviceMessage, ErrorCode};

use super::context::Ctx;
use super::residue::send_residue;
use crate::cache::CachedLaunch;
use crate::error::{refused, SessionError};
use crate::handoff::live;
use crate::instance::{prepare, Ending, Lineage, Outcome, Ports, Source};

pub(crate) async fn run(
    stream: &mut crate::DeviceStream,
    ctx: &Ctx<'_>,
    cached: CachedLaunch,
) -> Result<Outcome, SessionError> {
    let ports = Ports { service: cached.service().map(|s| s.port), ..Default::default() };
    let lineage = match &cached.manifest {
        Some(m) => Lineage::overlay(&ctx.base, m),
        None => Lineage::of(&cached.snapshot),
    };
    let source = Source::View { of: &cached.snapshot, lineage };
    let prepared = prepare(ctx.place(), source, &cached.snapshot.manifest().spec, ports).await?;
    let instance = prepared.resume(None, true).await?;
    instance.control.set_movable(true);
    let served = async {
        write(stream, &instance.ready()).await?;
        write(stream, &DeviceMessage::Complete { segments: 0, bytes: 0, apply_ms: 0, decompress_ms: 0 }).await?;
        live(Some(stream), ctx.place(), &instance).await
    }
    .await;
    match served {
        Ok(Ending::Residue) => {
            let parent = cached
                .manifest
                .as_ref()
                .ok_or_else(|| refused(ErrorCode::Internal, "this cache entry predates residues"))?;
            send_residue(stream, ctx, instance, parent, &cached.digest).await?;
        }
        other => {
            instance.finish(ctx.cloudlet).await;
            other?;
        }
    }
    Ok(Outcome { bytes: 0 })
}
