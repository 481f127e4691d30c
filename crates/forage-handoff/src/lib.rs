//! forage-handoff: VM handoff between cloudlets (the VM handoff paper). So far:
//! - [`adapt`]: operating modes, the offline lookup table, the per-tick prediction of each
//!   mode's throughput from what the running handoff measures, and the switching rule
//!   with hysteresis;
//! - [`encode`]: the encoding stages of one mode (delta against the destination's chunk,
//!   segment compression with zstd, gzip, bzip2 or LZMA) and the profiler that builds the
//!   lookup table;
//! - [`segment`]: the wire format of about 1 MiB of modified chunks (dedup of zero and
//!   unchanged chunks, delta, compression, checksum) and its checked decoder;
//! - [`sample`]: the adaptation's table measured on the VM's own data as a handoff starts
//!   (a sample of its modified chunks through each candidate mode, in parallel);
//! - [`pipeline`]: the threads (feeder, parallel encoders, in-order delivery, adaptation
//!   every 100 ms with a trace), bounded channels throughout.
//!
//! - [`migration`]: QEMU's outgoing migration stream split into guest RAM pages (which
//!   become chunks) and the rest (rebuilt into the destination's incoming stream);
//! - [`apply`]: the destination's side, segments applied in order onto its base.
//!
//! - [`account`]: where a handoff's time went (link, encoders, waiting for QEMU's pages),
//!   read from its trace.
//!
//! The protocol and the orchestration of QEMU live in `forage-cloudlet` (`handoff`).

pub mod account;
pub mod adapt;
pub mod apply;
pub mod encode;
pub mod migration;
pub mod pipeline;
pub mod sample;
pub mod segment;
