//! Subcommand implementations.

mod base;
mod bench;
mod bench_handoff;
mod bench_handoff_profile;
mod bench_provision;
mod bench_synthesis;
mod demo;
mod handoff;
mod handoff_plot;
mod image;
mod overlay;
mod pair;
mod service;
mod tactical;
mod synthesis;
mod vm;

use anyhow::Context;
use forage_datadir::DataDir;
use forage_vm::Accel;

use crate::cli::{Cli, Command};

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let data = DataDir::resolve(cli.data_dir.as_deref())?;
    match cli.command {
        Command::Image(c) => image::run(&data, c).await,
        Command::Vm(c) => vm::run(&data, c).await,
        Command::Base(c) => base::run(&data, c).await,
        Command::Overlay(c) => overlay::run(&data, c).await,
        Command::Bench(c) => bench::run(&data, c).await,
        Command::Serve { listen, service_addr, name, api, no_api, no_cache, no_advertise, idle_timeout } => {
            let idle = (idle_timeout > 0).then(|| std::time::Duration::from_secs(idle_timeout));
            synthesis::serve(&data, listen, service_addr, name, (!no_api).then_some(api), !no_cache, !no_advertise, idle).await
        }
        Command::Discover { timeout, json } => synthesis::discover(timeout, json).await,
        Command::Synthesize { file, cloudlet, hold, no_early_start, no_pipelining, request, residue, json } => {
            let cloudlet = synthesis::resolve_cloudlet(&cloudlet, &file).await?;
            let credentials = Some(pair::credentials(&data, cloudlet, None)?);
            let opts = forage_client::SynthesisOptions { device: "forage-cli".into(), early_start: !no_early_start, store_and_forward: no_pipelining, credentials, ..Default::default() };
            synthesis::synthesize(&file, cloudlet, hold, opts, request.as_deref(), residue.as_deref(), json).await
        }
        Command::Demo(a) => demo::run(&data, a).await,
        Command::Service(c) => service::run(&data, c).await,
        Command::Offload { service, join, session } => tactical::provision(&data, forage_proto::Provision::CachedVm { service: service.clone(), join }, Some(&service), &session).await,
        Command::Apps(a) => tactical::apps(&data, a).await,
        Command::Provision { script, port, os, timeout, components, session } => {
            let bytes = std::fs::read(&script).with_context(|| format!("reading {}", script.display()))?;
            tactical::provision(&data, forage_proto::Provision::Script { os, port, script: bytes, timeout_s: timeout, components }, None, &session).await
        }
        Command::App(c) => tactical::app(&data, c).await,
        Command::Pair(a) => pair::run(&data, a).await,
        Command::Handoff(a) => handoff::run(&data, a).await,
        Command::Signer(c) => pair::signer(&data, c),
    }
}

/// The accelerator to use, with one warning line when it is TCG.
pub fn accel() -> Accel {
    let choice = forage_vm::accel::detect();
    if let Some(why) = &choice.why_not_kvm {
        eprintln!("warning: using TCG software emulation (slow), not KVM: {why}");
    }
    choice.accel
}

/// Build an image with its recipe's sizes if needed, printing what happened.
pub fn ensure_image(data: &DataDir, name: &str, quiet: bool) -> anyhow::Result<forage_image::BuildOutcome> {
    let agent = forage_image::locate_guest_binary("forage-agent")?;
    let opts = forage_image::BuildOptions::new(agent);
    let out = forage_image::build(data, name, &opts).with_context(|| format!("building image {name}"))?;
    if !quiet {
        eprintln!(
            "image {name}: {} in {:.1} s ({})",
            if out.cached { "cached" } else { "built" },
            out.took.as_secs_f64(),
            out.image.dir().display()
        );
    }
    Ok(out)
}

/// Print `value` as one line of JSON.
pub fn print_json(value: &impl serde::Serialize) {
    println!("{}", serde_json::to_string(value).expect("serializable"));
}
