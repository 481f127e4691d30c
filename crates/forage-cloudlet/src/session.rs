//! One synthesis session (see the crate doc for the modes and `forage-proto` for the
//! message sequence): Hello/Welcome and the manifest here, then the mode's own module.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use forage_format::OverlayReader;
use forage_proto::asynchronous::{read, write};
use forage_proto::{negotiate, ErrorCode, Message, ProtoError, VERSION_MAX, VERSION_MIN};
use forage_state::{NewInstance, NewSession, SessionMode};
use forage_synth::BaseVm;
use forage_vm::{PortForward, RestoreOptions, Snapshot, Vm, VmSpec};

use crate::proxy::ServiceProxy;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::residue::Ending;
use crate::Cloudlet;

static NEXT: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("device: {0}")]
    Proto(#[from] ProtoError),
    #[error("device broke the sequence: expected {expected}, got {got}")]
    Sequence { expected: &'static str, got: &'static str },
    #[error("connection closed before Hello (a reachability probe)")]
    NoHello,
    #[error("device went silent for {0:?}")]
    Timeout(Duration),
    #[error("{code:?}: {message}")]
    Refused { code: ErrorCode, message: String },
}

pub(crate) fn refused(code: ErrorCode, message: impl Into<String>) -> SessionError {
    SessionError::Refused { code, message: message.into() }
}

pub(crate) fn internal(e: impl std::fmt::Display) -> SessionError {
    refused(ErrorCode::Internal, e.to_string())
}

pub(crate) async fn next(stream: &mut (impl AsyncRead + Unpin), wait: Duration) -> Result<Message, SessionError> {
    match tokio::time::timeout(wait, read(stream)).await {
        Ok(m) => Ok(m?),
        Err(_) => Err(SessionError::Timeout(wait)),
    }
}

/// What a mode hands back for the records.
pub(crate) struct Outcome {
    pub bytes: u64,
}

/// Everything a mode needs about its session.
pub(crate) struct Ctx<'a> {
    pub cloudlet: &'a Cloudlet,
    pub id: String,
    pub dir: std::path::PathBuf,
    pub base: BaseVm,
    pub started: Instant,
}

