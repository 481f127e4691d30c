//! forage-shim: one process per running instance that holds what must outlive the
//! cloudlet daemon (as containerd's shims do for containers): the instance's view of its
//! memory and disk (a FUSE mount: a copy-on-write view of a saved VM, or the launch VM of
//! an overlay assembled while it arrives) and its service relay (TLS, the instance's
//! token). QEMU runs detached from the daemon too; a daemon that restarts finds the
//! shims of the instances it recorded and adopts them again.
//!
//! - [`protocol`]: `shim.json` and the messages on the control socket;
//! - [`ShimClient`]: the daemon's side;
//! - [`server::run`]: the shim (`forage-shim DIR/shim.json`).

mod client;
pub mod protocol;
pub mod relay;
pub mod server;

use std::path::PathBuf;

pub use client::{shim_exe, ShimClient};
pub use protocol::{ChunkBytes, RelaySpec, ShimHello, ShimSpec, ShimStatus, ViewSpec};

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("forage-shim was not found beside this program or on PATH (set FORAGE_SHIM)")]
    NotFound,
    #[error("the shim did not start (its log {log}): {detail}")]
    Start { log: PathBuf, detail: String },
    #[error("the shim's description: {0}")]
    Spec(String),
    #[error("the shim's view: {0}")]
    View(String),
    #[error("the shim broke the protocol: {0}")]
    Protocol(String),
    #[error("the shim is gone")]
    Gone,
    #[error("{0}")]
    Failed(String),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
