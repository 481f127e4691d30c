//! Which parts of a running VM's disk were written from a point on: a QEMU dirty bitmap
//! on the disk's block node (`block-dirty-bitmap-add`), read back as a count
//! (`query-named-block-nodes`). Overlay creation adds one while the guest's file system is
//! frozen, to know whether anything reached the disk between the freeze and the save.

use serde::Deserialize;
use serde_json::json;

use crate::{Vm, VmError};

/// The block node of the VM's disk `i` (as [`crate::VmSpec::qemu_args`] names it).
pub fn disk_node(i: usize) -> String {
    format!("disk{i}")
}

#[derive(Debug, Deserialize)]
struct NamedNode {
    #[serde(rename = "node-name")]
    node_name: String,
    #[serde(rename = "dirty-bitmaps", default)]
    dirty_bitmaps: Vec<DirtyBitmap>,
}

#[derive(Debug, Deserialize)]
struct DirtyBitmap {
    name: String,
    count: u64,
    granularity: u64,
}

impl Vm {
    /// Start recording writes to `node` at `granularity` bytes in a bitmap named `name`
    /// (replacing one of that name).
    pub async fn dirty_bitmap_start(&self, node: &str, name: &str, granularity: u32) -> Result<(), VmError> {
        let _ = self.qmp().execute("block-dirty-bitmap-remove", Some(json!({ "node": node, "name": name }))).await;
        self.qmp()
            .execute(
                "block-dirty-bitmap-add",
                Some(json!({ "node": node, "name": name, "granularity": granularity, "persistent": false })),
            )
            .await?;
        Ok(())
    }

    /// Units of the bitmap's granularity written since [`Self::dirty_bitmap_start`].
    pub async fn dirty_bitmap_units(&self, node: &str, name: &str) -> Result<u64, VmError> {
        let v = self.qmp().execute("query-named-block-nodes", Some(json!({ "flat": true }))).await?;
        let bad = |detail: String| VmError::BadSpec { vm: self.spec().name.clone(), detail };
        let nodes: Vec<NamedNode> =
            serde_json::from_value(v).map_err(|e| bad(format!("query-named-block-nodes answer: {e}")))?;
        let bitmap = nodes
            .iter()
            .filter(|n| n.node_name == node)
            .flat_map(|n| &n.dirty_bitmaps)
            .find(|b| b.name == name)
            .ok_or_else(|| bad(format!("no dirty bitmap {name} on block node {node}")))?;
        Ok(bitmap.count.div_ceil(bitmap.granularity.max(1)))
    }

    /// Stop recording (the bitmap is dropped).
    pub async fn dirty_bitmap_stop(&self, node: &str, name: &str) -> Result<(), VmError> {
        self.qmp().execute("block-dirty-bitmap-remove", Some(json!({ "node": node, "name": name }))).await?;
        Ok(())
    }
}
