//! `forage serve` and `forage synthesize`.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use forage_cloudlet::Cloudlet;
use forage_datadir::DataDir;

/// What the HTTP API may do to the daemon.
struct DaemonControl {
    cloudlet: Arc<Cloudlet>,
}

impl forage_api::Control for DaemonControl {
    fn stop_instance(&self, id: &str) -> Result<(), String> {
        match self.cloudlet.stop_instance(id) {
            true => Ok(()),
            false => Err(format!("instance {id} is not running in this daemon")),
        }
    }

    fn bases(&self) -> Vec<forage_api::BaseInfo> {
        forage_synth::BaseVm::list(&self.cloudlet.data)
            .into_iter()
            .filter_map(|(name, b)| b.ok().map(|b| (name, b)))
            .map(|(name, b)| forage_api::BaseInfo { name, digest: b.digest().into(), memory_bytes: b.manifest().memory_size, disk_bytes: b.manifest().disk_size })
            .collect()
    }

    fn evict_cache(&self, overlay_digest: &str) -> Result<(), String> {
        self.cloudlet.cache.evict(overlay_digest);
        Ok(())
    }

    fn services(&self) -> Vec<forage_api::ServiceInfo> {
        self.cloudlet.services.list().into_iter().map(|s| {
            let m = s.manifest();
            forage_api::ServiceInfo { id: m.id.clone(), os: m.os.clone(), port: m.port, description: m.description.clone(), client_apps: m.client_apps.iter().map(|a| a.id.clone()).collect() }
        }).collect()
    }

    fn apps(&self, platform: Option<&str>) -> Vec<forage_api::AppInfo> {
        self.cloudlet.services.apps(platform).into_iter().map(|(s, a)| app_info(&s, &a)).collect()
    }

    fn handoff(&self, id: &str, request: forage_api::HandoffRequest) -> Result<forage_api::HandoffView, String> {
        let to = request.to.parse().map_err(|_| format!("destination {:?} is not HOST:PORT", request.to))?;
        let options = forage_cloudlet::HandoffOptions { mode: request.mode, downtime_limit_ms: request.downtime_limit_ms.unwrap_or(2000) };
        // The API calls this on a blocking thread of the daemon's runtime.
        let report = tokio::runtime::Handle::current().block_on(self.cloudlet.handoff(id, to, options)).map_err(|e| e.to_string())?;
        serde_json::to_value(&report).and_then(serde_json::from_value).map_err(|e| e.to_string())
    }

    fn app_file(&self, id: &str) -> Option<(forage_api::AppInfo, Vec<u8>)> {
        let (s, a) = self.cloudlet.services.app(id).ok()?;
        let bytes = std::fs::read(s.app_path(&a)).ok()?;
        Some((app_info(&s, &a), bytes))
    }
}

/// The API's bearer token file.
pub fn api_token_path(data: &DataDir) -> std::path::PathBuf {
    data.root().join("trust").join("api-token")
}

fn app_info(s: &forage_service::ServiceVm, a: &forage_service::ClientApp) -> forage_api::AppInfo {
    forage_api::AppInfo { id: a.id.clone(), service: s.id().to_string(), platform: a.platform.clone(), file: a.file.clone(), size: a.size, sha256: a.sha256.clone() }
}

