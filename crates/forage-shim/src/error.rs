//! What can go wrong between the daemon and a shim.

use std::path::PathBuf;

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
