//! What can go wrong making a base of a disk image (`forage base create --disk`): one
//! enum for the whole operation, the checks of `disk_image.rs` included.

use std::path::PathBuf;
use std::time::Duration;

use forage_image::cloud_seed::SeedError;
use forage_vm::qga::QgaError;

use crate::SynthError;

#[derive(Debug, thiserror::Error)]
pub enum DiskBaseError {
    #[error(transparent)]
    Name(#[from] forage_datadir::DataDirError),
    #[error("base {name} already exists at {}", path.display())]
    Exists { name: String, path: PathBuf },
    #[error("{}: not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error("{}: is not {claimed}: {found}", path.display())]
    NotAsClaimed { path: PathBuf, claimed: &'static str, found: String },
    #[error("{}: a {found} image, not raw or qcow2 (convert it with qemu-img first)", path.display())]
    OtherFormat { path: PathBuf, found: &'static str },
    #[error("{}: the qcow2 image names {what}; refused (QEMU would read it from this host): flatten it with `qemu-img convert -O qcow2` first", path.display())]
    NamesHostFile { path: PathBuf, what: &'static str },
    #[error("{}: virtual size {size} bytes is not a whole, non-zero number of 512-byte sectors", path.display())]
    BadSize { path: PathBuf, size: u64 },
    #[error("{}: virtual size {} MiB is over the cap of {} MiB (--max-disk-gib)", path.display(), size >> 20, max >> 20)]
    TooBig { path: PathBuf, size: u64, max: u64 },
    #[error("{tool} failed: {detail}")]
    Tool { tool: &'static str, detail: String },
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the cloud-init seed")]
    Seed(#[source] SeedError),
    #[error("booting the disk")]
    Boot(#[source] forage_vm::VmError),
    #[error("the guest was not ready within {waited:?} ({what}); its serial console ended with:\n{serial_tail}")]
    NotReady { what: String, waited: Duration, serial_tail: String },
    #[error("the guest's qemu-guest-agent")]
    GuestAgent(#[source] QgaError),
    #[error("saving the booted disk")]
    Save(#[source] forage_vm::SaveError),
    #[error("indexing the base")]
    Index(#[source] SynthError),
}
