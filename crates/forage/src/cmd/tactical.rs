//! The device's side of the tactical-cloudlet mechanisms: `forage offload`, `forage apps`,
//! `forage provision`, `forage app pack|run`. Each provisioning command asks a cloudlet,
//! prints the endpoint (and the first answer), and holds the instance as asked.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use forage_client::ProvisionReport;
use forage_proto::Provision;
use forage_service::appvirt;
use serde::Deserialize;

use crate::cli::{AppCommand, AppsArgs, AppsCommand, SessionArgs};

/// `--cloudlet ADDR|auto`; with `auto` and a service, only cloudlets holding it qualify.
pub async fn resolve(arg: &str, service: Option<&str>) -> anyhow::Result<SocketAddr> {
    if arg != "auto" {
        return arg
            .parse()
            .with_context(|| format!("--cloudlet {arg}: an address like 127.0.0.1:7878, or auto"));
    }
    let found = tokio::task::spawn_blocking(|| forage_discovery::discover(Duration::from_secs(2)))
        .await??;
    let need = forage_discovery::Need {
        base: None,
        service: service.map(str::to_string),
    };
    let utility = |f: &forage_discovery::Found, n: &forage_discovery::Need| {
        if n.service
            .as_ref()
            .is_some_and(|s| !f.ad.services.contains(s))
        {
            return None;
        }
        forage_discovery::default_utility(f, n)
    };
    let best = forage_discovery::select(&found, &need, &utility).with_context(|| match service {
        Some(s) => format!("--cloudlet auto: none of the {} cloudlets that answered holds service {s} and is reachable", found.len()),
        None => format!("--cloudlet auto: none of the {} cloudlets that answered is reachable", found.len()),
    })?;
    eprintln!(
        "cloudlet auto: {} at {} (of {} found)",
        best.ad.name,
        best.ad.addr,
        found.len()
    );
    Ok(best.ad.addr)
}

/// Provision `request` on the cloudlet and hold it as `args` say.
pub async fn provision(
    request: Provision,
    service: Option<&str>,
    args: &SessionArgs,
) -> anyhow::Result<()> {
    provision_after(request, service, args, None).await
}

/// [`provision`], after the device spent `download_s` getting the client app (push).
async fn provision_after(
    request: Provision,
    service: Option<&str>,
    args: &SessionArgs,
    download_s: Option<f64>,
) -> anyhow::Result<()> {
    let addr = resolve(&args.cloudlet, service).await?;
    let mechanism = request.mechanism();
    let (report, mut session) =
        forage_client::provision(addr, "forage-cli", request, args.request.clone())
            .await
            .with_context(|| format!("{mechanism} on cloudlet {addr}"))?;
    print_report(&report, args.json, download_s);
    if args.hold {
        eprintln!("instance held at {}; Ctrl-C releases it", report.endpoint);
        let ended = tokio::select! {
            _ = tokio::signal::ctrl_c() => None,
            e = session.ended() => Some(e),
        };
        match ended {
            None => session.close().await,
            Some(e) => bail!("the cloudlet ended the instance: {e}"),
        }
    } else {
        session.close().await;
    }
    Ok(())
}

fn print_report(r: &ProvisionReport, json: bool, download_s: Option<f64>) {
    if json {
        let mut v = serde_json::to_value(r).expect("report serializes");
        v["app_download_s"] = download_s.into();
        super::print_json(&v);
        return;
    }
    if let Some(d) = download_s {
        println!("client app downloaded in {d:.2} s");
    }
    println!(
        "{} on cloudlet {}: {} bytes sent, ready {:.2} s, service at {}",
        r.mechanism, r.cloudlet, r.payload_bytes, r.ready_s, r.endpoint
    );
    if let (Some(a), Some(t)) = (&r.answer, r.first_response_s) {
        println!("  first answer after {t:.2} s: {a}");
    }
}

/// The HTTP API's base URL: given, or `auto` (discovered cloudlet's announced API).
async fn api_url(arg: &str) -> anyhow::Result<String> {
    if arg != "auto" {
        return Ok(arg.trim_end_matches('/').to_string());
    }
    let found = tokio::task::spawn_blocking(|| forage_discovery::discover(Duration::from_secs(2)))
        .await??;
    let need = forage_discovery::Need::default();
    let best = forage_discovery::select(&found, &need, &forage_discovery::default_utility)
        .context("--api auto: no reachable cloudlet answered")?;
    let port = best
        .ad
        .http_port
        .context("--api auto: the best cloudlet announces no HTTP API")?;
    Ok(format!("http://{}:{port}", best.ad.addr.ip()))
}

#[derive(Debug, Deserialize, serde::Serialize)]
struct AppInfo {
    id: String,
    service: String,
    platform: String,
    file: String,
    size: u64,
    sha256: String,
}

#[derive(Debug, Deserialize)]
struct AppList {
    apps: Vec<AppInfo>,
}

fn http() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(5))
        .timeout_read(Duration::from_secs(60))
        .build()
}

