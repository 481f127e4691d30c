//! What every synthesis mode reaches: the session's place and base, and the digest that
//! names an overlay.

use std::path::PathBuf;
use std::time::Instant;

use forage_synth::BaseVm;

use crate::instance::Place;
use crate::Cloudlet;

/// A synthesis session: where its instance lives and the base it applies to.
pub(crate) struct Ctx<'a> {
    pub cloudlet: &'a Cloudlet,
    pub id: String,
    pub dir: PathBuf,
    pub base: BaseVm,
    pub started: Instant,
}

impl Ctx<'_> {
    pub fn place(&self) -> Place<'_> {
        Place { cloudlet: self.cloudlet, id: &self.id, dir: &self.dir, started: self.started }
    }
}

/// The digest naming an overlay: SHA-256 of its manifest, as its header records it
/// (checked against the manifest by `OverlayReader::open`).
pub(crate) fn overlay_digest(prefix: &[u8]) -> String {
    hex::encode(&prefix[24..56])
}
