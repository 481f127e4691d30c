//! Base VMs and service VMs from cloudlet to cloudlet: a cloudlet that lacks one another
//! cloudlet holds asks for it over the peer protocol (PackageWanted, `forage_proto::peer`),
//! receives the package `forage base|service export` writes, checks it whole (size as
//! offered, SHA-256, the holder's signature where this cloudlet keeps a signers list) and
//! imports it, which checks every file (a base against its digest, a service's files
//! against its package's list). Nothing is left behind a failure: the package is received
//! under a dot-name in `DATA/bases/` or `DATA/services/` and removed in every case.
//!
//! A peer's claim is capped by what this host allows: a package may be at most
//! [`MAX_PACKAGE`] and must fit five times (the package, and what it unpacks to, taken as
//! up to four times larger) in the free space of the data folder, with [`SPARE`] to
//! spare; it must arrive at [`MIN_RATE`] at least. The holder's side is [`serve`].

mod names;
mod serve;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use forage_datadir::DataDir;
use forage_proto::asynchronous::write;
use forage_proto::{ErrorCode, PackageKind, PeerMessage};
use forage_synth::BaseVm;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWriteExt};

use crate::peer_link::{self, PeerLinkError};

pub use names::is_digest;
use names::plain;
pub(crate) use serve::serve;

/// The largest package this host takes from a peer.
pub const MAX_PACKAGE: u64 = 64 << 30;
/// Free space left over after a package arrives.
pub const SPARE: u64 = 1 << 30;
/// The slowest a package may arrive (bytes per second, after a minute's grace).
pub const MIN_RATE: u64 = 64 << 10;
/// How long the holder may take to export the package before it offers it.
const OFFER_WAIT: std::time::Duration = std::time::Duration::from_secs(20 * 60);
/// The largest signature file taken from a peer.
const MAX_SIGNATURE: usize = 64 << 10;

/// What a fetch brought (`forage base|service fetch --json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PackageFetchReport {
    pub what: PackageKind,
    /// The base's name or the service's id, here.
    pub name: String,
    pub from: SocketAddr,
    pub package_bytes: u64,
    /// The package's SHA-256.
    pub sha256: String,
    /// A base's digest (its contents, as `forage base info` shows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_digest: Option<String>,
    pub seconds: f64,
}

