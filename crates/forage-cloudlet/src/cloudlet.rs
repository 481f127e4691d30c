//! The cloudlet: what every session reaches (its data, state, trust, cache, services,
//! limits) and the registry of running instances.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use forage_datadir::DataDir;
use forage_proto::ErrorCode;
use forage_vm::cpu::{CpuProbeError, HostCpu};
use forage_vm::Accel;
use tokio::net::TcpStream;

use crate::cache::LaunchCache;
use crate::instance::{Control, SharedInstance};
use crate::limits::{self, Limits};

/// A peer's connection: TLS 1.3, the peer authenticated by its certificate (or not yet
/// paired).
pub type DeviceStream = tokio_rustls::server::TlsStream<TcpStream>;

/// What a cloudlet needs to serve sessions.
pub struct Cloudlet {
    pub name: String,
    pub data: DataDir,
    pub accel: Accel,
    /// Address service relays listen on (what devices connect to).
    pub service_addr: Ipv4Addr,
    pub state: forage_state::State,
    /// The cloudlet's authority: its certificates, pairing codes, issued credentials.
    pub trust: forage_trust::CloudletTrust,
    pub cache: Arc<LaunchCache>,
    /// How long a peer may stay silent while something is still due (segments, demand
    /// fetches included).
    pub peer_wait: Duration,
    /// Kernel readahead on views' files: the granularity of demand fetching.
    pub readahead: u32,
    /// Service VMs, baseline VMs and the app store (the other provisioning mechanisms).
    pub services: forage_service::Repository,
    /// An instance whose service saw no traffic this long is stopped (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Longest an on-demand provisioning script may ask for.
    pub max_script_time: Duration,
    /// Running instances by id: asked to stop or move.
    pub(crate) instances: Mutex<HashMap<String, Arc<Control>>>,
    /// Joinable cached-VM instances by service id.
    pub(crate) shared: Mutex<HashMap<String, Arc<SharedInstance>>>,
    /// Connections and sessions a peer, and all together, may hold.
    pub limits: Limits,
    /// Where overlays named by URL may be fetched from (https to public addresses only,
    /// unless the operator lists networks).
    pub fetch_policy: forage_remote::FetchPolicy,
    /// Sessions open, per credential serial.
    pub(crate) sessions: Arc<limits::Counter<u64>>,
    /// Substrate activations under way (`substrate`).
    pub(crate) activations: Arc<limits::Counter<()>>,
    /// Wrong pairing codes per source.
    pub(crate) pairing_guard: forage_trust::PairingGuard,
    /// Handoffs sent from here, as they run (and the last few that ended).
    pub handoffs: Arc<crate::handoff::HandoffBoard>,
    /// The CPU models this host's QEMU gives under `accel` (asked at the first offer).
    pub(crate) host_cpu: std::sync::OnceLock<Result<HostCpu, Arc<CpuProbeError>>>,
    /// In a cluster (`forage serve --cluster`): where a device offering a base this node
    /// lacks is redirected (`docs/cluster.md`).
    pub placer: std::sync::OnceLock<Placer>,
    /// In a cluster: the cluster's record of the instance whose service answers at an
    /// endpoint, for a device asking after it (WhereIs).
    pub locator: std::sync::OnceLock<Locator>,
}

/// Given an offer's base digest and overlay digest, the device address of another node of
/// this cloudlet's cluster that should serve it; `None` to answer as a lone cloudlet.
pub type Placer = Arc<
    dyn Fn(String, String) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<std::net::SocketAddr>> + Send>>
        + Send
        + Sync,
>;

