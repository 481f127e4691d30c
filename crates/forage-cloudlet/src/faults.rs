//! Faults a test can inject into a debug build (`FORAGE_FAULTS=name,name`), to reach
//! states that timing alone cannot reach reliably: a message lost at one exact step.
//! Release builds compile every check to `false`.
//!
//! | name | where | what happens |
//! |---|---|---|
//! | `handoff-done-lost` | handoff destination | it resumes the VM and closes the connection instead of answering HandoffDone |
//! | `handoff-commit-lost` | handoff destination | it drops the commit (as if never received) and ends the session |

/// Whether the fault `name` is asked for (debug builds only).
pub(crate) fn injected(name: &str) -> bool {
    cfg!(debug_assertions) && std::env::var("FORAGE_FAULTS").is_ok_and(|v| v.split(',').any(|f| f.trim() == name))
}
