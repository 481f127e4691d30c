//! Errors reading or checking overlay bytes.

use crate::version::FORMAT_VERSION;

/// Errors reading or checking overlay bytes. Every message says what is wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("not a forage overlay (bad magic)")]
    BadMagic,
    #[error("overlay format {found} is newer than this forage understands ({FORMAT_VERSION})")]
    NewerFormat { found: u32 },
    #[error("overlay is truncated: {what}")]
    Truncated { what: String },
    #[error("overlay is corrupted: {what}")]
    Corrupt { what: String },
    #[error("overlay {what} is over the limit of {limit} bytes")]
    TooLarge { what: String, limit: u64 },
    #[error("I/O error reading the overlay")]
    Io(#[from] std::io::Error),
}

impl FormatError {
    pub fn corrupt(what: impl Into<String>) -> Self {
        Self::Corrupt { what: what.into() }
    }
}