/// Given a service endpoint (`HOST:PORT`), where the cluster says its instance is (the
/// last view read from etcd); `None` if no instance of the cluster answers there.
pub type Locator = Arc<dyn Fn(&str) -> Option<forage_proto::Whereabouts> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum CloudletError {
    #[error("cloudlet state")]
    State(#[from] forage_state::OpenError),
    #[error("cloudlet state")]
    Record(#[from] forage_state::StateError),
    #[error("cloudlet identity")]
    Trust(#[from] forage_trust::TrustError),
    #[error("cloudlet data directory")]
    DataDir(#[from] forage_datadir::DataDirError),
}

impl Cloudlet {
    /// Open the cloudlet's state in `data`. Instances a previous daemon left running are
    /// settled when it serves ([`serve`] adopts those that can be, see `recover`).
    pub fn open(name: String, data: DataDir, accel: Accel, service_addr: Ipv4Addr) -> Result<Self, CloudletError> {
        data.ensure_root()?;
        // QEMU's sockets go there: refuse now, not at the first instance, if it is not ours.
        data.runtime_dir()?;
        let state = forage_state::State::open(data.cloudlet_state())?;
        let cache = Arc::new(LaunchCache::new(data.launch_cache(), state.clone()));
        let services = forage_service::Repository::new(&data);
        let trust = forage_trust::CloudletTrust::open_or_init(&data.trust_cloudlet(), &name)?;
        Ok(Self {
            name,
            data,
            accel,
            service_addr,
            state,
            trust,
            cache,
            peer_wait: Duration::from_secs(30),
            readahead: 16 << 10,
            services,
            idle_timeout: Some(Duration::from_secs(600)),
            max_script_time: Duration::from_secs(600),
            instances: Mutex::new(HashMap::new()),
            shared: Mutex::new(HashMap::new()),
            sessions: limits::Counter::new(Limits::default().sessions, Limits::default().sessions_per_peer),
            limits: Limits::default(),
            activations: limits::Counter::new(limits::ACTIVATIONS_AT_ONCE, limits::ACTIVATIONS_AT_ONCE),
            fetch_policy: Default::default(),
            pairing_guard: Default::default(),
            handoffs: Default::default(),
            placer: Default::default(),
            locator: Default::default(),
            host_cpu: Default::default(),
        })
    }

    /// Enforce `limits` from now on (sessions already open keep their places).
    pub fn set_limits(&mut self, limits: Limits) {
        self.sessions = limits::Counter::new(limits.sessions, limits.sessions_per_peer);
        self.limits = limits;
    }

    /// Ask the running instance `id` to stop; false if there is none.
    pub fn stop_instance(&self, id: &str) -> bool {
        match self.instance_control(id) {
            Some(c) => {
                c.request(ErrorCode::Internal, "the cloudlet's operator stopped this instance");
                true
            }
            None => false,
        }
    }

    /// What running instance `id`'s service relay carried, and how long it has been
    /// idle; `None` if it does not run here or has no service.
    pub async fn instance_usage(&self, id: &str) -> Option<forage_api::InstanceUsage> {
        let control = self.instance_control(id)?;
        let s = control.shim().status().await.ok()?;
        Some(forage_api::InstanceUsage {
            idle_ms: s.relay_idle_ms?,
            connections: s.relay_connections,
            bytes_to_guest: s.relay_bytes_to_guest,
            bytes_from_guest: s.relay_bytes_from_guest,
        })
    }

    pub(crate) fn instance_control(&self, id: &str) -> Option<Arc<Control>> {
        self.instances.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    /// Whether instance `id` runs in this daemon and can move now.
    pub fn movable(&self, id: &str) -> bool {
        self.instance_control(id).is_some_and(|c| c.movable())
    }

    pub(crate) fn is_registered(&self, id: &str) -> bool {
        self.instances.lock().unwrap_or_else(|p| p.into_inner()).contains_key(id)
    }

    pub(crate) fn register(&self, id: &str, shim: Arc<forage_shim::ShimClient>) -> Arc<Control> {
        let c = Arc::new(Control::new(shim));
        self.instances.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_string(), c.clone());
        c
    }

    pub(crate) fn unregister(&self, id: &str) {
        self.instances.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }
}
