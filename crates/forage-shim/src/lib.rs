//! forage-shim: one process per running instance that holds what must outlive the
//! cloudlet daemon (as containerd's shims do for containers): the instance's view of its
//! memory and disk (a FUSE mount: a copy-on-write view of a saved VM, or the launch VM of
//! an overlay assembled while it arrives) and its service relay (TLS, the instance's
//! token). QEMU runs detached from the daemon too; a daemon that restarts finds the
//! shims of the instances it recorded and adopts them again.
//!
//! - [`protocol`]: `shim.json` and the messages on the control socket;
//! - [`ShimClient`]: the daemon's side;
//! - [`server::run`]: the shim (`forage-shim DIR/shim.json`).

mod client;
mod error;
pub mod protocol;
pub mod relay;
pub mod server;

pub use client::{shim_exe, ShimClient};
pub use error::ShimError;
pub use protocol::{ChunkBytes, RelaySpec, ShimHello, ShimSpec, ShimStatus, ViewSpec};