#[allow(clippy::too_many_arguments)]
pub async fn serve(data: &DataDir, listen: SocketAddr, service_addr: Option<std::net::Ipv4Addr>, name: String, api: Option<SocketAddr>, cache: bool, advertise: bool, idle_timeout: Option<Duration>) -> anyhow::Result<()> {
    let service_addr = match (service_addr, listen.ip()) {
        (Some(a), _) => a,
        (None, IpAddr::V4(a)) if !a.is_unspecified() => a,
        (None, _) => bail!("listening on {listen}: say which address services are forwarded on with --service-addr"),
    };
    let accel = super::accel();
    let mut cloudlet = Cloudlet::open(name, data.clone(), accel, service_addr)?;
    cloudlet.idle_timeout = idle_timeout;
    let cloudlet = Arc::new(cloudlet);
    cloudlet.cache.set_enabled(cache);
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let bases: Vec<String> = forage_synth::BaseVm::list(data).into_iter().filter_map(|(n, b)| b.ok().map(|b| format!("{n} ({})", forage_synth::package::short(b.digest())))).collect();
    eprintln!("cloudlet {} listening on {listen}; bases: {}", cloudlet.name, if bases.is_empty() { "none (forage base create ...)".into() } else { bases.join(", ") });
    if let Some(api) = api {
        let l = tokio::net::TcpListener::bind(api).await.with_context(|| format!("cannot serve the HTTP API on {api}"))?;
        let control = Arc::new(DaemonControl { cloudlet: cloudlet.clone() });
        let token_path = api_token_path(data);
        let token = forage_api::token::open_or_create(&token_path)?;
        let open_reads = api.ip().is_loopback();
        let ctx = forage_api::ApiContext::new(cloudlet.state.clone(), cloudlet.name.clone(), env!("CARGO_PKG_VERSION"), accel.to_string(), control).with_access(token, open_reads);
        eprintln!(
            "HTTP API on http://{api}/v1/status (metrics on /metrics, OpenAPI on /openapi.json); {} need the bearer token in {}",
            if open_reads { "changes" } else { "all requests" },
            token_path.display()
        );
        tokio::spawn(async move {
            if let Err(e) = forage_api::serve(l, ctx, std::future::pending()).await {
                tracing::error!("HTTP API stopped: {e}");
            }
        });
    }
    let advertisement = move |c: &Cloudlet| forage_discovery::Advertisement {
        name: c.name.clone(),
        addr: SocketAddr::new(IpAddr::V4(service_addr), listen.port()),
        http_port: api.map(|a| a.port()),
        bases: forage_synth::BaseVm::list(&c.data).into_iter().filter_map(|(_, b)| b.ok().map(|b| forage_synth::package::short(b.digest()).to_string())).collect(),
        services: c.services.list().into_iter().filter(|s| !s.manifest().is_baseline()).map(|s| s.id().to_string()).collect(),
        load: c.state.list_instances(true).map(|v| v.len() as u32).unwrap_or(0),
        free_mem_mib: free_memory_mib(),
        cores: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
    };
    let advertiser = match advertise {
        true => match forage_discovery::advertise(&advertisement(&cloudlet)) {
            Ok(a) => Some(a),
            Err(e) => {
                eprintln!("not announced on the local network: {e}");
                None
            }
        },
        false => None,
    };
    // Keep the TXT metadata current: load, bases and services change while serving.
    if let Some(advertiser) = advertiser {
        let c = cloudlet.clone();
        tokio::spawn(async move {
            let mut last = advertisement(&c);
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let now = tokio::task::block_in_place(|| advertisement(&c));
                let changed = (now.load, &now.bases, &now.services) != (last.load, &last.bases, &last.services) || now.free_mem_mib.abs_diff(last.free_mem_mib) > 256;
                if changed {
                    if let Err(e) = advertiser.update(&now) {
                        tracing::warn!("announcement not refreshed: {e}");
                    }
                    last = now;
                }
            }
        });
    }
    tokio::select! {
        r = forage_cloudlet::serve(listener, cloudlet) => r.context("accepting devices")?,
        _ = tokio::signal::ctrl_c() => eprintln!("cloudlet stopping"),
    }
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
    let (report, session) = synthesize_with_progress(file, cloudlet, opts, !json).await?;
    if json {
        super::print_json(&report);
    } else {
        print_report(&report);
    }
    if hold {
        eprintln!("instance held at {}; Ctrl-C releases it", report.endpoint);
        tokio::signal::ctrl_c().await?;
    }
    match residue {
        Some(out) => {
            let bytes = session.close_with_residue(out).await?;
            eprintln!("residue: {} ({} KiB); fold it in with: forage overlay merge {} {} -o NEW.ovl", out.display(), bytes >> 10, file.display(), out.display());
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
    bar.set_style(indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}").expect("valid template").progress_chars("=> "));
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

pub fn print_report(r: &forage_client::SynthesisReport) {
    println!("synthesized on cloudlet {} ({} KiB overlay, {}):", r.cloudlet, r.overlay_bytes >> 10, r.mode.replace('_', " "));
    if r.mode == "cached" {
        println!("  launch VM from the cloudlet's cache: nothing sent | resume {:.2} s | first response {:.2} s", r.resume_s, r.first_response_s);
    } else {
        println!(
            "  transfer {:.2} s | decompress {:.2} s | apply {:.2} s | resume {:.2} s | first response {:.2} s | all applied {:.2} s",
            r.transfer_s, r.decompress_s, r.apply_s, r.resume_s, r.first_response_s, r.complete_s
        );
    }
    if let Some(u) = &r.usage {
        println!(
            "  at the first response the VM had read {} of {} overlay blobs ({:.0}%); {} segments fetched on demand, {} of {} there",
            u.blobs_accessed,
            u.blobs,
            r.accessed_fraction.unwrap_or(0.0) * 100.0,
            u.demand_fetches,
            u.segments_arrived,
            u.segments
        );
    }
    println!("  service at {} answered: {}", r.endpoint, r.answer);
}

fn free_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with("MemAvailable:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map(|kib| kib / 1024)
        .unwrap_or(0)
}

/// `forage discover`.
pub async fn discover(timeout: f64, json: bool) -> anyhow::Result<()> {
    let wait = Duration::from_secs_f64(timeout.clamp(0.1, 600.0));
    let found = tokio::task::spawn_blocking(move || forage_discovery::discover(wait)).await??;
    if json {
        super::print_json(&found);
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
    let need = forage_discovery::Need { base: base.map(|d| forage_synth::package::short(&d).to_string()), service: None };
    let best = forage_discovery::select(&found, &need, &forage_discovery::default_utility)
        .with_context(|| format!("--cloudlet auto: none of the {} cloudlets that answered holds the overlay's base and is reachable", found.len()))?;
    eprintln!("cloudlet auto: {} at {} (of {} found)", best.ad.name, best.ad.addr, found.len());
    Ok(best.ad.addr)
}
