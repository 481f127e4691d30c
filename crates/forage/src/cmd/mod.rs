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
    data.ensure_root()?;
    match cli.command {
        Command::Image(c) => image::run(&data, c).await,
        Command::Vm(c) => vm::run(&data, c).await,
        Command::Base(c) => base::run(&data, c).await,
        Command::Overlay(c) => overlay::run(&data, c).await,
        Command::Bench(c) => bench::run(&data, c).await,
        Command::Serve { config, daemon } => synthesis::serve(&data, config.as_deref(), daemon).await,
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
    forage_vm::accel::choose()
}

/// Build the tiny image if needed, printing what happened.
pub fn ensure_image(data: &DataDir, name: &str, quiet: bool) -> anyhow::Result<forage_image::BuildOutcome> {
    let agent = forage_image::locate_guest_binary("forage-agent")?;
    let opts = forage_image::BuildOptions {
        agent_binary: agent,
        disk_mib: 64,
        memory_mib: 256,
        force: false,
    };
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