/// Run one session on `stream`. On any failure the device is told why (if it still
/// listens), and nothing of the session is left: no VM, no files.
/// `serial` is the serial of the peer's certificate (what it was paired as).
pub async fn session(mut stream: crate::DeviceStream, cloudlet: &Cloudlet, device: &str, serial: u64) -> Result<(), SessionError> {
    let id = format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    let dir = cloudlet.data.work().join(format!("session-{id}"));
    let result = run(&mut stream, cloudlet, &id, &dir, device, serial).await;
    if let Err(e) = &result {
        let (code, message) = match e {
            SessionError::Refused { code, message } => (*code, message.clone()),
            SessionError::Timeout(_) => (ErrorCode::Timeout, e.to_string()),
            other => (ErrorCode::Protocol, other.to_string()),
        };
        let _ = write(&mut stream, &Message::Error { code, message }).await;
    }
    cloudlet.unregister(&id);
    let _ = cloudlet.state.instance_stopped(&id);
    let recorded = match &result {
        Ok(o) => cloudlet.state.session_ended(&id, Ok(o.bytes)),
        Err(e) => cloudlet.state.session_ended(&id, Err(&e.to_string())),
    };
    if let Err(e) = recorded {
        tracing::debug!("session {id} not recorded: {e}");
    }
    unmount_session(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    result.map(|_| ())
}

async fn run(stream: &mut crate::DeviceStream, cloudlet: &Cloudlet, id: &str, dir: &Path, identity: &str, serial: u64) -> Result<Outcome, SessionError> {
    // Hello -> Welcome: pick a base we hold, and see whether the launch VM is cached.
    let hello = match next(stream, cloudlet.peer_wait).await {
        Err(SessionError::Proto(ProtoError::Closed)) => return Err(SessionError::NoHello),
        other => other?,
    };
    let Message::Hello { versions, device, offers, early_start, store_and_forward } = hello else {
        return Err(SessionError::Sequence { expected: "Hello", got: "another message" });
    };
    // Records name the device by its certificate; what it calls itself comes after (and
    // reaches logs and records: plain, short).
    if device.len() > 64 || device.chars().any(|c| c.is_control()) {
        return Err(refused(ErrorCode::Protocol, "the device's name in Hello is over 64 bytes or holds control characters"));
    }
    if offers.len() > 16 {
        return Err(refused(ErrorCode::Protocol, format!("{} overlays offered at once (at most 16)", offers.len())));
    }
    let device = format!("{identity} ({device})");
    let version = negotiate(versions).ok_or_else(|| refused(ErrorCode::Version, format!("device speaks {versions:?}, cloudlet {VERSION_MIN}..={VERSION_MAX}")))?;
    let held: Vec<BaseVm> = BaseVm::list(&cloudlet.data).into_iter().filter_map(|(_, b)| b.ok()).collect();
    let chosen = offers.iter().find_map(|o| held.iter().find(|b| b.digest() == o.base_digest).map(|b| (o, b)));
    let missing = offers.iter().filter(|o| !held.iter().any(|b| b.digest() == o.base_digest)).map(|o| o.base_digest.clone()).collect();
    // The signature first: whether this cloudlet has an overlay's launch VM cached is not
    // told (nor is the VM started) for an overlay it would refuse.
    if let Some((offer, _)) = chosen {
        check_signature(cloudlet, offer)?;
    }
    let cached = chosen.and_then(|(o, _)| cloudlet.cache.lookup(&o.overlay_digest));
    write(
        stream,
        &Message::Welcome { version, cloudlet: cloudlet.name.clone(), chosen: chosen.map(|(_, b)| b.digest().to_string()), missing, cached: cached.is_some() },
    )
    .await?;
    if offers.is_empty() {
        // No overlay: the app store, then one of the other provisioning mechanisms.
        let request = loop {
            match next(stream, cloudlet.peer_wait).await? {
                Message::Provision { request } => break request,
                Message::ListApps { platform } => {
                    let apps = cloudlet.services.apps(platform.as_deref()).into_iter().map(|(s, a)| app_entry(&s, &a)).collect();
                    write(stream, &Message::Apps { apps }).await?;
                }
                Message::GetApp { id } => {
                    let (svc, app) = cloudlet.services.app(&id).map_err(|e| refused(ErrorCode::NotFound, e.to_string()))?;
                    let bytes = tokio::fs::read(svc.app_path(&app)).await.map_err(internal)?;
                    write(stream, &Message::AppFile { id, file: app.file.clone(), bytes }).await?;
                }
                // The device only looked at the app store.
                Message::Bye => return Ok(Outcome { bytes: 0 }),
                // Another cloudlet hands a running instance over.
                Message::HandoffBegin(begin) => {
                    let is_cloudlet = cloudlet.trust.issued().iter().any(|i| i.serial == serial && i.kind == forage_trust::PeerKind::Cloudlet);
                    if !is_cloudlet {
                        return Err(refused(ErrorCode::Unpaired, format!("{identity} is paired as a device: only cloudlets paired with `--as-cloudlet` may hand off VMs")));
                    }
                    std::fs::create_dir_all(dir).map_err(|e| internal(format!("{}: {e}", dir.display())))?;
                    let place = Place { cloudlet, id, dir, started: Instant::now() };
                    return crate::handoff::receive(stream, place, identity, begin).await;
                }
                other => return Err(SessionError::Sequence { expected: "Provision, ListApps or GetApp", got: other.name() }),
            }
        };
        std::fs::create_dir_all(dir).map_err(|e| internal(format!("{}: {e}", dir.display())))?;
        let place = Place { cloudlet, id, dir, started: Instant::now() };
        return crate::provision::run(stream, place, &device, request).await;
    }
    let Some((offer, base)) = chosen else {
        return Err(refused(ErrorCode::NoBase, "none of the offered bases is held here"));
    };
    let early_start = early_start && !store_and_forward;
    let mode = match (&cached, early_start) {
        (Some(_), _) => SessionMode::Cached,
        (None, true) => SessionMode::EarlyStart,
        (None, false) => SessionMode::Pipelined,
    };
    tracing::info!(session = id, device, base = %base.manifest().name, mode = mode.as_str(), "synthesis session");
    let record = NewSession { id: id.into(), device: device.clone(), base_digest: base.digest().into(), overlay_digest: offer.overlay_digest.clone(), mode };
    if let Err(e) = cloudlet.state.session_started(&record) {
        tracing::warn!("session {id} not recorded: {e}");
    }
    std::fs::create_dir_all(dir).map_err(|e| internal(format!("{}: {e}", dir.display())))?;
    let ctx = Ctx { cloudlet, id: id.into(), dir: dir.to_path_buf(), base: base.clone(), started: Instant::now() };
    if let Some(snapshot) = cached {
        return crate::cache::run_cached(stream, &ctx, snapshot).await;
    }

    // Manifest (or where to fetch the overlay): check it before anything is written. Its
    // size is capped by what an overlay of this base can hold.
    let manifest_limit = forage_format::manifest::raw_limit_for(base.manifest().memory_size, base.manifest().disk_size);
    let (prefix, remote) = match next(stream, cloudlet.peer_wait).await? {
        Message::Manifest { bytes } => (bytes, None),
        Message::OverlayUrl { url } => {
            let policy = cloudlet.fetch_policy.clone();
            let remote = tokio::task::spawn_blocking(move || forage_remote::RemoteOverlay::open(&url, &policy, manifest_limit))
                .await
                .expect("no panic")
                .map_err(|e| {
                    // The device learns that the fetch failed, not what the server (or the
                    // network behind the cloudlet) said: that stays in the cloudlet's log.
                    tracing::warn!(session = id, "overlay by URL: {e}");
                    let why = match e {
                        forage_remote::RemoteError::Refused { source, .. } => source.to_string(),
                        forage_remote::RemoteError::Overlay { source, .. } => format!("the fetched overlay: {source}"),
                        _ => "the overlay URL could not be fetched (the cloudlet's log says why)".into(),
                    };
                    refused(ErrorCode::BadOverlay, why)
                })?;
            if !offer.overlay_digest.is_empty() && remote.digest() != offer.overlay_digest {
                return Err(refused(ErrorCode::BadOverlay, format!("the overlay at {} is not the one offered (digest {})", remote.url, remote.digest())));
            }
            (remote.prefix.clone(), Some(std::sync::Arc::new(remote)))
        }
        other => return Err(SessionError::Sequence { expected: "Manifest or OverlayUrl", got: other.name() }),
    };
    let manifest = OverlayReader::open_limited(&prefix[..], manifest_limit).map_err(|e| refused(ErrorCode::BadOverlay, e.to_string()))?.manifest().clone();
    // The manifest (whose hashes cover every segment) must be the one offered: the cache
    // entry and the signature are for that digest.
    if overlay_digest(&prefix) != offer.overlay_digest {
        return Err(refused(ErrorCode::BadOverlay, "the manifest sent is not the overlay offered (digests differ)"));
    }
    if manifest.base.digest != base.digest() {
        return Err(refused(ErrorCode::BadOverlay, "the manifest names another base than the one agreed"));
    }
    if (manifest.memory_size, manifest.disk_size) != (base.manifest().memory_size, base.manifest().disk_size) {
        return Err(refused(ErrorCode::BadOverlay, "the manifest's memory and disk sizes are not its base's"));
    }
    check_space(dir, &manifest, base)?;
    if let Some(parent) = &manifest.parent {
        return Err(refused(ErrorCode::BadOverlay, format!("this is a residue of overlay {parent}: merge it into its overlay first")));
    }
    match (early_start, remote) {
        (true, remote) => crate::early::run(stream, &ctx, manifest, prefix, remote).await,
        (false, Some(remote)) => crate::pipelined::run_remote(stream, &ctx, manifest, remote).await,
        (false, None) => crate::pipelined::run(stream, &ctx, manifest, prefix, !store_and_forward).await,
    }
}

/// Refuse a session whose files would not fit in the free space of the session folder's
/// file system (with 64 MiB to spare): the overlay as sent, its chunks decompressed, and
/// a launch VM the size of the base as allocated.
fn check_space(dir: &Path, manifest: &forage_format::Manifest, base: &BaseVm) -> Result<(), SessionError> {
    use std::os::unix::fs::MetadataExt;
    let allocated = |p: PathBuf| std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0);
    let raw: u64 = manifest.segments.iter().map(|s| s.raw_len).sum();
    let needed = manifest.segments_bytes() + raw + allocated(base.memory_path()) + allocated(base.disk_path()) + (64 << 20);
    let free = match rustix::fs::statvfs(dir.parent().unwrap_or(dir)) {
        Ok(s) => s.f_bavail.saturating_mul(s.f_frsize),
        Err(e) => return Err(internal(format!("free space of {}: {e}", dir.display()))),
    };
    if free < needed {
        return Err(refused(ErrorCode::Busy, format!("not enough disk space on the cloudlet for this overlay: it needs {} MiB, {} MiB are free", needed >> 20, free >> 20)));
    }
    Ok(())
}

