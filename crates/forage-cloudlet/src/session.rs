//! A device's session (the device protocol, `forage_proto::device`): Hello and Welcome
//! here, then VM synthesis (`synthesis`) for an overlay offered, or without one the app
//! store and one of the other four provisioning mechanisms (`provision`), or the
//! activation of a VM substrate (`substrate`). Sessions and
//! instances are recorded in the daemon's state (`forage-state`).

use std::path::Path;
use std::time::Instant;

use forage_proto::asynchronous::write;
use forage_proto::{negotiate, DeviceMessage, ErrorCode, ProtoError, VERSION_MAX, VERSION_MIN};
use forage_state::{NewSession, SessionMode};
use forage_synth::BaseVm;

use crate::error::{internal, next, refused, SessionError};
use crate::instance::{unmount_session, Outcome, Place};
use crate::synthesis::{self, Asked, Ctx};
use crate::Cloudlet;

/// Run one session of the device `device` (the name in its certificate) on `stream`. On
/// any failure the device is told why (if it still listens), and nothing of the session
/// is left: no VM, no files.
pub async fn session(stream: crate::DeviceStream, cloudlet: &Cloudlet, device: &str) -> Result<(), SessionError> {
    session_with(stream, cloudlet, device, None).await
}

/// [`session`], whose first frame (its Hello) was read already.
pub(crate) async fn session_from(
    stream: crate::DeviceStream,
    cloudlet: &Cloudlet,
    device: &str,
    first: &[u8],
) -> Result<(), SessionError> {
    session_with(stream, cloudlet, device, Some(first)).await
}

async fn session_with(
    mut stream: crate::DeviceStream,
    cloudlet: &Cloudlet,
    device: &str,
    first: Option<&[u8]>,
) -> Result<(), SessionError> {
    let id = cloudlet.new_session_id();
    let dir = cloudlet.data.work().join(format!("session-{id}"));
    let result = run(&mut stream, cloudlet, &id, &dir, device, first).await;
    if let Err(e) = &result {
        let (code, message) = e.code_and_message();
        let _ = write(&mut stream, &DeviceMessage::Error { code, message }).await;
    }
    cloudlet.end_session(&id, &dir, &result);
    result.map(|_| ())
}

async fn run(
    stream: &mut crate::DeviceStream,
    cloudlet: &Cloudlet,
    id: &str,
    dir: &Path,
    identity: &str,
    first: Option<&[u8]>,
) -> Result<Outcome, SessionError> {
    // Hello -> Welcome: pick a base we hold, and see whether the launch VM is cached.
    let hello = match first {
        Some(f) => forage_proto::decode::<DeviceMessage>(f)?,
        None => match next::<DeviceMessage>(stream, cloudlet.peer_wait).await {
            Err(SessionError::Proto(ProtoError::Closed)) => return Err(SessionError::NoHello),
            other => other?,
        },
    };
    let DeviceMessage::Hello { versions, device, offers, early_start, store_and_forward } = hello else {
        return Err(SessionError::Sequence { expected: "Hello", got: hello.name() });
    };
    // Records name the device by its certificate; what it calls itself comes after (and
    // reaches logs and records: plain, short).
    if device.len() > 64 || device.chars().any(|c| c.is_control()) {
        return Err(refused(
            ErrorCode::Protocol,
            "the device's name in Hello is over 64 bytes or holds control characters",
        ));
    }
    if offers.len() > 16 {
        return Err(refused(ErrorCode::Protocol, format!("{} overlays offered at once (at most 16)", offers.len())));
    }
    let device = format!("{identity} ({device})");
    let version = negotiate(versions).ok_or_else(|| {
        refused(ErrorCode::Version, format!("device speaks {versions:?}, cloudlet {VERSION_MIN}..={VERSION_MAX}"))
    })?;
    let held: Vec<BaseVm> = BaseVm::list(&cloudlet.data).into_iter().filter_map(|(_, b)| b.ok()).collect();
    let chosen = offers.iter().find_map(|o| held.iter().find(|b| b.digest() == o.base_digest).map(|b| (o, b)));
    let missing = offers
        .iter()
        .filter(|o| !held.iter().any(|b| b.digest() == o.base_digest))
        .map(|o| o.base_digest.clone())
        .collect();
    // The signature first: whether this cloudlet has an overlay's launch VM cached is not
    // told (nor is the VM started) for an overlay it would refuse.
    if let Some((offer, base)) = chosen {
        synthesis::check_signature(cloudlet, offer)?;
        crate::cpu::check_base(cloudlet, base)?;
    }
    let cached = chosen.and_then(|(o, _)| cloudlet.cache.lookup(&o.overlay_digest));
    // In a cluster, an offer no base here serves goes to the node holding its base.
    let redirect = match (chosen, offers.first(), cloudlet.placer.get()) {
        (None, Some(o), Some(place)) => place(o.base_digest.clone(), o.overlay_digest.clone()).await,
        _ => None,
    };
    if let Some(to) = redirect {
        tracing::info!(%device, %to, "cluster: the device's base is held by another node: redirected");
    }
    let welcome = DeviceMessage::Welcome {
        version,
        cloudlet: cloudlet.name.clone(),
        chosen: chosen.map(|(_, b)| b.digest().to_string()),
        missing,
        cached: cached.is_some(),
        redirect: redirect.map(|a| a.to_string()),
    };
    write(stream, &welcome).await?;
    if offers.is_empty() {
        // No overlay: the app store, then one of the other provisioning mechanisms.
        let request = loop {
            match next::<DeviceMessage>(stream, cloudlet.peer_wait).await? {
                DeviceMessage::Provision { request } => break request,
                DeviceMessage::ListApps { platform } => {
                    let apps =
                        cloudlet.services.apps(platform.as_deref()).into_iter().map(|(s, a)| s.app_info(&a)).collect();
                    write(stream, &DeviceMessage::Apps { apps }).await?;
                }
                DeviceMessage::GetApp { id } => {
                    let (svc, app) =
                        cloudlet.services.app(&id).map_err(|e| refused(ErrorCode::NotFound, e.to_string()))?;
                    let bytes = tokio::fs::read(svc.app_path(&app)).await.map_err(internal)?;
                    write(stream, &DeviceMessage::AppFile { id, file: app.file.clone(), bytes }).await?;
                }
                DeviceMessage::WhereIs { endpoint } => {
                    write(stream, &where_is(cloudlet, &endpoint)?).await?;
                }
                DeviceMessage::Activate { substrate, vcpus, memory_mib } => {
                    std::fs::create_dir_all(dir).map_err(|e| internal(format!("{}: {e}", dir.display())))?;
                    let place = Place { cloudlet, id, dir, started: Instant::now() };
                    let wanted = crate::substrate::Wanted { substrate, vcpus, memory_mib };
                    return crate::provision::activate(stream, place, &device, wanted).await;
                }
                // The device only looked at the app store, or asked after its instance.
                DeviceMessage::Bye => return Ok(Outcome { bytes: 0 }),
                other => {
                    let expected = "Provision, Activate, ListApps, GetApp or WhereIs";
                    return Err(SessionError::Sequence { expected, got: other.name() });
                }
            }
        };
        std::fs::create_dir_all(dir).map_err(|e| internal(format!("{}: {e}", dir.display())))?;
        let place = Place { cloudlet, id, dir, started: Instant::now() };
        return crate::provision::run(stream, place, &device, request).await;
    }
    let Some((offer, base)) = chosen else {
        return Err(refused(ErrorCode::NoBase, "none of the offered bases is held here"));
    };
    let asked = Asked { early_start, store_and_forward };
    let mode = match (&cached, early_start && !store_and_forward) {
        (Some(_), _) => SessionMode::Cached,
        (None, true) => SessionMode::EarlyStart,
        (None, false) => SessionMode::Pipelined,
    };
    tracing::info!(session = id, device, base = %base.manifest().name, mode = mode.as_str(), "synthesis session");
    let record = NewSession {
        id: id.into(),
        device: device.clone(),
        base_digest: base.digest().into(),
        overlay_digest: offer.overlay_digest.clone(),
        mode,
    };
    if let Err(e) = cloudlet.state.session_started(&record) {
        tracing::warn!("session {id} not recorded: {e}");
    }
    std::fs::create_dir_all(dir).map_err(|e| internal(format!("{}: {e}", dir.display())))?;
    let ctx = Ctx { cloudlet, id: id.into(), dir: dir.to_path_buf(), base: base.clone(), started: Instant::now() };
    synthesis::run(stream, &ctx, offer, cached, asked).await
}

