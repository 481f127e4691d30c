//! The holder's side of a package transfer: a peer cloudlet's PackageWanted answered with
//! the package, exported (and signed with this host's key) into the peer's session folder
//! (removed when the session ends, and by the sweep of dead sessions at start), sent in
//! pieces, each of which the peer must take within a minute.

use std::path::{Path, PathBuf};
use std::time::Instant;

use forage_datadir::DataDir;
use forage_proto::asynchronous::write;
use forage_proto::{ErrorCode, PackageKind, PeerMessage, PACKAGE_PIECE};
use forage_synth::{BaseVm, SynthError};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWrite};

use super::names::is_digest;
use crate::error::{refused, ServeError, SessionError};
use crate::peer_link::PEER_WAIT;

/// What is sent (one value per transfer, so its size does not matter).
#[allow(clippy::large_enum_variant)]
enum Held {
    Base(BaseVm),
    Service(forage_service::ServiceVm),
}

fn find(data: &DataDir, what: PackageKind, name: &str) -> Result<Held, SessionError> {
    let bad = || refused(ErrorCode::Protocol, format!("{name:?} is not a {} name", what.as_str()));
    let missing = || refused(ErrorCode::NotFound, format!("no {} {name} here", what.as_str()));
    match what {
        PackageKind::Base => {
            let by_digest = || {
                BaseVm::list(data)
                    .into_iter()
                    .find_map(|(_, b)| b.ok().filter(|b| b.digest().eq_ignore_ascii_case(name)))
            };
            if let Some(b) = is_digest(name).then(by_digest).flatten() {
                return Ok(Held::Base(b));
            }
            BaseVm::open(data, name).map(Held::Base).map_err(|e| match e {
                SynthError::NoBase { .. } => missing(),
                SynthError::DataDir(_) => bad(),
                e => ServeError::OpenBase { name: name.to_string(), source: Box::new(e) }.into(),
            })
        }
        PackageKind::Service if !forage_service::plain(name) => Err(bad()),
        PackageKind::Service => {
            forage_service::Repository::new(data).open(name).map(Held::Service).map_err(|e| match e {
                forage_service::ServiceError::NotFound { .. } => missing(),
                e => ServeError::OpenService { name: name.to_string(), source: e }.into(),
            })
        }
    }
}

/// Serve a peer cloudlet's PackageWanted (a base's name or digest, or a service's id):
/// export it (signed by this host), send it, remove the export. Returns the bytes sent.
pub(crate) async fn serve(
    stream: &mut (impl AsyncWrite + Unpin),
    data: &DataDir,
    session_dir: &Path,
    peer: &str,
    what: PackageKind,
    name: &str,
) -> Result<u64, SessionError> {
    let held = find(data, what, name)?;
    std::fs::create_dir_all(session_dir)
        .map_err(|source| ServeError::Io { path: session_dir.to_path_buf(), source })?;
    let file = session_dir.join("package.pkg");
    let sig = PathBuf::from(format!("{}.sig", file.display()));
    let sent = async {
        let (data2, f2) = (data.clone(), file.clone());
        let exported = tokio::task::spawn_blocking(move || match held {
            Held::Base(b) => {
                let n = forage_synth::package::export(&b, &f2)?;
                forage_synth::build::sign_package(&data2, forage_trust::signing::BASE_PACKAGE, &f2)?;
                Ok((n, b.manifest().name.clone()))
            }
            Held::Service(s) => {
                let n = forage_service::package::export(&s, &f2)?;
                forage_synth::build::sign_package(&data2, forage_trust::signing::SERVICE_PACKAGE, &f2)?;
                Ok((n, s.id().to_string()))
            }
        });
        let (what_s, name_s) = (what.as_str(), name.to_string());
        let (bytes, here) = exported
            .await
            .map_err(|source| ServeError::ExportTask { what: what_s, name: name_s.clone(), source })?
            .map_err(|source: forage_service::ServiceError| ServeError::Export {
                what: what_s,
                name: name_s,
                source,
            })?;
        let t = Instant::now();
        send(stream, &PeerMessage::PackageOffer { name: here, package_bytes: bytes }).await?;
        let failed = |source| ServeError::Io { path: file.clone(), source };
        let mut f = tokio::fs::File::open(&file).await.map_err(failed)?;
        let mut hash = Sha256::new();
        let mut piece = vec![0u8; PACKAGE_PIECE];
        loop {
            let n = f.read(&mut piece).await.map_err(failed)?;
            if n == 0 {
                break;
            }
            hash.update(&piece[..n]);
            send(stream, &PeerMessage::PackagePiece { bytes: piece[..n].to_vec() }).await?;
        }
        let signature = std::fs::read(&sig).unwrap_or_default();
        send(stream, &PeerMessage::PackageEnd { sha256: hex::encode(hash.finalize()), signature }).await?;
        let what = what.as_str();
        tracing::info!(what, name, peer, bytes, seconds = t.elapsed().as_secs_f64(), "package sent to a peer cloudlet");
        Ok::<_, SessionError>(bytes)
    }
    .await;
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(&sig);
    sent
}

/// Write `m` to a peer that must take it within [`PEER_WAIT`].
async fn send(stream: &mut (impl AsyncWrite + Unpin), m: &PeerMessage) -> Result<(), SessionError> {
    match tokio::time::timeout(PEER_WAIT, write(stream, m)).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(ServeError::PeerStalled(PEER_WAIT).into()),
    }
}
