//! Build an image with its default settings unless it is built already.

use crate::{build, locate_guest_binary, BuildOptions, BuildOutcome, ImageError};
use forage_datadir::DataDir;

/// Image `name` with the defaults of its recipe (the guest agent from `make guest`),
/// built if missing or out of date.
pub fn ensure(data: &DataDir, name: &str) -> Result<BuildOutcome, ImageError> {
    let opts = BuildOptions::new(locate_guest_binary("forage-agent")?);
    build(data, name, &opts)
}
