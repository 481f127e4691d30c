//! The four provisioning mechanisms besides VM synthesis (tactical cloudlets). Each one
//! ends in the same place as a synthesis: an instance resumed from a VM the cloudlet holds,
//! its service relayed on the service address, Ready sent, and the same life (`hold`):
//!
//! - **cached VM**: a copy-on-write view of the service VM (`forage_synth::cow`: nothing is
//!   copied, every instance starts from the same saved state), or, with `join`, the running
//!   shared instance of that service;
//! - **cloudlet push**: the same, for the service of a client app from the app store;
//! - **on-demand**: a copy-on-write view of the baseline VM of the requested OS; the
//!   script runs inside the guest through the guest agent (never on the host), killed at
//!   its time limit; Ready once the service port answers in the guest;
//! - **application virtualization**: the packed application is checked (closure, OS),
//!   copied into a view of the baseline VM of its OS and started through its own loader.
//!
//! A cached VM (and a push) starts from a substrate docked from the service when the
//! pool holds one (`substrate`), and a device may ask for a substrate by name
//! ([`activate`]).
//!
//! Any failure stops the VM and removes the view; the device gets an Error naming why.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forage_agent::app::AppPackage;
use forage_agent::{AgentClient, AGENT_PORT};
use forage_proto::asynchronous::write;
use forage_proto::{DeviceMessage, ErrorCode, Provision};
use forage_service::appvirt::AppBundle;
use forage_service::{ServiceError, ServiceVm};
use forage_state::{NewSession, SessionMode};
use tokio::sync::Notify;

use crate::error::{internal, refused, SessionError};
use crate::instance::{
    checkpoints, hold, prepare, Ending, Instance, Lineage, Outcome, Place, Ports, SharedInstance, Source,
};

/// Longest wait for a provisioned service to listen after its start.
const SERVICE_WAIT: Duration = Duration::from_secs(60);

fn not_found(e: ServiceError) -> SessionError {
    refused(ErrorCode::NotFound, e.to_string())
}

