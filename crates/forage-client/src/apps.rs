//! The cloudlet's app store over the paired channel: Hello without offers, then ListApps
//! or GetApp, then Bye. The same opening serves WhereIs (a device asking a node of a
//! cluster after its instance).

use std::net::SocketAddr;
use std::sync::Arc;

use forage_proto::asynchronous::{read, write};
use forage_proto::{AppInfo, DeviceMessage as Message, Whereabouts, VERSION_MAX, VERSION_MIN};
use sha2::{Digest, Sha256};

use crate::ClientError;

async fn open(addr: SocketAddr, credentials: &Arc<rustls::ClientConfig>) -> Result<crate::CloudletStream, ClientError> {
    let proto = |source| ClientError::Proto { addr, source };
    let mut stream = crate::connect(addr, credentials, None).await?;
    let hello = Message::Hello {
        versions: (VERSION_MIN, VERSION_MAX),
        device: "app-store".into(),
        offers: Vec::new(),
        early_start: false,
        store_and_forward: false,
    };
    write(&mut stream, &hello).await.map_err(proto)?;
    match read(&mut stream).await.map_err(proto)? {
        Message::Welcome { .. } => Ok(stream),
        Message::Error { code, message } => Err(ClientError::Refused { addr, code, message }),
        other => Err(ClientError::Sequence { addr, expected: "Welcome", got: other.name() }),
    }
}

/// The client apps for `platform` (and `any`), or all.
pub async fn list_apps(
    addr: SocketAddr,
    credentials: &Arc<rustls::ClientConfig>,
    platform: Option<&str>,
) -> Result<Vec<AppInfo>, ClientError> {
    let proto = |source| ClientError::Proto { addr, source };
    let mut s = open(addr, credentials).await?;
    write(&mut s, &Message::ListApps { platform: platform.map(str::to_string) }).await.map_err(proto)?;
    let apps = match read(&mut s).await.map_err(proto)? {
        Message::Apps { apps } => apps,
        Message::Error { code, message } => return Err(ClientError::Refused { addr, code, message }),
        other => return Err(ClientError::Sequence { addr, expected: "Apps", got: other.name() }),
    };
    let _ = write(&mut s, &Message::Bye).await;
    Ok(apps)
}

/// One client app: its entry and its file, checked against the entry's size and SHA-256.
pub async fn get_app(
    addr: SocketAddr,
    credentials: &Arc<rustls::ClientConfig>,
    id: &str,
) -> Result<(AppInfo, Vec<u8>), ClientError> {
    let proto = |source| ClientError::Proto { addr, source };
    let entry = list_apps(addr, credentials, None).await?.into_iter().find(|a| a.id == id).ok_or_else(|| {
        ClientError::Refused {
            addr,
            code: forage_proto::ErrorCode::NotFound,
            message: format!("no client app {id} in the app store (see `forage apps --all`)"),
        }
    })?;
    let mut s = open(addr, credentials).await?;
    write(&mut s, &Message::GetApp { id: id.into() }).await.map_err(proto)?;
    let bytes = match read(&mut s).await.map_err(proto)? {
        Message::AppFile { bytes, .. } => bytes,
        Message::Error { code, message } => return Err(ClientError::Refused { addr, code, message }),
        other => return Err(ClientError::Sequence { addr, expected: "AppFile", got: other.name() }),
    };
    let _ = write(&mut s, &Message::Bye).await;
    if bytes.len() as u64 != entry.size || hex::encode(Sha256::digest(&bytes)) != entry.sha256 {
        return Err(ClientError::Refused {
            addr,
            code: forage_proto::ErrorCode::Protocol,
            message: format!("app {id} arrived damaged ({} bytes, listed {})", bytes.len(), entry.size),
        });
    }
    Ok((entry, bytes))
}

