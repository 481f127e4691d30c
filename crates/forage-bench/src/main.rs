//! forage-bench: the papers' measurements on this machine, each against its peers in the
//! same run (`forage-bench overlay|synthesis|provision|handoff|handoff-profile|cluster`), and the
//! quickstart demo (`forage-bench demo`). `forage bench ...` and `forage demo` run this
//! binary; it is not part of the product binary.

mod bench_app;
mod big;
mod cli;
mod cluster;
mod cluster_requests;
mod common;
mod demo;
mod handoff;
mod handoff_profile;
mod handoff_qemu;
mod handoff_table;
mod handoff_workload;
mod launch_cache;
mod link_schedule;
mod measure;
mod overlay;
mod overlay_disk;
mod peers;
mod plot;
mod provision;
mod substrate;
mod synthesis;

use clap::Parser;
use forage_datadir::DataDir;

use cli::{BenchCommand, Cli, Command};

fn main() -> std::process::ExitCode {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let cli = Cli::parse();
    let default = if cli.verbose { "debug,fuser=warn" } else { "warn,forage_image=info,fuser=off" };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .init();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", common::chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let data = DataDir::resolve(cli.data_dir.as_deref())?;
    data.ensure_root()?;
    match cli.command {
        Command::Demo(a) => demo::run(&data, a).await,
        Command::Bench(BenchCommand::Overlay(a)) => overlay::run(&data, a).await,
        Command::Bench(BenchCommand::Synthesis(a)) => synthesis::run(&data, a).await,
        Command::Bench(BenchCommand::Provision(a)) => provision::run(&data, a).await,
        Command::Bench(BenchCommand::Handoff(a)) => handoff::run(&data, a).await,
        Command::Bench(BenchCommand::HandoffProfile(a)) => handoff_profile::profile(&data, a).await,
        Command::Bench(BenchCommand::Memory(a)) => big::run(&data, a).await,
        Command::Bench(BenchCommand::Substrate(a)) => substrate::run(&data, a).await,
        Command::Bench(BenchCommand::Cluster(a)) => cluster::run(&data, a).await,
        Command::Bench(BenchCommand::OverlayOracle { launch, base }) => {
            let base = forage_synth::BaseVm::open(&data, &base)?;
            common::print_json(&peers::oracle(&base, &launch_cache::reopen(&launch)?)?);
            Ok(())
        }
        Command::Bench(BenchCommand::OverlayCreate(a)) => overlay::create_one(&data, a),
        Command::Bench(BenchCommand::Sink { listen }) => synthesis::sink(listen),
        Command::Bench(BenchCommand::Blast { to, bytes }) => synthesis::blast(to, bytes),
    }
}
