//! Reservations: what a placement takes on the node it chose, until that node's own
//! record shows the instance (or the failure) the placement led to.
//!
//! Without them, placement reads each node's load as its last heartbeat wrote it, so
//! requests that arrive together all see the same least-loaded node and all go there.
//! With them, each placement writes `reservations/TARGET/ID` (a [`Reservation`], attached
//! to the placing node's lease: it goes if the placer dies) in an etcd transaction that
//! succeeds only if neither the target's node key nor any reservation on the target was
//! written since the placement read them; a placement that loses the race reads again
//! and chooses again. The utility sees each node with its fresh reservations counted in
//! ([`project`]): one more instance and [`RESERVED_MIB`] less free memory each, so a
//! node with too little memory left is not able at all (two placers cannot both take
//! its last slot).
//!
//! ```mermaid
//! sequenceDiagram
//!     participant P as placing node
//!     participant E as etcd
//!     participant T as target node
//!     P->>E: kv/txn {range nodes/, drains/, reservations/}   (one revision R)
//!     Note over P: project reservations onto nodes, choose T
//!     P->>E: kv/txn {if MOD(reservations/T/*) <= R and MOD(nodes/T) <= R: put reservations/T/ID (P's lease)}
//!     E-->>P: succeeded (else read again, choose again)
//!     Note over T: the device arrives; an instance starts or the session fails
//!     T->>E: kv/txn {put nodes/T (instances + 1), delete reservations/T/oldest}   (next heartbeat)
//! ```
//!
//! A reservation is released by its target's heartbeat, in the transaction that
//! publishes the target's new record: one reservation (the oldest) per instance started
//! there or session failed there since the previous heartbeat; reservations older than
//! [`RESERVATION_TTL_MS`] (a device that never came) are no longer counted and are
//! deleted at the target's next heartbeat. The counting is by number, not by request: an
//! instance started on the target without a placement (a device that went there
//! directly) also releases one.

use serde::{Deserialize, Serialize};

use crate::resources::{Node, Object};
use crate::resources::{ObjectMeta, API_VERSION};

/// The memory a reservation takes from its node's free memory (the tiny guest's size).
pub const RESERVED_MIB: u64 = 256;
/// How long a reservation is counted without its device arriving.
pub const RESERVATION_TTL_MS: u64 = 120_000;

/// A placement's hold on a node (`kind: Reservation`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reservation {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: ReservationSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReservationSpec {
    /// The node reserved on.
    pub node: String,
    /// The node that placed the request.
    pub by: String,
    pub memory_mib: u64,
    /// When it was made (the placing node's clock).
    pub created_unix_ms: u64,
}

impl Reservation {
    pub fn new(id: &str, node: &str, by: &str, created_unix_ms: u64) -> Self {
        Self {
            api_version: API_VERSION.into(),
            kind: "Reservation".into(),
            metadata: ObjectMeta { name: id.into(), generation: 1 },
            spec: ReservationSpec { node: node.into(), by: by.into(), memory_mib: RESERVED_MIB, created_unix_ms },
        }
    }

    /// Whether it still counts at `now_ms`.
    pub fn fresh(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.spec.created_unix_ms) < RESERVATION_TTL_MS
    }
}

impl Object for Reservation {
    const KIND: &'static str = "Reservation";
    fn header(&self) -> (&str, &str, &str) {
        (&self.api_version, &self.kind, &self.metadata.name)
    }
    fn longest_list(&self) -> usize {
        0
    }
}

/// `nodes` as the utility must see them: each fresh reservation on a node counts as one
/// more running instance and [`RESERVED_MIB`] less free memory. The number counted per
/// node is returned in `nodes`' order.
pub fn project(nodes: &mut [Node], reservations: &[Reservation], now_ms: u64) -> Vec<u32> {
    nodes
        .iter_mut()
        .map(|n| {
            let mine = reservations.iter().filter(|r| r.spec.node == n.name() && r.fresh(now_ms));
            let (count, mib) = mine.fold((0u32, 0u64), |(c, m), r| (c + 1, m.saturating_add(r.spec.memory_mib)));
            n.status.instances_running = n.status.instances_running.saturating_add(count);
            n.status.free_memory_mib = n.status.free_memory_mib.saturating_sub(mib);
            count
        })
        .collect()
}