impl Cloudlet {
    /// A new session's id: this daemon's pid, a counter, and a random part (instances
    /// outlive the daemon, and a later daemon may get the same pid).
    pub(crate) fn new_session_id(&self) -> String {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut r = [0u8; 2];
        let _ = getrandom::fill(&mut r);
        format!("{}-{}-{}", std::process::id(), NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed), hex::encode(r))
    }

    /// Records and files of a session that ended (its instance, if any, was finished).
    pub(crate) fn end_session(&self, id: &str, dir: &Path, result: &Result<Outcome, SessionError>) {
        self.unregister(id);
        let _ = self.state.instance_stopped(id);
        let recorded = match result {
            Ok(o) => self.state.session_ended(id, Ok(o.bytes)),
            Err(e) => self.state.session_ended(id, Err(&e.to_string())),
        };
        if let Err(e) = recorded {
            tracing::debug!("session {id} not recorded: {e}");
        }
        remove_session_dir(dir);
    }
}

/// Remove a finished session's folder. A process of the session may still be letting go
/// of it (a shim that outlived its 5 s shutdown wait unmounts and exits later): then the
/// removal is retried for 30 s on a thread of its own, and a folder still there is logged.
fn remove_session_dir(dir: &Path) {
    unmount_session(dir);
    let first = match std::fs::remove_dir_all(dir) {
        Ok(()) => return,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => e,
    };
    tracing::info!("removing {}: {first}; retried while the session's processes exit", dir.display());
    let dir = dir.to_path_buf();
    std::thread::spawn(move || {
        let mut last = first;
        for _ in 0..60 {
            std::thread::sleep(std::time::Duration::from_millis(500));
            unmount_session(&dir);
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(e) => last = e,
            }
        }
        tracing::warn!("the session folder {} is left: {last}", dir.display());
    });
}

/// The answer to a device's WhereIs: the cluster's record of the instance at `endpoint`.
fn where_is(cloudlet: &Cloudlet, endpoint: &str) -> Result<DeviceMessage, SessionError> {
    if endpoint.len() > 64 || endpoint.parse::<std::net::SocketAddr>().is_err() {
        return Err(refused(ErrorCode::Protocol, "WhereIs: the endpoint is not HOST:PORT"));
    }
    let Some(locate) = cloudlet.locator.get() else {
        return Err(refused(ErrorCode::NotFound, "this cloudlet is not in a cluster: it knows only its own instances"));
    };
    match locate(endpoint) {
        Some(w) => Ok(DeviceMessage::Whereabouts(w)),
        None => Err(refused(ErrorCode::NotFound, format!("no instance of this cluster answers at {endpoint}"))),
    }
}
