//! `forage-shim DIR/shim.json`: one instance's view and service relay (see the
//! `forage_shim` crate). Started by the cloudlet daemon; logs to stderr.

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,fuser=off".into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false)
        .init();
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: forage-shim DIR/shim.json (started by `forage serve`)");
        return std::process::ExitCode::from(2);
    };
    let spec: forage_shim::ShimSpec = match std::fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{}: {e}", std::path::Path::new(&path).display());
            return std::process::ExitCode::FAILURE;
        }
    };
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    match runtime.block_on(forage_shim::server::run(spec)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The daemon shows this line as why the shim did not start: every cause.
            eprintln!("error: {}", forage_proto::one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
