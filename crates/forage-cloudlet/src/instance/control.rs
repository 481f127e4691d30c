//! How the rest of the cloudlet reaches a running instance: ask it to stop (with the
//! reason its device is given), order it to hand itself off, or to dock itself into a
//! substrate (`super::dock`). One order at a time: a dock under way refuses a move order
//! and the other way round.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use forage_proto::ErrorCode;
use tokio::sync::{oneshot, Notify};

use crate::error::SessionError;

/// An order to move an instance to another cloudlet (from the API).
pub(crate) struct MoveOrder {
    pub to: std::net::SocketAddr,
    pub options: crate::handoff::HandoffOptions,
    pub reply: oneshot::Sender<HandoffOutcome>,
    /// Where the pipeline's trace goes while it runs (the cloudlet's handoff board).
    pub sink: Option<forage_handoff::pipeline::TraceSink>,
}

pub(crate) struct Control {
    /// The instance's shim: its relay knows the service's traffic.
    shim: Arc<forage_shim::ShimClient>,
    notify: Notify,
    why: Mutex<Option<(ErrorCode, String)>>,
    movable: AtomicBool,
    order: Mutex<Option<MoveOrder>>,
    ordered: Notify,
    /// The outcome of the handoff the instance's device asked for (Follow), if pending.
    follow: Mutex<Option<oneshot::Receiver<HandoffOutcome>>>,
    /// The instance's life takes dock orders (its holder carries them out).
    dockable: AtomicBool,
    /// A dock order given and not yet carried out (or being carried out).
    docking: AtomicBool,
    dock: Mutex<Option<super::dock_order::DockOrder>>,
    dock_ordered: Notify,
}

type HandoffOutcome = Result<forage_api::HandoffReport, crate::handoff::HandoffError>;

impl Control {
    pub fn new(shim: Arc<forage_shim::ShimClient>) -> Self {
        Self {
            shim,
            notify: Notify::new(),
            why: Mutex::new(None),
            movable: Default::default(),
            order: Mutex::new(None),
            ordered: Notify::new(),
            follow: Mutex::new(None),
            dockable: Default::default(),
            docking: Default::default(),
            dock: Mutex::new(None),
            dock_ordered: Notify::new(),
        }
    }

    pub fn shim(&self) -> &Arc<forage_shim::ShimClient> {
        &self.shim
    }

    pub fn movable(&self) -> bool {
        self.movable.load(Ordering::SeqCst)
    }

    /// The instance's life takes move orders from now on (`handoff::live`).
    pub fn set_movable(&self, on: bool) {
        self.movable.store(on, Ordering::SeqCst)
    }

    /// Leave a move order; given back if one is pending already (or a dock is).
    pub fn order(&self, order: MoveOrder) -> Result<(), MoveOrder> {
        let mut slot = self.order.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() || self.docking.load(Ordering::SeqCst) {
            return Err(order);
        }
        *slot = Some(order);
        self.ordered.notify_one();
        Ok(())
    }

    pub async fn ordered(&self) {
        self.ordered.notified().await
    }

    /// The instance's device asks it to follow it to the cloudlet at `to`: a move order
    /// (reason `device`). Err: why not, for the device (NotFollowed).
    pub fn follow(&self, to: &str) -> Result<(), String> {
        let to: std::net::SocketAddr = to.parse().map_err(|_| format!("{to:?} is not HOST:PORT"))?;
        if !self.movable() {
            return Err("this instance cannot move yet (its overlay is still arriving)".into());
        }
        let (reply, answer) = oneshot::channel();
        let options =
            crate::handoff::HandoffOptions { reason: forage_api::HandoffReason::Device, ..Default::default() };
        self.order(MoveOrder { to, options, reply, sink: None })
            .map_err(|_| "a handoff of this instance is under way".to_string())?;
        tracing::info!(%to, "the device asks its instance to follow it");
        *self.follow.lock().unwrap_or_else(|p| p.into_inner()) = Some(answer);
        Ok(())
    }

    /// After a move order was carried out and the instance stayed: why, if its device
    /// asked for the move (what NotFollowed tells it).
    pub fn not_followed(&self) -> Option<String> {
        let mut answer = self.follow.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        match answer.try_recv() {
            Ok(Err(e)) => Some(forage_api::one_line(&e)),
            _ => None,
        }
    }

    pub fn take_order(&self) -> Option<MoveOrder> {
        self.order.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    pub fn dockable(&self) -> bool {
        self.dockable.load(Ordering::SeqCst)
    }

    /// The instance's life takes dock orders from now on (its holder carries them out).
    pub fn set_dockable(&self, on: bool) {
        self.dockable.store(on, Ordering::SeqCst)
    }

    /// Leave a dock order for the instance's life to carry out.
    pub fn order_dock(&self, order: super::dock_order::DockOrder) -> Result<(), super::dock_order::DockRefusal> {
        use super::dock_order::DockRefusal;
        // Under the move order's lock: a move order and a dock order exclude each other.
        let moving = self.order.lock().unwrap_or_else(|p| p.into_inner());
        if !self.dockable() {
            return Err(DockRefusal::NotDockable);
        }
        if moving.is_some() {
            return Err(DockRefusal::Moving);
        }
        if self.docking.swap(true, Ordering::SeqCst) {
            return Err(DockRefusal::Docking);
        }
        *self.dock.lock().unwrap_or_else(|p| p.into_inner()) = Some(order);
        self.dock_ordered.notify_one();
        Ok(())
    }

    pub async fn dock_ordered(&self) {
        self.dock_ordered.notified().await
    }

    pub fn take_dock(&self) -> Option<super::dock_order::DockOrder> {
        self.dock.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// A dock order was carried out and the instance runs on (it failed before the save):
    /// other orders may come.
    pub fn dock_failed(&self) {
        self.docking.store(false, Ordering::SeqCst)
    }

    /// Ask the instance to end; the first reason wins.
    pub fn request(&self, code: ErrorCode, why: impl Into<String>) {
        self.why.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert((code, why.into()));
        self.notify.notify_one();
    }

    /// The instance has ended for this reason (a dock saved its VM): it replaces one asked
    /// for before (an idle timeout that fired while the dock ran).
    pub fn ended(&self, code: ErrorCode, why: impl Into<String>) {
        *self.why.lock().unwrap_or_else(|p| p.into_inner()) = Some((code, why.into()));
        self.notify.notify_one();
    }

    pub async fn notified(&self) {
        self.notify.notified().await
    }

    /// Why the instance was asked to end.
    pub fn error(&self) -> SessionError {
        let (code, message) = self
            .why
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or((ErrorCode::Internal, "instance stopped".into()));
        tracing::info!("instance stopped: {message}");
        SessionError::Refused { code, message }
    }
}
