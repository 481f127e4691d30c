//! The API's bearer token: 48 hex digits in `DATA/trust/api-token` (mode 0600), made by
//! the daemon the first time it serves the API and read by the operator's CLI.
//!
//! Written through a private temporary file renamed into place, so a crash or a full
//! disk never leaves a short token; a file that holds no valid token (empty, cut) is
//! replaced with a new one when the daemon starts, with a warning.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Bytes of randomness (hex: twice as many digits).
const TOKEN_BYTES: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("no API token at {path}: the daemon makes it the first time `forage serve` runs with its API on")]
    Missing { path: PathBuf },
    #[error("{path} does not hold an API token (it should be {} hex digits): restart `forage serve` to make a new one", TOKEN_BYTES * 2)]
    Invalid { path: PathBuf },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn valid(t: &str) -> bool {
    t.len() == TOKEN_BYTES * 2 && t.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The token in `path` (for a client of the API): never creates one.
pub fn read(path: &Path) -> Result<String, TokenError> {
    match std::fs::read_to_string(path) {
        Ok(t) if valid(t.trim()) => Ok(t.trim().to_string()),
        Ok(_) => Err(TokenError::Invalid { path: path.into() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(TokenError::Missing { path: path.into() }),
        Err(source) => Err(TokenError::Io { path: path.into(), source }),
    }
}

/// The token in `path`, made (or remade, if the file holds none) for the daemon.
pub fn open_or_create(path: &Path) -> Result<String, TokenError> {
    match read(path) {
        Ok(t) => return Ok(t),
        Err(TokenError::Missing { .. }) => {}
        Err(TokenError::Invalid { .. }) => {
            tracing::warn!("{} held no valid API token (an interrupted write?): making a new one", path.display())
        }
        Err(e) => return Err(e),
    }
    let io = |source| TokenError::Io { path: path.into(), source };
    let mut bytes = [0u8; TOKEN_BYTES];
    std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes)).map_err(io)?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    // tempfile creates the file with mode 0600.
    let mut tmp = tempfile::Builder::new().prefix(".api-token-").tempfile_in(dir).map_err(io)?;
    tmp.write_all(token.as_bytes()).and_then(|()| tmp.as_file().sync_all()).map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_made_once_kept_private_and_remade_when_broken() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("trust").join("api-token");
        assert!(matches!(read(&path), Err(TokenError::Missing { .. })), "reading never creates");
        assert!(!path.exists());
        let a = open_or_create(&path).unwrap();
        assert_eq!(open_or_create(&path).unwrap(), a);
        assert_eq!(read(&path).unwrap(), a);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // A full disk once left an empty file: the daemon must still start.
        std::fs::write(&path, b"").unwrap();
        assert!(matches!(read(&path), Err(TokenError::Invalid { .. })));
        let b = open_or_create(&path).unwrap();
        assert!(valid(&b) && b != a);
    }
}
