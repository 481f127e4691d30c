//! Base VMs from cloudlet to cloudlet: a cloudlet that lacks a base another one holds
//! asks for it over the peer protocol (BaseWanted, `forage_proto::peer`), receives the
//! package `forage base export` writes, checks it whole (size as offered, SHA-256, the
//! holder's signature where this cloudlet keeps a signers list) and imports it, which
//! checks every file against the base's digest. Nothing is left behind a failure: the
//! package is received under a dot-name in `DATA/bases/` and removed in every case.
//!
//! A peer's claim is capped by what this host allows: a package may be at most
//! [`MAX_BASE_PACKAGE`] and must fit twice (package and imported base) in the free space
//! of the data folder, with [`SPARE`] to spare.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use forage_datadir::DataDir;
use forage_proto::asynchronous::write;
use forage_proto::{ErrorCode, PeerMessage, BASE_PIECE};
use forage_synth::{BaseVm, SynthError};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{internal, refused, SessionError};
use crate::peer_link::{self, PeerLinkError};

/// The largest base package this host takes from a peer.
pub const MAX_BASE_PACKAGE: u64 = 64 << 30;
/// Free space left over after a base arrives.
pub const SPARE: u64 = 1 << 30;
/// The largest signature file taken from a peer.
const MAX_SIGNATURE: usize = 64 << 10;

/// What a fetch brought (`forage base fetch --json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BaseFetchReport {
    pub base: String,
    pub from: SocketAddr,
    pub package_bytes: u64,
    pub digest: String,
    pub seconds: f64,
}