/// With a signers list (`DATA/trust/signers`), the offered overlay must carry a good
/// signature by one of them; checked before anything is received or started.
fn check_signature(cloudlet: &Cloudlet, offer: &forage_proto::Offer) -> Result<(), SessionError> {
    let path = cloudlet.data.root().join("trust").join("signers");
    let Some(allowed) = forage_trust::signing::allowed_signers(&path).map_err(internal)? else { return Ok(()) };
    let short = forage_trust::short(&offer.overlay_digest);
    if offer.signature.is_empty() {
        return Err(refused(ErrorCode::BadOverlay, format!("overlay {short} is not signed, and this cloudlet accepts only overlays signed by its listed signers")));
    }
    let sig = forage_trust::signing::Signature::parse(&offer.signature).map_err(|e| refused(ErrorCode::BadOverlay, format!("overlay {short}: signature: {e}")))?;
    sig.verify(forage_trust::signing::OVERLAY, &offer.overlay_digest, &allowed).map_err(|e| refused(ErrorCode::BadOverlay, format!("overlay {short}: {e}")))?;
    tracing::info!(overlay = short, signer = forage_trust::short(&sig.signer), "signature verified");
    Ok(())
}

fn app_entry(s: &forage_service::ServiceVm, a: &forage_service::ClientApp) -> forage_proto::AppEntry {
    forage_proto::AppEntry { id: a.id.clone(), service: s.id().to_string(), platform: a.platform.clone(), file: a.file.clone(), size: a.size, sha256: a.sha256.clone() }
}

