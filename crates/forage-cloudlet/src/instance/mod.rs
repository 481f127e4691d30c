//! Instances: a VM resumed for a device (or handed over by a peer cloudlet), its service
//! relayed, and its life until it ends. The bottom layer of the cloudlet: synthesis,
//! provisioning and handoff start instances here and end them here.
//!
//! An instance is three processes: QEMU, detached from the daemon; its shim
//! (`forage-shim`), which serves the instance's view of its memory and disk over FUSE
//! (a copy-on-write view of a saved VM, or the launch VM of an overlay while it arrives)
//! and its service relay; and the daemon, which drives both. The first two outlive a
//! restart of the daemon, which adopts them again ([`adopt`]); `instance.json` in the
//! instance's folder says what it needs to.
//!
//! ```text
//! prepare: ports chosen -> shim started (view, relay) ----+
//! resume:  QEMU restored on the view's (or copied) files -+-> Instance -> life -> finish
//! ```

pub(crate) mod control;
pub(crate) mod dock;
pub(crate) mod dock_order;
mod record;
mod shared;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forage_proto::asynchronous::{read, write};
use forage_proto::{DeviceMessage, ErrorCode, ProtoError, ServiceEndpoint};
use forage_shim::{RelaySpec, ShimClient, ShimSpec, ViewSpec};
use forage_state::{NewInstance, Timing};
use forage_vm::{PortForward, RestoreOptions, Snapshot, Vm, VmSpec};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::{internal, refused, SessionError};
use crate::Cloudlet;
pub(crate) use control::Control;
pub(crate) use record::InstanceFile;
pub(crate) use shared::SharedInstance;

/// How an instance's life ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    Bye,
    Residue,
    /// A handoff was ordered (movable instances only).
    Moving,
    /// The instance moved to another cloudlet.
    Moved,
    /// A dock order was given (`dock`): the instance's holder carries it out.
    Docking,
}

/// What a session hands back for the records.
pub(crate) struct Outcome {
    pub bytes: u64,
}

/// Where an instance lives: its cloudlet, id (the session's) and folder.
#[derive(Clone, Copy)]
pub(crate) struct Place<'a> {
    pub cloudlet: &'a Cloudlet,
    pub id: &'a str,
    pub dir: &'a Path,
    pub started: Instant,
}

impl Place<'_> {
    /// Milliseconds since the session started.
    pub fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Record a moment of the session's first-response breakdown (the operator's view;
    /// a failure to record is only logged).
    pub fn timing(&self, timing: Timing) {
        if let Err(e) = self.cloudlet.state.session_timing(self.id, timing) {
            tracing::debug!(session = self.id, "{e}");
        }
    }

    /// A device's Checkpoint: its first answer from the service counts for the breakdown.
    pub fn checkpoint(&self, label: &str) {
        if label == forage_proto::device::FIRST_RESPONSE {
            self.timing(Timing::FirstResponse(self.elapsed_ms()));
        }
    }
}

/// What an instance's memory and disk are. Either way a view, whose shim tracks what
/// the VM writes: nothing is copied and what it is a view of is never written.
pub(crate) enum Source<'a> {
    /// A copy-on-write view of a saved VM (a service VM, a launch VM, a handoff's
    /// rebuilt VM).
    View { of: &'a Snapshot, lineage: Lineage },
    /// The launch VM of an overlay, assembled while its segments arrive (early start):
    /// the manifest as encoded in the overlay, and the base's files.
    Overlay {
        manifest: &'a forage_format::Manifest,
        base_memory: PathBuf,
        base_disk: PathBuf,
        /// The package volume of an overlay naming Debian packages (format 3).
        packages: Option<PathBuf>,
        lineage: Lineage,
    },
}

/// What a handoff compares an instance with: a saved VM another cloudlet may hold (the
/// service VM or base VM the instance comes from), and the disk chunks that already
/// differed from it when the VM first resumed (an overlay's). Memory needs no list: all
/// of it passes through QEMU's migration stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lineage {
    pub base: PathBuf,
    pub disk_changed: Vec<u64>,
}

impl Lineage {
    /// An instance of `saved` as it is.
    pub fn of(saved: &Snapshot) -> Self {
        Self { base: saved.dir().to_path_buf(), disk_changed: Vec::new() }
    }

