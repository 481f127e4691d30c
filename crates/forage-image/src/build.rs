//! `forage image build NAME`: the recipes by name.

use forage_datadir::DataDir;
use sha2::{Digest, Sha256};

use crate::error::ImageError;
use crate::recipe::{BuildOptions, BuildOutcome};
use crate::{debian, tiny};

/// The busybox image.
pub const TINY: &str = tiny::NAME;
/// The Debian 12 (bookworm) image.
pub const DEBIAN_12: &str = debian::NAME;
/// Every recipe `forage image build` knows.
pub const RECIPES: &[&str] = &[TINY, DEBIAN_12];

/// Build (or find cached) the image `name`.
pub fn build(data: &DataDir, name: &str, opts: &BuildOptions) -> Result<BuildOutcome, ImageError> {
    if !RECIPES.contains(&name) {
        return Err(ImageError::UnknownRecipe { name: name.to_string(), known: RECIPES.join(", ") });
    }
    let agent = std::fs::read(&opts.agent_binary)
        .map_err(|source| ImageError::Io { path: opts.agent_binary.clone(), source })?;
    let agent_sha256 = hex::encode(Sha256::digest(&agent));
    match name {
        tiny::NAME => tiny::build(data, opts, &agent, agent_sha256),
        _ => debian::build(data, opts, &agent, agent_sha256),
    }
}
