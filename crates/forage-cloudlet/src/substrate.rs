//! VM substrates (`forage_substrate`, `docs/substrates.md`) as a way to start an instance:
//! a device asks for one by name (`DeviceMessage::Activate`, see `provision`), and a
//! cached VM of a service starts from a substrate docked from that service when the pool
//! holds one (`forage substrate dock NAME --from service:ID`) instead of a copy-on-write
//! view of the service VM.
//!
//! ```text
//! checks: plain name, sizes within the host's limits, in the pool, has a service,
//!         host memory available now, activations at once
//! activate (detached QEMU, copy-on-write disk, NIC plugged, vCPUs and balloon grown)
//!   -> shim (relay only: no view) -> Instance (not movable: no saved VM to compare)
//! ```
//!
//! A refusal changes nothing: every check runs before anything is written, and a failed
//! activation stops its VM and leaves only the session folder, which the session removes.

use std::net::SocketAddr;
use std::sync::Arc;

use forage_image::RunPaths;
use forage_proto::ErrorCode;
use forage_shim::{RelaySpec, ShimClient, ShimSpec};
use forage_substrate::format::plain_name;
use forage_substrate::{ActivateError, ActivateRequest, Pool, PoolError};

use crate::error::{refused, SessionError};
use crate::instance::{new_token, Instance, Place, Running};
use crate::limits::ACTIVATIONS_AT_ONCE;

/// Host memory an activation leaves free: a request that would eat into it is `busy`.
const MEMORY_RESERVE_MIB: u64 = 256;

