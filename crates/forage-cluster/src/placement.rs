//! Placement: which node of the cluster serves a device's request. Any node accepts the
//! request, reads the live nodes from etcd and answers with the best one (the device is
//! redirected there). "Best" is a [`Utility`]: the default, [`HoldsThenLeastLoaded`],
//! ranks nodes holding what the request needs (the cached launch VM first, then the
//! service VM, then the base) and among them the least loaded; a node that cannot serve
//! the request at all scores `None`.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::resources::Node;

/// What a device asks for, as far as placement cares.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PlacementRequest {
    /// Digest of the base VM the overlay applies to (synthesis).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_digest: Option<String>,
    /// Digest of the overlay (a node with its launch VM cached skips synthesis).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay_digest: Option<String>,
    /// A service VM (offload, cached VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Reserve room on the chosen node (a request about to go there, as in the device
    /// protocol's redirect) rather than only ask where it would go.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reserve: bool,
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Placement {
    /// The node chosen.
    pub node: String,
    /// Where the device connects (`forage synthesize --cloudlet ADDR`).
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub device_addr: SocketAddr,
    /// The utility's score of that node, and the utility's name.
    pub score: f64,
    pub utility: String,
    /// Live nodes considered, and how many could serve the request.
    pub considered: u32,
    pub able: u32,
    /// From the request's arrival to the answer, etcd read included.
    pub place_ms: f64,
    /// The reservation taken on the node (`reserve`), released by the node's heartbeat
    /// once the instance started or the session failed there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation: Option<String>,
    /// Reservations lost to concurrent placements (each: read again, chose again).
    #[serde(default)]
    pub conflicts: u32,
}

/// How good a node is for a request: higher is better, `None` if it cannot serve it.
pub trait Utility: Send + Sync {
    fn name(&self) -> &'static str;
    fn score(&self, request: &PlacementRequest, node: &Node) -> Option<f64>;
}

/// Holding what the request needs first (cached launch VM 4, service VM 2, base 1: a
/// request for a base no node holds cannot be placed), then the least load: free memory
/// and idle cores break ties within a rank. A node with less than
/// [`RESERVED_MIB`](crate::reservation::RESERVED_MIB) free (reservations deducted) cannot
/// serve it.
pub struct HoldsThenLeastLoaded;

impl Utility for HoldsThenLeastLoaded {
    fn name(&self) -> &'static str {
        "holds-then-least-loaded"
    }

    fn score(&self, r: &PlacementRequest, n: &Node) -> Option<f64> {
        let cached = r.overlay_digest.as_deref().is_some_and(|d| n.holds_launch_vm(d));
        let service = r.service.as_deref().map(|s| n.holds_service(s));
        let base = r.base_digest.as_deref().map(|d| n.holds_base(d));
        let rank = match (cached, service, base) {
            (true, _, _) => 4.0,
            (false, Some(true), _) => 2.0,
            (false, Some(false), _) => return None,
            (false, None, Some(true)) => 1.0,
            (false, None, Some(false)) => return None,
            (false, None, None) => 0.0,
        };
        if n.status.free_memory_mib < crate::reservation::RESERVED_MIB {
            return None;
        }
        // Load in [0, 1): 1 - idle share, weighted with memory use.
        let s = &n.status;
        let busy = (s.load_per_core.max(0.0) / (1.0 + s.load_per_core.max(0.0))) * 0.5
            + (s.instances_running as f64 / (1.0 + s.instances_running as f64)) * 0.3
            + (1.0 - (s.free_memory_mib as f64 / n.spec.memory_mib.max(1) as f64).clamp(0.0, 1.0)) * 0.2;
        Some(rank * 10.0 + (1.0 - busy))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    #[error("the cluster has no live node")]
    NoNodes,
    #[error("none of the {considered} live nodes can serve it (it needs {needs})")]
    NoneAble { considered: u32, needs: String },
}

/// The best of `nodes` for `request` by `utility` (ties: the first name).
pub fn choose<'a>(
    nodes: &'a [Node],
    request: &PlacementRequest,
    utility: &dyn Utility,
) -> Result<(&'a Node, f64, u32), PlaceError> {
    if nodes.is_empty() {
        return Err(PlaceError::NoNodes);
    }
    let mut scored: Vec<(&Node, f64)> =
        nodes.iter().filter_map(|n| utility.score(request, n).map(|s| (n, s))).collect();
    let able = scored.len() as u32;
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.name().cmp(b.0.name())));
    match scored.first() {
        Some(&(n, s)) => Ok((n, s, able)),
        None => Err(PlaceError::NoneAble { considered: nodes.len() as u32, needs: needs(request) }),
    }
}

fn needs(r: &PlacementRequest) -> String {
    let mut parts = Vec::new();
    if let Some(s) = &r.service {
        parts.push(format!("service {s}"));
    }
    if let Some(b) = &r.base_digest {
        parts.push(format!("base {}", b.chars().take(16).collect::<String>()));
    }
    if parts.is_empty() {
        "nothing".into()
    } else {
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{NodeSpec, NodeStatus};

    fn node(name: &str, bases: &[&str], load: f64, running: u32) -> Node {
        let spec = NodeSpec { device_addr: "10.0.0.1:7878".parse().unwrap(), cores: 2, memory_mib: 4096 };
        let status = NodeStatus {
            bases: bases.iter().map(|b| b.to_string()).collect(),
            load_per_core: load,
            instances_running: running,
            free_memory_mib: 2048,
            ..Default::default()
        };
        Node::new(name, 1, spec, status)
    }

    #[test]
    fn the_node_holding_the_base_wins_then_the_least_loaded() {
        let base = "b".repeat(64);
        let nodes = [node("a", &[], 0.0, 0), node("b", &[&base], 1.0, 3), node("c", &[&base], 0.1, 0)];
        let r = PlacementRequest { base_digest: Some(base.clone()), ..Default::default() };
        let (n, _, able) = choose(&nodes, &r, &HoldsThenLeastLoaded).unwrap();
        assert_eq!((n.name(), able), ("c", 2));
        let r = PlacementRequest { base_digest: Some("c".repeat(64)), ..Default::default() };
        assert!(matches!(choose(&nodes, &r, &HoldsThenLeastLoaded), Err(PlaceError::NoneAble { considered: 3, .. })));
        assert!(matches!(choose(&[], &r, &HoldsThenLeastLoaded), Err(PlaceError::NoNodes)));
        let (n, _, _) = choose(&nodes, &PlacementRequest::default(), &HoldsThenLeastLoaded).unwrap();
        assert_eq!(n.name(), "a", "nothing needed: the least loaded");
    }

    #[test]
    fn a_utility_is_pluggable() {
        struct Named(&'static str);
        impl Utility for Named {
            fn name(&self) -> &'static str {
                "named"
            }
            fn score(&self, _: &PlacementRequest, n: &Node) -> Option<f64> {
                (n.name() == self.0).then_some(1.0)
            }
        }
        let nodes = [node("a", &[], 0.0, 0), node("b", &[], 0.0, 0)];
        assert_eq!(choose(&nodes, &PlacementRequest::default(), &Named("b")).unwrap().0.name(), "b");
    }
}
