//! The shapes of VM substrates held by this cloudlet (`docs/substrates.md`): the pool's
//! totals and each substrate's description, as `GET /v1/substrates` and
//! `GET /v1/substrates/{name}` answer them and `/metrics` counts them.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where a substrate's file is: in host memory, or spilled to disk (read back on use).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SubstrateTier {
    Memory,
    Disk,
}

/// One substrate in the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SubstrateView {
    #[schema(example = "web")]
    pub name: String,
    /// Size of its (compressed) file.
    pub bytes: u64,
    pub tier: SubstrateTier,
    /// When an activation, push or info last used it (Unix milliseconds; 0: never).
    pub last_used_unix_ms: u64,
}

/// The pool: its memory budget, what it holds in memory and on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SubstrateList {
    pub budget_bytes: u64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub substrates: Vec<SubstrateView>,
}

/// A section of a substrate file (memory, disks, device state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SubstrateSection {
    #[schema(example = "memory")]
    pub name: String,
    /// Size of the file it stands for.
    pub raw_bytes: u64,
    /// Bytes of data it keeps (the rest is holes, or the guest image's disk).
    pub data_bytes: u64,
    /// Bytes it takes in the substrate file.
    pub encoded_bytes: u64,
}

/// One substrate described from its manifest (the whole file is verified when it enters
/// the pool and when it is activated, not on every read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SubstrateInfo {
    #[serde(flatten)]
    pub pool: SubstrateView,
    /// What was docked, e.g. `image:tiny+app:hashsearch`.
    pub source: String,
    /// The guest image it runs (this host's image of that name and recipe).
    pub image: String,
    /// Guest port of its service besides the agent's.
    pub service_port: Option<u16>,
    /// vCPUs and memory an activation may ask for.
    pub max_vcpus: u32,
    pub max_memory_mib: u64,
    /// Guest memory the balloon left when it was docked.
    pub docked_memory_bytes: u64,
    pub docked_at_unix: u64,
    pub sections: Vec<SubstrateSection>,
}

/// What `POST /v1/instances/{id}/dock` asks: dock the running instance as substrate
/// `name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceDockRequest {
    /// The substrate's name (1 to 64 letters, digits, `-`, `_`, `.`; not in the pool yet).
    #[schema(example = "web-docked")]
    pub name: String,
    /// A public substrate: each activation renews the guest's identity (host name,
    /// machine-id, SSH host keys).
    #[serde(default)]
    pub public: bool,
}

/// What docking an instance did. The instance has ended (its device was told why); the
/// substrate is in the pool, and what runs from it later is a new VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InstanceDockReport {
    pub instance: String,
    #[schema(example = "web-docked")]
    pub substrate: String,
    /// Restoring the saved instance as the VM to dock (after its save, not counted).
    pub restore_seconds: f64,
    /// Shrink + NIC + save + encode: the dock itself.
    pub dock_seconds: f64,
    pub shrink_seconds: f64,
    pub encode_seconds: f64,
    /// Guest memory before and after the shrink, and the memory data kept.
    pub memory_bytes: u64,
    pub docked_memory_bytes: u64,
    pub memory_data_bytes: u64,
    /// The substrate's file, and the files it stands for.
    pub compressed_bytes: u64,
    pub raw_bytes: u64,
    /// Substrates spilled to disk to keep the pool within its memory budget.
    pub spilled: Vec<String>,
}
