//! Build an image with its default settings unless it is built already.

use crate::{build, locate_guest_binary, BuildOptions, BuildOutcome, ImageError};
use forage_datadir::DataDir;

/// Image `name` with the defaults of its recipe (the guest agent from `make guest`),
/// built if missing or out of date.
pub fn ensure(data: &DataDir, name: &str) -> Result<BuildOutcome, ImageError> {
    let opts = BuildOptions { agent_binary: locate_guest_binary("forage-agent")?, disk_mib: 64, memory_mib: 256, force: false };
    build(data, name, &opts)
}
