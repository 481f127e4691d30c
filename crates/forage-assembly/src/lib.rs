//! forage-assembly: early start. The launch VM's memory and disk are assembled on demand
//! from the base VM's files and the overlay's chunks while the overlay is still arriving,
//! and served to QEMU as two files on a FUSE mount ([`Mount`]).
//!
//! A read of a chunk whose segment has not arrived blocks and asks for that segment out
//! of order (the fetch callback given to [`Assembly::new`]); the bulk stream goes on in
//! access order meanwhile. Writes of the VM are copy-on-write into the assembly's own
//! files and never touch the base.

mod assembly;
mod error;
mod fs;
mod stats;
mod volume;

pub use assembly::{Assembly, AssemblyStats, FetchFn, WriteMark};
pub use error::AssemblyError;
pub use fs::{Mount, DISK_FILE, MEMORY_FILE};
