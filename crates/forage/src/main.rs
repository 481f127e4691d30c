//! forage: one binary for every role (device, builder, cloudlet, bench). Parses the command
//! line, sets up logging, and hands off to `cmd`.

mod cli;
mod cmd;
mod output;

use clap::Parser;

fn main() -> std::process::ExitCode {
    // What forage writes (overlays, copies of guest memory and disks, keys, the state
    // database) and the QEMU it starts are for this user alone.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    bound_malloc_arenas();
    quiet_when_stdout_closes();
    let cli = cli::Cli::parse();
    // Progress of long work (package downloads) at info; details with -v or RUST_LOG.
    // fuser reports its own unmount failing after forage-assembly detached the mount
    // lazily (on purpose): not worth a line.
    // A daemon's log is its record (what moved where, and why): info by default.
    let default = match (cli.verbose, matches!(cli.command, cli::Command::Serve { .. })) {
        (true, _) => "debug,fuser=warn",
        (false, true) => "info,fuser=off,mdns_sd=warn",
        (false, false) => "warn,forage_image=info,fuser=off",
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .init();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(cmd::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// `forage ... | head`: once the reader is gone, `println!` panics ("failed printing to
/// stdout: Broken pipe"). End as a shell tool ended by SIGPIPE does instead: no message,
/// status 141 (128 + SIGPIPE). SIGPIPE itself stays ignored (Rust's default), so a peer
/// that hangs up a socket is still an error forage reports.
fn quiet_when_stdout_closes() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message =
            payload.downcast_ref::<String>().map(String::as_str).or_else(|| payload.downcast_ref::<&str>().copied());
        if message.is_some_and(|m| m.starts_with("failed printing to stdout") && m.contains("Broken pipe")) {
            std::process::exit(141);
        }
        default(info)
    }));
}

/// One malloc arena. glibc gives new threads their own arena (up to 8 per core)
/// and keeps what is freed in each: a daemon whose sessions run on ever new threads
/// (tokio's blocking pool, FUSE answers) held more after every session. Measured on the
/// vision overlay's synthesis, three sessions in one cloudlet process: peak RSS 119, 217,
/// 256 MB at 38 Mbit/s; with one arena (MALLOC_ARENA_MAX=1) 116, 116, 148 MB at 200 Mbit/s (`forage-bench synthesis --image debian-12`).
fn bound_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// "outer: inner: innermost", each cause once.
fn chain(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}
