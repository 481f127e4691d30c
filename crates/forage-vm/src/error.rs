//! What can go wrong running, saving and restoring VMs.

use std::path::PathBuf;

use crate::qmp;
use crate::snapshot::SnapshotError;

/// Errors of starting and driving a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("qemu-system-x86_64 not found: install it with `apt-get install qemu-system-x86` (or set FORAGE_QEMU)")]
    QemuNotFound,
    #[error("cannot start {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} does not exist (build the guest image first: `forage image build tiny`)")]
    MissingInput { path: PathBuf },
    #[error("VM {vm}: {detail}")]
    BadSpec { vm: String, detail: String },
    #[error("VM {vm}: {detail}")]
    Hotplug { vm: String, detail: String },
    #[error("VM {vm} has no control socket: it cannot be driven from another process")]
    NoControlSocket { vm: String },
    #[error("QMP socket path {path} is longer than 107 bytes")]
    SocketPathTooLong { path: PathBuf },
    #[error("VM {vm}: QEMU exited ({status}); it said:\n{qemu_said}")]
    Exited { vm: String, status: String, qemu_said: String },
    #[error("VM {vm}: no {marker:?} on the serial console after {waited:?}; its last lines:\n{serial_tail}")]
    ReadyTimeout { vm: String, marker: String, waited: std::time::Duration, serial_tail: String },
    #[error(transparent)]
    Qmp(#[from] qmp::QmpError),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Errors of saving a VM.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("{dir} already holds a saved VM; remove it or save elsewhere")]
    Exists { dir: PathBuf },
    #[error("saving VM {vm}: QEMU could not write its device state: {detail}")]
    Migration { vm: String, detail: String },
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("saving: {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the save finished but does not check out")]
    Check(#[from] SnapshotError),
}

/// Errors of restoring a VM.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("cannot copy {from} to {to}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("VM {vm}: QEMU could not load {state}:\n{qemu_said}")]
    Incoming { vm: String, state: PathBuf, qemu_said: String },
    #[error(transparent)]
    Vm(#[from] VmError),
}
