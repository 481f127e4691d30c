//! VM handoff: a running copy-on-write instance moves to another cloudlet (the VM
//! handoff paper). The source drives QEMU's own live migration into a local socket,
//! parses the stream page by page, and sends guest RAM and the disk chunks written since
//! launch through the adaptive pipeline of `forage-handoff` (dedup against the base,
//! delta, compression, in segments of about 1 MiB). QEMU's dirty tracking drives the
//! iterations and its `downtime-limit` (default 2 s) ends them; its bandwidth estimate
//! counts the unchanged pages we skip, so it tends to stop the VM early (see
//! `docs/handoff-protocol.md` for why forage does not hold it back). The rest of the stream (ROM blocks, device state) is
//! sent last; the destination rebuilds the VM from its base (or from nothing) and resumes
//! it only once everything has arrived and applied.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant S as source cloudlet
//!     participant D as destination cloudlet
//!     S->>D: Hello {no offers}    (TLS 1.3, S paired with D as a cloudlet)
//!     D->>S: Welcome
//!     S->>D: HandoffBegin {base's state digest, VM description, ports}
//!     D->>S: HandoffAccept {has_base} | Error
//!     S->>D: HandoffFile {kernel, initrd}...   (only without the base)
//!     Note over S: QEMU migrates into a local socket; the VM runs meanwhile
//!     S->>D: HandoffSegment {seq, bytes}...   (disk chunks, RAM rounds)
//!     D->>S: HandoffAck {seq, bytes}...   (bandwidth for the adaptation)
//!     Note over S: QEMU stops the VM for its last round (downtime starts)
//!     S->>D: HandoffCommit {segments, ROM + device state}
//!     Note over D: every segment applied: resume
//!     D->>S: HandoffDone {service endpoint, token, CA}
//!     S-->>device: Moved {cloudlet, service endpoint, token, CA}
//!     Note over S: the source VM and its files are removed
//! ```
//!
//! Any failure before HandoffDone (link cut, destination gone, bad stream): the source
//! cancels the migration and its VM runs on (`cont` if QEMU had stopped it); the
//! destination's session folder, with every partial file, is removed.

mod destination;
mod source;

use std::net::SocketAddr;

use forage_handoff::pipeline::TraceRow;
use forage_proto::asynchronous::write;
use forage_proto::Message;
use forage_synth::cow::CowView;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::residue::Ending;
use crate::session::{hold, no_usage, Instance, Place, SessionError};
use crate::{Cloudlet, DeviceStream};

pub(crate) use destination::receive;

/// How to hand off.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandoffOptions {
    /// A static operating mode (e.g. `xor+zstd-1`); none: adaptive.
    #[serde(default)]
    pub mode: Option<String>,
    /// QEMU's `downtime-limit`: iterations stop once the rest would take this long.
    #[serde(default = "default_downtime_ms")]
    pub downtime_limit_ms: u64,
}

fn default_downtime_ms() -> u64 {
    2000
}

impl Default for HandoffOptions {
    fn default() -> Self {
        Self { mode: None, downtime_limit_ms: default_downtime_ms() }
    }
}

/// What a handoff did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandoffReport {
    pub instance: String,
    pub to: String,
    /// Where the service answers now.
    pub endpoint: String,
    /// SHA-256 of the destination's CA (its relay's certificate chains to it).
    pub ca_sha256: String,
    /// What the device is told to reach it (its token included): not for the operator.
    #[serde(skip)]
    pub service: forage_proto::ServiceEndpoint,
    pub has_base: bool,
    pub total_s: f64,
    /// From the VM's stop at the source to its resume at the destination.
    pub downtime_s: f64,
    /// Bytes sent: segments, the final state, boot files.
    pub bytes: u64,
    /// Distinct memory and disk chunks that differ from the base VM, in bytes.
    pub modified_bytes: u64,
    pub memory_pages: u64,
    pub disk_chunks: u64,
    pub segments: u64,
    pub state_bytes: u64,
    pub boot_file_bytes: u64,
    /// QEMU's dirty-memory synchronisations (its iterations).
    pub qemu_rounds: u64,
    pub mode: String,
    pub switches: Vec<String>,
    pub trace: Vec<TraceRow>,
}