pub(crate) async fn run(
    stream: &mut crate::DeviceStream,
    place: Place<'_>,
    device: &str,
    request: Provision,
) -> Result<Outcome, SessionError> {
    let cloudlet = place.cloudlet;
    let mode = match &request {
        Provision::CachedVm { .. } => SessionMode::CachedVm,
        Provision::Push { .. } => SessionMode::CloudletPush,
        Provision::Script { .. } => SessionMode::OnDemand,
        Provision::App { .. } => SessionMode::AppVirtualization,
    };
    tracing::info!(session = place.id, device, mechanism = request.mechanism(), "provisioning session");
    let what = match &request {
        Provision::CachedVm { service, .. } => service.clone(),
        Provision::Push { app } => app.clone(),
        Provision::Script { os, .. } => os.clone(),
        Provision::App { .. } => "app bundle".into(),
    };
    let record = NewSession {
        id: place.id.into(),
        device: device.into(),
        base_digest: String::new(),
        overlay_digest: what,
        mode,
    };
    if let Err(e) = cloudlet.state.session_started(&record) {
        tracing::warn!("session {} not recorded: {e}", place.id);
    }
    if let Provision::Script { port: AGENT_PORT, .. } = &request {
        return Err(refused(
            ErrorCode::Provision,
            format!("guest port {AGENT_PORT} is the guest agent's, never a service port"),
        ));
    }
    match request {
        Provision::CachedVm { service, join } => {
            let svc = cloudlet.services.open(&service).map_err(not_found)?;
            cached_vm(stream, place, &svc, join).await
        }
        Provision::Push { app } => {
            let (svc, _) = cloudlet.services.app(&app).map_err(not_found)?;
            cached_vm(stream, place, &svc, false).await
        }
        Provision::Script { os, port, script, timeout_s, components } => {
            let limit = Duration::from_secs(timeout_s as u64);
            if limit > cloudlet.max_script_time || timeout_s == 0 {
                return Err(refused(
                    ErrorCode::Provision,
                    format!(
                        "a script time limit of {timeout_s}s is outside 1..={}s",
                        cloudlet.max_script_time.as_secs()
                    ),
                ));
            }
            let baseline = cloudlet.services.baseline(&os).map_err(not_found)?;
            let parts = components
                .iter()
                .map(|c| cloudlet.services.component(c).map(|p| (c.clone(), p)))
                .collect::<Result<Vec<_>, _>>()
                .map_err(not_found)?;
            let setup = move |agent: &mut AgentClient| {
                for (name, path) in &parts {
                    for (abs, rel) in forage_service::files_under(path) {
                        agent
                            .put_file(&abs, &format!("/opt/components/{name}/{}", rel.display()))
                            .map_err(|e| format!("copying component {name} into the guest: {e}"))?;
                    }
                }
                run_script(agent, &script, limit, port)
            };
            provisioned(stream, place, &baseline, port, setup).await
        }
        Provision::App { package } => {
            let bundle = AppBundle::open(&package).map_err(|e| refused(ErrorCode::Provision, e.to_string()))?;
            let baseline = match cloudlet.services.baseline(&bundle.manifest.os) {
                Ok(b) => b,
                Err(_) => {
                    let held: Vec<String> = cloudlet
                        .services
                        .list()
                        .into_iter()
                        .filter(|s| s.manifest().is_baseline())
                        .map(|s| s.manifest().os.clone())
                        .collect();
                    return Err(refused(
                        ErrorCode::Provision,
                        format!(
                            "the app was packed on {} and this cloudlet has VMs of {} only",
                            bundle.manifest.os,
                            if held.is_empty() { "no OS".into() } else { held.join(", ") }
                        ),
                    ));
                }
            };
            bundle.check_os(&baseline.manifest().os).map_err(|e| refused(ErrorCode::Provision, e.to_string()))?;
            let app_dir = place.dir.join("app");
            bundle.unpack_as_app(&app_dir).map_err(internal)?;
            let app = AppPackage::open(&app_dir).map_err(|e| refused(ErrorCode::Provision, e.to_string()))?;
            let port = bundle.manifest.port;
            let setup = move |agent: &mut AgentClient| {
                app.install(agent).map_err(|e| format!("deploying the app: {e}"))?;
                wait_listening(agent, port, SERVICE_WAIT)
            };
            provisioned(stream, place, &baseline, port, setup).await
        }
    }
}

/// Start a copy-on-write instance of the service VM `svc` (its shim serves the view).
async fn start_view(
    place: Place<'_>,
    svc: &ServiceVm,
    service_port: Option<u16>,
    extra: &[u16],
) -> Result<Instance, SessionError> {
    let saved = svc.snapshot().map_err(internal)?;
    let ports = Ports { service: service_port, extra, token: None };
    let source = Source::View { of: &saved, lineage: Lineage::of(&saved) };
    let prepared = prepare(place, source, &saved.manifest().spec, ports).await?;
    prepared.resume(None, true).await
}

/// An instance of service `svc`: activated from the substrate docked from it, if the
/// pool holds one, else (or if that activation fails) a copy-on-write view of the service
/// VM. The log says which path it took.
async fn start_service(place: Place<'_>, svc: &ServiceVm, port: u16) -> Result<Instance, SessionError> {
    let pool = forage_substrate::Pool::open(&place.cloudlet.data);
    let docked = pool.ok().and_then(|p| crate::substrate::of_service(&p, svc.id()));
    if let Some(wanted) = docked {
        let t = Instant::now();
        match crate::substrate::start(place, &wanted).await {
            Ok(i) => {
                tracing::info!(
                    session = place.id,
                    service = svc.id(),
                    substrate = wanted.substrate,
                    path = "substrate",
                    took_ms = t.elapsed().as_millis() as u64,
                    "service started from its substrate"
                );
                return Ok(i);
            }
            Err(e) => tracing::warn!(
                session = place.id,
                service = svc.id(),
                substrate = wanted.substrate,
                "the service's substrate did not activate ({}): starting a view of the service VM",
                forage_proto::one_line(&e)
            ),
        }
    }
    let t = Instant::now();
    let instance = start_view(place, svc, Some(port), &[]).await?;
    tracing::info!(
        session = place.id,
        service = svc.id(),
        path = "copy-on-write view",
        took_ms = t.elapsed().as_millis() as u64,
        "service started from its service VM"
    );
    Ok(instance)
}

