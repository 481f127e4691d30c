//! Subcommand implementations.

mod base;
mod base_disk;
mod cluster;
mod handoff;
mod image;
mod overlay;
mod overlay_from_vm;
mod overlay_interactive;
mod packages;
mod pair;
mod service;
mod substrate;
mod synthesis;
mod tactical;
mod vm;
mod vm_import;

use anyhow::Context;
use forage_datadir::DataDir;

use crate::cli::{Cli, Command};

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let data = DataDir::resolve(cli.data_dir.as_deref())?;
    data.ensure_root()?;
    match cli.command {
        Command::Image(c) => image::run(&data, c).await,
        Command::Vm(c) => vm::run(&data, c).await,
        Command::Base(c) => base::run(&data, c).await,
        Command::Overlay(c) => overlay::run(&data, c).await,
        Command::Packages(c) => packages::run(&data, c),
        Command::Bench { args } => bench(&cli.data_dir, None, args),
        Command::Demo { args } => bench(&cli.data_dir, Some("demo"), args),
        Command::Serve { config, daemon } => synthesis::serve(&data, config.as_deref(), daemon).await,
        Command::Discover { timeout, json } => synthesis::discover(timeout, json).await,
        Command::Synthesize {
            file,
            cloudlet,
            hold,
            early_start: _,
            no_early_start,
            no_pipelining,
            request,
            residue,
            json,
        } => {
            let cloudlet = synthesis::resolve_cloudlet(&cloudlet, &file).await?;
            let credentials = Some(forage_trust::DeviceTrust::new(&data.trust_peers()).credentials(cloudlet, None)?);
            let opts = forage_client::SynthesisOptions {
                device: "forage-cli".into(),
                early_start: !no_early_start,
                store_and_forward: no_pipelining,
                credentials,
                pairings: Some(data.trust_peers()),
                ..Default::default()
            };
            synthesis::synthesize(&file, cloudlet, hold, opts, request.as_deref(), residue.as_deref(), json).await
        }
        Command::Service(c) => service::run(&data, c).await,
        Command::Substrate(c) => substrate::run(&data, c).await,
        Command::Offload { service, join, substrate, vcpus, memory, session } => match (service, substrate) {
            (Some(service), _) => {
                tactical::provision(
                    &data,
                    forage_proto::Provision::CachedVm { service: service.clone(), join },
                    Some(&service),
                    &session,
                )
                .await
            }
            (None, Some(substrate)) => {
                let memory_mib = memory.context("--substrate needs --memory MIB")?;
                let ask = forage_client::Ask::Activate { substrate, vcpus, memory_mib };
                tactical::provision(&data, ask, None, &session).await
            }
            (None, None) => anyhow::bail!("forage offload needs --service ID or --substrate NAME"),
        },
        Command::Apps(a) => tactical::apps(&data, a).await,
        Command::Provision { script, port, os, timeout, components, session } => {
            let bytes = std::fs::read(&script).with_context(|| format!("reading {}", script.display()))?;
            tactical::provision(
                &data,
                forage_proto::Provision::Script { os, port, script: bytes, timeout_s: timeout, components },
                None,
                &session,
            )
            .await
        }
        Command::App(c) => tactical::app(&data, c).await,
        Command::Pair(a) => pair::run(&data, a).await,
        Command::Handoff(a) => handoff::run(&data, a).await,
        Command::Instances(a) => handoff::instances(&data, a).await,
        Command::Stop(a) => handoff::stop(&data, a).await,
        Command::Drain(a) => handoff::drain(&data, a).await,
        Command::Cluster(c) => cluster::run(&data, c).await,
        Command::Node(c) => cluster::node(&data, c).await,
        Command::Signer(c) => pair::signer(&data, c),
    }
}

/// `forage bench ...` and `forage demo` run `forage-bench` (beside this binary, else on
/// PATH): the benches, their plotting and the demo are not part of the product binary.
fn bench(
    data_dir: &Option<std::path::PathBuf>,
    first: Option<&str>,
    args: Vec<std::ffi::OsString>,
) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let beside =
        std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("forage-bench"))).filter(|p| p.is_file());
    let program = beside.unwrap_or_else(|| "forage-bench".into());
    let mut cmd = std::process::Command::new(&program);
    if let Some(d) = data_dir {
        cmd.arg("--data-dir").arg(d);
    }
    cmd.args(first).args(args);
    let err = cmd.exec();
    anyhow::bail!("cannot run {}: {err} (build it: `cargo build --release -p forage-bench`)", program.display())
}