/// What an activation asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Wanted {
    pub substrate: String,
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// Why a substrate was not activated. The device gets [`ActivationError::code`] and the
/// one-line message.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ActivationError {
    #[error(transparent)]
    BadName(PoolError),
    #[error(transparent)]
    NotFound(PoolError),
    #[error("substrate {0} has no service port: a device would have nothing to reach")]
    NoService(String),
    #[error("{what} is over this cloudlet's limit of {limit} for one VM")]
    OverHost { what: String, limit: String },
    #[error("this cloudlet has {available} MiB of memory available; {asked} MiB asked leaves less than {MEMORY_RESERVE_MIB} MiB: try again later")]
    NoMemoryNow { available: u64, asked: u64 },
    #[error("this cloudlet activates {ACTIVATIONS_AT_ONCE} substrates at once already: try again later")]
    Busy,
    #[error("activating substrate {name}")]
    Activate {
        name: String,
        #[source]
        source: Box<ActivateError>,
    },
    #[error("starting the instance's service relay")]
    Shim(#[source] forage_shim::ShimError),
    #[error("the substrate pool")]
    Pool(#[source] PoolError),
    #[error("the cloudlet's runtime folder")]
    RuntimeDir(#[source] forage_datadir::DataDirError),
    #[error("the instance's service token")]
    Token(#[source] SessionError),
}

impl ActivationError {
    /// The device protocol's code for it (what the HTTP API would map to 400, 404, 409).
    pub fn code(&self) -> ErrorCode {
        match self {
            ActivationError::BadName(_) => ErrorCode::Protocol,
            ActivationError::NotFound(_) => ErrorCode::NotFound,
            ActivationError::NoService(_) | ActivationError::OverHost { .. } => ErrorCode::Provision,
            ActivationError::NoMemoryNow { .. } | ActivationError::Busy => ErrorCode::Busy,
            ActivationError::Activate { source, .. } => match &**source {
                ActivateError::Pool(PoolError::NotFound(_)) => ErrorCode::NotFound,
                ActivateError::TooBig { .. } | ActivateError::Refused { .. } => ErrorCode::Provision,
                ActivateError::Image { .. } | ActivateError::ImageMismatch { .. } => ErrorCode::NotFound,
                _ => ErrorCode::Internal,
            },
            ActivationError::Shim(_)
            | ActivationError::Pool(_)
            | ActivationError::RuntimeDir(_)
            | ActivationError::Token(_) => ErrorCode::Internal,
        }
    }
}

impl From<ActivationError> for SessionError {
    fn from(e: ActivationError) -> Self {
        refused(e.code(), forage_proto::one_line(&e))
    }
}

/// The substrate docked from service `service` (`--from service:ID`), at the largest
/// size it was docked for (the service VM's own), if the pool holds one. A substrate
/// whose manifest cannot be read is passed over (it would be refused at activation).
pub(crate) fn of_service(pool: &Pool, service: &str) -> Option<Wanted> {
    let label = format!("service:{service}");
    let summary = pool.summary().ok()?;
    summary.substrates.into_iter().find_map(|e| {
        let m = forage_substrate::format::read_manifest(&e.path).ok()?;
        (m.source == label).then(|| {
            let spec = &m.snapshot.spec;
            Wanted { substrate: e.name, vcpus: spec.max_vcpus.unwrap_or(spec.vcpus), memory_mib: spec.memory_mib }
        })
    })
}

/// Check `wanted` against what this cloudlet allows, before anything is written.
fn check(place: Place<'_>, pool: &Pool, wanted: &Wanted) -> Result<(), ActivationError> {
    if !plain_name(&wanted.substrate) {
        return Err(ActivationError::BadName(PoolError::BadName(wanted.substrate.chars().take(80).collect())));
    }
    let host = &place.cloudlet.limits.vm;
    if wanted.vcpus > host.vcpus {
        return Err(ActivationError::OverHost {
            what: format!("{} vCPUs", wanted.vcpus),
            limit: format!("{} vCPUs", host.vcpus),
        });
    }
    let host_mib = host.memory_bytes >> 20;
    if wanted.memory_mib > host_mib {
        return Err(ActivationError::OverHost {
            what: format!("{} MiB of memory", wanted.memory_mib),
            limit: format!("{host_mib} MiB"),
        });
    }
    let entry = pool.entry(&wanted.substrate).map_err(|e| match e {
        PoolError::NotFound(_) => ActivationError::NotFound(e),
        PoolError::BadName(_) => ActivationError::BadName(e),
        other => ActivationError::Pool(other),
    })?;
    // The manifest alone (the whole file is verified by the activation's decode).
    let m = forage_substrate::format::read_manifest(&entry.path).map_err(|source| ActivationError::Activate {
        name: wanted.substrate.clone(),
        source: Box::new(ActivateError::Refused { name: wanted.substrate.clone(), source }),
    })?;
    if m.service_port.is_none() {
        return Err(ActivationError::NoService(wanted.substrate.clone()));
    }
    // What it was docked for, checked here too (activation checks it again): a refusal
    // must not touch the pool (a read marks the substrate used, or reads it back in).
    let spec = &m.snapshot.spec;
    let (max_vcpus, docked_mib) = (spec.max_vcpus.unwrap_or(spec.vcpus), m.docked_memory_bytes.div_ceil(1 << 20));
    let too_big = |what| ActivationError::Activate {
        name: wanted.substrate.clone(),
        source: Box::new(ActivateError::TooBig { name: wanted.substrate.clone(), what }),
    };
    if wanted.vcpus == 0 || wanted.vcpus > max_vcpus {
        return Err(too_big(format!("1 to {max_vcpus} vCPUs, not {}", wanted.vcpus)));
    }
    if wanted.memory_mib < docked_mib || wanted.memory_mib > spec.memory_mib {
        return Err(too_big(format!("{docked_mib} to {} MiB of memory, not {}", spec.memory_mib, wanted.memory_mib)));
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let available = forage_substrate::dock::meminfo(&meminfo).1 >> 20;
    if available > 0 && wanted.memory_mib + MEMORY_RESERVE_MIB > available {
        return Err(ActivationError::NoMemoryNow { available, asked: wanted.memory_mib });
    }
    Ok(())
}

/// Activate `wanted` as this session's instance: its service relayed on the service
/// address like any other instance's. On failure nothing of it runs.
pub(crate) async fn start(place: Place<'_>, wanted: &Wanted) -> Result<Instance, ActivationError> {
    let cloudlet = place.cloudlet;
    let pool = Pool::open(&cloudlet.data).map_err(ActivationError::Pool)?;
    check(place, &pool, wanted)?;
    let _slot = cloudlet.activations.take(()).map_err(|_| ActivationError::Busy)?;
    let runtime = cloudlet.data.runtime_dir().map_err(ActivationError::RuntimeDir)?;
    let req = ActivateRequest {
        substrate: wanted.substrate.clone(),
        vcpus: wanted.vcpus,
        memory_mib: wanted.memory_mib,
        accel: cloudlet.accel,
        run: RunPaths { dir: place.dir.join("run"), qmp_socket: runtime.join(format!("session-{}.qmp", place.id)) },
        vm_name: format!("substrate-{}", place.id),
        detached: true,
    };
    let name = wanted.substrate.clone();
    let activated = forage_substrate::activate(&cloudlet.data, &pool, req)
        .await
        .map_err(|e| ActivationError::Activate { name: name.clone(), source: Box::new(e) })?;
    let r = &activated.report;
    tracing::info!(
        session = place.id,
        substrate = name,
        vcpus = r.guest_vcpus,
        mem_total_mib = r.guest_mem_total_bytes >> 20,
        first_response_ms = (r.first_response_seconds * 1000.0) as u64,
        total_ms = (r.total_seconds * 1000.0) as u64,
        "substrate activated"
    );
    let service_port = activated.manifest.service_port;
    let target = r.service_port.map(|(_, host)| SocketAddr::from(([127, 0, 0, 1], host)));
    let resumed_after_ms = (r.first_response_seconds * 1000.0) as u64;
    let (token, shim) = match relay(place, target, &runtime).await {
        Ok(s) => s,
        Err(e) => {
            let _ = activated.vm.shutdown().await;
            return Err(e);
        }
    };
    let service = match (&shim.hello.relay, &shim.hello.ca_sha256) {
        (Some(addr), Some(ca)) => {
            forage_proto::ServiceEndpoint { addr: addr.clone(), token: hex::encode(token), ca_sha256: ca.clone() }
        }
        _ => forage_proto::ServiceEndpoint::default(),
    };
    let run = Running {
        vm: activated.vm,
        shim: Arc::new(shim),
        service,
        resumed_after_ms,
        forwards: activated.forwards,
        service_port,
        extra_ports: vec![forage_agent::AGENT_PORT],
    };
    // No lineage: no saved VM another cloudlet holds to compare it with, so it stays.
    Ok(Instance::running(place, run, None).await)
}

/// A shim that relays the service (and serves no view: the activated VM runs on files
/// of its own).
async fn relay(
    place: Place<'_>,
    target: Option<SocketAddr>,
    runtime: &std::path::Path,
) -> Result<([u8; forage_proto::service::TOKEN_BYTES], ShimClient), ActivationError> {
    let cloudlet = place.cloudlet;
    let token = new_token().map_err(ActivationError::Token)?;
    let relay = target.map(|target| RelaySpec {
        listen: cloudlet.service_addr,
        port: 0,
        target,
        token: hex::encode(token),
        trust: cloudlet.data.trust_cloudlet(),
    });
    let spec = ShimSpec {
        format: forage_shim::protocol::SHIM_FORMAT,
        instance: place.id.to_string(),
        dir: place.dir.to_path_buf(),
        control: runtime.join(format!("shim-{}.sock", place.id)),
        view: None,
        relay,
    };
    let shim = ShimClient::spawn(&spec).await.map_err(ActivationError::Shim)?;
    Ok((token, shim))
}
