//! The launch cache: overlays already applied to a base, keyed by overlay digest.

use rusqlite::{params, OptionalExtension, Row};

use crate::records::{path_text, CacheEntry, NewCacheEntry};
use crate::{now_unix_ms, State, StateError};

const COLUMNS: &str = "overlay_digest, base_digest, dir, bytes, created_unix_ms, last_used_unix_ms, hits";

fn from_row(r: &Row<'_>) -> rusqlite::Result<CacheEntry> {
    Ok(CacheEntry {
        overlay_digest: r.get(0)?,
        base_digest: r.get(1)?,
        dir: r.get::<_, String>(2)?.into(),
        bytes: r.get(3)?,
        created_unix_ms: r.get(4)?,
        last_used_unix_ms: r.get(5)?,
        hits: r.get(6)?,
    })
}

impl State {
    /// Adds an entry, or replaces the one with the same overlay digest (its hits restart
    /// at 0: the launch files are new).
    pub fn cache_put(&self, e: &NewCacheEntry) -> Result<(), StateError> {
        let dir = path_text("cache dir", &e.dir)?;
        let now = now_unix_ms();
        self.conn()
            .execute(
                "INSERT OR REPLACE INTO launch_cache (overlay_digest, base_digest, dir, bytes, \
                 created_unix_ms, last_used_unix_ms, hits) VALUES (?1, ?2, ?3, ?4, ?5, ?5, 0)",
                params![e.overlay_digest, e.base_digest, dir, e.bytes, now],
            )
            .map_err(StateError::sql("add cache entry"))?;
        tracing::debug!(overlay = %e.overlay_digest, bytes = e.bytes, "cache entry added");
        Ok(())
    }

    /// Looks an overlay up to launch from it: a found entry counts a hit and is marked
    /// used now. The returned entry includes this hit.
    pub fn cache_get(&self, overlay_digest: &str) -> Result<Option<CacheEntry>, StateError> {
        let entry = self
            .conn()
            .query_row(
                &format!(
                    "UPDATE launch_cache SET hits = hits + 1, last_used_unix_ms = ?2 \
                     WHERE overlay_digest = ?1 RETURNING {COLUMNS}"
                ),
                params![overlay_digest, now_unix_ms()],
                from_row,
            )
            .optional()
            .map_err(StateError::sql("use cache entry"))?;
        match &entry {
            Some(e) => tracing::debug!(overlay = %overlay_digest, hits = e.hits, "cache hit"),
            None => tracing::debug!(overlay = %overlay_digest, "cache miss"),
        }
        Ok(entry)
    }

    /// Looks an overlay up without counting a hit (for listings and eviction).
    pub fn cache_entry(&self, overlay_digest: &str) -> Result<Option<CacheEntry>, StateError> {
        self.conn()
            .query_row(
                &format!("SELECT {COLUMNS} FROM launch_cache WHERE overlay_digest = ?1"),
                [overlay_digest],
                from_row,
            )
            .optional()
            .map_err(StateError::sql("read cache entry"))
    }

    /// Every entry, least recently used first (the order to evict in).
    pub fn cache_list(&self) -> Result<Vec<CacheEntry>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&format!("SELECT {COLUMNS} FROM launch_cache ORDER BY last_used_unix_ms, overlay_digest"))
            .map_err(StateError::sql("list cache entries"))?;
        let rows = stmt.query_map([], from_row).map_err(StateError::sql("list cache entries"))?;
        rows.collect::<Result<_, _>>().map_err(StateError::sql("list cache entries"))
    }

    /// Forgets an entry and returns it (the caller removes its directory), or `None` if
    /// there was none.
    pub fn cache_remove(&self, overlay_digest: &str) -> Result<Option<CacheEntry>, StateError> {
        let entry = self
            .conn()
            .query_row(
                &format!("DELETE FROM launch_cache WHERE overlay_digest = ?1 RETURNING {COLUMNS}"),
                [overlay_digest],
                from_row,
            )
            .optional()
            .map_err(StateError::sql("remove cache entry"))?;
        if entry.is_some() {
            tracing::debug!(overlay = %overlay_digest, "cache entry removed");
        }
        Ok(entry)
    }
}
