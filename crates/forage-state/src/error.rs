//! Why opening, reading or updating the state failed.

use std::path::PathBuf;

/// Why [`State::open`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot create the directory of state file {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open state file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "state file {path} has schema version {found}, newer than this forage supports \
         ({supported}): upgrade forage or use another data directory"
    )]
    NewerSchema { path: PathBuf, found: u32, supported: u32 },
    #[error("cannot migrate state file {path} from schema version {from} to {to}")]
    Migrate {
        path: PathBuf,
        from: u32,
        to: u32,
        #[source]
        source: rusqlite::Error,
    },
}

/// Why a read or an update of the state failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state: {op} failed")]
    Sql {
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("state: no {kind} with id {id:?}")]
    NotFound { kind: &'static str, id: String },
    #[error("state: {kind} {id:?} already exists")]
    Duplicate { kind: &'static str, id: String },
    #[error("state: {field} {path:?} is not UTF-8")]
    NotUtf8 { field: &'static str, path: PathBuf },
}

impl StateError {
    /// Wraps a SQLite error, naming the operation.
    pub(crate) fn sql(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StateError {
        move |source| StateError::Sql { op, source }
    }

    /// Wraps the error of an insert: a primary-key clash becomes [`StateError::Duplicate`].
    pub(crate) fn insert(op: &'static str, kind: &'static str, id: &str) -> impl FnOnce(rusqlite::Error) -> StateError {
        let id = id.to_string();
        move |source| match &source {
            rusqlite::Error::SqliteFailure(e, _) if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY => {
                StateError::Duplicate { kind, id }
            }
            _ => StateError::Sql { op, source },
        }
    }
}
