//! How the rest of the cloudlet reaches a running instance: ask it to stop (with the
//! reason its device is given), or order it to hand itself off.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use forage_proto::ErrorCode;
use tokio::sync::{oneshot, Notify};

use crate::error::SessionError;

/// An order to move an instance to another cloudlet (from the API).
pub(crate) struct MoveOrder {
    pub to: std::net::SocketAddr,
    pub options: crate::handoff::HandoffOptions,
    pub reply: oneshot::Sender<HandoffOutcome>,
}

pub(crate) struct Control {
    notify: Notify,
    why: Mutex<Option<(ErrorCode, String)>>,
    movable: AtomicBool,
    order: Mutex<Option<MoveOrder>>,
    ordered: Notify,
    /// The outcome of the handoff the instance's device asked for (Follow), if pending.
    follow: Mutex<Option<oneshot::Receiver<HandoffOutcome>>>,
}

type HandoffOutcome = Result<forage_api::HandoffReport, crate::handoff::HandoffError>;

impl Control {
    pub fn new() -> Self {
        Self {
            notify: Notify::new(),
            why: Mutex::new(None),
            movable: Default::default(),
            order: Mutex::new(None),
            ordered: Notify::new(),
            follow: Mutex::new(None),
        }
    }

    pub fn movable(&self) -> bool {
        self.movable.load(Ordering::SeqCst)
    }

    /// The instance's life takes move orders from now on (`handoff::live`).
    pub fn set_movable(&self, on: bool) {
        self.movable.store(on, Ordering::SeqCst)
    }

    /// Leave a move order; given back if one is pending already.
    pub fn order(&self, order: MoveOrder) -> Result<(), MoveOrder> {
        let mut slot = self.order.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
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
        self.order(MoveOrder { to, options, reply })
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

    /// Ask the instance to end; the first reason wins.
    pub fn request(&self, code: ErrorCode, why: impl Into<String>) {
        self.why.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert((code, why.into()));
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
