//! The announcement on the local network (mDNS, `_cloudlet._tcp`, [`forage_discovery`]).
//!
//! A cloudlet alone announces itself and keeps its TXT record current. A node of a
//! cluster (`--cluster`) announces only while it holds the cluster's one announcement
//! (claimed in etcd under its lease, `forage_cluster::Member::announces`): devices then
//! see one cloudlet, named after the cluster, at that node's address, with what the whole
//! cluster holds; the node places each session on the best node (redirect). When the
//! holder's lease ends, the next node's heartbeat claims the announcement and it starts
//! announcing within a few seconds.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use forage_cloudlet::Cloudlet;
use forage_cluster::Member;
use forage_discovery::{Advertisement, Advertiser};

use crate::holdings;

/// Announce the cloudlet (`_cloudlet._tcp`) and keep its TXT record current: load,
/// bases and services change while serving.
pub(crate) fn cloudlet(
    cloudlet: &Arc<Cloudlet>,
    service_addr: std::net::Ipv4Addr,
    port: u16,
    http_port: Option<u16>,
) -> Result<(), String> {
    let advertisement = move |c: &Cloudlet| Advertisement {
        name: c.name.clone(),
        addr: SocketAddr::new(IpAddr::V4(service_addr), port),
        http_port,
        bases: holdings::base_digests(c).iter().map(|d| forage_synth::package::short(d).to_string()).collect(),
        services: holdings::service_ids(c),
        load: c.state.list_instances(true).map(|v| v.len() as u32).unwrap_or(0),
        free_mem_mib: free_memory_mib(),
        cores: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
    };
    let advertiser = forage_discovery::advertise(&advertisement(cloudlet)).map_err(|e| e.to_string())?;
    let c = cloudlet.clone();
    tokio::spawn(async move {
        let mut last = advertisement(&c);
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let now = tokio::task::block_in_place(|| advertisement(&c));
            if worth_refreshing(&now, &last) {
                if let Err(e) = advertiser.update(&now) {
                    tracing::warn!("announcement not refreshed: {e}");
                }
                last = now;
            }
        }
    });
    Ok(())
}

/// Whether the announcement changed enough to be sent again: what is held, the load or
/// the cores, or the free memory by more than 256 MiB.
fn worth_refreshing(now: &Advertisement, last: &Advertisement) -> bool {
    (now.load, &now.bases, &now.services, now.cores) != (last.load, &last.bases, &last.services, last.cores)
        || now.free_mem_mib.abs_diff(last.free_mem_mib) > 256
}

/// What the cluster holds, as one announcement at `addr` (this node's device address).
fn cluster_advertisement(member: &Member, addr: SocketAddr, http_port: Option<u16>) -> Advertisement {
    let status = member.status();
    let mut bases: Vec<String> = status
        .nodes
        .iter()
        .flat_map(|n| n.status.bases.iter().map(|d| forage_synth::package::short(d).to_string()))
        .collect();
    bases.sort();
    bases.dedup();
    let mut services: Vec<String> = status.nodes.iter().flat_map(|n| n.status.services.iter().cloned()).collect();
    services.sort();
    services.dedup();
    Advertisement {
        name: status.cluster.clone(),
        addr,
        http_port,
        bases,
        services,
        load: status.nodes.iter().map(|n| n.status.instances_running).sum(),
        free_mem_mib: status.nodes.iter().map(|n| n.status.free_memory_mib).sum(),
        cores: status.nodes.iter().map(|n| n.spec.cores).sum::<u32>().max(1),
    }
}

/// Announce the cluster from this node while it holds the announcement (checked every
/// 2 s); stop announcing when it no longer does.
pub(crate) fn cluster(member: Arc<Member>, addr: SocketAddr, http_port: Option<u16>) {
    tokio::spawn(async move {
        let mut held: Option<(Advertiser, Advertisement)> = None;
        loop {
            match (member.announces(), held.take()) {
                (true, None) => {
                    let adv = cluster_advertisement(&member, addr, http_port);
                    match tokio::task::block_in_place(|| forage_discovery::advertise(&adv)) {
                        Ok(a) => {
                            tracing::info!(cluster = adv.name, %addr, "this node announces the cluster");
                            held = Some((a, adv));
                        }
                        Err(e) => tracing::warn!("the cluster is not announced from this node: {e}"),
                    }
                }
                (true, Some((a, last))) => {
                    let now = cluster_advertisement(&member, addr, http_port);
                    if worth_refreshing(&now, &last) {
                        if let Err(e) = tokio::task::block_in_place(|| a.update(&now)) {
                            tracing::warn!("announcement not refreshed: {e}");
                        }
                        held = Some((a, now));
                    } else {
                        held = Some((a, last));
                    }
                }
                (false, Some((a, _))) => {
                    // Another node holds it now (or etcd is out of reach): one announcement.
                    tokio::task::block_in_place(|| drop(a));
                    tracing::info!("this node no longer announces the cluster");
                }
                (false, None) => {}
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
}

fn free_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(0)
}
