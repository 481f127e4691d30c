//! `forage cluster status|place|where`, `forage node drain`.

use forage_datadir::DataDir;

use crate::cli::{ClusterCommand, NodeCommand};

pub async fn run(data: &DataDir, c: ClusterCommand) -> anyhow::Result<()> {
    match c {
        ClusterCommand::Where { endpoint, cloudlet, json } => {
            let credentials = forage_trust::DeviceTrust::new(&data.trust_peers()).credentials(cloudlet, None)?;
            let w = forage_client::where_is(cloudlet, &credentials, &endpoint).await?;
            match json {
                true => println!("{}", serde_json::to_string(&w)?),
                false => println!("{w}"),
            }
            Ok(())
        }
        ClusterCommand::Status { api, json } => {
            let api = super::handoff::client(data, api)?;
            let s = tokio::task::spawn_blocking(move || api.cluster()).await??;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(());
            }
            let quorum = match (&s.quorum, &s.error) {
                (true, _) => "etcd quorum".to_string(),
                (false, Some(e)) => format!("NO etcd quorum: {e}"),
                (false, None) => "NO etcd quorum".to_string(),
            };
            println!("cluster {} (this node: {}), {} nodes live, {quorum}", s.cluster, s.node, s.nodes.len());
            for n in &s.nodes {
                let st = &n.status;
                println!(
                    "  node {:<16} {:<21} cores {} mem {}/{} MiB free, load {:.2}/core, {} instances, {} bases, {} services, {} cached, {} substrates",
                    n.name(),
                    n.spec.device_addr,
                    n.spec.cores,
                    st.free_memory_mib,
                    n.spec.memory_mib,
                    st.load_per_core,
                    st.instances_running,
                    st.bases.len(),
                    st.services.len(),
                    st.cached_launch_vms.len(),
                    st.substrates.len()
                );
            }
            for i in &s.instances {
                let why = i.status.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default();
                println!(
                    "  instance {} on {}: {:?} at {}{why}",
                    i.metadata.name, i.spec.node, i.status.phase, i.status.endpoint
                );
            }
            Ok(())
        }
        ClusterCommand::Place { base, overlay, service, api, json } => {
            let api = super::handoff::client(data, api)?;
            // Where a request would go now: asked, not reserved.
            let request = forage_cluster::PlacementRequest {
                base_digest: base,
                overlay_digest: overlay,
                service,
                reserve: false,
            };
            let p = tokio::task::spawn_blocking(move || api.place(&request)).await??;
            if json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else {
                println!(
                    "placed on {} at {} (score {:.3} by {}, {} of {} live nodes able, {:.1} ms)",
                    p.node, p.device_addr, p.score, p.utility, p.able, p.considered, p.place_ms
                );
            }
            Ok(())
        }
    }
}

pub async fn node(data: &DataDir, c: NodeCommand) -> anyhow::Result<()> {
    let NodeCommand::Drain { node, api, wait_s } = c;
    let api = super::handoff::client(data, api)?;
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        api.drain_node(&node)?;
        eprintln!("node {node} is draining: its instances move to the other nodes...");
        let started = std::time::Instant::now();
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
            let s = api.cluster()?;
            let running = s.instances.iter().filter(|i| i.spec.node == node).count();
            if !s.draining.contains(&node) && running == 0 {
                println!("node {node} drained in {:.1} s", started.elapsed().as_secs_f64());
                return Ok(());
            }
            if started.elapsed().as_secs() > wait_s {
                anyhow::bail!("node {node} still holds {running} instance(s) after {wait_s} s (the drain goes on)");
            }
        }
    })
    .await?
}