/// A request, from the API, to move an instance.
pub(crate) struct HandoffOrder {
    pub to: SocketAddr,
    pub options: HandoffOptions,
    pub reply: oneshot::Sender<Result<HandoffReport, String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("no running instance {0} on this cloudlet")]
    NoInstance(String),
    #[error("instance {0} cannot be handed off: only copy-on-write instances of service VMs move (cached VM, push, on-demand, app), not synthesized or shared ones")]
    NotMovable(String),
    #[error("instance {0} is already being handed off")]
    Busy(String),
    #[error("handoff of {instance} to {to} failed: {detail} (the instance keeps running here)")]
    Failed { instance: String, to: SocketAddr, detail: String },
}

impl Cloudlet {
    /// Move instance `id` to the cloudlet at `to` (paired with this one as a cloudlet).
    /// Returns when the instance runs there, or has failed to move and runs on here.
    pub async fn handoff(&self, id: &str, to: SocketAddr, options: HandoffOptions) -> Result<HandoffReport, HandoffError> {
        let stop = self.instance_control(id).ok_or_else(|| HandoffError::NoInstance(id.into()))?;
        if !stop.movable() {
            return Err(HandoffError::NotMovable(id.into()));
        }
        let (reply, answer) = oneshot::channel();
        if !stop.order(HandoffOrder { to, options, reply }) {
            return Err(HandoffError::Busy(id.into()));
        }
        let failed = |detail: String| HandoffError::Failed { instance: id.into(), to, detail };
        match answer.await {
            Ok(Ok(report)) => Ok(report),
            Ok(Err(detail)) => Err(failed(detail)),
            Err(_) => Err(failed("the instance ended first".into())),
        }
    }
}

/// What a movable instance is made of besides its VM.
pub(crate) struct Movable<'a> {
    pub view: &'a CowView,
    pub service_port: Option<u16>,
    pub extra_ports: &'a [u16],
}

/// The life of a movable instance: as `hold` (with its device, if it has one), and
/// handoffs when asked. A handoff that fails leaves the instance running and its life
/// goes on; one that succeeds tells the device where its service went and ends it.
pub(crate) async fn live(mut device: Option<&mut DeviceStream>, place: Place<'_>, instance: &Instance, movable: Movable<'_>) -> Result<Ending, SessionError> {
    loop {
        let ending = match device.as_deref_mut() {
            Some(stream) => hold(stream, &instance.stop, no_usage).await?,
            None => tokio::select! {
                _ = instance.stop.notified() => return Err(instance.stop.error()),
                _ = instance.stop.ordered() => Ending::Moving,
            },
        };
        if ending != Ending::Moving {
            return Ok(ending);
        }
        let Some(order) = instance.stop.take_order() else { continue };
        tracing::info!(instance = place.id, to = %order.to, "handoff starts");
        match source::send(place, instance, &movable, &order).await {
            Ok(report) => {
                tracing::info!(instance = place.id, to = %order.to, total_s = report.total_s, downtime_s = report.downtime_s, bytes = report.bytes, "handoff done");
                if let Some(stream) = device.as_deref_mut() {
                    let moved = Message::Moved { cloudlet: order.to.to_string(), service: report.service.clone() };
                    let _ = write(stream, &moved).await;
                }
                let _ = order.reply.send(Ok(report));
                return Ok(Ending::Moved);
            }
            Err(detail) => {
                tracing::warn!(instance = place.id, to = %order.to, "handoff failed, the instance runs on here: {detail}");
                let _ = order.reply.send(Err(detail));
            }
        }
    }
}
