//! The overlay format's version numbers.

/// Newest overlay format this crate understands; readers accept this and older.
pub const FORMAT_VERSION: u32 = 3;
/// Format written for plain overlays (a launch VM against its base).
pub const OVERLAY_FORMAT: u32 = 1;
/// Format written for residues (an instance's changes since launch; `parent` is set).
pub const RESIDUE_FORMAT: u32 = 2;
/// Format written for overlays whose chunks may name blocks of Debian packages
/// (`Manifest::packages` set): a reader that predates it refuses it instead of failing on
/// an unknown chunk reference.
pub const PACKAGES_FORMAT: u32 = 3;