    /// An instance of an overlay's launch VM on `base`.
    pub fn overlay(base: &forage_synth::BaseVm, manifest: &forage_format::Manifest) -> Self {
        let disk_changed =
            manifest.chunks.iter().filter(|c| c.space == forage_format::Space::Disk).map(|c| c.index).collect();
        Self { base: base.snapshot().dir().to_path_buf(), disk_changed }
    }
}

/// The ports an instance needs.
#[derive(Debug, Clone, Default)]
pub(crate) struct Ports<'a> {
    /// Relayed to devices.
    pub service: Option<u16>,
    /// Forwarded to loopback only (the guest agent's, for provisioning).
    pub extra: &'a [u16],
    /// The service token its devices already hold (a handoff), else a new one.
    pub token: Option<[u8; forage_proto::service::TOKEN_BYTES]>,
}

/// An instance whose shim runs and whose QEMU does not yet.
pub(crate) struct Prepared<'a> {
    place: Place<'a>,
    shim: Arc<ShimClient>,
    forwards: Vec<PortForward>,
    service_port: Option<u16>,
    extra_ports: Vec<u16>,
    /// A copy-on-write view of a saved VM (not an overlay being assembled).
    cow: bool,
    lineage: Lineage,
    pub service: ServiceEndpoint,
}

/// A running instance.
pub(crate) struct Instance {
    pub id: String,
    pub vm: Vm,
    pub shim: Arc<ShimClient>,
    /// The relay's address (empty without a service).
    pub endpoint: String,
    /// What its devices are given to reach the service (address, token, CA).
    pub service: ServiceEndpoint,
    pub resumed_after_ms: u64,
    pub control: Arc<Control>,
    /// Every guest port's loopback forward (the agent's included, if asked for).
    pub forwards: Vec<PortForward>,
    pub service_port: Option<u16>,
    pub extra_ports: Vec<u16>,
    /// What a handoff compares it with (none: it cannot move, e.g. adopted from a
    /// record that did not say).
    pub lineage: Option<Lineage>,
    idle: Option<tokio::task::JoinHandle<()>>,
}

/// The guest ports `spec` forwards, plus `ports`.
fn guest_ports(spec: &VmSpec, ports: &Ports<'_>) -> Vec<u16> {
    let mut p: Vec<u16> = spec.nic.iter().flat_map(|n| n.forwards.iter().map(|f| f.guest_port)).collect();
    p.extend(ports.extra.iter().chain(ports.service.iter()).copied());
    p.sort_unstable();
    p.dedup();
    p
}

/// A new instance's service token: its devices' secret for the relay.
pub(crate) fn new_token() -> Result<[u8; forage_proto::service::TOKEN_BYTES], SessionError> {
    let mut t = [0u8; forage_proto::service::TOKEN_BYTES];
    getrandom::fill(&mut t).map_err(|e| internal(format!("no randomness for the instance's token: {e}")))?;
    Ok(t)
}

/// Choose the instance's ports and start its shim (its view and relay). `spec` is the
/// VM's description (its forwarded guest ports count).
pub(crate) async fn prepare<'a>(
    place: Place<'a>,
    source: Source<'_>,
    spec: &VmSpec,
    ports: Ports<'_>,
) -> Result<Prepared<'a>, SessionError> {
    let cloudlet = place.cloudlet;
    // The guest agent runs anything as root in the guest: it never faces a device.
    if ports.service == Some(forage_agent::AGENT_PORT) {
        return Err(refused(
            ErrorCode::Provision,
            format!("guest port {} is the guest agent's, never a service port", forage_agent::AGENT_PORT),
        ));
    }
    if ports.extra.len() > 8 {
        return Err(refused(
            ErrorCode::Provision,
            format!("{} extra guest ports asked for (at most 8)", ports.extra.len()),
        ));
    }
    let forwards = forage_image::loopback_forwards(guest_ports(spec, &ports)).map_err(internal)?;
    let token = match ports.token {
        Some(t) => t,
        None => new_token()?,
    };
    let relay = ports.service.and_then(|p| forwards.iter().find(|f| f.guest_port == p)).map(|f| RelaySpec {
        listen: cloudlet.service_addr,
        port: 0,
        target: SocketAddr::from((f.host_addr, f.host_port)),
        token: hex::encode(token),
        trust: cloudlet.data.trust_cloudlet(),
    });
    let (view, cow, lineage) = match source {
        Source::View { of, lineage } => {
            (ViewSpec::Cow { saved: of.dir().to_path_buf(), readahead: cloudlet.readahead }, true, lineage)
        }
        Source::Overlay { manifest, base_memory, base_disk, packages, lineage } => {
            let file = place.dir.join("overlay-manifest.zst");
            std::fs::write(&file, manifest.encode()).map_err(|e| internal(format!("{}: {e}", file.display())))?;
            (
                ViewSpec::Overlay { manifest: file, base_memory, base_disk, readahead: cloudlet.readahead, packages },
                false,
                lineage,
            )
        }
    };
    let control = cloudlet.data.runtime_dir().map_err(internal)?.join(format!("shim-{}.sock", place.id));
    let spec = ShimSpec {
        format: forage_shim::protocol::SHIM_FORMAT,
        instance: place.id.to_string(),
        dir: place.dir.to_path_buf(),
        control,
        view: Some(view),
        relay,
    };
    let shim = ShimClient::spawn(&spec).await.map_err(internal)?;
    let service = match (&shim.hello.relay, &shim.hello.ca_sha256) {
        (Some(addr), Some(ca)) => {
            ServiceEndpoint { addr: addr.clone(), token: hex::encode(token), ca_sha256: ca.clone() }
        }
        _ => ServiceEndpoint::default(),
    };
    Ok(Prepared {
        place,
        shim: Arc::new(shim),
        forwards,
        service_port: ports.service,
        extra_ports: ports.extra.to_vec(),
        cow,
        lineage,
        service,
    })
}