/// Which of a target's own reservations (`(key, reservation)`, any order) its heartbeat
/// deletes: the stale ones, and the `arrivals` oldest fresh ones (one per instance
/// started or session failed since the previous heartbeat).
pub fn to_release(mine: &[(String, Reservation)], arrivals: usize, now_ms: u64) -> Vec<String> {
    let mut fresh: Vec<&(String, Reservation)> = mine.iter().filter(|(_, r)| r.fresh(now_ms)).collect();
    fresh.sort_by(|a, b| a.1.spec.created_unix_ms.cmp(&b.1.spec.created_unix_ms).then_with(|| a.0.cmp(&b.0)));
    let stale = mine.iter().filter(|(_, r)| !r.fresh(now_ms)).map(|(k, _)| k.clone());
    stale.chain(fresh.into_iter().take(arrivals).map(|(k, _)| k.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::{choose, HoldsThenLeastLoaded, PlacementRequest};
    use crate::resources::{decode, NodeSpec, NodeStatus};

    fn node(name: &str, free_mib: u64) -> Node {
        let spec = NodeSpec { device_addr: "10.0.0.1:7878".parse().unwrap(), cores: 2, memory_mib: 4096 };
        let status = NodeStatus { free_memory_mib: free_mib, ..Default::default() };
        Node::new(name, 1, spec, status)
    }

    #[test]
    fn reservations_spread_requests_that_arrive_together() {
        let nodes = [node("a", 4096), node("b", 4096), node("c", 4096)];
        let mut reservations = Vec::new();
        let mut placed = Vec::new();
        // Twenty placements one after the other, each seeing the others' reservations
        // (what the transaction guarantees when they race): no node's record changes.
        for k in 0..20 {
            let mut seen = nodes.clone();
            project(&mut seen, &reservations, 1000);
            let (n, _, _) = choose(&seen, &PlacementRequest::default(), &HoldsThenLeastLoaded).unwrap();
            placed.push(n.name().to_string());
            reservations.push(Reservation::new(&format!("r{k}"), n.name(), "a", 1000));
        }
        let count = |name: &str| placed.iter().filter(|p| *p == name).count();
        assert_eq!((count("a"), count("b"), count("c")), (7, 7, 6), "{placed:?}");
        // Without reservations: all on one node (the old behaviour, the bench's first table).
        let (n, _, _) = choose(&nodes, &PlacementRequest::default(), &HoldsThenLeastLoaded).unwrap();
        assert_eq!(n.name(), "a");
    }

    #[test]
    fn a_node_whose_memory_is_reserved_is_not_able_and_stale_ones_do_not_count() {
        let mut nodes = [node("a", RESERVED_MIB * 2), node("b", RESERVED_MIB * 8)];
        let r = |k: u32, on: &str, at: u64| Reservation::new(&format!("r{k}"), on, "b", at);
        let held = vec![r(1, "a", 10_000), r(2, "a", 10_000), r(3, "b", 0)];
        let counted = project(&mut nodes, &held, 10_000 + RESERVATION_TTL_MS - 1);
        // r3 was made RESERVATION_TTL_MS + 9999 ms ago: stale, not counted.
        assert_eq!(counted, [2, 0]);
        assert_eq!((nodes[0].status.free_memory_mib, nodes[0].status.instances_running), (0, 2));
        let r = PlacementRequest::default();
        let (n, _, able) = choose(&nodes, &r, &HoldsThenLeastLoaded).unwrap();
        assert_eq!((n.name(), able), ("b", 1), "a has no memory left for one more");
    }

    #[test]
    fn the_target_releases_the_oldest_per_arrival_and_every_stale_one() {
        let mk = |k: &str, at: u64| (format!("/x/{k}"), Reservation::new(k, "t", "p", at));
        let mine = vec![mk("new", 300), mk("old", 100), mk("mid", 200), mk("stale", 0)];
        let now = RESERVATION_TTL_MS + 50;
        assert_eq!(to_release(&mine, 0, now), ["/x/stale"]);
        assert_eq!(to_release(&mine, 2, now), ["/x/stale", "/x/old", "/x/mid"]);
        assert_eq!(to_release(&mine, 9, now).len(), 4);
    }

    #[test]
    fn a_reservation_round_trips_and_hostile_ones_are_refused() {
        let r = Reservation::new("0001-n0-1", "n1", "n0", 5);
        let text = serde_json::to_vec(&r).unwrap();
        assert_eq!(decode::<Reservation>("k", &text).unwrap(), r);
        let mut bad = r.clone();
        bad.metadata.name = "../x".into();
        assert!(decode::<Reservation>("k", &serde_json::to_vec(&bad).unwrap()).is_err());
        assert!(decode::<Reservation>("k", br#"{"kind":"Reservation"}"#).is_err());
    }
}