/// Why a base or service did not arrive (nothing of it is left here).
#[derive(Debug, thiserror::Error)]
pub enum PackageFetchError {
    #[error("{name:?} is not a {} name (letters, digits, '-', '_', '.')", what.as_str())]
    BadName { what: PackageKind, name: String },
    #[error("{} {name} is here already", what.as_str())]
    Exists { what: PackageKind, name: String },
    #[error(transparent)]
    Link(PeerLinkError),
    #[error("cloudlet {from} offered {got} where {wanted} was asked")]
    Wrong { from: SocketAddr, wanted: String, got: String },
    #[error("cloudlet {from} offers a package of {claimed} bytes for {name}: this host takes at most {limit} ({why})")]
    TooLarge { from: SocketAddr, name: String, claimed: u64, limit: u64, why: &'static str },
    #[error("cloudlet {from} sent more of {name}'s package than the {claimed} bytes it offered")]
    Overrun { from: SocketAddr, name: String, claimed: u64 },
    #[error("{name}'s package from cloudlet {from} ended after {got} of {claimed} bytes")]
    Short { from: SocketAddr, name: String, got: u64, claimed: u64 },
    #[error("{name}'s package from cloudlet {from} came slower than {} KiB/s ({got} of {claimed} bytes)", MIN_RATE >> 10)]
    Slow { from: SocketAddr, name: String, got: u64, claimed: u64 },
    #[error("{name}'s package from cloudlet {from} does not match the SHA-256 sent with it")]
    Checksum { from: SocketAddr, name: String },
    #[error("{name}'s package from cloudlet {from} has a signature of {bytes} bytes")]
    BadSignature { from: SocketAddr, name: String, bytes: usize },
    #[error("importing base {name} from cloudlet {from}")]
    ImportBase {
        name: String,
        from: SocketAddr,
        #[source]
        source: Box<forage_synth::SynthError>,
    },
    #[error("importing service {name} from cloudlet {from}")]
    ImportService {
        name: String,
        from: SocketAddr,
        #[source]
        source: Box<forage_service::ServiceError>,
    },
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl PackageFetchError {
    /// The peer refused because it holds no such base or service.
    pub fn not_found(&self) -> bool {
        matches!(self, Self::Link(PeerLinkError::Refused { code: ErrorCode::NotFound, .. }))
    }
}

/// Whether this cloudlet holds `what` named `name` (a base also by digest).
fn held(data: &DataDir, what: PackageKind, name: &str) -> bool {
    match what {
        PackageKind::Base if is_digest(name) => {
            BaseVm::list(data).into_iter().any(|(_, b)| b.is_ok_and(|b| b.digest().eq_ignore_ascii_case(name)))
        }
        PackageKind::Base => data.base(name).is_ok_and(|d| d.exists()),
        PackageKind::Service => forage_service::Repository::new(data).open(name).is_ok(),
    }
}

/// Fetch base `name` (a name, or a digest: it arrives under the holder's name for it) or
/// service `name` from the paired cloudlet at `from` (this cloudlet is `me`) and import it.
pub async fn fetch(
    data: &DataDir,
    me: &str,
    from: SocketAddr,
    what: PackageKind,
    name: &str,
) -> Result<PackageFetchReport, PackageFetchError> {
    let by_digest = what == PackageKind::Base && is_digest(name);
    if !by_digest && !plain(name) {
        return Err(PackageFetchError::BadName { what, name: name.into() });
    }
    if held(data, what, name) {
        return Err(PackageFetchError::Exists { what, name: name.into() });
    }
    let t = Instant::now();
    let mut stream = peer_link::connect(data, me, from).await.map_err(PackageFetchError::Link)?;
    write(&mut stream, &PeerMessage::PackageWanted { what, name: name.to_string() })
        .await
        .map_err(|source| PackageFetchError::Link(PeerLinkError::Wire { to: from, source }))?;
    let dir = match what {
        PackageKind::Base => data.bases(),
        PackageKind::Service => data.services(),
    };
    sweep(&dir);
    let file = dir.join(format!(".fetch-{name}-{}.pkg", std::process::id()));
    let sig = PathBuf::from(format!("{}.sig", file.display()));
    let got = async {
        let room = room(&dir)?;
        // Checked as soon as the holder names it, before any of the package comes.
        let accept = |offered: &str| match held(data, what, offered) {
            true => Err(PackageFetchError::Exists { what, name: offered.into() }),
            false => Ok(()),
        };
        let (claimed, sha256, got_name) = receive(&mut stream, from, name, by_digest, &file, room, &accept).await?;
        let expect = by_digest.then_some(name);
        let base_digest = import(data, what, &file, &got_name, expect, from).await?;
        Ok(PackageFetchReport {
            what,
            name: got_name,
            from,
            package_bytes: claimed,
            sha256,
            base_digest,
            seconds: t.elapsed().as_secs_f64(),
        })
    }
    .await;
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(&sig);
    got
}

/// Import the received package (its signature checked first where this cloudlet keeps a
/// signers list; a base fetched by digest refused before it is moved into place if its
/// digest is another); a base's digest.
async fn import(
    data: &DataDir,
    what: PackageKind,
    file: &Path,
    name: &str,
    expect: Option<&str>,
    from: SocketAddr,
) -> Result<Option<String>, PackageFetchError> {
    let (data2, f2, n2) = (data.clone(), file.to_path_buf(), name.to_string());
    let expect = expect.map(str::to_string);
    let joined = tokio::task::spawn_blocking(move || match what {
        PackageKind::Base => {
            let imported = forage_synth::build::check_package(&data2, forage_trust::signing::BASE_PACKAGE, &f2)
                .and_then(|_| forage_synth::package::import_expecting(&data2, &f2, Some(&n2), expect.as_deref()));
            imported.map(|b| Some(b.digest().to_string())).map_err(|e| PackageFetchError::ImportBase {
                name: n2,
                from,
                source: Box::new(e),
            })
        }
        PackageKind::Service => {
            let repo = forage_service::Repository::new(&data2);
            let checked = forage_synth::build::check_package(&data2, forage_trust::signing::SERVICE_PACKAGE, &f2);
            let imported = checked
                .map_err(forage_service::ServiceError::from)
                .and_then(|_| forage_service::package::import(&data2, &repo, &f2, Some(&n2)).map(|_| None));
            imported.map_err(|e| PackageFetchError::ImportService { name: n2, from, source: Box::new(e) })
        }
    });
    joined.await.map_err(|e| PackageFetchError::Io { path: file.to_path_buf(), source: std::io::Error::other(e) })?
}

/// Remove what fetches of processes that no longer run left in `dir` (`.fetch-NAME-PID.pkg`
/// and its `.sig`).
fn sweep(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(".fetch-") else { continue };
        let stem = rest.trim_end_matches(".sig").trim_end_matches(".pkg");
        let pid = stem.rsplit('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// How large a package this host takes now into `dir`, and why not larger.
fn room(dir: &Path) -> Result<(u64, &'static str), PackageFetchError> {
    std::fs::create_dir_all(dir).map_err(|source| PackageFetchError::Io { path: dir.to_path_buf(), source })?;
    let free = rustix::fs::statvfs(dir)
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
        .map_err(|e| PackageFetchError::Io { path: dir.to_path_buf(), source: e.into() })?;
    let fits = free.saturating_sub(SPARE) / 5;
    Ok(if fits < MAX_PACKAGE {
        (fits, "the free disk space, five times over, with 1 GiB to spare")
    } else {
        (MAX_PACKAGE, "the most forage takes")
    })
}

/// Receive PackageOffer, the pieces and PackageEnd into `file` (and its signature into
/// `FILE.sig`). Returns the package's size and SHA-256 and the name it arrives under (the
/// one asked for, or the holder's name for the base digest asked for, `by_digest`).
/// `limit`: the largest package taken.
async fn receive(
    stream: &mut (impl AsyncRead + Unpin),
    from: SocketAddr,
    name: &str,
    by_digest: bool,
    file: &Path,
    (limit, why): (u64, &'static str),
    accept: &(dyn Fn(&str) -> Result<(), PackageFetchError> + Sync),
) -> Result<(u64, String, String), PackageFetchError> {
    let link = PackageFetchError::Link;
    let (claimed, got_name) = match peer_link::next_within(stream, from, OFFER_WAIT).await.map_err(link)? {
        PeerMessage::PackageOffer { name: got, package_bytes } if got == name || (by_digest && plain(&got)) => {
            (package_bytes, got)
        }
        PeerMessage::PackageOffer { name: got, .. } => {
            return Err(PackageFetchError::Wrong { from, wanted: name.into(), got })
        }
        other => return Err(link(PeerLinkError::Unexpected { to: from, expected: "PackageOffer", got: other.name() })),
    };
    if claimed > limit {
        return Err(PackageFetchError::TooLarge { from, name: got_name, claimed, limit, why });
    }
    accept(&got_name)?;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60 + claimed / MIN_RATE);
    let io = |source| PackageFetchError::Io { path: file.to_path_buf(), source };
    let mut out = tokio::io::BufWriter::new(tokio::fs::File::create(file).await.map_err(io)?);
    let mut hash = Sha256::new();
    let mut got = 0u64;
    loop {
        let message = tokio::time::timeout_at(deadline, peer_link::next(stream, from))
            .await
            .map_err(|_| PackageFetchError::Slow { from, name: got_name.clone(), got, claimed })?;
        match message.map_err(link)? {
            PeerMessage::PackagePiece { bytes } => {
                got += bytes.len() as u64;
                if got > claimed {
                    return Err(PackageFetchError::Overrun { from, name: got_name, claimed });
                }
                hash.update(&bytes);
                out.write_all(&bytes).await.map_err(io)?;
            }
            PeerMessage::PackageEnd { sha256, signature } => {
                if got != claimed {
                    return Err(PackageFetchError::Short { from, name: got_name, got, claimed });
                }
                let ours = hex::encode(hash.finalize());
                if !sha256.eq_ignore_ascii_case(&ours) {
                    return Err(PackageFetchError::Checksum { from, name: got_name });
                }
                if signature.len() > MAX_SIGNATURE {
                    return Err(PackageFetchError::BadSignature { from, name: got_name, bytes: signature.len() });
                }
                out.flush().await.map_err(io)?;
                out.into_inner().sync_all().await.map_err(io)?;
                if !signature.is_empty() {
                    let sig = PathBuf::from(format!("{}.sig", file.display()));
                    std::fs::write(&sig, &signature).map_err(|source| PackageFetchError::Io { path: sig, source })?;
                }
                return Ok((claimed, ours, got_name));
            }
            other => {
                let expected = "PackagePiece or PackageEnd";
                return Err(link(PeerLinkError::Unexpected { to: from, expected, got: other.name() }));
            }
        }
    }
}
