//! forage-cloudlet: the cloudlet side of VM synthesis.
//!
//! [`serve`] accepts devices on TCP and runs one [`session`] per connection (the protocol
//! is `forage-proto`'s, see `docs/synthesis-protocol.md`). A session picks a base it holds
//! among the device's offers and then, by the device's choice and the cache:
//! - **cached**: the overlay's launch VM is in the launch-VM cache: resume a copy of it;
//! - **pipelined**: apply the overlay while its segments arrive (receive, verify,
//!   decompress and apply run concurrently through a bounded pipe), then resume;
//! - **early start**: resume as soon as the manifest and the device state are here, from
//!   files assembled on demand over FUSE (`forage-assembly`); reads of chunks not yet here
//!   fetch their segment out of order while the bulk stream goes on.
//!
//! A device that offers no overlay asks for one of the other four mechanisms of tactical
//! cloudlets instead ([`provision`]): a cached service VM, a service behind a client app
//! of the app store, an on-demand provisioning script, or a packed application. They all
//! run as copy-on-write instances of VMs the cloudlet holds.
//!
//! Every instance, whatever the mechanism, resumes with its service port relayed on the
//! cloudlet's service address and the device gets that endpoint. It lives until the
//! device says Bye or goes away, an operator stops it, or its service sees no traffic for
//! the idle timeout; then the VM is stopped and its files removed (a synthesized launch VM
//! is kept in the cache).
//! Sessions and instances are recorded in the daemon's SQLite state (`forage-state`).

mod cache;
mod early;
mod handoff;
mod limits;
mod pipe;
mod pipelined;
mod provision;
mod proxy;
mod residue;
mod session;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use forage_datadir::DataDir;
use forage_vm::Accel;
use tokio::net::{TcpListener, TcpStream};
use forage_proto::ErrorCode;
use tokio::sync::Notify;

pub use cache::LaunchCache;
pub use limits::{raise_fd_limit, Limits};
pub use handoff::{HandoffError, HandoffOptions, HandoffReport};

/// A device's connection: TLS 1.3, the device authenticated by its certificate (or not
/// yet paired).
pub type DeviceStream = tokio_rustls::server::TlsStream<TcpStream>;
pub use session::{session, SessionError};

/// What a cloudlet needs to serve sessions.
pub struct Cloudlet {
    pub name: String,
    pub data: DataDir,
    pub accel: Accel,
    /// Address service ports are forwarded on (what devices connect to).
    pub service_addr: Ipv4Addr,
    pub state: forage_state::State,
    /// The cloudlet's authority: its certificates, pairing codes, issued credentials.
    pub trust: forage_trust::CloudletTrust,
    pub cache: Arc<LaunchCache>,
    /// How long a device may stay silent while segments are still due (demand fetches
    /// included).
    pub peer_wait: Duration,
    /// Kernel readahead on early-start files: the granularity of demand fetching.
    pub readahead: u32,
    /// Service VMs, baseline VMs and the app store (the other provisioning mechanisms).
    pub services: forage_service::Repository,
    /// An instance whose service saw no traffic this long is stopped (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Longest an on-demand provisioning script may ask for.
    pub max_script_time: Duration,
    /// Running instances by session id: asked to stop one.
    instances: Mutex<HashMap<String, Arc<Stop>>>,
    /// Joinable cached-VM instances by service id.
    pub(crate) shared: Mutex<HashMap<String, Arc<provision::SharedInstance>>>,
    /// Connections and sessions a peer, and all together, may hold.
    pub limits: Limits,
    /// Where overlays named by URL may be fetched from (https to public addresses only,
    /// unless the operator lists networks).
    pub fetch_policy: forage_remote::FetchPolicy,
    /// Sessions open, per credential serial.
    sessions: Arc<limits::Counter<u64>>,
    /// Wrong pairing codes per source.
    pairing_guard: forage_trust::PairingGuard,
}

/// Asks a running instance to end, with the reason its device is given; or, if it can
/// move, to hand itself off to another cloudlet.
pub(crate) struct Stop {
    notify: Notify,
    why: Mutex<Option<(ErrorCode, String)>>,
    movable: std::sync::atomic::AtomicBool,
    order: Mutex<Option<handoff::HandoffOrder>>,
    ordered: Notify,
}

impl Stop {
    fn new() -> Self {
        Self { notify: Notify::new(), why: Mutex::new(None), movable: Default::default(), order: Mutex::new(None), ordered: Notify::new() }
    }

