//! `forage serve` and `forage synthesize`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use forage_datadir::DataDir;

/// `forage serve`: the daemon, from the flags or a configuration file, until Ctrl-C or
/// SIGTERM.
pub async fn serve(
    data: &DataDir,
    config_file: Option<&Path>,
    flags: forage_daemon::DaemonConfig,
) -> anyhow::Result<()> {
    let config = match config_file {
        Some(path) => {
            if flags != forage_daemon::DaemonConfig::default() {
                bail!("give the daemon's settings either in {} or as flags, not both", path.display());
            }
            forage_daemon::DaemonConfig::read(path)?
        }
        None => flags,
    };
    let daemon = forage_daemon::Daemon::start(data, &config).await?;
    let bases: Vec<String> = forage_synth::BaseVm::list(data)
        .into_iter()
        .filter_map(|(n, b)| b.ok().map(|b| format!("{n} ({})", forage_synth::package::short(b.digest()))))
        .collect();
    eprintln!(
        "cloudlet {} listening on {}; bases: {}",
        daemon.cloudlet.name,
        daemon.listen,
        if bases.is_empty() { "none (forage base create ...)".into() } else { bases.join(", ") }
    );
    if let Some((api, token_path)) = &daemon.api {
        let open_reads = api.ip().is_loopback();
        eprintln!(
            "HTTP API on http://{api}/v1/status (metrics on /metrics, OpenAPI on /openapi.json); {} need the bearer token in {}",
            if open_reads { "changes" } else { "all requests" },
            token_path.display()
        );
    }
    if let Some(m) = &daemon.cluster {
        let s = m.status();
        eprintln!(
            "joined cluster {} as node {}: {} nodes live (etcd {})",
            s.cluster,
            s.node,
            s.nodes.len(),
            s.endpoints.join(",")
        );
    }
    if let Some(why) = &daemon.not_announced {
        eprintln!("not announced on the local network: {why}");
    }
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        eprintln!("cloudlet stopping");
    };
    daemon.run_until(shutdown).await.context("accepting devices")?;
    Ok(())
}

pub async fn synthesize(
    file: &Path,
    cloudlet: SocketAddr,
    hold: bool,
    mut opts: forage_client::SynthesisOptions,
    request: Option<&Path>,
    residue: Option<&Path>,
    json: bool,
) -> anyhow::Result<()> {
    let request = match request {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("request file {}", p.display()))?;
            Some(text.lines().next().unwrap_or_default().to_string())
        }
        None => None,
    };
    opts.request = request;
    let pairings = opts.pairings.clone();
    let (report, session) = synthesize_with_progress(file, cloudlet, opts, !json).await?;
    if json {
        crate::output::print_json(&report);
    } else {
        println!("{report}");
    }
    if hold {
        eprintln!("instance held at {}; Ctrl-C releases it", report.endpoint);
        let mut session = session;
        let mut follows = forage_client::follow_requests(std::io::BufReader::new(std::io::stdin()));
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            ended = session.ended_following(&mut follows) => {
                let asked = pairings.as_deref().map(|p| (p, report.service.addr.as_str()));
                return report_end(ended, json, asked).await;
            }
        }
        return finish(session, file, residue).await;
    }
    finish(session, file, residue).await
}

/// How a held instance ended: where it moved (printed), or why it stopped (an error).
/// With `asked` (the device's pairings and the service's endpoint), a session that broke
/// is followed by asking the cloudlets this device is paired with where the instance is
/// (in a cluster, a node that died has its instances marked lost when its lease expires):
/// their answer is printed (`--json`: the Whereabouts) before the error.
pub async fn report_end(
    ended: forage_client::Ended,
    json: bool,
    asked: Option<(&std::path::Path, &str)>,
) -> anyhow::Result<()> {
    match (ended.moved(), ended) {
        (Some(notice), _) if json => crate::output::print_json(&notice),
        (Some(notice), _) => {
            println!("the instance moved to cloudlet {}: the service answers at {}", notice.moved_to, notice.endpoint)
        }
        (None, forage_client::Ended::Stopped(e)) => {
            // Only a session that broke (not one the cloudlet ended saying why) is asked after.
            let broke = matches!(e, forage_client::ClientError::Proto { .. });
            if let Some((pairings, endpoint)) = asked.filter(|_| broke) {
                eprintln!(
                    "the session broke ({e}); asking the paired cloudlets where the instance is (Ctrl-C stops)..."
                );
                let every = std::time::Duration::from_secs(2);
                let ask = forage_client::ask_after(pairings, endpoint, every, std::time::Duration::from_secs(60));
                let answer = tokio::select! {
                    a = ask => a,
                    _ = tokio::signal::ctrl_c() => None,
                };
                match answer {
                    Some((_, w)) if json => crate::output::print_json(&w),
                    Some((at, w)) => println!("cloudlet {at}: {w}"),
                    None => eprintln!("no paired cloudlet knows the instance (not in a cluster, or it ended)"),
                }
                anyhow::bail!("the session with the cloudlet broke: {e}")
            }
            anyhow::bail!("the cloudlet ended the instance: {e}")
        }
        (None, forage_client::Ended::Moved { .. }) => unreachable!("a move has its notice"),
    }
    Ok(())
}

