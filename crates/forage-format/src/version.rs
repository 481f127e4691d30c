//! The overlay format's version numbers.

/// Newest overlay format this crate understands; readers accept this and older.
pub const FORMAT_VERSION: u32 = 2;
/// Format written for plain overlays (a launch VM against its base).
pub const OVERLAY_FORMAT: u32 = 1;
/// Format written for residues (an instance's changes since launch; `parent` is set).
pub const RESIDUE_FORMAT: u32 = 2;