impl<'a> Prepared<'a> {
    /// The shim (to feed an overlay's segments, or a handoff's chunks, before the resume).
    pub fn shim(&self) -> Arc<ShimClient> {
        self.shim.clone()
    }

    /// The view's snapshot folder (a copy-on-write view: its files are the mount's).
    pub fn view_snapshot(&self) -> Option<PathBuf> {
        self.cow.then(|| self.place.dir.join("view").join("snapshot"))
    }

    /// Restore the view's snapshot (a copy-on-write view's; for an overlay being
    /// assembled, `snap` names the mount's files), register the instance and record it.
    /// On failure the shim is shut down.
    pub async fn resume(self, snap: Option<&Snapshot>, ignore_shared: bool) -> Result<Instance, SessionError> {
        let own = match (self.view_snapshot(), snap) {
            (_, Some(_)) => None,
            (Some(dir), None) => Some(Snapshot::open(&dir).map_err(internal)),
            (None, None) => Some(Err(internal("an overlay's instance needs its launch snapshot"))),
        };
        let own = match own {
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => {
                let _ = self.shim.shutdown().await;
                return Err(e);
            }
            None => None,
        };
        let snap = snap.or(own.as_ref()).expect("one of them");
        let Prepared { place, shim, forwards, service_port, extra_ports, lineage, service, .. } = self;
        let cloudlet = place.cloudlet;
        let result = async {
            let run = place.dir.join("run");
            std::fs::create_dir_all(&run).map_err(internal)?;
            let qmp = cloudlet.data.runtime_dir().map_err(internal)?.join(format!("session-{}.qmp", place.id));
            let mut spec: VmSpec = snap.relocated_spec(&run, &qmp, Some(forwards.clone()));
            spec.memory_file = snap.memory_path();
            spec.disks[0].path = snap.disk_paths()[0].clone();
            let opts = RestoreOptions { copy_disks: false, ignore_shared, detached: true, ..Default::default() };
            let t = Instant::now();
            let vm =
                Vm::restore_with(snap, spec, cloudlet.accel, &run.join("qemu.log"), opts).await.map_err(internal)?;
            Ok::<_, SessionError>((vm, t.elapsed().as_millis() as u64))
        }
        .await;
        let (vm, resumed_after_ms) = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = shim.shutdown().await;
                return Err(e);
            }
        };
        let run = Running { vm, shim, service, resumed_after_ms, forwards, service_port, extra_ports };
        Ok(Instance::running(place, run, Some(lineage)).await)
    }
}

/// A QEMU started detached and its shim, about to become an instance.
pub(crate) struct Running {
    pub vm: Vm,
    pub shim: Arc<ShimClient>,
    pub service: ServiceEndpoint,
    pub resumed_after_ms: u64,
    pub forwards: Vec<PortForward>,
    pub service_port: Option<u16>,
    pub extra_ports: Vec<u16>,
}

