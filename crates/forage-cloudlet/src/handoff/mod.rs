//! VM handoff: a running copy-on-write instance moves to another cloudlet (the VM
//! handoff paper). The source drives QEMU's own live migration into a local socket,
//! parses the stream page by page, and sends guest RAM and the disk chunks written since
//! launch through the adaptive pipeline of `forage-handoff` (dedup against the base,
//! delta, compression, in segments of about 1 MiB). QEMU's dirty tracking drives the
//! iterations; forage holds QEMU's last round back until what is left fits the downtime
//! limit (`steering`, where QEMU tracks every write: see `forage_vm::spec::RAM_TAIL_KIB`
//! for the QEMU 7.2 TCG bug that decides it). The rest of the
//! stream (ROM blocks, device state) is sent last; the destination rebuilds the VM from
//! its base (or from nothing) and resumes it only once everything has arrived and applied.
//!
//! The messages are the peer protocol's (`forage_proto::peer`, with its sequence
//! diagram); afterwards the source tells the device Moved {cloudlet, service}.
//!
//! Any failure before HandoffDone (link cut, destination gone, bad stream): the source
//! cancels the migration and its VM runs on (`cont` if QEMU had stopped it); the
//! destination's session folder, with every partial file, is removed.

mod arrival;
mod board;
mod destination;
mod feed;
mod live;
mod order;
mod sampling;
mod source;
mod steering;

use std::net::SocketAddr;

use forage_api::HandoffReport;
use tokio::sync::oneshot;

use crate::instance::control::MoveOrder;
use crate::Cloudlet;

pub(crate) use arrival::{fate, Fate};
pub use board::HandoffBoard;
pub(crate) use destination::receive;
pub(crate) use live::{carry_out, live, Carried};
pub use order::{HandoffError, HandoffFailure, HandoffOptions};

impl Cloudlet {
    /// Move instance `id` to the cloudlet at `to` (paired with this one as a cloudlet).
    /// Returns when the instance runs there, or has failed to move and runs on here.
    pub async fn handoff(
        &self,
        id: &str,
        to: SocketAddr,
        options: HandoffOptions,
    ) -> Result<HandoffReport, HandoffError> {
        if let Some(m) = &options.mode {
            forage_handoff::adapt::parse_mode(m).map_err(|detail| HandoffError::BadMode { mode: m.clone(), detail })?;
        }
        let control = self.instance_control(id).ok_or_else(|| HandoffError::NoInstance(id.into()))?;
        if !control.movable() {
            return Err(HandoffError::NotMovable(id.into()));
        }
        let (reply, answer) = oneshot::channel();
        if control.order(MoveOrder { to, options, reply, sink: None }).is_err() {
            return Err(HandoffError::Busy(id.into()));
        }
        answer.await.map_err(|_| HandoffError::Ended(id.into()))?
    }
}
