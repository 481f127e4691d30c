//! A node's membership: its lease, its heartbeat, its view of the cluster, placement.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant N as node (forage serve --cluster)
//!     participant E as etcd
//!     N->>E: lease/grant {TTL}
//!     N->>E: kv/put nodes/NAME = Node {spec, status} (lease)
//!     loop every TTL/3
//!         N->>E: lease/keepalive {ID}   (gone: grant a new lease, put again)
//!         N->>E: kv/put nodes/NAME (status: load, memory, what it holds)
//!         N->>E: kv/put instances/NAME/ID (Running) | kv/deleterange (stopped, moved)
//!         N->>E: kv/range nodes/, instances/
//!         N->>E: kv/txn {instance of a node without a key: MOD equal -> put Lost}
//!     end
//!     Note over N,E: a device's request: kv/txn {range nodes/, drains/, reservations/}, choose
//!     N->>E: kv/txn {unchanged since the read: put reservations/TARGET/ID (lease)}, redirect
//!     N->>E: lease/revoke (at a clean stop: the node leaves at once)
//! ```
//!
//! A node that stops renewing (killed, cut off) loses its key when its lease expires;
//! the next heartbeat of any other node marks its instances Lost, once (a transaction on
//! the instance's revision). Without quorum every call fails: the heartbeat records the
//! error (instances keep running: nothing here touches them), placement refuses.
//! Reservations, and how a node's heartbeat releases those on it: [`crate::reservation`].

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::etcd::{Etcd, EtcdError};
use crate::placement::{choose, PlaceError, Placement, PlacementRequest, Utility};
use crate::reservation::{project, to_release, Reservation};
use crate::resources::{decode, plain_name, ClusterInstance, InstancePhase, Node, NodeSpec, NodeStatus};

/// How a node joins.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterConfig {
    /// etcd client URLs (`http://HOST:PORT`, or `https://` with `tls`).
    pub endpoints: Vec<String>,
    /// The cluster's name: the keys' prefix is `/forage/v1/CLUSTER/`.
    pub cluster: String,
    /// Seconds a node stays listed after its last renewal.
    pub lease_ttl_s: u64,
    /// How to reach `https://` members.
    pub tls: Option<crate::etcd::EtcdTls>,
}

/// What the node publishes, read afresh for each heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalView {
    pub spec: NodeSpec,
    pub status: NodeStatus,
    pub instances: Vec<LocalInstance>,
    /// Sessions that failed here since the node started (a counter): each releases a
    /// reservation, as each instance that appears does.
    pub sessions_failed: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalInstance {
    pub id: String,
    pub name: String,
    pub endpoint: String,
}