/// A device's Activate: the substrate it named, at the size it asked for, as its
/// instance; Ready, then the instance's life (it does not move: see `substrate`).
pub(crate) async fn activate(
    stream: &mut crate::DeviceStream,
    place: Place<'_>,
    device: &str,
    wanted: crate::substrate::Wanted,
) -> Result<Outcome, SessionError> {
    let cloudlet = place.cloudlet;
    tracing::info!(
        session = place.id,
        device,
        substrate = %wanted.substrate.chars().take(64).collect::<String>(),
        vcpus = wanted.vcpus,
        memory_mib = wanted.memory_mib,
        "substrate activation session"
    );
    // What it started from (the overlay field of the record) names the substrate.
    let record = NewSession {
        id: place.id.into(),
        device: device.into(),
        base_digest: String::new(),
        overlay_digest: format!("substrate:{}", wanted.substrate.chars().take(64).collect::<String>()),
        mode: SessionMode::Substrate,
    };
    if let Err(e) = cloudlet.state.session_started(&record) {
        tracing::warn!("session {} not recorded: {e}", place.id);
    }
    let instance = crate::substrate::start(place, &wanted).await?;
    let result = ready_then_hold(stream, place, &instance).await;
    instance.finish(cloudlet).await;
    result.map(|_| Outcome { bytes: 0 })
}

async fn cached_vm(
    stream: &mut crate::DeviceStream,
    place: Place<'_>,
    svc: &ServiceVm,
    join: bool,
) -> Result<Outcome, SessionError> {
    let cloudlet = place.cloudlet;
    let port = svc
        .manifest()
        .port
        .ok_or_else(|| refused(ErrorCode::NotFound, format!("{} is a baseline VM without a service", svc.id())))?;
    if join {
        let existing = cloudlet.shared.lock().unwrap_or_else(|p| p.into_inner()).get(svc.id()).cloned();
        if let Some(shared) = existing {
            shared.users.fetch_add(1, Ordering::SeqCst);
            tracing::info!(
                session = place.id,
                service = svc.id(),
                endpoint = shared.endpoint,
                "joining the running instance"
            );
            let result = async {
                write(stream, &DeviceMessage::Ready { service: shared.service.clone(), resumed_after_ms: 0 }).await?;
                hold(stream, &shared.control, std::future::pending(), checkpoints(place), false).await
            }
            .await;
            if shared.users.fetch_sub(1, Ordering::SeqCst) == 1 {
                shared.released.notify_one();
            }
            return result.map(|_| Outcome { bytes: 0 });
        }
    }
    let instance = start_service(place, svc, port).await?;
    let shared = join.then(|| {
        let s = Arc::new(SharedInstance {
            endpoint: instance.endpoint.clone(),
            service: instance.service.clone(),
            users: AtomicUsize::new(1),
            released: Notify::new(),
            control: instance.control.clone(),
        });
        cloudlet.shared.lock().unwrap_or_else(|p| p.into_inner()).insert(svc.id().to_string(), s.clone());
        s
    });
    // A shared instance has several devices: it does not move; nor does one without a
    // saved VM to compare it with (a substrate's).
    let result = match (&shared, &instance.lineage) {
        (None, Some(_)) => ready_then_live(stream, place, &instance).await,
        _ => ready_then_hold(stream, place, &instance).await,
    };
    if let Some(shared) = shared {
        // The instance lives on while devices that joined it are still there.
        if shared.users.fetch_sub(1, Ordering::SeqCst) > 1 && result.is_ok() {
            tracing::info!(session = place.id, "devices still use the shared instance: keeping it");
            tokio::select! {
                _ = shared.released.notified() => {}
                _ = instance.control.notified() => {}
            }
        }
        cloudlet.shared.lock().unwrap_or_else(|p| p.into_inner()).remove(svc.id());
        shared.control.request(ErrorCode::Internal, "the shared instance ended");
    }
    instance.finish(cloudlet).await;
    result.map(|_: Ending| Outcome { bytes: 0 })
}

