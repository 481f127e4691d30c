//! Why a saved VM was not imported.

use std::path::{Path, PathBuf};

use crate::VmError;

use super::libvirt::LibvirtHeaderError;

/// Why a saved VM was not imported. Offsets are bytes of the saved file.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{dir} already exists")]
    Exists { dir: PathBuf },
    #[error("byte 0: not a saved VM: found {found}, expected a QEMU stream (\"QEVM\") or a libvirt save (\"LibvirtQemudSave\")")]
    Foreign { found: String },
    #[error("libvirt header")]
    Libvirt(#[from] LibvirtHeaderError),
    #[error("byte {offset}: the libvirt header announces {data_len} bytes of XML, the file has {file_len} bytes")]
    LibvirtData { offset: u64, data_len: u32, file_len: u64 },
    #[error("byte {offset}: migration stream")]
    Stream {
        offset: u64,
        #[source]
        source: forage_migstream::ParseError,
    },
    #[error("byte {offset}: cannot import: {reason}")]
    Refused { offset: u64, reason: String },
    #[error("starting the target VM to read what it offers")]
    Reference(#[source] VmError),
    #[error("saving the target VM's reference state")]
    ReferenceSave(#[source] Box<crate::SaveError>),
    #[error("{path}: the target VM's reference state does not read: {detail}")]
    ReferenceStream { path: PathBuf, detail: String },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: forage_migstream::WriteError,
    },
    #[error("{path}: qemu-img could not convert the disk: {detail}")]
    Disk { path: PathBuf, detail: String },
    #[error("the imported VM does not check out as a snapshot")]
    Check(#[from] crate::SnapshotError),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ImportError {
    pub(crate) fn io(path: &Path) -> impl Fn(std::io::Error) -> ImportError + '_ {
        move |source| ImportError::Io { path: path.to_path_buf(), source }
    }
}
