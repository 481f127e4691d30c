//! `forage serve --cluster URLS`: this daemon as one node of a cloudlet of many hosts
//! ([`forage_cluster`], `docs/cluster.md`). What the node publishes at each heartbeat is
//! read here from the cloudlet: its size and load, the bases, service VMs, cached launch
//! VMs and substrates it holds, its running instances. A node that redirects a device
//! to another node for a base it lacks fetches that base from there in the background
//! (when it is paired with that node as a cloudlet), so that it can serve the next one.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use forage_cloudlet::Cloudlet;
use forage_cluster::{
    ClusterConfig, HoldsThenLeastLoaded, InstancePhase, JoinError, LocalInstance, LocalView, Member, NodeSpec,
    NodeStatus, PlacementRequest,
};

/// Join the cluster at `config` as `cloudlet.name`, reachable by devices at `device_addr`,
/// and keep the node's record current.
pub async fn join(
    config: ClusterConfig,
    cloudlet: &Arc<Cloudlet>,
    service_addr: Ipv4Addr,
    listen: SocketAddr,
) -> Result<Arc<Member>, JoinError> {
    let device_addr = SocketAddr::new(IpAddr::V4(service_addr), listen.port());
    let view = {
        let c = cloudlet.clone();
        move || local_view(&c, device_addr)
    };
    let first = tokio::task::block_in_place(&view);
    let every = Duration::from_secs(config.lease_ttl_s.max(3) / 3);
    let member = Member::join(config, &cloudlet.name, first, Box::new(HoldsThenLeastLoaded)).await?;
    member.run(view);
    drain_when_asked(member.clone(), cloudlet.clone(), every);
    let placer = member.clone();
    let weak = Arc::downgrade(cloudlet);
    let fetching: Arc<Mutex<Fetching>> = Arc::default();
    let _ = cloudlet.placer.set(Arc::new(move |base: String, overlay: String| {
        let m = placer.clone();
        let (weak, fetching) = (weak.clone(), fetching.clone());
        Box::pin(async move {
            // The device is about to go there: room is reserved for it.
            let request = PlacementRequest {
                base_digest: Some(base.clone()),
                overlay_digest: Some(overlay),
                service: None,
                reserve: true,
            };
            match m.place(&request).await {
                Ok(p) if p.node != m.name() => {
                    fetch_base_later(&weak, &fetching, base, p.device_addr, p.node);
                    Some(p.device_addr)
                }
                Ok(_) => None,
                Err(e) => {
                    tracing::info!("cluster: no node to redirect the device to: {}", forage_cluster::chain(&e));
                    None
                }
            }
        })
    }));
    let locator = member.clone();
    let _ = cloudlet.locator.set(Arc::new(move |endpoint: &str| whereabouts(&locator.status(), endpoint)));
    Ok(member)
}

/// The node's base fetches: one at a time (each unpacks into the bases folder and takes
/// disk and a core), and a base whose fetch failed is not asked for again for
/// [`RETRY_AFTER`].
#[derive(Default)]
struct Fetching {
    running: Option<String>,
    failed: HashMap<String, Instant>,
}

const RETRY_AFTER: Duration = Duration::from_secs(600);

/// Fetch base `digest` from node `node` (at `from`) in the background, unless a fetch is
/// under way or this one failed lately; logged either way (a node not paired with `node`
/// as a cloudlet is refused at once and serves by redirect, as before).
fn fetch_base_later(
    cloudlet: &Weak<Cloudlet>,
    fetching: &Arc<Mutex<Fetching>>,
    digest: String,
    from: SocketAddr,
    node: String,
) {
    // The digest comes from a device: only a well-formed one names a base to fetch.
    let Some(c) = cloudlet.upgrade().filter(|_| forage_cloudlet::package_transfer::is_digest(&digest)) else { return };
    {
        let mut f = fetching.lock().unwrap_or_else(|p| p.into_inner());
        f.failed.retain(|_, at| at.elapsed() < RETRY_AFTER);
        if f.running.is_some() || f.failed.contains_key(&digest) {
            return;
        }
        f.running = Some(digest.clone());
    }
    let fetching = fetching.clone();
    tokio::spawn(async move {
        let base = forage_proto::PackageKind::Base;
        let fetched = forage_cloudlet::package_transfer::fetch(&c.data, &c.name, from, base, &digest).await;
        let mut f = fetching.lock().unwrap_or_else(|p| p.into_inner());
        f.running = None;
        match fetched {
            Ok(r) => tracing::info!(
                base = r.name,
                node,
                bytes = r.package_bytes,
                seconds = r.seconds,
                "cluster: fetched the base this node lacked from the node holding it"
            ),
            Err(e) => {
                tracing::info!(node, "cluster: base {} not fetched: {}", &digest[..16], forage_cluster::chain(&e));
                f.failed.insert(digest, Instant::now());
            }
        }
    });
}