/// The digest naming an overlay: SHA-256 of its manifest, as its header records it
/// (checked against the manifest by `OverlayReader::open`).
pub(crate) fn overlay_digest(prefix: &[u8]) -> String {
    hex::encode(&prefix[24..56])
}

/// Where an instance lives: what [`resume`] needs of its session.
#[derive(Clone, Copy)]
pub(crate) struct Place<'a> {
    pub cloudlet: &'a Cloudlet,
    pub id: &'a str,
    pub dir: &'a Path,
    pub started: Instant,
}

impl Ctx<'_> {
    pub fn place(&self) -> Place<'_> {
        Place { cloudlet: self.cloudlet, id: &self.id, dir: &self.dir, started: self.started }
    }
}

/// A resumed VM and where its service answers.
pub(crate) struct Instance {
    pub vm: Vm,
    /// The service proxy's address on the cloudlet's service address (empty without one).
    pub endpoint: String,
    /// What its devices are given to reach the service (address, token, CA).
    pub service: forage_proto::ServiceEndpoint,
    pub resumed_after_ms: u64,
    pub stop: std::sync::Arc<crate::Stop>,
    /// Every guest port's loopback forward (the agent's included, if asked for).
    pub forwards: Vec<PortForward>,
    pub proxy: Option<ServiceProxy>,
}

