//! forage-assembly: early start. The launch VM's memory and disk are assembled on demand
//! from the base VM's files and the overlay's chunks while the overlay is still arriving,
//! and served to QEMU as two files on a FUSE mount ([`Mount`]).
//!
//! A read of a chunk whose segment has not arrived blocks and asks for that segment out
//! of order (the fetch callback given to [`Assembly::new`]); the bulk stream goes on in
//! access order meanwhile. Writes of the VM are copy-on-write into the assembly's own
//! files and never touch the base.

mod assembly;
mod fs;

use std::path::PathBuf;

pub use assembly::{Assembly, AssemblyStats, FetchFn, WriteMark};
pub use fs::{Mount, DISK_FILE, MEMORY_FILE};

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
