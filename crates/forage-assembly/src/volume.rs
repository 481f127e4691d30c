//! The package volume of an overlay naming Debian packages (format 3): its chunks
//! `Package(N)` are block N of this file, which the cloudlet built from its .debs.

use std::fs::File;
use std::path::Path;

use forage_format::{Manifest, CHUNK_SIZE};

use crate::AssemblyError;

/// The volume `manifest` needs, open and checked to be as long as it says; `None` for an
/// overlay that names no packages.
pub(crate) fn open_volume(manifest: &Manifest, packages: Option<&Path>) -> Result<Option<File>, AssemblyError> {
    let io = |source| AssemblyError::Io { path: packages.unwrap_or(Path::new("")).to_path_buf(), source };
    match (&manifest.packages, packages) {
        (None, _) => Ok(None),
        (Some(set), Some(p)) => {
            let f = File::open(p).map_err(io)?;
            let have = f.metadata().map_err(io)?.len();
            if Some(have) != set.blocks.checked_mul(CHUNK_SIZE as u64) {
                return Err(AssemblyError::Mismatch(format!(
                    "{} is {have} bytes, the overlay's package volume is {} blocks",
                    p.display(),
                    set.blocks
                )));
            }
            Ok(Some(f))
        }
        (Some(_), None) => {
            Err(AssemblyError::Mismatch("the overlay names Debian packages and no package volume was given".into()))
        }
    }
}