/// The cluster's record of the instance whose service answers at `endpoint`: a running
/// one first (an endpoint of a lost instance may be reused by a later one).
pub fn whereabouts(view: &forage_cluster::ClusterStatus, endpoint: &str) -> Option<forage_proto::Whereabouts> {
    let mut at = view.instances.iter().filter(|i| i.status.endpoint == endpoint);
    let i = at.clone().find(|i| i.status.phase == InstancePhase::Running).or_else(|| at.next_back())?;
    let lost = match i.status.phase {
        InstancePhase::Running => None,
        InstancePhase::Lost => Some(i.status.reason.clone().unwrap_or_else(|| "its node is gone".into())),
    };
    Some(forage_proto::Whereabouts { endpoint: endpoint.into(), node: i.spec.node.clone(), lost })
}

fn meminfo_mib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|kib| kib / 1024)
        .unwrap_or(0)
}

/// What this node holds and runs, now.
pub fn local_view(c: &Cloudlet, device_addr: SocketAddr) -> LocalView {
    let cores = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    let load = crate::balance::Pressure::now().map(|p| p.load_per_core).unwrap_or(0.0);
    let instances = c.state.list_instances(true).unwrap_or_default();
    let substrates_dir = c.data.root().join("substrates");
    let substrates = match substrates_dir.is_dir() {
        true => forage_substrate::Pool::open(&c.data)
            .and_then(|p| p.summary())
            .map(|s| s.substrates.into_iter().map(|e| e.name).collect())
            .unwrap_or_default(),
        false => Vec::new(),
    };
    LocalView {
        spec: NodeSpec { device_addr, cores, memory_mib: meminfo_mib("MemTotal:") },
        status: NodeStatus {
            free_memory_mib: meminfo_mib("MemAvailable:"),
            load_per_core: load,
            instances_running: instances.len() as u32,
            bases: crate::holdings::base_digests(c),
            services: crate::holdings::service_ids(c),
            cached_launch_vms: c.state.cache_list().unwrap_or_default().into_iter().map(|e| e.overlay_digest).collect(),
            substrates,
            heartbeat_unix_ms: 0,
        },
        instances: instances
            .into_iter()
            .map(|i| LocalInstance { id: i.id, name: i.name, endpoint: i.endpoint })
            .collect(),
        sessions_failed: c.state.totals().map(|t| t.sessions_failed).unwrap_or(0),
    }
}

/// While this node is asked to drain (`forage node drain`), hand each running instance
/// off (the VM handoff) to the best other node not being drained; the drain ends when
/// none is left.
fn drain_when_asked(member: Arc<Member>, cloudlet: Arc<Cloudlet>, every: Duration) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            if !member.drain_requested() {
                continue;
            }
            let instances = cloudlet.state.list_instances(true).unwrap_or_default();
            let mut left = 0;
            for i in instances {
                if !cloudlet.movable(&i.id) {
                    left += 1;
                    continue;
                }
                let request = PlacementRequest { reserve: true, ..Default::default() };
                let to = match member.place_except(&request, member.name()).await {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(instance = i.id, "drain: no node to move it to: {}", forage_cluster::chain(&e));
                        left += 1;
                        continue;
                    }
                };
                tracing::info!(instance = i.id, to = to.node, "drain: moving an instance");
                let options =
                    forage_cloudlet::HandoffOptions { reason: forage_api::HandoffReason::Drain, ..Default::default() };
                match cloudlet.handoff(&i.id, to.device_addr, options).await {
                    Ok(r) => tracing::info!(instance = i.id, to = to.node, endpoint = r.endpoint, "drain: moved"),
                    Err(e) => {
                        tracing::warn!(instance = i.id, to = to.node, "drain: did not move: {e}");
                        left += 1;
                    }
                }
            }
            if left == 0 {
                match member.drain_done().await {
                    Ok(()) => tracing::info!("drain: no instance left on this node"),
                    Err(e) => tracing::warn!("drain: done, not recorded: {}", forage_cluster::chain(&e)),
                }
            }
        }
    });
}
