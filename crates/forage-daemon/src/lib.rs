//! forage-daemon: `forage serve`. One [`Daemon`] is a cloudlet accepting devices and peer
//! cloudlets ([`forage_cloudlet::serve`]), its HTTP management API with the operator's
//! bearer token ([`forage_api`]), and its announcement on the local network kept current
//! ([`forage_discovery`]), configured by one [`DaemonConfig`]; with a load policy
//! (`--move-when-memory-above`, `--move-when-load-above`) it sheds instances to paired
//! cloudlets that announce room ([`balance`]).
//!
//! Under systemd (`contrib/forage.service`, `Type=notify`) the daemon says READY=1 once
//! it accepts devices, and STOPPING=1 when it ends. Running instances outlive the daemon
//! (`KillMode=process`): see `forage_cloudlet` for what is re-adopted at the next start.

mod announce;
mod balance;
mod cluster;
mod config;
mod control;
mod holdings;
mod substrates;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use forage_cloudlet::Cloudlet;
use forage_datadir::DataDir;

pub use balance::{LoadPolicy, Pressure};
pub use config::{ConfigError, DaemonConfig};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("opening the cloudlet")]
    Cloudlet(#[from] forage_cloudlet::CloudletError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the API token")]
    Token(#[from] forage_api::token::TokenError),
    #[error("joining the cluster")]
    Cluster(#[from] forage_cluster::JoinError),
}

/// A running daemon: what `forage serve` prints about, then waits on.
pub struct Daemon {
    pub cloudlet: Arc<Cloudlet>,
    /// Where devices connect.
    pub listen: SocketAddr,
    /// Where the HTTP API answers, and the file with its token.
    pub api: Option<(SocketAddr, PathBuf)>,
    /// Why the cloudlet is not announced on the local network, if announcing failed.
    pub not_announced: Option<String>,
    /// This node's membership, with `--cluster`.
    pub cluster: Option<Arc<forage_cluster::Member>>,
    serving: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// The API's bearer token file in `data`.
pub fn api_token_path(data: &DataDir) -> PathBuf {
    data.root().join("trust").join("api-token")
}

impl Daemon {
    /// Open the cloudlet in `data`, bind its listeners, start the API and the
    /// announcement; devices are accepted from the moment this returns.
    pub async fn start(data: &DataDir, config: &DaemonConfig) -> Result<Self, DaemonError> {
        let service_addr = config.service_addr()?;
        let accel = forage_vm::accel::choose();
        let mut cloudlet = Cloudlet::open(config.name.clone(), data.clone(), accel, service_addr)?;
        cloudlet.idle_timeout = config.idle_timeout();
        cloudlet.set_limits(config.limits());
        cloudlet.fetch_policy = config.fetch_policy();
        let cloudlet = Arc::new(cloudlet);
        cloudlet.cache.set_enabled(!config.no_cache);
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| DaemonError::Listen { addr: config.listen, source })?;
        let listen = listener.local_addr().unwrap_or(config.listen);
        // Browsing for other cloudlets goes with announcing this one (mDNS on or off).
        let watcher = match config.no_advertise {
            true => None,
            false => forage_discovery::watch()
                .inspect_err(|e| tracing::warn!("not watching the network for cloudlets: {e}"))
                .ok(),
        };
        let member = match config.cluster() {
            Some(c) => Some(cluster::join(c, &cloudlet, service_addr, listen).await?),
            None => None,
        };
        let api = match config.no_api {
            true => None,
            false => Some(start_api(data, config.api, &cloudlet, accel, listen, watcher, member.clone()).await?),
        };
        let http_port = api.as_ref().map(|a| a.0.port());
        let not_announced = match (config.no_advertise, &member) {
            (true, _) => None,
            (false, None) => announce::cloudlet(&cloudlet, service_addr, listen.port(), http_port).err(),
            (false, Some(m)) => {
                announce::cluster(m.clone(), SocketAddr::new(IpAddr::V4(service_addr), listen.port()), http_port);
                None
            }
        };
        let serving = tokio::spawn(forage_cloudlet::serve(listener, cloudlet.clone()));
        balance::start(cloudlet.clone(), config.load_policy());
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        Ok(Self { cloudlet, listen, api, not_announced, cluster: member, serving })
    }

    /// Serve until `shutdown` resolves (or accepting fails for good).
    pub async fn run_until(self, shutdown: impl std::future::Future<Output = ()>) -> std::io::Result<()> {
        let result = tokio::select! {
            r = self.serving => r.unwrap_or(Ok(())),
            _ = shutdown => Ok(()),
        };
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        // A clean stop leaves the cluster at once rather than when the lease expires.
        if let Some(m) = &self.cluster {
            if let Err(e) = m.leave().await {
                tracing::warn!("leaving the cluster: {}", forage_cluster::chain(&e));
            }
        }
        result
    }
}

async fn start_api(
    data: &DataDir,
    addr: SocketAddr,
    cloudlet: &Arc<Cloudlet>,
    accel: forage_vm::Accel,
    listen: SocketAddr,
    watcher: Option<forage_discovery::Watcher>,
    cluster: Option<Arc<forage_cluster::Member>>,
) -> Result<(SocketAddr, PathBuf), DaemonError> {
    let l = tokio::net::TcpListener::bind(addr).await.map_err(|source| DaemonError::Listen { addr, source })?;
    let bound = l.local_addr().unwrap_or(addr);
    let control = Arc::new(control::DaemonControl { cloudlet: cloudlet.clone(), listen, watcher, cluster });
    let token_path = api_token_path(data);
    let token = forage_api::token::open_or_create(&token_path)?;
    let open_reads = addr.ip().is_loopback();
    let ctx = forage_api::ApiContext::new(
        cloudlet.state.clone(),
        cloudlet.name.clone(),
        env!("CARGO_PKG_VERSION"),
        accel.to_string(),
        control,
    )
    .with_access(token, open_reads);
    tokio::spawn(async move {
        if let Err(e) = forage_api::serve(l, ctx, std::future::pending()).await {
            tracing::error!("HTTP API stopped: {e}");
        }
    });
    Ok((bound, token_path))
}
