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
//! The launch VM resumes with its service port forwarded and the device gets the endpoint.
//! The instance lives until the device says Bye or goes away (or an operator stops it);
//! then the VM is stopped, its files removed, and the launch VM kept in the cache.
//! Sessions and instances are recorded in the daemon's SQLite state (`forage-state`).

mod cache;
mod early;
mod pipe;
mod pipelined;
mod residue;
mod session;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use forage_datadir::DataDir;
use forage_vm::Accel;
use tokio::net::TcpListener;
use tokio::sync::Notify;

pub use cache::LaunchCache;
pub use session::{session, SessionError};

/// What a cloudlet needs to serve sessions.
pub struct Cloudlet {
    pub name: String,
    pub data: DataDir,
    pub accel: Accel,
    /// Address service ports are forwarded on (what devices connect to).
    pub service_addr: Ipv4Addr,
    pub state: forage_state::State,
    pub cache: Arc<LaunchCache>,
    /// How long a device may stay silent while segments are still due (demand fetches
    /// included).
    pub peer_wait: Duration,
    /// Kernel readahead on early-start files: the granularity of demand fetching.
    pub readahead: u32,
    /// Running instances by session id: notified to stop one.
    instances: Mutex<HashMap<String, Arc<Notify>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum CloudletError {
    #[error("cloudlet state: {0}")]
    State(#[from] forage_state::OpenError),
    #[error("cloudlet state: {0}")]
    Record(#[from] forage_state::StateError),
}

impl Cloudlet {
    /// Open the cloudlet's state in `data` and clean up after a previous run: instances
    /// whose QEMU is gone are marked lost and their files removed (QEMU dies with the
    /// daemon: early-start instances depend on its FUSE server).
    pub fn open(name: String, data: DataDir, accel: Accel, service_addr: Ipv4Addr) -> Result<Self, CloudletError> {
        let state = forage_state::State::open(data.cloudlet_state())?;
        for lost in state.recover_after_restart()? {
            tracing::warn!(instance = %lost.id, dir = %lost.dir.display(), "instance lost in a restart; removing its files");
            session::unmount_stale(&lost.dir.join("mnt"));
            let _ = std::fs::remove_dir_all(&lost.dir);
        }
        session::sweep_dead_sessions(&data.work());
        let cache = Arc::new(LaunchCache::new(data.launch_cache(), state.clone()));
        Ok(Self {
            name,
            data,
            accel,
            service_addr,
            state,
            cache,
            peer_wait: Duration::from_secs(30),
            readahead: 16 << 10,
            instances: Mutex::new(HashMap::new()),
        })
    }

    /// Ask the running instance of session `id` to stop; false if there is none.
    pub fn stop_instance(&self, id: &str) -> bool {
        match self.instances.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            Some(n) => {
                n.notify_one();
                true
            }
            None => false,
        }
    }

    fn register(&self, id: &str) -> Arc<Notify> {
        let n = Arc::new(Notify::new());
        self.instances.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_string(), n.clone());
        n
    }

    fn unregister(&self, id: &str) {
        self.instances.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }
}

/// Accept devices until the listener fails; each session runs on its own task, and one
/// session's failure does not affect the others.
pub async fn serve(listener: TcpListener, cloudlet: Arc<Cloudlet>) -> std::io::Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        let c = cloudlet.clone();
        tokio::spawn(async move {
            match session(stream, &c).await {
                Ok(()) => tracing::info!(%peer, "session ended"),
                Err(SessionError::NoHello) => tracing::debug!(%peer, "connection closed before Hello"),
                Err(e) => tracing::warn!(%peer, "session failed: {e}"),
            }
        });
    }
}