impl Instance {
    /// The loopback address of guest port `guest_port`.
    pub fn local(&self, guest_port: u16) -> Option<SocketAddr> {
        self.forwards.iter().find(|f| f.guest_port == guest_port).map(|f| SocketAddr::from((f.host_addr, f.host_port)))
    }

    /// What tells a device its instance runs and how to reach its service.
    pub fn ready(&self) -> Message {
        Message::Ready { service: self.service.clone(), resumed_after_ms: self.resumed_after_ms }
    }
}

/// Resume `snap` with its guest ports and `extra_ports` forwarded to loopback, and
/// `service_port` relayed on the service address. `in_place`: the spec's memory and disk
/// are the snapshot's own files (early start, copy-on-write views); otherwise they are
/// copied into the session's run folder.
pub(crate) async fn resume(place: Place<'_>, snap: &Snapshot, service_port: Option<u16>, extra_ports: &[u16], in_place: bool) -> Result<Instance, SessionError> {
    resume_with(place, snap, service_port, extra_ports, in_place, RestoreOptions { copy_disks: !in_place, ..Default::default() }, None).await
}

/// [`resume`] with restore options (a handoff's state stream has no `x-ignore-shared`)
/// and the service token its devices already hold (a handoff), if any.
pub(crate) async fn resume_with(
    place: Place<'_>,
    snap: &Snapshot,
    service_port: Option<u16>,
    extra_ports: &[u16],
    in_place: bool,
    opts: RestoreOptions,
    token: Option<[u8; forage_proto::service::TOKEN_BYTES]>,
) -> Result<Instance, SessionError> {
    let cloudlet = place.cloudlet;
    // The guest agent runs anything as root in the guest: it never faces a device.
    if service_port == Some(forage_agent::AGENT_PORT) {
        return Err(refused(ErrorCode::Provision, format!("guest port {} is the guest agent's, never a service port", forage_agent::AGENT_PORT)));
    }
    if extra_ports.len() > 8 {
        return Err(refused(ErrorCode::Provision, format!("{} extra guest ports asked for (at most 8)", extra_ports.len())));
    }
    let run = place.dir.join("run");
    std::fs::create_dir_all(&run).map_err(internal)?;
    let mut guest_ports: Vec<u16> = snap.manifest().spec.nic.iter().flat_map(|n| n.forwards.iter().map(|f| f.guest_port)).collect();
    guest_ports.extend(extra_ports.iter().chain(service_port.iter()).copied());
    guest_ports.sort_unstable();
    guest_ports.dedup();
    let forwards = forage_image::loopback_forwards(guest_ports).map_err(internal)?;
    let qmp = cloudlet.data.runtime_dir().map_err(internal)?.join(format!("session-{}.qmp", place.id));
    let mut spec: VmSpec = snap.relocated_spec(&run, &qmp, Some(forwards.clone()));
    if in_place {
        spec.memory_file = snap.memory_path();
        spec.disks[0].path = snap.disk_paths()[0].clone();
    }
    let t = Instant::now();
    let vm = Vm::restore_with(snap, spec, cloudlet.accel, &run.join("qemu.log"), opts).await.map_err(internal)?;
    let resumed_after_ms = t.elapsed().as_millis() as u64;
    let stop = cloudlet.register(place.id);
    let target = service_port.and_then(|p| forwards.iter().find(|f| f.guest_port == p)).map(|f| SocketAddr::from((f.host_addr, f.host_port)));
    let proxy = match target {
        Some(target) => {
            let tls = cloudlet.trust.relay_server_config().map_err(internal)?;
            let mut p = ServiceProxy::start(cloudlet.service_addr, target, tls, cloudlet.trust.ca_fingerprint(), token).await.map_err(|e| internal(format!("service proxy on {}: {e}", cloudlet.service_addr)))?;
            if let Some(t) = cloudlet.idle_timeout {
                p.watch_idle(t, stop.clone());
            }
            Some(p)
        }
        None => None,
    };
    let endpoint = proxy.as_ref().map(|p| p.addr.to_string()).unwrap_or_default();
    let service = proxy.as_ref().map(|p| p.endpoint.clone()).unwrap_or_default();
    let record = NewInstance { id: place.id.to_string(), session_id: place.id.to_string(), name: vm.spec().name.clone(), qemu_pid: vm.pid(), dir: place.dir.to_path_buf(), endpoint: endpoint.clone() };
    if let Err(e) = cloudlet.state.instance_started(&record) {
        tracing::warn!("instance {} not recorded: {e}", place.id);
    }
    if let Err(e) = cloudlet.state.session_ready(place.id, place.started.elapsed().as_millis() as u64) {
        tracing::debug!("{e}");
    }
    Ok(Instance { vm, endpoint, service, resumed_after_ms, stop, forwards, proxy })
}