fn list_apps(api: &str, platform: Option<&str>) -> anyhow::Result<Vec<AppInfo>> {
    let mut req = http().get(&format!("{api}/v1/apps"));
    if let Some(p) = platform {
        req = req.query("platform", p);
    }
    let text = req
        .call()
        .with_context(|| format!("app store at {api}"))?
        .into_string()
        .with_context(|| format!("app store at {api}"))?;
    let list: AppList = serde_json::from_str(&text)
        .with_context(|| format!("app store at {api}: not a list of apps"))?;
    Ok(list.apps)
}

pub async fn apps(args: AppsArgs) -> anyhow::Result<()> {
    let api = api_url(&args.api).await?;
    let platform = forage_service::this_platform();
    match args.command {
        None => {
            let (api2, p) = (api.clone(), (!args.all).then(|| platform.clone()));
            let apps =
                tokio::task::spawn_blocking(move || list_apps(&api2, p.as_deref())).await??;
            if args.json {
                super::print_json(&apps);
            } else if apps.is_empty() {
                println!(
                    "no client apps for {} at {api}",
                    if args.all { "any platform" } else { &platform }
                );
            } else {
                for a in apps {
                    println!(
                        "{:<24} {:<16} service {:<16} {} ({} bytes)",
                        a.id, a.platform, a.service, a.file, a.size
                    );
                }
            }
        }
        Some(AppsCommand::Get {
            id,
            output,
            no_start,
            cloudlet,
            request,
            hold,
        }) => {
            let (api2, id2, out2) = (api.clone(), id.clone(), output.clone());
            let t = std::time::Instant::now();
            let (info, path) =
                tokio::task::spawn_blocking(move || download(&api2, &id2, &out2)).await??;
            let download_s = t.elapsed().as_secs_f64();
            if !args.json {
                println!(
                    "app {} for {} saved to {} ({} bytes, sha256 checked); its service is {}",
                    info.id,
                    info.platform,
                    path.display(),
                    info.size,
                    info.service
                );
            }
            if !no_start {
                let session = SessionArgs {
                    cloudlet,
                    request,
                    hold,
                    json: args.json,
                };
                return provision_after(Provision::Push { app: id }, Some(&info.service), &session, Some(download_s)).await;
            }
        }
    }
    Ok(())
}

/// Download app `id` into `dir`, checking its size and SHA-256 against the listing; the
/// file appears only when complete.
fn download(api: &str, id: &str, dir: &Path) -> anyhow::Result<(AppInfo, std::path::PathBuf)> {
    use sha2::Digest;
    let info = list_apps(api, None)?
        .into_iter()
        .find(|a| a.id == id)
        .with_context(|| {
            format!("no client app {id} in the app store at {api} (see `forage apps --all`)")
        })?;
    if !forage_service::plain(&info.file) {
        bail!(
            "the app store names a file {:?} that is not a plain name",
            info.file
        );
    }
    let resp = http()
        .get(&format!("{api}/v1/apps/{id}"))
        .call()
        .with_context(|| format!("downloading app {id}"))?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(resp.into_reader(), info.size + 1),
        &mut bytes,
    )
    .with_context(|| format!("downloading app {id}"))?;
    if bytes.len() as u64 != info.size || hex::encode(sha2::Sha256::digest(&bytes)) != info.sha256 {
        bail!(
            "app {id} arrived damaged ({} bytes, listed {}; or its checksum differs)",
            bytes.len(),
            info.size
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(&info.file);
    let partial = dir.join(format!(".{}.partial", info.file));
    std::fs::write(&partial, &bytes).with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok((info, path))
}

pub async fn app(cmd: AppCommand) -> anyhow::Result<()> {
    match cmd {
        AppCommand::Pack {
            command,
            name,
            port,
            probe,
            data,
            output,
        } => {
            let name = name.unwrap_or_else(|| {
                Path::new(&command[0])
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
            let bytes = appvirt::pack(&command, &name, port, probe, &data)?;
            let b = appvirt::AppBundle::open(&bytes).context("checking the bundle just packed")?;
            let partial = output.with_extension("partial");
            std::fs::write(&partial, &bytes)
                .with_context(|| format!("writing {}", partial.display()))?;
            std::fs::rename(&partial, &output)
                .with_context(|| format!("writing {}", output.display()))?;
            let libs = b
                .manifest
                .files
                .iter()
                .filter(|f| f.path.contains(".so"))
                .count();
            println!(
                "packed {name} for {}: {} files ({libs} libraries), {} KiB -> {}",
                b.manifest.os,
                b.manifest.files.len(),
                bytes.len() >> 10,
                output.display()
            );
            Ok(())
        }
        AppCommand::Run { bundle, session } => {
            let package =
                std::fs::read(&bundle).with_context(|| format!("reading {}", bundle.display()))?;
            appvirt::AppBundle::open(&package).with_context(|| format!("{}", bundle.display()))?;
            provision(Provision::App { package }, None, &session).await
        }
    }
}