impl Instance {
    /// A VM that runs (restored detached) becomes an instance: its shim watches QEMU, it
    /// is registered, recorded (for the operator and for a daemon that adopts it) and its
    /// session marked ready. `lineage: None`: it cannot move.
    pub(crate) async fn running(place: Place<'_>, run: Running, lineage: Option<Lineage>) -> Instance {
        let Running { mut vm, shim, service, resumed_after_ms, forwards, service_port, extra_ports } = run;
        if let Err(e) = shim.watch_qemu(vm.pid()).await {
            tracing::warn!(instance = place.id, "the shim does not watch QEMU: {e}");
        }
        // From here on the instance is the daemon's to end (or to adopt after a restart):
        // dropping it (the daemon exiting) leaves it running.
        vm.release();
        let instance =
            Instance::new(place, vm, shim, service, resumed_after_ms, forwards, service_port, extra_ports, lineage);
        instance.record(place);
        place.timing(Timing::Resumed(resumed_after_ms));
        if let Err(e) = place.cloudlet.state.session_ready(place.id, place.started.elapsed().as_millis() as u64) {
            tracing::debug!("{e}");
        }
        instance
    }
}

impl Instance {
    #[allow(clippy::too_many_arguments)]
    fn new(
        place: Place<'_>,
        vm: Vm,
        shim: Arc<ShimClient>,
        service: ServiceEndpoint,
        resumed_after_ms: u64,
        forwards: Vec<PortForward>,
        service_port: Option<u16>,
        extra_ports: Vec<u16>,
        lineage: Option<Lineage>,
    ) -> Self {
        let control = place.cloudlet.register(place.id, shim.clone());
        let idle = match (place.cloudlet.idle_timeout, service.addr.is_empty()) {
            (Some(t), false) => Some(tokio::spawn(watch_idle(shim.clone(), t, control.clone()))),
            _ => None,
        };
        Self {
            id: place.id.to_string(),
            vm,
            shim,
            endpoint: service.addr.clone(),
            service,
            resumed_after_ms,
            control,
            forwards,
            service_port,
            extra_ports,
            lineage,
            idle,
        }
    }

    /// An instance a previous daemon started (see `recover`).
    pub(crate) fn adopted(place: Place<'_>, vm: Vm, shim: Arc<ShimClient>, file: InstanceFile) -> Self {
        let lineage = file.saved.clone().map(|base| Lineage { base, disk_changed: file.disk_changed() });
        Self::new(place, vm, shim, file.service, 0, file.forwards, file.service_port, file.extra_ports, lineage)
    }

    /// The loopback address of guest port `guest_port`.
    pub fn local(&self, guest_port: u16) -> Option<SocketAddr> {
        self.forwards.iter().find(|f| f.guest_port == guest_port).map(|f| SocketAddr::from((f.host_addr, f.host_port)))
    }

    /// What tells a device its instance runs and how to reach its service.
    pub fn ready(&self) -> DeviceMessage {
        DeviceMessage::Ready { service: self.service.clone(), resumed_after_ms: self.resumed_after_ms }
    }

    /// Count the service's idleness from now (the instance is handed to its device).
    pub async fn touch(&self) {
        let _ = self.shim.touch_relay().await;
    }

    /// Record it (the state database, and `instance.json` for a daemon that adopts it).
    fn record(&self, place: Place<'_>) {
        let file = self.file();
        if let Err(e) = file.write(place.dir) {
            tracing::warn!(instance = place.id, "{e}: it will not survive a restart of the daemon");
        }
        let record = NewInstance {
            id: place.id.to_string(),
            session_id: place.id.to_string(),
            name: self.vm.spec().name.clone(),
            qemu_pid: self.vm.pid(),
            dir: place.dir.to_path_buf(),
            endpoint: self.endpoint.clone(),
        };
        if let Err(e) = place.cloudlet.state.instance_started(&record) {
            tracing::warn!("instance {} not recorded: {e}", place.id);
        }
    }

    /// What a later daemon needs to adopt this instance.
    fn file(&self) -> InstanceFile {
        let i = self;
        InstanceFile {
            format: record::FORMAT,
            id: i.id.clone(),
            qemu_pid: i.vm.pid(),
            spec: i.vm.spec().clone(),
            accel: i.vm.accel(),
            shim: i.shim.control().to_path_buf(),
            service: i.service.clone(),
            service_port: i.service_port,
            extra_ports: i.extra_ports.clone(),
            forwards: i.forwards.clone(),
            saved: i.lineage.as_ref().map(|l| l.base.clone()),
            disk_changed: i.lineage.as_ref().map(|l| record::ranges(&l.disk_changed)).unwrap_or_default(),
        }
    }