    pub fn movable(&self) -> bool {
        self.movable.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The instance's life handles handoff orders (`handoff::live`).
    pub fn set_movable(&self, on: bool) {
        self.movable.store(on, std::sync::atomic::Ordering::SeqCst)
    }

    /// Leave a handoff order; false if one is pending already.
    fn order(&self, order: handoff::HandoffOrder) -> bool {
        let mut slot = self.order.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            return false;
        }
        *slot = Some(order);
        self.ordered.notify_one();
        true
    }

    pub async fn ordered(&self) {
        self.ordered.notified().await
    }

    pub fn take_order(&self) -> Option<handoff::HandoffOrder> {
        self.order.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// The first reason wins.
    pub fn request(&self, code: ErrorCode, why: impl Into<String>) {
        self.why.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert((code, why.into()));
        self.notify.notify_one();
    }

    pub async fn notified(&self) {
        self.notify.notified().await
    }

    pub fn error(&self) -> SessionError {
        let (code, message) = self.why.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or((ErrorCode::Internal, "instance stopped".into()));
        tracing::info!("instance stopped: {message}");
        SessionError::Refused { code, message }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CloudletError {
    #[error("cloudlet state: {0}")]
    State(#[from] forage_state::OpenError),
    #[error("cloudlet state: {0}")]
    Record(#[from] forage_state::StateError),
    #[error("cloudlet identity: {0}")]
    Trust(#[from] forage_trust::TrustError),
    #[error("cloudlet data directory: {0}")]
    DataDir(#[from] forage_datadir::DataDirError),
}

impl Cloudlet {
    /// Open the cloudlet's state in `data` and clean up after a previous run: instances
    /// whose QEMU is gone are marked lost and their files removed (QEMU dies with the
    /// daemon: early-start instances depend on its FUSE server).
    pub fn open(name: String, data: DataDir, accel: Accel, service_addr: Ipv4Addr) -> Result<Self, CloudletError> {
        data.ensure_root()?;
        // QEMU's sockets go there: refuse now, not at the first instance, if it is not ours.
        data.runtime_dir()?;
        let state = forage_state::State::open(data.cloudlet_state())?;
        for lost in state.recover_after_restart()? {
            tracing::warn!(instance = %lost.id, dir = %lost.dir.display(), "instance lost in a restart; removing its files");
            session::unmount_session(&lost.dir);
            let _ = std::fs::remove_dir_all(&lost.dir);
        }
        session::sweep_dead_sessions(&data.work());
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
            fetch_policy: Default::default(),
            pairing_guard: Default::default(),
        })
    }

    /// Enforce `limits` from now on (sessions already open keep their places).
    pub fn set_limits(&mut self, limits: Limits) {
        self.sessions = limits::Counter::new(limits.sessions, limits.sessions_per_peer);
        self.limits = limits;
    }

    /// Ask the running instance of session `id` to stop; false if there is none.
    pub fn stop_instance(&self, id: &str) -> bool {
        match self.instances.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            Some(s) => {
                s.request(ErrorCode::Internal, "the cloudlet's operator stopped this instance");
                true
            }
            None => false,
        }
    }

    fn instance_control(&self, id: &str) -> Option<Arc<Stop>> {
        self.instances.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    fn register(&self, id: &str) -> Arc<Stop> {
        let n = Arc::new(Stop::new());
        self.instances.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_string(), n.clone());
        n
    }

    fn unregister(&self, id: &str) {
        self.instances.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }
}

/// Accept devices until the process ends; each connection is a TLS 1.3 handshake (the
/// device's certificate checked against this cloudlet's CA, validity and CRL) within
/// [`Limits::handshake`], then a session on its own task. Connections beyond the limits
/// (in all, per source address) are closed at once; an `accept` error (out of file
/// descriptors, say) is logged and accepting goes on. One session's failure does not
/// affect the others.
pub async fn serve(listener: TcpListener, cloudlet: Arc<Cloudlet>) -> std::io::Result<()> {
    let fds = limits::raise_fd_limit();
    let l = cloudlet.limits.clone();
    tracing::debug!(fds, ?l, "accepting devices");
    let connections = limits::Counter::new(l.connections, l.connections_per_source);
    let mut warned = std::time::Instant::now() - Duration::from_secs(60);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS, ECONNABORTED...: transient; never the end of serving.
                if warned.elapsed() > Duration::from_secs(10) {
                    tracing::warn!("accepting a device connection failed (going on): {e}");
                    warned = std::time::Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let slot = match connections.take(limits::source_key(peer.ip())) {
            Ok(s) => s,
            Err(full) => {
                tracing::debug!(%peer, ?full, "connection refused: too many open");
                drop(tcp);
                continue;
            }
        };
        let c = cloudlet.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let config = match c.trust.server_config() {
                Ok(cfg) => cfg,
                Err(e) => {
                    tracing::error!("cannot serve TLS: {e}");
                    return;
                }
            };
            let handshake = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
            let stream = match tokio::time::timeout(c.limits.handshake, handshake).await {
                Err(_) => {
                    tracing::debug!(%peer, "refused: no TLS handshake within {:?}", c.limits.handshake);
                    return;
                }
                Ok(Ok(s)) => s,
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    tracing::debug!(%peer, "connection closed before TLS (a reachability probe)");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(%peer, "refused: TLS handshake failed: {e}");
                    return;
                }
            };
            let who = stream.get_ref().1.peer_certificates().and_then(|p| p.first()).and_then(forage_trust::peer_identity);
            match who {
                None => match pair(stream, peer, &c).await {
                    Ok(name) => tracing::info!(%peer, name, "paired"),
                    Err(e) => tracing::warn!(%peer, "pairing refused: {e}"),
                },
                Some((name, serial)) => {
                    let _session = match c.sessions.take(serial) {
                        Ok(s) => s,
                        Err(full) => {
                            let why = match full {
                                limits::Full::All(n) => format!("cloudlet {} runs its maximum of {n} sessions: try again later", c.name),
                                limits::Full::This(n) => format!("{name} already has {n} sessions open on cloudlet {}", c.name),
                            };
                            tracing::warn!(%peer, name, "session refused: {why}");
                            let mut stream = stream;
                            let _ = forage_proto::asynchronous::write(&mut stream, &forage_proto::Message::Error { code: ErrorCode::Busy, message: why }).await;
                            return;
                        }
                    };
                    match session(stream, &c, &name, serial).await {
                        Ok(()) => tracing::info!(%peer, name, serial, "session ended"),
                        Err(SessionError::NoHello) => tracing::debug!(%peer, "connection closed before Hello"),
                        Err(e) => tracing::warn!(%peer, name, "session failed: {e}"),
                    }
                }
            }
        });
    }
}

/// A connection without a client certificate: it may pair (PairRequest with a code's
/// secret), and do nothing else. What the credential grants comes from the code; a source
/// that sent too many wrong codes is refused without its code being looked at.
async fn pair(mut stream: DeviceStream, peer: SocketAddr, cloudlet: &Cloudlet) -> Result<String, String> {
    use forage_proto::asynchronous::{read, write};
    use forage_proto::Message;
    let refuse = |code: ErrorCode, message: String| Message::Error { code, message };
    let first = tokio::time::timeout(cloudlet.peer_wait, read(&mut stream)).await.map_err(|_| "silent".to_string())?.map_err(|e| e.to_string())?;
    let Message::PairRequest { secret, name, csr } = first else {
        let why = format!("this device is not paired with cloudlet {}: pair first (`forage pair --cloudlet ADDR --code CODE`)", cloudlet.name);
        let _ = write(&mut stream, &refuse(ErrorCode::Unpaired, why.clone())).await;
        return Err(format!("{} without credentials", first.name()));
    };
    let granted = cloudlet
        .pairing_guard
        .check(peer.ip())
        .and_then(|()| forage_trust::check_peer_name(&name).map(|_| ()))
        .and_then(|()| {
            cloudlet.trust.redeem(&secret).inspect_err(|_| cloudlet.pairing_guard.failed(peer.ip()))
        })
        .and_then(|grant| cloudlet.trust.issue_for_csr(&csr, &name, grant.kind, grant.valid()));
    match granted {
        Ok((cert, issued)) => {
            let m = Message::PairGranted { cloudlet: cloudlet.name.clone(), ca: cloudlet.trust.ca_der().to_vec(), cert: cert.to_vec(), not_after_unix: issued.not_after_unix };
            write(&mut stream, &m).await.map_err(|e| e.to_string())?;
            Ok(format!("{name} ({:?})", issued.kind))
        }
        Err(e) => {
            let _ = write(&mut stream, &refuse(ErrorCode::Pairing, e.to_string())).await;
            Err(e.to_string())
        }
    }
}
