//! Errors of the migration stream parser and writer.
//!
//! Every parse error names the byte offset in the stream where the offending item starts
//! and what was expected there.

use std::io;

/// Why a migration stream could not be parsed.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("I/O error at stream offset {offset} while reading {what}")]
    Io {
        offset: u64,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("truncated migration stream at offset {offset}: expected {what}")]
    Truncated { offset: u64, what: &'static str },
    #[error("malformed migration stream at offset {offset}: expected {expected}, found {found}")]
    Malformed { offset: u64, expected: &'static str, found: String },
    #[error("unsupported migration stream feature at offset {offset}: {what}")]
    Unsupported { offset: u64, what: String },
    #[error("device state starting at offset {offset} exceeds the limit of {limit} bytes")]
    TooLarge { offset: u64, limit: usize },
}

impl ParseError {
    /// The stream offset the error refers to.
    pub fn offset(&self) -> u64 {
        match self {
            Self::Io { offset, .. }
            | Self::Truncated { offset, .. }
            | Self::Malformed { offset, .. }
            | Self::Unsupported { offset, .. }
            | Self::TooLarge { offset, .. } => *offset,
        }
    }
}

/// Why a migration stream could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("I/O error writing the migration stream")]
    Io(#[from] io::Error),
    #[error("invalid migration stream content: {0}")]
    Invalid(String),
}
