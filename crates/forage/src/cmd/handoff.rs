//! `forage handoff`: ask this cloudlet's daemon (its HTTP API, with the operator's token)
//! to move a running instance to another cloudlet, and print what the handoff did.

use std::time::Duration;

use anyhow::{bail, Context};
use forage_api::{HandoffRequest, HandoffView, InstanceList};
use forage_datadir::DataDir;

use crate::cli::HandoffArgs;

pub async fn run(data: &DataDir, a: HandoffArgs) -> anyhow::Result<()> {
    let data = data.clone();
    tokio::task::spawn_blocking(move || run_blocking(&data, a)).await?
}

fn run_blocking(data: &DataDir, a: HandoffArgs) -> anyhow::Result<()> {
    let token = forage_api::token::read(&super::synthesis::api_token_path(data))?;
    let base = format!("http://{}", a.api);
    let auth = format!("Bearer {token}");
    let id = resolve(&base, &auth, &a.instance)?;
    if !a.json {
        eprintln!("handing off instance {id} to {}...", a.to);
    }
    let request = HandoffRequest { to: a.to.to_string(), mode: a.mode.clone(), downtime_limit_ms: Some(a.downtime_ms) };
    let view: HandoffView = match ureq::post(&format!("{base}/v1/instances/{id}/handoff")).set("Authorization", &auth).timeout(Duration::from_secs(3600)).send_json(&request) {
        Ok(r) => r.into_json().context("the daemon's answer")?,
        Err(ureq::Error::Status(_, r)) => bail!("{}", api_error(r)),
        Err(e) => bail!("the cloudlet's API at {}: {e}", a.api),
    };
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
    println!("  mode at the end {}; switches: {}", view.mode, if view.switches.is_empty() { "none".into() } else { view.switches.join("; ") });
    Ok(())
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

/// An instance id, or the endpoint of one.
fn resolve(base: &str, auth: &str, instance: &str) -> anyhow::Result<String> {
    if !instance.contains(':') {
        return Ok(instance.to_string());
    }
    let list: InstanceList = match ureq::get(&format!("{base}/v1/instances")).set("Authorization", auth).call() {
        Ok(r) => r.into_json()?,
        Err(ureq::Error::Status(_, r)) => bail!("{}", api_error(r)),
        Err(e) => bail!("the cloudlet's API at {base}: {e}"),
    };
    list.instances.into_iter().find(|i| i.endpoint == instance).map(|i| i.id).with_context(|| format!("no running instance has endpoint {instance}"))
}

fn api_error(r: ureq::Response) -> String {
    let status = r.status();
    match r.into_json::<forage_api::ErrorBody>() {
        Ok(b) => b.error,
        Err(_) => format!("the API answered {status}"),
    }
}

/// The adaptation's trace as CSV.
pub fn write_trace(path: &std::path::Path, view: &HandoffView) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("{}", path.display()))?);
    forage_handoff::pipeline::write_trace_csv(&view.trace, &mut f).with_context(|| format!("{}", path.display()))
}
