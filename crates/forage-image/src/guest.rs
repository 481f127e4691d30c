//! What every forage guest image promises.

/// Printed on the serial console once the agent runs.
pub const READY_MARKER: &str = "FORAGE-READY";
/// Guest port of the agent (see `forage-agent`).
pub const AGENT_PORT: u16 = forage_agent::AGENT_PORT;
/// The operating system forage guest images run (Linux on x86-64): what service VMs and
/// packed applications name to be matched.
pub const GUEST_OS: &str = "linux-x86_64";
