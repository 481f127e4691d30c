//! Cached-VM instances that later devices join (provisioning's "shared" instances): how
//! many hold one, and the control that ends it.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use tokio::sync::Notify;

use super::control::Control;

/// A cached-VM instance that later devices may join.
pub(crate) struct SharedInstance {
    pub endpoint: String,
    /// Devices that join are given the instance's token too.
    pub service: forage_proto::ServiceEndpoint,
    pub users: AtomicUsize,
    pub released: Notify,
    pub control: Arc<Control>,
}
