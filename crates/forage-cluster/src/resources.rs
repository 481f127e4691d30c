//! The cluster's objects, shaped like Kubernetes resources (`apiVersion`, `kind`,
//! `metadata {name, generation}`, `spec`, `status`) so that a Kubernetes adapter (a CRD
//! per kind) can carry the same JSON. `spec` is what a node declares about itself and
//! changes rarely (its addresses, its size): `generation` counts its changes. `status` is
//! what it observes and rewrites at every heartbeat.
//!
//! Objects read from etcd are untrusted bytes: [`decode`] refuses one over
//! [`MAX_OBJECT_BYTES`], of another apiVersion or kind, with a name that is not plain, or
//! with more than [`MAX_LIST`] entries in a list.

use std::net::SocketAddr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The API group and version of every object.
pub const API_VERSION: &str = "forage.dev/v1alpha1";
/// The largest object read from etcd.
pub const MAX_OBJECT_BYTES: usize = 64 << 10;
/// The most entries of any list in an object.
pub const MAX_LIST: usize = 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    /// Bumped each time `spec` changes.
    pub generation: u64,
}

/// A forage node: one host of the cloudlet (`kind: Node`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Node {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: NodeSpec,
    pub status: NodeStatus,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct NodeSpec {
    /// Where devices and peer cloudlets connect (`forage serve --listen`).
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub device_addr: SocketAddr,
    pub cores: u32,
    pub memory_mib: u64,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub free_memory_mib: u64,
    /// The 1-minute load average per core.
    pub load_per_core: f64,
    pub instances_running: u32,
    /// Digests of the base VMs held.
    pub bases: Vec<String>,
    /// Ids of the service VMs held.
    pub services: Vec<String>,
    /// Overlay digests whose launch VMs are cached.
    pub cached_launch_vms: Vec<String>,
    /// Names of the substrates held.
    pub substrates: Vec<String>,
    /// When the node last wrote this status (its clock).
    pub heartbeat_unix_ms: u64,
}

