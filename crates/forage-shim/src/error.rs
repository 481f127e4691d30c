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
    #[error("the shim's relay: the cloudlet's credentials")]
    Trust(#[source] forage_trust::TrustError),
    #[error("the shim's view: the saved VM")]
    Snapshot(#[source] forage_vm::SnapshotError),
    #[error("the shim's view: the copy-on-write view of the saved VM")]
    CowView(#[source] forage_synth::SynthError),
    #[error("the shim's view: the overlay manifest {}", path.display())]
    Manifest {
        path: PathBuf,
        #[source]
        source: forage_format::FormatError,
    },
    #[error("the shim's view: the launch VM's assembly")]
    Assembly(#[source] forage_assembly::AssemblyError),
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