/// Start a view of `baseline` with the agent and `port` forwarded, run `setup` in the
/// guest, then Ready and the instance's life.
async fn provisioned(
    stream: &mut crate::DeviceStream,
    place: Place<'_>,
    baseline: &ServiceVm,
    port: u16,
    setup: impl FnOnce(&mut AgentClient) -> Result<(), String> + Send + 'static,
) -> Result<Outcome, SessionError> {
    let instance = start_view(place, baseline, Some(port), &[AGENT_PORT]).await?;
    let agent_addr: SocketAddr = instance.local(AGENT_PORT).expect("agent port forwarded");
    let result = async {
        let t = Instant::now();
        let setup = tokio::task::spawn_blocking(move || {
            let mut agent =
                AgentClient::connect(agent_addr, Duration::from_secs(30)).map_err(|e| format!("guest agent: {e}"))?;
            setup(&mut agent)
        });
        tokio::select! {
            r = setup => r.expect("no panic").map_err(|e| refused(ErrorCode::Provision, e))?,
            _ = instance.control.notified() => return Err(instance.control.error()),
        }
        tracing::info!(session = place.id, took_ms = t.elapsed().as_millis() as u64, "provisioned");
        instance.touch().await; // idle from now on, not from the resume
        ready_then_live(stream, place, &instance).await
    }
    .await;
    instance.finish(place.cloudlet).await;
    result.map(|_| Outcome { bytes: 0 })
}

/// Tell the device where its service is, then the life of a movable instance.
async fn ready_then_live(
    stream: &mut crate::DeviceStream,
    place: Place<'_>,
    instance: &Instance,
) -> Result<Ending, SessionError> {
    write(stream, &instance.ready()).await?;
    instance.control.set_movable(true);
    crate::handoff::live(Some(stream), place, instance).await
}

/// Tell the device where its service is, then the instance's life (docked when ordered:
/// a dock that fails before the save leaves it running).
async fn ready_then_hold(
    stream: &mut crate::DeviceStream,
    place: Place<'_>,
    instance: &Instance,
) -> Result<Ending, SessionError> {
    write(stream, &instance.ready()).await?;
    instance.control.set_dockable(true);
    let held = loop {
        match hold(stream, &instance.control, instance.gone(), checkpoints(place), true).await {
            Ok(Ending::Docking) => match crate::instance::dock::carry_out(place, instance).await {
                crate::instance::dock::Docked::Stayed => continue,
                crate::instance::dock::Docked::Ended(e) => break Err(e),
            },
            other => break other,
        }
    };
    instance.control.set_dockable(false);
    held
}

/// Copy the script into the guest and run it there with `limit`; then wait (in what is
/// left of the limit, at least 5 s) until something listens on `port`.
fn run_script(agent: &mut AgentClient, script: &[u8], limit: Duration, port: u16) -> Result<(), String> {
    let t = Instant::now();
    agent
        .put_bytes(script, "/tmp/forage-provision.sh", 0o755)
        .map_err(|e| format!("copying the script into the guest: {e}"))?;
    let out = agent.exec(&["sh", "/tmp/forage-provision.sh"], limit).map_err(|e| format!("running the script: {e}"))?;
    if out.timed_out {
        return Err(format!("the provisioning script ran over its time limit of {}s and was killed", limit.as_secs()));
    }
    if out.code != 0 {
        let tail: String =
            out.stderr.lines().rev().take(3).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(" | ");
        return Err(format!("the provisioning script exited with {}: {tail}", out.code));
    }
    wait_listening(agent, port, limit.saturating_sub(t.elapsed()).max(Duration::from_secs(5)))
}

/// Until a TCP connect to `port` inside the guest succeeds.
fn wait_listening(agent: &mut AgentClient, port: u16, wait: Duration) -> Result<(), String> {
    let t = Instant::now();
    while t.elapsed() < wait {
        if agent.listening(port).unwrap_or(false) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("nothing listens on guest port {port} after {}s", wait.as_secs()))
}