/// An instance, as the cluster knows it (`kind: Instance`); kept after its node is gone,
/// then marked [`InstancePhase::Lost`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ClusterInstance {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: InstanceSpec,
    pub status: InstanceState,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct InstanceSpec {
    /// The node it runs on.
    pub node: String,
    /// What it runs (service id or application name).
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct InstanceState {
    pub phase: InstancePhase,
    /// Where its device reaches its service.
    pub endpoint: String,
    /// Why it is in this phase, when not running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum InstancePhase {
    Running,
    /// Its node's lease expired: the node stopped renewing it (down, or cut off).
    Lost,
}

impl Node {
    pub fn new(name: &str, generation: u64, spec: NodeSpec, status: NodeStatus) -> Self {
        let metadata = ObjectMeta { name: name.into(), generation };
        Self { api_version: API_VERSION.into(), kind: "Node".into(), metadata, spec, status }
    }

    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    /// Whether it holds base `digest` (or a digest starting with it, 12+ characters).
    pub fn holds_base(&self, digest: &str) -> bool {
        holds(&self.status.bases, digest)
    }

    pub fn holds_launch_vm(&self, overlay_digest: &str) -> bool {
        holds(&self.status.cached_launch_vms, overlay_digest)
    }

    pub fn holds_service(&self, service: &str) -> bool {
        self.status.services.iter().any(|s| s == service)
    }
}

fn holds(list: &[String], digest: &str) -> bool {
    digest.len() >= 12 && list.iter().any(|d| d.starts_with(digest) || digest.starts_with(d.as_str()))
}

impl ClusterInstance {
    pub fn new(id: &str, node: &str, name: &str, endpoint: &str) -> Self {
        Self {
            api_version: API_VERSION.into(),
            kind: "Instance".into(),
            metadata: ObjectMeta { name: id.into(), generation: 1 },
            spec: InstanceSpec { node: node.into(), name: name.into() },
            status: InstanceState { phase: InstancePhase::Running, endpoint: endpoint.into(), reason: None },
        }
    }
}

/// Why bytes read from etcd are not an object of the cluster.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("{key}: {len} bytes, over the {MAX_OBJECT_BYTES}-byte limit of an object")]
    TooLarge { key: String, len: usize },
    #[error("{key}: not a {kind} object")]
    Json {
        key: String,
        kind: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{key}: apiVersion {api_version:?} kind {found:?}, expected {API_VERSION} {kind}")]
    WrongKind { key: String, api_version: String, found: String, kind: &'static str },
    #[error("{key}: name {name:?} is not plain (a-z, 0-9, '-', '.', '_', 1 to 63 characters)")]
    BadName { key: String, name: String },
    #[error("{key}: a list of {len} entries, over {MAX_LIST}")]
    TooMany { key: String, len: usize },
}

/// Whether `name` is plain: safe in a key, a path, a log line.
pub fn plain_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        && !name.starts_with('.')
}

/// What [`decode`] checks in each kind.
pub trait Object: DeserializeOwned {
    const KIND: &'static str;
    fn header(&self) -> (&str, &str, &str);
    fn longest_list(&self) -> usize;
}

impl Object for Node {
    const KIND: &'static str = "Node";
    fn header(&self) -> (&str, &str, &str) {
        (&self.api_version, &self.kind, &self.metadata.name)
    }
    fn longest_list(&self) -> usize {
        let s = &self.status;
        [s.bases.len(), s.services.len(), s.cached_launch_vms.len(), s.substrates.len()].into_iter().max().unwrap_or(0)
    }
}

impl Object for ClusterInstance {
    const KIND: &'static str = "Instance";
    fn header(&self) -> (&str, &str, &str) {
        (&self.api_version, &self.kind, &self.metadata.name)
    }
    fn longest_list(&self) -> usize {
        0
    }
}

/// Decode the object at `key` from etcd's bytes, checked.
pub fn decode<T: Object>(key: &str, bytes: &[u8]) -> Result<T, DecodeError> {
    let key = || key.chars().take(200).collect::<String>();
    if bytes.len() > MAX_OBJECT_BYTES {
        return Err(DecodeError::TooLarge { key: key(), len: bytes.len() });
    }
    let object: T =
        serde_json::from_slice(bytes).map_err(|source| DecodeError::Json { key: key(), kind: T::KIND, source })?;
    let (api_version, kind, name) = object.header();
    if api_version != API_VERSION || kind != T::KIND {
        return Err(DecodeError::WrongKind {
            key: key(),
            api_version: api_version.chars().take(100).collect(),
            found: kind.chars().take(100).collect(),
            kind: T::KIND,
        });
    }
    if !plain_name(name) {
        return Err(DecodeError::BadName { key: key(), name: name.chars().take(100).collect() });
    }
    let len = object.longest_list();
    if len > MAX_LIST {
        return Err(DecodeError::TooMany { key: key(), len });
    }
    Ok(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Node {
        let spec = NodeSpec { device_addr: "10.0.0.1:7878".parse().unwrap(), cores: 2, memory_mib: 4096 };
        let status = NodeStatus { bases: vec!["ab".repeat(32)], ..Default::default() };
        Node::new("n1", 1, spec, status)
    }

    #[test]
    fn a_node_round_trips_in_kubernetes_shape() {
        let n = node();
        let text = serde_json::to_string(&n).unwrap();
        assert!(text
            .contains(r#""apiVersion":"forage.dev/v1alpha1","kind":"Node","metadata":{"name":"n1","generation":1}"#));
        assert_eq!(decode::<Node>("k", text.as_bytes()).unwrap(), n);
        assert!(n.holds_base(&"ab".repeat(8)));
        assert!(!n.holds_base("ab"), "a digest shorter than 12 characters names nothing");
    }

    #[test]
    fn hostile_objects_are_refused_with_one_line() {
        let mut n = node();
        n.metadata.name = "../etc".into();
        let e = decode::<Node>("k", serde_json::to_string(&n).unwrap().as_bytes()).unwrap_err();
        assert!(matches!(e, DecodeError::BadName { .. }), "{e}");
        let mut n = node();
        n.status.bases = vec!["x".into(); MAX_LIST + 1];
        assert!(matches!(
            decode::<Node>("k", serde_json::to_string(&n).unwrap().as_bytes()),
            Err(DecodeError::TooMany { .. })
        ));
        assert!(matches!(decode::<Node>("k", &vec![b' '; MAX_OBJECT_BYTES + 1]), Err(DecodeError::TooLarge { .. })));
        let i = ClusterInstance::new("i1", "n1", "svc", "10.0.0.1:9000");
        assert!(matches!(
            decode::<Node>("k", serde_json::to_string(&i).unwrap().as_bytes()),
            Err(DecodeError::Json { .. } | DecodeError::WrongKind { .. })
        ));
        assert!(matches!(decode::<Node>("k", b"{\"apiVersion\":"), Err(DecodeError::Json { .. })));
    }
}
