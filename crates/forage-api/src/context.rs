//! What every route reaches: the daemon's state, its [`Control`] and who may call.

use std::sync::Arc;
use std::time::Instant;

use crate::error::ActionError;
use crate::substrate_views::{InstanceDockReport, InstanceDockRequest, SubstrateInfo, SubstrateList};
use crate::views::{AppInfo, BaseInfo, HandoffReport, HandoffRequest, InstanceUsage, ServiceInfo};
use crate::views_live::{CloudletList, CredentialView, HandoffEvent, HandoffView, PairingCodeRequest, PairingCodeView};
use crate::websession::WebSessions;

/// What the API asks of the daemon. Calls are synchronous; the API runs them on a
/// blocking thread.
pub trait Control: Send + Sync + 'static {
    /// Stops a running instance (its QEMU, its forwarding) and removes what it leaves.
    /// The API then records the stop with `State::instance_stopped`, which is idempotent,
    /// so the daemon may record it as well.
    fn stop_instance(&self, id: &str) -> Result<(), ActionError>;
    /// The base VMs held here.
    fn bases(&self) -> Vec<BaseInfo>;
    /// Removes a launch-cache entry's files, refusing if a running instance still uses
    /// them. The API then forgets the entry with `State::cache_remove`.
    fn evict_cache(&self, overlay_digest: &str) -> Result<(), ActionError>;
    /// The service VMs held here.
    fn services(&self) -> Vec<ServiceInfo>;
    /// The app store, for one device platform (and `any`) or all.
    fn apps(&self, platform: Option<&str>) -> Vec<AppInfo>;
    /// A client app's description and file contents; `None` if there is no such app.
    fn app_file(&self, id: &str) -> Option<(AppInfo, Vec<u8>)>;
    /// Moves running instance `id` to another cloudlet and waits for the outcome: the
    /// instance runs there, or it failed to move and runs on here (the error says why).
    fn handoff(&self, id: &str, request: HandoffRequest) -> Result<HandoffReport, ActionError>;
    /// What running instance `id`'s service relay carried; `None` if it does not run
    /// here or has no service.
    fn instance_usage(&self, id: &str) -> Option<InstanceUsage>;
    /// Handoffs sent from here: running, and the last few that ended, newest first.
    fn handoffs(&self) -> Vec<HandoffView>;
    /// Hear every handoff's start, trace point and end from now on.
    fn watch_handoffs(&self) -> tokio::sync::broadcast::Receiver<HandoffEvent>;
    /// Makes a one-time pairing code. `reached_at` is the address the operator's browser
    /// reached the API at: where a phone on the same network may reach the cloudlet when
    /// it listens on every address.
    fn pairing_code(
        &self,
        request: &PairingCodeRequest,
        reached_at: Option<std::net::IpAddr>,
    ) -> Result<PairingCodeView, ActionError>;
    /// Credentials this cloudlet issued, newest first.
    fn credentials(&self) -> Vec<CredentialView>;
    /// Revokes every credential named `who` (or with serial `who`).
    fn revoke(&self, who: &str) -> Result<(), ActionError>;
    /// Cloudlets seen announcing themselves on the local network.
    fn cloudlets(&self) -> CloudletList;
    /// The substrate pool: budget, totals, each substrate's place.
    fn substrates(&self) -> Result<SubstrateList, ActionError>;
    /// One substrate, described from its manifest.
    fn substrate(&self, name: &str) -> Result<SubstrateInfo, ActionError>;
    /// Docks running instance `id` as a substrate and waits for the outcome: the
    /// instance ends (its device is told why) once its VM is saved, docked or not. The
    /// API then records the stop with `State::instance_stopped`, which is idempotent.
    /// BadRequest: not a substrate name; NotFound: no such instance; Conflict: not
    /// running here, a handoff or dock of it under way, or the substrate exists.
    fn dock_instance(&self, id: &str, request: &InstanceDockRequest) -> Result<InstanceDockReport, ActionError>;
    /// The cluster as this node last read it; `None` when not in a cluster.
    fn cluster(&self) -> Option<forage_cluster::ClusterStatus>;
    /// The best live node of the cluster for a device's request (read from etcd now):
    /// NotFound when not in a cluster, Unavailable without etcd quorum, Conflict when no
    /// node can serve it.
    fn place(&self, request: &forage_cluster::PlacementRequest) -> Result<forage_cluster::Placement, ActionError>;
    /// Asks live node `node` of the cluster to hand all its instances off to the others.
    fn drain_node(&self, node: &str) -> Result<(), ActionError>;
}

/// What every route can reach.
#[derive(Clone)]
pub struct ApiContext {
    pub state: forage_state::State,
    /// The cloudlet's name.
    pub name: String,
    /// The daemon's version.
    pub version: String,
    /// "kvm" or "tcg".
    pub accel: String,
    /// When the daemon started, for uptime.
    pub started: Instant,
    pub control: Arc<dyn Control>,
    pub access: Access,
    /// Live feeds open now (`GET /v1/events`).
    pub feeds: Arc<std::sync::atomic::AtomicUsize>,
}

/// Who may call the API.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// The bearer token; `None` lets everyone do everything (tests only).
    pub token: Option<String>,
    /// Reads (GET) without the token: only when the API listens on loopback.
    pub open_reads: bool,
    /// The web UI's sign-ins (session cookies and their CSRF tokens).
    pub sessions: Arc<WebSessions>,
}

impl ApiContext {
    /// Require `token` for changes, and for reads unless `open_reads`.
    pub fn with_access(mut self, token: String, open_reads: bool) -> Self {
        self.access = Access { token: Some(token), open_reads, sessions: self.access.sessions.clone() };
        self
    }

    /// A context whose uptime counts from now.
    pub fn new(
        state: forage_state::State,
        name: impl Into<String>,
        version: impl Into<String>,
        accel: impl Into<String>,
        control: Arc<dyn Control>,
    ) -> ApiContext {
        ApiContext {
            state,
            name: name.into(),
            version: version.into(),
            accel: accel.into(),
            started: Instant::now(),
            control,
            access: Access::default(),
            feeds: Default::default(),
        }
    }
}
