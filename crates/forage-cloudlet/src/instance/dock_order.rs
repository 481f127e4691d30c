//! What docking a running instance is asked and why it did not happen: the types an
//! instance's control ([`super::control`]) shares with the dock itself ([`super::dock`]),
//! kept apart so that neither imports the other.

use std::path::PathBuf;

use forage_substrate::{DockError, DockReport, PoolError};
use tokio::sync::oneshot;

/// An order to dock an instance (from the API).
pub(crate) struct DockOrder {
    pub name: String,
    pub public: bool,
    pub reply: oneshot::Sender<Result<DockReport, DockInstanceError>>,
}

/// Why an instance's control did not take a dock order.
#[derive(Debug, Clone, Copy)]
pub(crate) enum DockRefusal {
    /// Its holder does not carry out dock orders (yet).
    NotDockable,
    /// A move order waits.
    Moving,
    /// A dock order was given already.
    Docking,
}

/// Why an instance was not docked.
#[derive(Debug, thiserror::Error)]
pub enum DockInstanceError {
    #[error("{0:?} is not a substrate name (1 to 64 letters, digits, '-', '_', '.')")]
    BadName(String),
    #[error("no running instance {0} on this cloudlet")]
    NoInstance(String),
    #[error("substrate {0} exists already (forage substrate rm {0})")]
    Exists(String),
    #[error("instance {0} cannot be docked now: an early-start instance whose overlay is still arriving, or one a device joined, is not")]
    NotDockable(String),
    #[error("instance {0} is being handed off")]
    HandoffUnderWay(String),
    #[error("instance {0} is being docked already")]
    Busy(String),
    #[error("the substrate pool")]
    Pool(#[source] PoolError),
    #[error("the kernel instance {id} boots, {}, is not a guest image's of this cloudlet", kernel.display())]
    NoImage {
        id: String,
        kernel: PathBuf,
        #[source]
        source: forage_image::ImageError,
    },
    #[error("instance {id} boots no kernel directly: it has no guest image to dock with")]
    NoKernel { id: String },
    #[error("asking instance {id}'s QEMU how many vCPUs it has")]
    Vcpus {
        id: String,
        #[source]
        source: forage_vm::VmError,
    },
    #[error("saving instance {id} (the end of QEMU's log: {qemu_said:?})")]
    Save {
        id: String,
        qemu_said: String,
        #[source]
        source: Box<forage_vm::SaveError>,
    },
    #[error("the saved instance {id}")]
    Saved {
        id: String,
        #[source]
        source: forage_vm::SnapshotError,
    },
    #[error("qemu-img could not flatten instance {id}'s disk {}: {detail}", path.display())]
    Flatten { id: String, path: PathBuf, detail: String },
    #[error("docking instance {id} as substrate {name}")]
    Dock {
        id: String,
        name: String,
        #[source]
        source: Box<DockError>,
    },
    #[error("instance {0} ended before it was docked")]
    Ended(String),
}
