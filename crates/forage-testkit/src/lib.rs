//! forage-testkit: helpers the test suites of several crates share (a dev-dependency
//! only, never linked into the product).
//!
//! - [`guest`]: the tiny guest image, booting it, asking its service, pairing a test
//!   device with a cloudlet, checking what a cloudlet left behind;
//! - [`synthetic`]: VMs without QEMU (sparse memory and disk files, a fake device state, a
//!   snapshot description), bases with their index, launch VMs that exercise every chunk
//!   reference kind, overlays made from them.
//! - [`wan`]: emulated WAN links (two network namespaces, a veth pair, `tc tbf`), for
//!   tests and benches.
//! - [`lan`]: hosts (network namespaces) on one bridge, one of them lossy, for multicast.

pub mod guest;
pub mod lan;
pub mod synthetic;
pub mod wan;
