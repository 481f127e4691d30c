//! forage-handoff: VM handoff between cloudlets (the VM handoff paper). So far the
//! adaptation of its pipeline ([`adapt`]): operating modes, the offline lookup table, the
//! per-tick prediction of each mode's throughput from what the running handoff measures,
//! and the switching rule with hysteresis. The pipeline itself and the handoff protocol
//! are not built yet (issue "VM handoff").

pub mod adapt;
