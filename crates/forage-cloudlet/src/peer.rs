//! A peer cloudlet's connection (the peer protocol, `forage_proto::peer`): PeerHello and
//! PeerWelcome, then a handoff the peer offers, or a base or service VM it asks for. Only a certificate this cloudlet issued
//! `--as-cloudlet` may speak it.

use std::time::Instant;

use forage_proto::asynchronous::write;
use forage_proto::{negotiate, ErrorCode, PeerMessage, ProtoError, VERSION_MAX, VERSION_MIN};

use crate::error::{internal, next, refused, SessionError};
use crate::handoff::Fate;
use crate::instance::Place;
use crate::Cloudlet;

/// Serve one peer cloudlet (`name` and `serial` from its certificate); its first frame
/// (already read) is `first`.
pub async fn peer(
    mut stream: crate::DeviceStream,
    cloudlet: &Cloudlet,
    name: &str,
    serial: u64,
    first: PeerMessage,
) -> Result<(), SessionError> {
    let id = cloudlet.new_session_id();
    let dir = cloudlet.data.work().join(format!("session-{id}"));
    let result = run(&mut stream, cloudlet, &id, &dir, name, serial, first).await;
    // A peer that is gone (or a stream this side closed) hears nothing more.
    if let Some(e) = result.as_ref().err().filter(|e| !matches!(e, SessionError::Proto(ProtoError::Closed))) {
        let (code, message) = e.code_and_message();
        let _ = write(&mut stream, &PeerMessage::Error { code, message }).await;
    }
    cloudlet.end_session(&id, &dir, &result);
    result.map(|_| ())
}

async fn run(
    stream: &mut crate::DeviceStream,
    cloudlet: &Cloudlet,
    id: &str,
    dir: &std::path::Path,
    name: &str,
    serial: u64,
    first: PeerMessage,
) -> Result<crate::instance::Outcome, SessionError> {
    let PeerMessage::PeerHello { versions, cloudlet: theirs } = first else {
        return Err(SessionError::Sequence { expected: "PeerHello", got: first.name() });
    };
    let is_cloudlet = cloudlet
        .trust
        .issued()
        .iter()
        .any(|i| i.serial == serial && i.kind == forage_trust::PeerKind::Cloudlet && i.revoked_unix.is_none());
    if !is_cloudlet {
        return Err(refused(
            ErrorCode::Unpaired,
            format!("{name} is paired as a device: only cloudlets paired with `--as-cloudlet` may hand off VMs"),
        ));
    }
    let version = negotiate(versions).ok_or_else(|| {
        refused(ErrorCode::Version, format!("peer speaks {versions:?}, cloudlet {VERSION_MIN}..={VERSION_MAX}"))
    })?;
    write(stream, &PeerMessage::PeerWelcome { version, cloudlet: cloudlet.name.clone() }).await?;
    let begin = match next::<PeerMessage>(stream, cloudlet.peer_wait).await {
        Ok(PeerMessage::HandoffBegin(b)) => b,
        Ok(PeerMessage::HandoffQuery { instance }) => {
            answer_query(stream, cloudlet, name, &instance).await?;
            return Ok(crate::instance::Outcome { bytes: 0 });
        }
        Ok(PeerMessage::PackageWanted { what, name: wanted }) => {
            let bytes = crate::package_transfer::serve(stream, &cloudlet.data, dir, name, what, &wanted).await?;
            return Ok(crate::instance::Outcome { bytes });
        }
        Ok(other) => {
            return Err(SessionError::Sequence {
                expected: "HandoffBegin, HandoffQuery or PackageWanted",
                got: other.name(),
            })
        }
        Err(SessionError::Proto(ProtoError::Closed)) => return Ok(crate::instance::Outcome { bytes: 0 }),
        Err(e) => return Err(e),
    };
    std::fs::create_dir_all(dir).map_err(|e| internal(format!("{}: {e}", dir.display())))?;
    let place = Place { cloudlet, id, dir, started: Instant::now() };
    crate::handoff::receive(stream, place, name, &format!("{name} ({theirs})"), begin).await
}

/// Tell a source that did not hear the outcome of its commit what became of its instance.
async fn answer_query(
    stream: &mut crate::DeviceStream,
    cloudlet: &Cloudlet,
    from: &str,
    instance: &str,
) -> Result<(), SessionError> {
    forage_trust::check_peer_name(instance).map_err(|e| refused(ErrorCode::Protocol, format!("instance id: {e}")))?;
    let answer = match crate::handoff::fate(cloudlet, from, instance) {
        Fate::Running(service) => PeerMessage::HandoffDone { service, resumed_after_ms: 0 },
        Fate::Resuming => PeerMessage::Error {
            code: ErrorCode::Busy,
            message: format!("instance {instance} of {from} is being resumed here: ask again"),
        },
        Fate::Unknown => PeerMessage::Error {
            code: ErrorCode::NotFound,
            message: format!("no instance {instance} of {from} runs here"),
        },
    };
    tracing::info!(from, instance, answer = answer.name(), "handoff query");
    write(stream, &answer).await?;
    Ok(())
}
