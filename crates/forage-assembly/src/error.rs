//! What can go wrong assembling a launch VM.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AssemblyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("overlay: {0}")]
    Overlay(String),
    #[error("base does not match the overlay: {0}")]
    Mismatch(String),
    #[error("{space} offset {off} is past the end")]
    OutOfRange { space: &'static str, off: u64 },
    #[error("waited too long for {0}")]
    Timeout(String),
    #[error("assembly stopped: {0}")]
    Failed(String),
    #[error("cannot mount the assembly on {path}: {source}")]
    Mount {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