/// After Ready and Complete: the instance lives until the device says Bye (or asks for
/// its residue) or goes away, or the instance is asked to stop (operator, idle timeout).
/// Checkpoints are answered with `usage`.
pub(crate) async fn hold(stream: &mut (impl AsyncRead + AsyncWrite + Unpin), stop: &crate::Stop, usage: impl Fn(String) -> Message) -> Result<Ending, SessionError> {
    loop {
        tokio::select! {
            m = read(stream) => match m {
                Ok(Message::Bye) | Err(ProtoError::Closed) => return Ok(Ending::Bye),
                Ok(Message::WantResidue) => return Ok(Ending::Residue),
                Ok(Message::Checkpoint { label }) => write(stream, &usage(label)).await?,
                Ok(other) => return Err(SessionError::Sequence { expected: "Bye, WantResidue or Checkpoint", got: other.name() }),
                Err(e) => return Err(e.into()),
            },
            _ = stop.notified() => return Err(stop.error()),
            _ = stop.ordered(), if stop.movable() => return Ok(Ending::Moving),
        }
    }
}

pub(crate) fn no_usage(label: String) -> Message {
    Message::Usage { label, blobs_accessed: 0, blobs: 0, demand_fetches: 0, segments_arrived: 0, segments: 0 }
}

/// Detach the FUSE mounts a session folder may hold: the early-start assembly's, and a
/// copy-on-write view's (provisioning).
pub(crate) fn unmount_session(dir: &Path) {
    unmount_stale(&dir.join("mnt"));
    unmount_stale(&dir.join("view").join("mnt"));
}

/// Detach a FUSE mount left behind (a crash, or a VM that kept its files open).
pub(crate) fn unmount_stale(mnt: &Path) {
    // No `exists()` check: a mount whose server died fails every stat (ENOTCONN).
    let mounted = std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(&*mnt.to_string_lossy())));
    if mounted {
        let _ = std::process::Command::new("fusermount3").arg("-uzq").arg(mnt).stderr(std::process::Stdio::null()).status();
    }
}

/// Session folders of daemons that are gone (crashed or killed): their mounts and files.
pub(crate) fn sweep_dead_sessions(work: &Path) {
    for entry in std::fs::read_dir(work).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("session-").and_then(|r| r.split('-').next()).and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!("removing {} left by a daemon that is gone", entry.path().display());
            unmount_session(&entry.path());
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
