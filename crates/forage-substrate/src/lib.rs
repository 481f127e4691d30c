//! forage-substrate: VM substrates (the third seed paper, chapter 3).
//!
//! A substrate is a running VM docked in a miniature state and kept ready to become an
//! instance: one vCPU of the several it may grow to, its memory ballooned down to what the
//! guest uses (QEMU punches the rest out of the memory file), saved with forage-vm's
//! snapshot, and encoded with its disk and device state into one compressed, checksummed,
//! self-describing file ([`format`], `docs/substrates.md`).
//!
//! - [`dock`]: boot an image (optionally install an app) or restore a saved VM (a service,
//!   a base VM), shrink, save, encode.
//! - [`pool`]: substrate files in host memory (tmpfs) within a budget, least recently
//!   used spilled to disk and read back on use.
//! - [`activate`]: verify, restore with a fresh NIC and a copy-on-write disk, hot-plug
//!   vCPUs, deflate the balloon.
//! - [`generalize`]: a public substrate's guest renews its identity on activation.
//! - [`push`]: one substrate to many hosts by UDP multicast (Debian's udpcast), verified
//!   at each receiver before it enters that host's pool.

pub mod activate;
mod activate_error;
pub mod decoded;
pub mod dock;
pub mod format;
pub mod generalize;
pub mod pool;
pub mod push;
mod record;
pub mod section;

pub use activate::{activate, ActivateError, ActivateRequest, Activated, ActivationReport};
pub use dock::{dock, DockError, DockReport, DockRequest, DockSource};
pub use format::{DecodeError, SubstrateManifest};
pub use pool::{DescribeError, Pool, PoolEntry, PoolError, PoolSummary, Tier};
pub use push::{push, receive, Channel, PushError, PushReport, ReceiveReport};