/// Why a base did not arrive (nothing of it is left here).
#[derive(Debug, thiserror::Error)]
pub enum BaseFetchError {
    #[error("{0:?} is not a base name (letters, digits, '-', '_', '.')")]
    BadName(String),
    #[error("base {0} is here already")]
    Exists(String),
    #[error(transparent)]
    Link(PeerLinkError),
    #[error("cloudlet {from} offered base {got} where {wanted} was asked")]
    WrongBase { from: SocketAddr, wanted: String, got: String },
    #[error(
        "cloudlet {from} offers a package of {claimed} bytes for base {base}: this host takes at most {limit} ({why})"
    )]
    TooLarge { from: SocketAddr, base: String, claimed: u64, limit: u64, why: &'static str },
    #[error("cloudlet {from} sent more of base {base}'s package than the {claimed} bytes it offered")]
    Overrun { from: SocketAddr, base: String, claimed: u64 },
    #[error("base {base}'s package from cloudlet {from} ended after {got} of {claimed} bytes")]
    Short { from: SocketAddr, base: String, got: u64, claimed: u64 },
    #[error("base {base}'s package from cloudlet {from} does not match the SHA-256 sent with it")]
    Checksum { from: SocketAddr, base: String },
    #[error("base {base}'s package from cloudlet {from} has a signature of {bytes} bytes")]
    BadSignature { from: SocketAddr, base: String, bytes: usize },
    #[error("importing base {base} from cloudlet {from}")]
    Import {
        base: String,
        from: SocketAddr,
        #[source]
        source: Box<SynthError>,
    },
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl BaseFetchError {
    /// The peer refused because it holds no such base.
    pub fn not_found(&self) -> bool {
        matches!(self, Self::Link(PeerLinkError::Refused { code: ErrorCode::NotFound, .. }))
    }
}

/// Whether `base` names a base by its digest (64 hex digits: the cluster knows bases so).
pub fn is_digest(base: &str) -> bool {
    base.len() == 64 && base.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Fetch base `base` (a name, or a digest: it arrives under the holder's name for it)
/// from the paired cloudlet at `from` (this cloudlet is `me`) and import it.
pub async fn fetch_base(
    data: &DataDir,
    me: &str,
    from: SocketAddr,
    base: &str,
) -> Result<BaseFetchReport, BaseFetchError> {
    let held = |digest: &str| BaseVm::list(data).into_iter().any(|(_, b)| b.is_ok_and(|b| b.digest() == digest));
    if is_digest(base) {
        if held(base) {
            return Err(BaseFetchError::Exists(base.to_string()));
        }
    } else if data.base(base).map_err(|_| BaseFetchError::BadName(base.to_string()))?.exists() {
        return Err(BaseFetchError::Exists(base.to_string()));
    }
    let t = Instant::now();
    let mut stream = peer_link::connect(data, me, from).await.map_err(BaseFetchError::Link)?;
    write(&mut stream, &PeerMessage::BaseWanted { base: base.to_string() })
        .await
        .map_err(|source| BaseFetchError::Link(PeerLinkError::Wire { to: from, source }))?;
    let short = &base[..base.len().min(16)];
    let file = data.bases().join(format!(".fetch-{short}-{}.pkg", std::process::id()));
    let sig = PathBuf::from(format!("{}.sig", file.display()));
    let got = async {
        let (claimed, name) = receive(&mut stream, from, base, &file, room(data)?).await?;
        if data.base(&name).map_err(|_| BaseFetchError::BadName(name.clone()))?.exists() {
            return Err(BaseFetchError::Exists(name));
        }
        let data2 = data.clone();
        let (f2, n2) = (file.clone(), name.clone());
        let imported = tokio::task::spawn_blocking(move || {
            forage_synth::build::check_package(&data2, forage_trust::signing::BASE_PACKAGE, &f2)?;
            forage_synth::package::import(&data2, &f2, Some(&n2))
        })
        .await
        .map_err(|e| BaseFetchError::Io { path: file.clone(), source: std::io::Error::other(e) })?
        .map_err(|e| BaseFetchError::Import { base: name.clone(), from, source: Box::new(e) })?;
        if is_digest(base) && !imported.digest().eq_ignore_ascii_case(base) {
            // A good base, but not the one asked for: it does not stay.
            let _ = BaseVm::remove(data, &name);
            return Err(BaseFetchError::WrongBase { from, wanted: base.into(), got: imported.digest().into() });
        }
        Ok(BaseFetchReport {
            base: name,
            from,
            package_bytes: claimed,
            digest: imported.digest().to_string(),
            seconds: t.elapsed().as_secs_f64(),
        })
    }
    .await;
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(&sig);
    got
}

/// How large a package this host takes now, and why not larger.
fn room(data: &DataDir) -> Result<(u64, &'static str), BaseFetchError> {
    let bases = data.bases();
    std::fs::create_dir_all(&bases).map_err(|source| BaseFetchError::Io { path: bases.clone(), source })?;
    let free = rustix::fs::statvfs(&bases)
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
        .map_err(|e| BaseFetchError::Io { path: bases, source: e.into() })?;
    let fits = free.saturating_sub(SPARE) / 2;
    Ok(if fits < MAX_BASE_PACKAGE {
        (fits, "the free disk space, twice, with 1 GiB to spare")
    } else {
        (MAX_BASE_PACKAGE, "the most forage takes")
    })
}

/// Receive BaseOffer, the pieces and BaseEnd into `file` (and its signature into
/// `FILE.sig`). Returns the package's size and the base's name (the one asked for, or
/// the holder's name for the digest asked for). `limit`: the largest package taken.
async fn receive(
    stream: &mut (impl AsyncRead + Unpin),
    from: SocketAddr,
    base: &str,
    file: &Path,
    (limit, why): (u64, &'static str),
) -> Result<(u64, String), BaseFetchError> {
    let link = BaseFetchError::Link;
    let (claimed, name) = match peer_link::next(stream, from).await.map_err(link)? {
        PeerMessage::BaseOffer { base: got, package_bytes } if got == base || (is_digest(base) && plain(&got)) => {
            (package_bytes, got)
        }
        PeerMessage::BaseOffer { base: got, .. } => {
            return Err(BaseFetchError::WrongBase { from, wanted: base.into(), got })
        }
        other => return Err(link(PeerLinkError::Unexpected { to: from, expected: "BaseOffer", got: other.name() })),
    };
    if claimed > limit {
        return Err(BaseFetchError::TooLarge { from, base: base.into(), claimed, limit, why });
    }
    let io = |source| BaseFetchError::Io { path: file.to_path_buf(), source };
    let mut out = tokio::io::BufWriter::new(tokio::fs::File::create(file).await.map_err(io)?);
    let mut hash = Sha256::new();
    let mut got = 0u64;
    loop {
        match peer_link::next(stream, from).await.map_err(link)? {
            PeerMessage::BasePiece { bytes } => {
                got += bytes.len() as u64;
                if got > claimed {
                    return Err(BaseFetchError::Overrun { from, base: base.into(), claimed });
                }
                hash.update(&bytes);
                out.write_all(&bytes).await.map_err(io)?;
            }
            PeerMessage::BaseEnd { sha256, signature } => {
                if got != claimed {
                    return Err(BaseFetchError::Short { from, base: base.into(), got, claimed });
                }
                if !sha256.eq_ignore_ascii_case(&hex::encode(hash.finalize())) {
                    return Err(BaseFetchError::Checksum { from, base: base.into() });
                }
                if signature.len() > MAX_SIGNATURE {
                    return Err(BaseFetchError::BadSignature { from, base: base.into(), bytes: signature.len() });
                }
                out.flush().await.map_err(io)?;
                out.into_inner().sync_all().await.map_err(io)?;
                if !signature.is_empty() {
                    let sig = PathBuf::from(format!("{}.sig", file.display()));
                    std::fs::write(&sig, &signature).map_err(|source| BaseFetchError::Io { path: sig, source })?;
                }
                return Ok((claimed, name));
            }
            other => {
                return Err(link(PeerLinkError::Unexpected {
                    to: from,
                    expected: "BasePiece or BaseEnd",
                    got: other.name(),
                }))
            }
        }
    }
}

fn plain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Serve a peer cloudlet's BaseWanted (a base's name or digest): export the base (signed by this host), send it,
/// remove the export.
pub(crate) async fn serve_base(
    stream: &mut (impl AsyncWrite + Unpin),
    data: &DataDir,
    session: &str,
    peer: &str,
    base: &str,
) -> Result<u64, SessionError> {
    let by_digest =
        || BaseVm::list(data).into_iter().find_map(|(_, b)| b.ok().filter(|b| b.digest().eq_ignore_ascii_case(base)));
    let b = match is_digest(base).then(by_digest).flatten() {
        Some(b) => Ok(b),
        None => BaseVm::open(data, base),
    };
    let b = b.map_err(|e| match e {
        SynthError::NoBase { .. } => refused(ErrorCode::NotFound, format!("no base VM named {base} here")),
        SynthError::DataDir(_) => refused(ErrorCode::Protocol, format!("{base:?} is not a base name")),
        e => internal(e),
    })?;
    let work = data.work();
    std::fs::create_dir_all(&work).map_err(|e| internal(format!("{}: {e}", work.display())))?;
    let file = work.join(format!("base-export-{session}.pkg"));
    let sig = PathBuf::from(format!("{}.sig", file.display()));
    let b_name = b.manifest().name.clone();
    let sent = async {
        let (data2, f2) = (data.clone(), file.clone());
        let bytes = tokio::task::spawn_blocking(move || {
            let n = forage_synth::package::export(&b, &f2)?;
            forage_synth::build::sign_package(&data2, forage_trust::signing::BASE_PACKAGE, &f2)?;
            Ok::<_, SynthError>(n)
        })
        .await
        .map_err(internal)?
        .map_err(|e| internal(format!("exporting base {base}: {}", forage_proto::one_line(&e))))?;
        let t = Instant::now();
        let name = b_name.clone();
        write(stream, &PeerMessage::BaseOffer { base: name, package_bytes: bytes }).await?;
        let mut f = tokio::fs::File::open(&file).await.map_err(|e| internal(format!("{}: {e}", file.display())))?;
        let mut hash = Sha256::new();
        let mut piece = vec![0u8; BASE_PIECE];
        loop {
            let n = f.read(&mut piece).await.map_err(|e| internal(format!("{}: {e}", file.display())))?;
            if n == 0 {
                break;
            }
            hash.update(&piece[..n]);
            write(stream, &PeerMessage::BasePiece { bytes: piece[..n].to_vec() }).await?;
        }
        let signature = std::fs::read(&sig).unwrap_or_default();
        write(stream, &PeerMessage::BaseEnd { sha256: hex::encode(hash.finalize()), signature }).await?;
        tracing::info!(base, peer, bytes, seconds = t.elapsed().as_secs_f64(), "base sent to a peer cloudlet");
        Ok::<_, SessionError>(bytes)
    }
    .await;
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(&sig);
    sent
}

#[cfg(test)]
mod tests {
    use super::*;

    const FROM: &str = "127.0.0.1:4000";

    /// Receive what a (hostile) holder sends as `msgs` into a fresh folder; returns the
    /// result and what is left in the folder.
    async fn from_holder(msgs: Vec<PeerMessage>, limit: u64) -> (Result<(u64, String), BaseFetchError>, Vec<PathBuf>) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(".fetch-b.pkg");
        let (mut ours, mut theirs) = tokio::io::duplex(4 << 20);
        tokio::spawn(async move {
            for m in msgs {
                if write(&mut theirs, &m).await.is_err() {
                    return;
                }
            }
        });
        let got = receive(&mut ours, FROM.parse().unwrap(), "b", &file, (limit, "the test's limit")).await;
        if got.is_err() {
            let _ = std::fs::remove_file(&file);
        }
        let left = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.path()).collect();
        (got, left)
    }

    fn offer(bytes: u64) -> PeerMessage {
        PeerMessage::BaseOffer { base: "b".into(), package_bytes: bytes }
    }

    fn end(data: &[u8]) -> PeerMessage {
        PeerMessage::BaseEnd { sha256: hex::encode(Sha256::digest(data)), signature: vec![] }
    }

    #[tokio::test]
    async fn a_good_package_is_received_whole() {
        let piece = PeerMessage::BasePiece { bytes: b"package".to_vec() };
        let (got, left) = from_holder(vec![offer(7), piece, end(b"package")], 100).await;
        assert_eq!(got.unwrap(), (7, "b".to_string()));
        assert_eq!(left.len(), 1);
    }

    #[tokio::test]
    async fn hostile_holders_are_refused() {
        let piece = |b: &[u8]| PeerMessage::BasePiece { bytes: b.to_vec() };
        let cases: Vec<(Vec<PeerMessage>, &str)> = vec![
            (vec![offer(1 << 40)], "TooLarge"),
            (vec![PeerMessage::BaseOffer { base: "other".into(), package_bytes: 1 }], "WrongBase"),
            (vec![offer(3), piece(b"abcd")], "Overrun"),
            (vec![offer(4), piece(b"abc"), end(b"abc")], "Short"),
            (vec![offer(3), piece(b"abc"), end(b"abd")], "Checksum"),
            (
                vec![
                    offer(3),
                    piece(b"abc"),
                    PeerMessage::BaseEnd { sha256: hex::encode(Sha256::digest(b"abc")), signature: vec![0; 1 << 20] },
                ],
                "BadSignature",
            ),
            (vec![offer(3), piece(b"ab")], "Wire"),
            (vec![PeerMessage::BaseWanted { base: "b".into() }], "Unexpected"),
        ];
        for (msgs, want) in cases {
            let (got, left) = from_holder(msgs, 1 << 20).await;
            let e = got.expect_err(want);
            assert!(format!("{e:?}").contains(want), "{want}: {e:?}");
            assert!(left.is_empty(), "{want}: {left:?} left behind");
        }
    }
}