/// The cluster as this node last read it (`GET /v1/cluster`, `forage cluster status`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    pub cluster: String,
    /// This node's name.
    pub node: String,
    pub endpoints: Vec<String>,
    pub lease_ttl_s: u64,
    /// Whether the last heartbeat reached a quorum of etcd.
    pub quorum: bool,
    /// Why not, if not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Live nodes (their lease held), by name.
    pub nodes: Vec<Node>,
    /// Instances of every node, lost ones included.
    pub instances: Vec<ClusterInstance>,
    /// When the view was last read (ms since the epoch; 0: never).
    pub read_unix_ms: u64,
    /// Objects read from etcd and refused (too large, malformed), in all.
    pub refused_objects: u64,
    /// Nodes asked to drain (`forage node drain`): they hand their instances off to the
    /// others and take no new placements.
    #[serde(default)]
    pub draining: Vec<String>,
    /// The node that announces the cluster on the local network (mDNS), one at a time:
    /// the first to claim it, until its lease ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announcer: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("node name {0:?} is not plain (a-z, 0-9, '-', '.', '_', 1 to 63 characters)")]
    BadNodeName(String),
    #[error("cluster name {0:?} is not plain (a-z, 0-9, '-', '.', '_', 1 to 63 characters)")]
    BadClusterName(String),
    #[error("no etcd endpoint given")]
    NoEndpoints,
    #[error("joining cluster {cluster} as {node}")]
    Etcd {
        cluster: String,
        node: String,
        #[source]
        source: EtcdError,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("node {0:?} is not a live node of the cluster")]
    NoSuchNode(String),
    #[error("cannot ask node {node} to drain")]
    Etcd {
        node: String,
        #[source]
        source: EtcdError,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("no placement: etcd has no quorum (running instances keep running)")]
    NoQuorum(#[source] EtcdError),
    #[error("no placement")]
    Unplaceable(#[source] PlaceError),
    #[error("no placement: {tries} reservations in a row lost to concurrent placements")]
    Contended { tries: u32 },
}

/// How many times a placement reads again after losing its reservation to another.
pub const RESERVE_TRIES: u32 = 64;

pub struct Member {
    etcd: Etcd,
    config: ClusterConfig,
    name: String,
    lease: Mutex<i64>,
    /// The spec last written and its generation.
    spec: Mutex<(u64, Option<NodeSpec>)>,
    seen: Mutex<ClusterStatus>,
    utility: Box<dyn Utility>,
    /// Instance ids and the failed-session count at the last heartbeat (what is new
    /// since then releases reservations).
    arrivals: Mutex<Option<(HashSet<String>, u64)>>,
    /// Numbers this node's reservation ids.
    reservations_made: AtomicU64,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Member {
    fn prefix(&self) -> String {
        format!("/forage/v1/{}/", self.config.cluster)
    }
    fn node_key(&self, node: &str) -> String {
        format!("{}nodes/{node}", self.prefix())
    }
    fn instance_key(&self, node: &str, id: &str) -> String {
        format!("{}instances/{node}/{id}", self.prefix())
    }
    fn drain_key(&self, node: &str) -> String {
        format!("{}drains/{node}", self.prefix())
    }
    fn announcer_key(&self) -> String {
        format!("{}announcer", self.prefix())
    }
    fn reservations_of(&self, node: &str) -> String {
        format!("{}reservations/{node}/", self.prefix())
    }

    /// Register `name` under a new lease with `view`, placing by `utility`.
    pub async fn join(
        config: ClusterConfig,
        name: &str,
        view: LocalView,
        utility: Box<dyn Utility>,
    ) -> Result<Arc<Self>, JoinError> {
        if !plain_name(name) {
            return Err(JoinError::BadNodeName(name.into()));
        }
        if !plain_name(&config.cluster) {
            return Err(JoinError::BadClusterName(config.cluster.clone()));
        }
        if config.endpoints.is_empty() {
            return Err(JoinError::NoEndpoints);
        }
        let seen = ClusterStatus {
            cluster: config.cluster.clone(),
            node: name.into(),
            endpoints: config.endpoints.clone(),
            lease_ttl_s: config.lease_ttl_s,
            quorum: false,
            error: None,
            nodes: vec![],
            instances: vec![],
            read_unix_ms: 0,
            refused_objects: 0,
            draining: vec![],
            announcer: None,
        };
        let etcd = Etcd::with_tls(config.endpoints.clone(), config.tls.as_ref()).map_err(|source| JoinError::Etcd {
            cluster: config.cluster.clone(),
            node: name.into(),
            source,
        })?;
        let member = Arc::new(Self {
            etcd,
            config,
            name: name.into(),
            lease: Mutex::new(0),
            spec: Mutex::new((0, None)),
            seen: Mutex::new(seen),
            utility,
            arrivals: Mutex::new(None),
            reservations_made: AtomicU64::new(0),
        });
        let joined = async {
            let lease = member.etcd.lease_grant(member.config.lease_ttl_s).await?;
            *member.lease.lock().expect("lease lock") = lease;
            member.heartbeat(view).await
        };
        joined.await.map_err(|source| JoinError::Etcd {
            cluster: member.config.cluster.clone(),
            node: member.name.clone(),
            source,
        })?;
        Ok(member)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Heartbeats every third of the lease until the process ends.
    pub fn run(self: &Arc<Self>, view: impl Fn() -> LocalView + Send + Sync + 'static) {
        let me = self.clone();
        let every = Duration::from_millis((self.config.lease_ttl_s * 1000 / 3).max(500));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let v = tokio::task::block_in_place(&view);
                if let Err(e) = me.heartbeat(v).await {
                    let mut seen = me.seen.lock().expect("seen lock");
                    if seen.quorum {
                        tracing::warn!("cluster {}: heartbeat failed: {}", me.config.cluster, chain(&e));
                    }
                    seen.quorum = false;
                    seen.error = Some(chain(&e));
                }
            }
        });
    }

    /// Renew the lease, publish `view`, read the cluster, mark the instances of gone
    /// nodes lost.
    pub async fn heartbeat(&self, view: LocalView) -> Result<(), EtcdError> {
        let lease = *self.lease.lock().expect("lease lock");
        let lease = match self.etcd.lease_keepalive(lease).await {
            Ok(_) => lease,
            Err(EtcdError::LeaseGone(_)) => {
                let new = self.etcd.lease_grant(self.config.lease_ttl_s).await?;
                tracing::warn!(old = lease, new, "cluster: the node's lease had expired; registered again");
                *self.lease.lock().expect("lease lock") = new;
                new
            }
            Err(e) => return Err(e),
        };
        let generation = {
            let mut spec = self.spec.lock().expect("spec lock");
            if spec.1.as_ref() != Some(&view.spec) {
                *spec = (spec.0 + 1, Some(view.spec.clone()));
            }
            spec.0
        };
        let mut status = view.status;
        status.heartbeat_unix_ms = now_ms();
        let node = Node::new(&self.name, generation, view.spec, status);
        let bytes = serde_json::to_vec(&node).expect("a node serializes");
        // What arrived since the last heartbeat releases reservations on this node, in
        // the transaction that publishes the record counting it.
        let ids: HashSet<String> = view.instances.iter().map(|i| i.id.clone()).collect();
        let arrivals = match &*self.arrivals.lock().expect("arrivals lock") {
            Some((before, failed)) => {
                ids.difference(before).count() + view.sessions_failed.saturating_sub(*failed) as usize
            }
            None => 0,
        };
        let mut mine = Vec::new();
        for kv in self.etcd.range_prefix(&self.reservations_of(&self.name)).await? {
            match decode::<Reservation>(&kv.key, &kv.value) {
                Ok(r) => mine.push((kv.key, r)),
                // Not a reservation: not counted by placement either; cleared here.
                Err(_) => mine.push((kv.key, Reservation::new("refused", &self.name, "", 0))),
            }
        }
        let release = to_release(&mine, arrivals, now_ms());
        self.etcd.put_and_delete(&self.node_key(&self.name), &bytes, lease, &release).await?;
        *self.arrivals.lock().expect("arrivals lock") = Some((ids, view.sessions_failed));
        if !release.is_empty() {
            tracing::debug!(released = release.len(), arrivals, "cluster: reservations released");
        }
        self.publish_instances(&view.instances).await?;
        self.claim_announcement(lease).await?;
        self.read_and_mark_lost().await
    }

    /// Claim the cluster's one announcement on the local network, or learn who holds it.
    /// The claim lives under the holder's lease: a node that stops renewing (or leaves)
    /// hands it to the next node whose heartbeat claims it.
    async fn claim_announcement(&self, lease: i64) -> Result<(), EtcdError> {
        let kv = self.etcd.create_or_read(&self.announcer_key(), self.name.as_bytes(), lease).await?;
        let holder = std::str::from_utf8(&kv.value).ok().filter(|n| plain_name(n)).map(str::to_string);
        let mut seen = self.seen.lock().expect("seen lock");
        if holder != seen.announcer {
            tracing::info!(cluster = self.config.cluster, announcer = ?holder, "cluster: the announcing node");
        }
        seen.announcer = holder;
        Ok(())
    }

    /// Whether this node is the one announcing the cluster (and in touch with etcd).
    pub fn announces(&self) -> bool {
        let seen = self.seen.lock().expect("seen lock");
        seen.quorum && seen.announcer.as_deref() == Some(&self.name)
    }

    async fn publish_instances(&self, local: &[LocalInstance]) -> Result<(), EtcdError> {
        let mine = format!("{}instances/{}/", self.prefix(), self.name);
        let stored = self.etcd.range_prefix(&mine).await?;
        for i in local.iter().filter(|i| plain_name(&i.id)) {
            let want = ClusterInstance::new(&i.id, &self.name, &i.name, &i.endpoint);
            let key = self.instance_key(&self.name, &i.id);
            let have =
                stored.iter().find(|kv| kv.key == key).and_then(|kv| decode::<ClusterInstance>(&key, &kv.value).ok());
            if have.as_ref() != Some(&want) {
                self.etcd.put(&key, &serde_json::to_vec(&want).expect("serializes"), 0).await?;
            }
        }
        for kv in &stored {
            let id = kv.key.rsplit('/').next().unwrap_or_default();
            if !local.iter().any(|i| i.id == id) {
                self.etcd.delete(&kv.key).await?;
            }
        }
        Ok(())
    }

    async fn read_nodes(&self) -> Result<(Vec<Node>, u64), EtcdError> {
        Ok(self.decode_nodes(self.etcd.range_prefix(&format!("{}nodes/", self.prefix())).await?))
    }

    fn decode_nodes(&self, kvs: Vec<crate::etcd::KeyValue>) -> (Vec<Node>, u64) {
        let mut refused = 0;
        let mut nodes = Vec::new();
        for kv in kvs {
            match decode::<Node>(&kv.key, &kv.value) {
                Ok(n) if kv.key.ends_with(&format!("/{}", n.name())) => nodes.push(n),
                Ok(_) => refused += 1,
                Err(e) => {
                    refused += 1;
                    tracing::warn!("cluster: refused an object: {}", chain(&e));
                }
            }
        }
        nodes.sort_by(|a, b| a.name().cmp(b.name()));
        (nodes, refused)
    }

    async fn read_and_mark_lost(&self) -> Result<(), EtcdError> {
        let (nodes, mut refused) = self.read_nodes().await?;
        let mut instances = Vec::new();
        for kv in self.etcd.range_prefix(&format!("{}instances/", self.prefix())).await? {
            let mut i = match decode::<ClusterInstance>(&kv.key, &kv.value) {
                Ok(i) if kv.key == self.instance_key(&i.spec.node, &i.metadata.name) => i,
                Ok(_) => {
                    refused += 1;
                    continue;
                }
                Err(e) => {
                    refused += 1;
                    tracing::warn!("cluster: refused an object: {}", chain(&e));
                    continue;
                }
            };
            let node_live = nodes.iter().any(|n| n.name() == i.spec.node);
            if i.status.phase == InstancePhase::Running && !node_live {
                i.status.phase = InstancePhase::Lost;
                i.status.reason = Some(format!("node {}'s lease expired", i.spec.node));
                let bytes = serde_json::to_vec(&i).expect("serializes");
                if self.etcd.put_if_unchanged(&kv.key, &bytes, kv.mod_revision).await? {
                    tracing::warn!(
                        instance = i.metadata.name,
                        node = i.spec.node,
                        "cluster: instance lost with its node"
                    );
                }
            }
            instances.push(i);
        }
        let mut draining: Vec<String> = Vec::new();
        for kv in self.etcd.range_prefix(&format!("{}drains/", self.prefix())).await? {
            match kv.key.rsplit('/').next() {
                Some(name) if plain_name(name) && kv.value.len() <= 64 => draining.push(name.to_string()),
                _ => refused += 1,
            }
        }
        let mut seen = self.seen.lock().expect("seen lock");
        seen.draining = draining;
        if !seen.quorum {
            tracing::info!("cluster {}: in touch with etcd, {} nodes live", self.config.cluster, nodes.len());
        }
        seen.quorum = true;
        seen.error = None;
        seen.nodes = nodes;
        seen.instances = instances;
        seen.read_unix_ms = now_ms();
        seen.refused_objects += refused;
        Ok(())
    }

    /// The cluster as last read.
    pub fn status(&self) -> ClusterStatus {
        self.seen.lock().expect("seen lock").clone()
    }

    /// Ask live node `node` to hand all its instances off to the others; it takes no new
    /// placements until it is done.
    pub async fn request_drain(&self, node: &str) -> Result<(), DrainError> {
        let etcd = |source| DrainError::Etcd { node: node.into(), source };
        let (nodes, _) = self.read_nodes().await.map_err(etcd)?;
        if !nodes.iter().any(|n| n.name() == node) {
            return Err(DrainError::NoSuchNode(node.chars().take(63).collect()));
        }
        self.etcd.put(&self.drain_key(node), self.name.as_bytes(), 0).await.map_err(etcd)
    }

    /// Whether this node was asked to drain (as of the last heartbeat).
    pub fn drain_requested(&self) -> bool {
        let seen = self.seen.lock().expect("seen lock");
        seen.draining.iter().any(|n| n == &self.name)
    }

    /// This node has no instance left: the drain is over.
    pub async fn drain_done(&self) -> Result<(), EtcdError> {
        self.etcd.delete(&self.drain_key(&self.name)).await
    }

    /// The best live node for `request`, read from etcd now; nodes being drained and
    /// `except` (e.g. the node being drained itself) are left out.
    pub async fn place_except(&self, request: &PlacementRequest, except: &str) -> Result<Placement, PlacementError> {
        self.place_among(request, except).await
    }

    /// The best live node for `request`, read from etcd now (nodes being drained left out).
    pub async fn place(&self, request: &PlacementRequest) -> Result<Placement, PlacementError> {
        self.place_among(request, "").await
    }

    async fn place_among(&self, request: &PlacementRequest, except: &str) -> Result<Placement, PlacementError> {
        let t0 = Instant::now();
        let mut conflicts = 0;
        loop {
            let prefixes = ["nodes/", "drains/", "reservations/"].map(|p| format!("{}{p}", self.prefix()));
            let (revision, mut read) = self.etcd.ranges_at_once(&prefixes).await.map_err(PlacementError::NoQuorum)?;
            let held = std::mem::take(&mut read[2]);
            let drains = std::mem::take(&mut read[1]);
            let (mut nodes, _) = self.decode_nodes(std::mem::take(&mut read[0]));
            nodes.retain(|n| n.name() != except && !drains.iter().any(|kv| kv.key == self.drain_key(n.name())));
            // A reservation counts only at its own key (its node's prefix and its name).
            let reservations: Vec<Reservation> = held
                .iter()
                .filter_map(|kv| {
                    let r = decode::<Reservation>(&kv.key, &kv.value).ok()?;
                    let at = kv.key.strip_prefix(&self.reservations_of(&r.spec.node));
                    (at == Some(r.metadata.name.as_str())).then_some(r)
                })
                .collect();
            let now = now_ms();
            project(&mut nodes, &reservations, now);
            let (node, score, able) =
                choose(&nodes, request, self.utility.as_ref()).map_err(PlacementError::Unplaceable)?;
            let mut placement = Placement {
                node: node.name().into(),
                device_addr: node.spec.device_addr,
                score,
                utility: self.utility.name().into(),
                considered: nodes.len() as u32,
                able,
                place_ms: 0.0,
                reservation: None,
                conflicts,
            };
            if request.reserve {
                let n = self.reservations_made.fetch_add(1, Ordering::Relaxed);
                let id = format!("{now:013}-{}-{n}", self.name);
                let r = Reservation::new(&id, node.name(), &self.name, now);
                let key = format!("{}{id}", self.reservations_of(node.name()));
                let lease = *self.lease.lock().expect("lease lock");
                let value = serde_json::to_vec(&r).expect("serializes");
                let (watched, node_key) = (self.reservations_of(node.name()), self.node_key(node.name()));
                let taken = self
                    .etcd
                    .put_if_untouched_since(&watched, &node_key, revision, &key, &value, lease)
                    .await
                    .map_err(PlacementError::NoQuorum)?;
                if !taken {
                    conflicts += 1;
                    if conflicts >= RESERVE_TRIES {
                        return Err(PlacementError::Contended { tries: conflicts });
                    }
                    // Apart a little, so that racing placers do not meet again at once.
                    let jitter = (now_ms() ^ (n * 7919)) % 5 + 1;
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                    continue;
                }
                placement.reservation = Some(id);
            }
            placement.place_ms = t0.elapsed().as_secs_f64() * 1000.0;
            return Ok(placement);
        }
    }

    /// Leave now (a clean stop): the node's key goes with its lease.
    pub async fn leave(&self) -> Result<(), EtcdError> {
        let lease = *self.lease.lock().expect("lease lock");
        self.etcd.lease_revoke(lease).await
    }

    /// The node's device address as published, for logs.
    pub fn device_addr(&self) -> Option<SocketAddr> {
        self.spec.lock().expect("spec lock").1.as_ref().map(|s| s.device_addr)
    }
}

/// An error and its causes on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}
