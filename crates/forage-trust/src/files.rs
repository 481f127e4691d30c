//! Files of keys and credentials, written safely; the clock.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::TrustError;

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrustError + '_ {
    move |source| TrustError::Io { path: path.to_path_buf(), source }
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub(crate) fn offset(unix: u64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix as i64).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// Write `data` through a temporary file of its own (created with mode 0600, unique
/// name, synced), renamed into place; files that are not `secret` then get mode 0644. An
/// interrupted write leaves at worst a private temporary file, never a readable key.
pub(crate) fn write_file(path: &Path, data: &[u8], secret: bool) -> Result<(), TrustError> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut tmp = tempfile::Builder::new().prefix(".partial-").tempfile_in(dir).map_err(io(dir))?;
    tmp.write_all(data).map_err(io(tmp.path()))?;
    if !secret {
        tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644)).map_err(io(path))?;
    }
    tmp.as_file().sync_all().map_err(io(path))?;
    tmp.persist(path).map_err(|e| TrustError::Io { path: path.to_path_buf(), source: e.error })?;
    Ok(())
}