/// Where the cluster of the cloudlet at `addr` says the instance whose service answered
/// at `endpoint` is: running on a node, or lost with its node (`docs/cluster.md`).
pub async fn where_is(
    addr: SocketAddr,
    credentials: &Arc<rustls::ClientConfig>,
    endpoint: &str,
) -> Result<Whereabouts, ClientError> {
    let proto = |source| ClientError::Proto { addr, source };
    let mut s = open(addr, credentials).await?;
    write(&mut s, &Message::WhereIs { endpoint: endpoint.into() }).await.map_err(proto)?;
    let w = match read(&mut s).await.map_err(proto)? {
        Message::Whereabouts(w) if w.endpoint == endpoint => w,
        Message::Error { code, message } => return Err(ClientError::Refused { addr, code, message }),
        other => return Err(ClientError::Sequence { addr, expected: "Whereabouts", got: other.name() }),
    };
    let _ = write(&mut s, &Message::Bye).await;
    Ok(w)
}

/// How long every cloudlet reached must say it does not know an instance before
/// [`ask_after`] believes them. A node's view of the cluster is what it read at its last
/// heartbeat (a third of its lease), later on a loaded host: in CI a node asked right
/// after the holder died had not yet read the record the holder published seconds before.
pub const UNKNOWN_SETTLE: std::time::Duration = std::time::Duration::from_secs(6);

/// After a held instance's session broke: ask every cloudlet this device is paired with
/// (`pairings`, each at the address it was paired at) where the instance whose service
/// answered at `endpoint` is, every `every` until one says it is lost or `patience` has
/// passed (a node that died is marked lost only when its lease expires). Returns the
/// cloudlet that answered and its last answer; `None` when no cloudlet knows it (a
/// cloudlet alone, not in a cluster, answers `not_found`; so does a cluster once the
/// instance ended in good order, for [`UNKNOWN_SETTLE`]) or none answered within
/// `patience`. A round in which no cloudlet could be reached (a busy host, a node
/// restarting) is not an answer: the device asks again.
pub async fn ask_after(
    pairings: &std::path::Path,
    endpoint: &str,
    every: std::time::Duration,
    patience: std::time::Duration,
) -> Option<(SocketAddr, Whereabouts)> {
    let started = std::time::Instant::now();
    let peers: Vec<(SocketAddr, Arc<rustls::ClientConfig>)> = forage_trust::DeviceTrust::new(pairings)
        .peers()
        .into_iter()
        .filter_map(|p| Some((p.record.addr.as_deref()?.parse().ok()?, p.client_config().ok()?)))
        .collect();
    let every = every.max(std::time::Duration::from_millis(100));
    let mut last = None;
    let mut unknown_since: Option<std::time::Instant> = None;
    loop {
        let (mut answered, mut unknown) = (None, false);
        for (addr, credentials) in &peers {
            let asked = tokio::time::timeout(
                every.max(std::time::Duration::from_secs(5)),
                where_is(*addr, credentials, endpoint),
            );
            match asked.await {
                Ok(Ok(w)) => {
                    answered = Some((*addr, w));
                    break;
                }
                Ok(Err(ClientError::Refused { code: forage_proto::ErrorCode::NotFound, .. })) => unknown = true,
                Ok(Err(e)) => tracing::debug!("asking {addr} where {endpoint} is: {e}"),
                Err(_) => tracing::debug!("asking {addr} where {endpoint} is: no answer in time"),
            }
        }
        if answered.is_some() {
            unknown_since = None;
        }
        match answered {
            Some((_, ref w)) if w.lost.is_some() => return answered,
            Some(_) => last = answered,
            // No cloudlet knows it (any more), and for long enough not to be a view that
            // lags: it ended, it was not lost.
            None if unknown
                && unknown_since.get_or_insert_with(std::time::Instant::now).elapsed() >= UNKNOWN_SETTLE =>
            {
                return None
            }
            // None could be reached this round, or those reached may lag: ask again.
            None => {}
        }
        if started.elapsed() >= patience {
            return last;
        }
        tokio::time::sleep(every).await;
    }
}
