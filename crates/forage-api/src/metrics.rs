//! `GET /metrics`: the state's totals in the OpenMetrics text format, which Prometheus
//! scrapes.
//!
//! The registry is built afresh from [`State::totals`](forage_state::State::totals) on
//! every scrape: the database is the one source of truth, so the numbers survive a daemon
//! restart and no code path has to remember to bump a gauge.
//!
//! ```text
//! forage_sessions_total{status="running|done|failed"}  counter
//! forage_instances_running                               gauge
//! forage_cache_entries                                   gauge
//! forage_cache_bytes                                     gauge
//! forage_cache_hits_total                                counter
//! forage_uptime_seconds                                  gauge
//! forage_substrates{tier="memory|disk"}                  gauge   (substrates in the pool)
//! forage_substrate_bytes{tier="memory|disk"}             gauge   (their files' bytes)
//! forage_substrate_budget_bytes                          gauge   (the pool's memory budget)
//! forage_cluster_nodes                                   gauge (with --cluster: live nodes)
//! forage_cluster_quorum                                  gauge (1: the last heartbeat reached etcd)
//! forage_cluster_instances{phase="Running|Lost"}         gauge
//! ```
//! The substrate pool is read from its folders on each scrape as well.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use forage_state::{SessionStatus, Totals};

use crate::substrate_views::{SubstrateList, SubstrateTier};
use prometheus_client::encoding::text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The content type of the metrics text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The metrics text for `totals`, the substrate pool (left out if it could not be read),
/// the daemon's uptime and, with `--cluster`, the cluster.
pub fn encode(
    totals: &Totals,
    substrates: Option<&SubstrateList>,
    uptime: Duration,
    cluster: Option<&forage_cluster::ClusterStatus>,
) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("forage");

    let sessions = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
    for status in SessionStatus::ALL {
        sessions.get_or_create(&vec![("status", status.as_str())]).inc_by(totals.sessions(*status));
    }
    registry.register("sessions", "Synthesis sessions by status", sessions);

    let gauge = |v: u64| {
        let g = Gauge::<i64>::default();
        g.set(i64::try_from(v).unwrap_or(i64::MAX));
        g
    };
    registry.register("instances_running", "Launch VMs running", gauge(totals.instances_running));
    registry.register("cache_entries", "Launch cache entries", gauge(totals.cache_entries));
    registry.register("cache_bytes", "Bytes held by the launch cache", gauge(totals.cache_bytes));
    let hits = Counter::<u64>::default();
    hits.inc_by(totals.cache_hits);
    registry.register("cache_hits", "Launches served from the launch cache", hits);
    if let Some(pool) = substrates {
        let count = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
        let bytes = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
        for (tier, label, total) in
            [(SubstrateTier::Memory, "memory", pool.memory_bytes), (SubstrateTier::Disk, "disk", pool.disk_bytes)]
        {
            let n = pool.substrates.iter().filter(|s| s.tier == tier).count();
            count.get_or_create(&vec![("tier", label)]).set(i64::try_from(n).unwrap_or(i64::MAX));
            bytes.get_or_create(&vec![("tier", label)]).set(i64::try_from(total).unwrap_or(i64::MAX));
        }
        registry.register("substrates", "Substrates in the pool, in host memory or spilled to disk", count);
        registry.register("substrate_bytes", "Bytes of substrate files in host memory or spilled to disk", bytes);
        registry.register("substrate_budget_bytes", "Host memory the substrate pool may use", gauge(pool.budget_bytes));
    }
    let up = Gauge::<f64, AtomicU64>::default();
    up.set(uptime.as_secs_f64());
    registry.register("uptime_seconds", "Seconds since the daemon started", up);

    if let Some(c) = cluster {
        registry.register("cluster_nodes", "Live nodes of the cluster", gauge(c.nodes.len() as u64));
        registry.register("cluster_quorum", "1 when the last heartbeat reached etcd", gauge(u64::from(c.quorum)));
        let phases = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
        for (phase, name) in
            [(forage_cluster::InstancePhase::Running, "Running"), (forage_cluster::InstancePhase::Lost, "Lost")]
        {
            let n = c.instances.iter().filter(|i| i.status.phase == phase).count();
            phases.get_or_create(&vec![("phase", name)]).set(n as i64);
        }
        registry.register("cluster_instances", "Instances of the cluster's nodes by phase", phases);
    }

    let mut out = String::new();
    text::encode(&mut out, &registry)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_carries_its_total() {
        let totals = Totals {
            sessions_running: 1,
            sessions_done: 7,
            sessions_failed: 2,
            instances_running: 3,
            cache_entries: 4,
            cache_bytes: 5_000,
            cache_hits: 6,
        };
        let pool = SubstrateList {
            budget_bytes: 1 << 30,
            memory_bytes: 300,
            disk_bytes: 50,
            substrates: [
                ("a", 100, SubstrateTier::Memory),
                ("b", 200, SubstrateTier::Memory),
                ("c", 50, SubstrateTier::Disk),
            ]
            .into_iter()
            .map(|(n, b, tier)| crate::SubstrateView { name: n.into(), bytes: b, tier, last_used_unix_ms: 0 })
            .collect(),
        };
        let text = encode(&totals, Some(&pool), Duration::from_millis(12_500), None).unwrap();
        for line in [
            "forage_sessions_total{status=\"running\"} 1",
            "forage_sessions_total{status=\"done\"} 7",
            "forage_sessions_total{status=\"failed\"} 2",
            "forage_instances_running 3",
            "forage_cache_entries 4",
            "forage_cache_bytes 5000",
            "forage_cache_hits_total 6",
            "forage_uptime_seconds 12.5",
            "forage_substrates{tier=\"memory\"} 2",
            "forage_substrates{tier=\"disk\"} 1",
            "forage_substrate_bytes{tier=\"memory\"} 300",
            "forage_substrate_bytes{tier=\"disk\"} 50",
            "forage_substrate_budget_bytes 1073741824",
            "# TYPE forage_sessions counter",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in\n{text}");
        }
        let without = encode(&totals, None, Duration::ZERO, None).unwrap();
        assert!(!without.contains("substrate"), "an unreadable pool is left out:\n{without}");
    }
}