    /// Stop the VM and its shim (the view unmounted, the relay closed).
    pub async fn finish(self, cloudlet: &Cloudlet) {
        let Instance { id, vm, shim, idle, .. } = self;
        if let Some(i) = idle {
            i.abort();
        }
        let _ = vm.shutdown().await;
        let _ = shim.shutdown().await;
        cloudlet.unregister(&id);
    }
}

/// Ask `control` to end the instance once its relay carried nothing for `timeout`.
async fn watch_idle(shim: Arc<ShimClient>, timeout: Duration, control: Arc<Control>) {
    loop {
        let idle = match shim.status().await {
            Ok(s) => Duration::from_millis(s.relay_idle_ms.unwrap_or(0)),
            Err(_) => return,
        };
        if idle >= timeout {
            control.request(
                ErrorCode::Idle,
                format!("the instance was idle for {}s (no traffic to its service)", timeout.as_secs()),
            );
            return;
        }
        tokio::time::sleep((timeout - idle).clamp(Duration::from_millis(200), Duration::from_secs(5))).await;
    }
}

/// After Ready (and Complete): the instance lives until the device says Bye (or asks for
/// its residue) or goes away, or the instance is asked to stop (operator, idle timeout,
/// its shim or QEMU gone), to move, or (`docks`: the instance's own holder, not a device
/// that joined it) to dock. Checkpoints are answered with `usage`.
pub(crate) async fn hold(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    control: &Control,
    gone: impl std::future::Future<Output = ()>,
    usage: impl Fn(String) -> DeviceMessage,
    docks: bool,
) -> Result<Ending, SessionError> {
    tokio::pin!(gone);
    loop {
        tokio::select! {
            m = read::<DeviceMessage>(stream) => match m {
                Ok(DeviceMessage::Bye) | Err(ProtoError::Closed) => return Ok(Ending::Bye),
                Ok(DeviceMessage::WantResidue) => return Ok(Ending::Residue),
                Ok(DeviceMessage::Checkpoint { label }) => write(stream, &usage(label)).await?,
                // Its device asks it to move (a move order: the next turn carries it out).
                Ok(DeviceMessage::Follow { to }) => if let Err(message) = control.follow(&to) {
                    write(stream, &DeviceMessage::NotFollowed { message }).await?
                },
                Ok(other) => return Err(SessionError::Sequence { expected: "Bye, WantResidue, Checkpoint or Follow", got: other.name() }),
                Err(e) => return Err(e.into()),
            },
            _ = control.notified() => return Err(control.error()),
            _ = control.ordered(), if control.movable() => return Ok(Ending::Moving),
            _ = control.dock_ordered(), if docks => return Ok(Ending::Docking),
            _ = &mut gone => return Err(refused(ErrorCode::Internal, "the instance's VM stopped")),
        }
    }
}

impl Instance {
    /// Resolves when the VM or its shim is gone.
    pub async fn gone(&self) {
        tokio::select! {
            _ = self.vm.wait_exit() => {}
            _ = self.shim.closed() => {}
        }
    }
}

fn no_usage(label: String) -> DeviceMessage {
    DeviceMessage::Usage { label, blobs_accessed: 0, blobs: 0, demand_fetches: 0, segments_arrived: 0, segments: 0 }
}

/// Checkpoints of an instance without an overlay to report on: answered with no usage,
/// and noted for the session's breakdown.
pub(crate) fn checkpoints<'a>(place: Place<'a>) -> impl Fn(String) -> DeviceMessage + 'a {
    move |label| {
        place.checkpoint(&label);
        no_usage(label)
    }
}

/// Detach the FUSE mounts a session folder may hold: the early-start assembly's, and a
/// copy-on-write view's (normally the shim's; after a crash they stay behind).
pub(crate) fn unmount_session(dir: &Path) {
    unmount_stale(&dir.join("mnt"));
    unmount_stale(&dir.join("view").join("mnt"));
}

/// Detach a FUSE mount left behind (a crash, or a VM that kept its files open).
pub(crate) fn unmount_stale(mnt: &Path) {
    // No `exists()` check: a mount whose server died fails every stat (ENOTCONN).
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .is_ok_and(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(&*mnt.to_string_lossy())));
    if mounted {
        let _ =
            std::process::Command::new("fusermount3").arg("-uzq").arg(mnt).stderr(std::process::Stdio::null()).status();
    }
}
