//! forage-cloudlet: the cloudlet's side of VM synthesis.
//!
//! [`serve`] accepts devices on TCP and runs one [`session`] per connection (the protocol
//! is `forage-proto`'s, see `docs/synthesis-protocol.md`). A session picks a base it holds
//! among the device's offers, applies the overlay while its segments arrive (receive,
//! verify, decompress and apply run concurrently: the network task feeds a bounded pipe
//! that the apply thread reads), resumes the launch VM with the service port forwarded,
//! answers Ready and Complete, and stops the VM and removes its files when the device says
//! Bye or goes away.
//!
//! Not yet here (see the cloudlet daemon issue): early start with demand fetch, the HTTP
//! API, SQLite state, the launch-VM cache, residues.

mod pipe;
mod session;

use std::net::Ipv4Addr;
use std::sync::Arc;

use forage_datadir::DataDir;
use forage_vm::Accel;
use tokio::net::TcpListener;

pub use session::{session, SessionError};

/// What a cloudlet needs to serve sessions.
#[derive(Debug, Clone)]
pub struct Cloudlet {
    pub name: String,
    pub data: DataDir,
    pub accel: Accel,
    /// Address service ports are forwarded on (what devices connect to).
    pub service_addr: Ipv4Addr,
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
                Err(e) => tracing::warn!(%peer, "session failed: {e}"),
            }
        });
    }
}
