//! What can go wrong activating a substrate (its own module, so that the decoded folder's
//! code and activation both use it without importing each other).

use std::path::{Path, PathBuf};

use forage_agent::AgentError;

use crate::format::DecodeError;
use crate::pool::PoolError;

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("substrate {name} is refused: {source}")]
    Refused {
        name: String,
        #[source]
        source: DecodeError,
    },
    #[error("substrate {name} was docked for {what}")]
    TooBig { name: String, what: String },
    #[error("substrate {name} runs image {image} of recipe {wanted}; this host's is {found}")]
    ImageMismatch { name: String, image: String, wanted: String, found: String },
    #[error("substrate {name} needs guest image {image}")]
    Image {
        name: String,
        image: String,
        #[source]
        source: forage_image::ImageError,
    },
    #[error("qemu-img could not make the copy-on-write disk {path}: {detail}")]
    CowDisk { path: PathBuf, detail: String },
    #[error("restoring substrate {name}")]
    Restore {
        name: String,
        #[source]
        source: forage_vm::RestoreError,
    },
    #[error("plugging a NIC into the activated VM")]
    PlugNic(#[source] forage_vm::VmError),
    #[error("growing the activated VM")]
    Expand(#[source] forage_vm::VmError),
    #[error("the activated VM's guest agent")]
    Agent(#[source] AgentError),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ActivateError {
    let path = path.to_path_buf();
    move |source| ActivateError::Io { path, source }
}