async fn finish(session: forage_client::Session, file: &Path, residue: Option<&Path>) -> anyhow::Result<()> {
    match residue {
        Some(out) => {
            let bytes = session.close_with_residue(out).await?;
            eprintln!(
                "residue: {} ({} KiB); fold it in with: forage overlay merge {} {} -o NEW.ovl",
                out.display(),
                bytes >> 10,
                file.display(),
                out.display()
            );
        }
        None => session.close().await,
    }
    Ok(())
}

/// Synthesize with a progress bar on stderr (hidden when stderr is not a terminal).
pub async fn synthesize_with_progress(
    file: &Path,
    cloudlet: SocketAddr,
    mut opts: forage_client::SynthesisOptions,
    progress: bool,
) -> anyhow::Result<(forage_client::SynthesisReport, forage_client::Session)> {
    let url = file.to_str().filter(|f| f.starts_with("http://") || f.starts_with("https://")).map(str::to_string);
    let total = match &url {
        Some(_) => 0, // the cloudlet fetches it: the device sends nothing
        None => std::fs::metadata(file).with_context(|| format!("overlay {}", file.display()))?.len(),
    };
    let sent = Arc::new(AtomicU64::new(0));
    opts.sent = Some(sent.clone());
    let bar = indicatif::ProgressBar::new(total);
    if !progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message("sending overlay");
    let ticker = {
        let (bar, sent) = (bar.clone(), sent.clone());
        tokio::spawn(async move {
            loop {
                bar.set_position(sent.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let result = match &url {
        Some(url) => forage_client::synthesize_url(url, cloudlet, &opts).await,
        None => forage_client::synthesize(file, cloudlet, &opts).await,
    };
    ticker.abort();
    bar.finish_and_clear();
    Ok(result?)
}
/// `forage discover`.
pub async fn discover(timeout: f64, json: bool) -> anyhow::Result<()> {
    let wait = Duration::from_secs_f64(timeout.clamp(0.1, 600.0));
    let found = tokio::task::spawn_blocking(move || forage_discovery::discover(wait)).await??;
    if json {
        crate::output::print_json(&found);
        return Ok(());
    }
    if found.is_empty() {
        println!("no cloudlet answered within {timeout} s");
    }
    for f in &found {
        let rtt = f.rtt_ms.map(|r| format!("{r:.1} ms")).unwrap_or_else(|| "unreachable".into());
        println!(
            "{:<20} {:<22} rtt {:<11} load {} | {} cores, {} MiB free | bases {} | services {} | http {}",
            f.ad.name,
            f.ad.addr,
            rtt,
            f.ad.load,
            f.ad.cores,
            f.ad.free_mem_mib,
            if f.ad.bases.is_empty() { "-".into() } else { f.ad.bases.join(",") },
            if f.ad.services.is_empty() { "-".into() } else { f.ad.services.join(",") },
            f.ad.http_port.map(|p| p.to_string()).unwrap_or_else(|| "-".into())
        );
    }
    Ok(())
}

/// `--cloudlet ADDR|auto`: with `auto`, discover for 2 s and pick by the default utility
/// (the overlay's base held, load, round trip).
pub async fn resolve_cloudlet(arg: &str, overlay: &Path) -> anyhow::Result<SocketAddr> {
    if arg != "auto" {
        return arg.parse().with_context(|| format!("--cloudlet {arg}: an address like 127.0.0.1:7878, or auto"));
    }
    let base = match overlay.to_str().filter(|f| f.starts_with("http://") || f.starts_with("https://")) {
        Some(_) => None, // read by the cloudlet; any cloudlet may be asked
        None => Some(forage_client::OverlayFile::open(overlay).await?.manifest.base.digest),
    };
    let found = tokio::task::spawn_blocking(|| forage_discovery::discover(Duration::from_secs(2))).await??;
    let need =
        forage_discovery::Need { base: base.map(|d| forage_synth::package::short(&d).to_string()), service: None };
    let best = forage_discovery::select(&found, &need, &forage_discovery::default_utility).with_context(|| {
        format!(
            "--cloudlet auto: none of the {} cloudlets that answered holds the overlay's base and is reachable",
            found.len()
        )
    })?;
    eprintln!("cloudlet auto: {} at {} (of {} found)", best.ad.name, best.ad.addr, found.len());
    Ok(best.ad.addr)
}
