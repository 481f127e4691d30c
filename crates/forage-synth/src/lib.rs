//! forage-synth: VM synthesis, offline half. Base VMs and their chunk index, launch VMs
//! (base + installed application), overlay creation (semantic gap, five-rule dedup, delta,
//! compressed segments in offset or access order) and overlay application; residues (an
//! instance's changes since launch) and merging them into their overlay; package volumes
//! (chunks named as blocks of Debian packages the cloudlet holds).

pub mod apply;
pub mod base;
pub mod build;
pub mod cow;
pub mod create;
pub mod deb_volume;
pub mod disk_base;
mod disk_error;
pub mod disk_image;
mod error;
pub mod ext4;
pub mod index;
pub mod launch;
mod options;
mod pack;
pub mod package;
pub mod partition;
pub mod profile;
pub mod residue;
pub mod saved;

pub(crate) use forage_datadir::DataDir;

pub use base::BaseVm;
pub(crate) use error::run_tool;
pub use error::SynthError;
