//! What a handoff is asked (its options) and why one did not happen: the types the API
//! and an instance's control share with the handoff itself.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use forage_proto::ProtoError;

/// How to hand off.
#[derive(Debug, Clone)]
pub struct HandoffOptions {
    /// A static operating mode (e.g. `xor+zstd-1`); none: adaptive.
    pub mode: Option<String>,
    /// QEMU's `downtime-limit`: iterations stop once the rest would take this long.
    pub downtime_limit_ms: u64,
    /// Why it moves: logged with the handoff.
    pub reason: forage_api::HandoffReason,
}

impl Default for HandoffOptions {
    fn default() -> Self {
        Self { mode: None, downtime_limit_ms: 1000, reason: forage_api::HandoffReason::Operator }
    }
}

/// Why a handoff did not happen.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("no running instance {0} on this cloudlet")]
    NoInstance(String),
    #[error("instance {0} cannot be handed off now: an early-start instance moves once its overlay has all arrived, a shared (joined) one not at all")]
    NotMovable(String),
    #[error("instance {0} is already being handed off")]
    Busy(String),
    #[error("operating mode {mode:?}: {detail}")]
    BadMode { mode: String, detail: String },
    #[error(
        "handoff of {instance} to {to}: the destination did not say whether it runs the instance; it was stopped here"
    )]
    Unresolved {
        instance: String,
        to: SocketAddr,
        #[source]
        cause: HandoffFailure,
    },
    #[error("handoff of {instance} to {to} failed (the instance keeps running here)")]
    Failed {
        instance: String,
        to: SocketAddr,
        #[source]
        cause: HandoffFailure,
    },
    #[error("instance {0} ended before its handoff")]
    Ended(String),
}

/// Why a handoff failed (the instance runs on at the source).
#[derive(Debug, thiserror::Error)]
pub enum HandoffFailure {
    #[error("the instance does not say what it was made from (an instance adopted from an older record)")]
    NotMovable,
    #[error("the saved VM the instance was made from, {}", path.display())]
    Lineage {
        path: PathBuf,
        #[source]
        source: Box<forage_vm::SnapshotError>,
    },
    #[error(transparent)]
    Link(crate::peer_link::PeerLinkError),
    #[error("the connection to the destination")]
    Wire(#[source] ProtoError),
    #[error("the destination was silent for {0:?}")]
    Silent(Duration),
    #[error("the destination refused: {0}")]
    Refused(String),
    #[error("the destination sent {got} where {expected} was due")]
    Unexpected { expected: &'static str, got: &'static str },
    #[error("the destination acknowledged nothing for {}s (link cut or destination gone)", .0.as_secs())]
    Stalled(Duration),
    #[error("the destination said it resumed the VM before the commit")]
    EarlyDone,
    #[error("the destination did not resume the VM in {}s", .0.as_secs())]
    NotResumed(Duration),
    #[error("the destination never resumed the VM: {0}")]
    NotThere(String),
    #[error("cloudlet {to} did not say in {}s whether it runs the VM after its commit: the VM was stopped here, at most one copy runs", waited.as_secs())]
    Unresolved { to: SocketAddr, waited: Duration },
    #[error("QEMU")]
    Qemu(#[source] forage_vm::qmp::QmpError),
    #[error("QEMU did not connect its migration stream")]
    NoStream,
    #[error("QEMU's migration ended {0}")]
    Migration(String),
    #[error("QEMU's migration stream")]
    Stream(#[source] forage_handoff::migration::SplitError),
    #[error("the VM's remaining state: {0}")]
    Residual(String),
    #[error("the instance's view")]
    View(#[source] forage_shim::ShimError),
    #[error("the pipeline")]
    Pipeline(#[source] std::io::Error),
    #[error("the pipeline stopped")]
    Stopped,
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl HandoffFailure {
    /// Whether the VM may (and does) run on at the source: not once the source has sent
    /// its commit and never heard whether the destination resumed it.
    pub fn vm_runs_here(&self) -> bool {
        !matches!(self, HandoffFailure::Unresolved { .. })
    }
}
