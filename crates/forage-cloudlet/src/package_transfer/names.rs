//! The names a package transfer takes: a plain name, or a base's digest.

/// Whether `base` names a base by its digest (64 hex digits: the cluster knows bases so).
pub fn is_digest(base: &str) -> bool {
    base.len() == 64 && base.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A plain name: what may become a folder name here.
pub(super) fn plain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}
