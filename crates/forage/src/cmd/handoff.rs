//! The instance commands, through this cloudlet's daemon (its HTTP API, with the
//! operator's token): `forage handoff` moves a running instance to another cloudlet and
//! prints what the handoff did; `forage drain` moves them all; `forage instances` lists
//! them; `forage stop` ends one.

use anyhow::Context;
use forage_api::client::ApiClient;
use forage_api::{HandoffReason, HandoffReport, HandoffRequest};
use forage_datadir::DataDir;

use crate::cli::{DrainArgs, HandoffArgs, InstancesArgs, StopArgs};

pub async fn run(data: &DataDir, a: HandoffArgs) -> anyhow::Result<()> {
    let data = data.clone();
    tokio::task::spawn_blocking(move || run_blocking(&data, a)).await?
}

pub(super) fn client(data: &DataDir, api: std::net::SocketAddr) -> anyhow::Result<ApiClient> {
    let token = forage_api::token::read(&forage_daemon::api_token_path(data))?;
    Ok(ApiClient::new(api, &token))
}

/// An instance id, or the endpoint of one.
fn instance_id(api: &ApiClient, instance: &str) -> anyhow::Result<String> {
    Ok(match instance.contains(':') {
        true => api.instance_at(instance)?,
        false => instance.to_string(),
    })
}

pub async fn instances(data: &DataDir, a: InstancesArgs) -> anyhow::Result<()> {
    let api = client(data, a.api)?;
    let list = tokio::task::spawn_blocking(move || api.instances(a.all)).await??;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if list.instances.is_empty() {
        println!("no {}instances", if a.all { "" } else { "running " });
    }
    for i in &list.instances {
        println!(
            "{:<16} {:<9} {:<24} {} (QEMU {})",
            i.id,
            format!("{:?}", i.status).to_lowercase(),
            i.endpoint,
            i.name,
            i.qemu_pid
        );
    }
    Ok(())
}

pub async fn stop(data: &DataDir, a: StopArgs) -> anyhow::Result<()> {
    let api = client(data, a.api)?;
    let view = tokio::task::spawn_blocking(move || {
        let id = instance_id(&api, &a.instance)?;
        anyhow::Ok(api.stop(&id)?)
    })
    .await??;
    match a.json {
        true => println!("{}", serde_json::to_string_pretty(&view)?),
        false => println!("stopped {} ({})", view.id, view.name),
    }
    Ok(())
}

/// What `forage drain --json` prints.
#[derive(Debug, serde::Serialize)]
struct Drained {
    moved: Vec<HandoffReport>,
    failed: Vec<NotDrained>,
}

/// An instance that did not move (it runs on here, unless the error says otherwise).
#[derive(Debug, serde::Serialize)]
struct NotDrained {
    instance: String,
    error: String,
}

pub async fn drain(data: &DataDir, a: DrainArgs) -> anyhow::Result<()> {
    let api = client(data, a.api)?;
    let drained = tokio::task::spawn_blocking(move || -> anyhow::Result<Drained> {
        let list = api.instances(false)?;
        let mut drained = Drained { moved: Vec::new(), failed: Vec::new() };
        if !a.json {
            eprintln!("draining {} instance(s) to {}...", list.instances.len(), a.to);
        }
        for i in &list.instances {
            let request = HandoffRequest { to: a.to.to_string(), reason: HandoffReason::Drain, ..Default::default() };
            match api.handoff(&i.id, &request) {
                Ok(view) => {
                    if !a.json {
                        println!("moved {} ({}) to {}: it answers at {}", i.id, i.name, view.to, view.endpoint);
                    }
                    drained.moved.push(view);
                }
                Err(e) => {
                    let error = format!("{:#}", anyhow::Error::from(e));
                    if !a.json {
                        println!("did not move {} ({}): {error}", i.id, i.name);
                    }
                    drained.failed.push(NotDrained { instance: i.id.clone(), error });
                }
            }
        }
        Ok(drained)
    })
    .await??;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&drained)?);
    }
    match drained.failed.len() {
        0 => Ok(()),
        n => anyhow::bail!("{n} instance(s) did not move"),
    }
}

fn run_blocking(data: &DataDir, a: HandoffArgs) -> anyhow::Result<()> {
    let api = client(data, a.api)?;
    let id = instance_id(&api, &a.instance)?;
    if !a.json {
        eprintln!("handing off instance {id} to {}...", a.to);
    }
    let request = HandoffRequest {
        to: a.to.to_string(),
        mode: a.mode.clone(),
        downtime_limit_ms: Some(a.downtime_ms),
        reason: HandoffReason::Operator,
    };
    let view = api.handoff(&id, &request)?;
    if let Some(path) = &a.trace {
        write_trace(path, &view)?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(());
    }
    println!("moved {} to {}: the service answers at {}", view.instance, view.to, view.endpoint);
    println!(
        "  total {:.2} s, downtime {:.2} s, {} sent for {} modified ({}), {} segments, {} QEMU rounds, destination {} the base",
        view.total_s,
        view.downtime_s,
        mib(view.bytes),
        mib(view.modified_bytes),
        if view.bytes > 0 { format!("1/{:.1}", view.modified_bytes as f64 / view.bytes as f64) } else { "-".into() },
        view.segments,
        view.qemu_rounds,
        if view.has_base { "held" } else { "did not hold" },
    );
    println!(
        "  mode at the end {}; switches: {}",
        view.mode,
        if view.switches.is_empty() { "none".into() } else { view.switches.join("; ") }
    );
    let (running, last_round) = view.time_account();
    println!("  where the time went: while the VM ran {running}; its last round {last_round}");
    Ok(())
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

/// The adaptation's trace as CSV.
pub fn write_trace(path: &std::path::Path, view: &HandoffReport) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("{}", path.display()))?);
    forage_handoff::pipeline::write_trace_csv(&view.trace, &mut f).with_context(|| format!("{}", path.display()))
}
