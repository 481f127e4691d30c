//! Why a peer refused or failed: the code every protocol's Error message carries.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// No common protocol version.
    Version,
    /// The cloudlet holds none of the offered bases.
    NoBase,
    /// The overlay failed a check (checksum, truncation, format).
    BadOverlay,
    /// The peer broke the message sequence.
    Protocol,
    /// Something failed on the cloudlet (disk full, QEMU...).
    Internal,
    /// The peer did not answer in time.
    Timeout,
    /// The service, app or guest OS asked for is not held by this cloudlet.
    NotFound,
    /// Provisioning failed: the script failed or ran over its limit, the app package is
    /// incomplete or for another OS.
    Provision,
    /// The instance was stopped for want of use (no traffic for the idle timeout).
    Idle,
    /// The peer presented no credentials: it may pair, nothing else.
    Unpaired,
    /// Pairing refused (wrong, used or expired code).
    Pairing,
    /// A VM handoff failed (the instance keeps running at its source).
    Handoff,
    /// The cloudlet is at a limit (sessions in all or of this peer, disk space): later.
    Busy,
}

/// An error and every cause under it, as the one line an Error message carries to a peer
/// (the wire keeps text; the typed error stays on the side that had it).
pub fn one_line(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        line.push_str(": ");
        line.push_str(&c.to_string());
        cause = c.source();
    }
    line
}
