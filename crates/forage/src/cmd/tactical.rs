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

use crate::cli::{AppCommand, AppsArgs, AppsCommand, SessionArgs};

/// `--cloudlet ADDR|auto`; with `auto` and a service, only cloudlets holding it qualify.
pub async fn resolve(arg: &str, service: Option<&str>) -> anyhow::Result<SocketAddr> {
    if arg != "auto" {
        return arg.parse().with_context(|| format!("--cloudlet {arg}: an address like 127.0.0.1:7878, or auto"));
    }
    let found = tokio::task::spawn_blocking(|| forage_discovery::discover(Duration::from_secs(2))).await??;
    let need = forage_discovery::Need { base: None, service: service.map(str::to_string) };
    let utility = |f: &forage_discovery::Found, n: &forage_discovery::Need| {
        if n.service.as_ref().is_some_and(|s| !f.ad.services.contains(s)) {
            return None;
        }
        forage_discovery::default_utility(f, n)
    };
    let best = forage_discovery::select(&found, &need, &utility).with_context(|| match service {
        Some(s) => format!(
            "--cloudlet auto: none of the {} cloudlets that answered holds service {s} and is reachable",
            found.len()
        ),
        None => format!("--cloudlet auto: none of the {} cloudlets that answered is reachable", found.len()),
    })?;
    eprintln!("cloudlet auto: {} at {} (of {} found)", best.ad.name, best.ad.addr, found.len());
    Ok(best.ad.addr)
}

/// Provision `request` on the cloudlet and hold it as `args` say.
pub async fn provision(
    data: &forage_datadir::DataDir,
    request: impl Into<forage_client::Ask>,
    service: Option<&str>,
    args: &SessionArgs,
) -> anyhow::Result<()> {
    provision_after(data, request, service, args, None).await
}

/// [`provision`], after the device spent `download_s` getting the client app (push).
async fn provision_after(
    data: &forage_datadir::DataDir,
    request: impl Into<forage_client::Ask>,
    service: Option<&str>,
    args: &SessionArgs,
    download_s: Option<f64>,
) -> anyhow::Result<()> {
    let addr = resolve(&args.cloudlet, service).await?;
    let request: forage_client::Ask = request.into();
    let mechanism = request.mechanism();
    let (report, mut session) = forage_client::provision(
        addr,
        &forage_trust::DeviceTrust::new(&data.trust_peers()).credentials(addr, None)?,
        "forage-cli",
        request,
        args.request.clone(),
    )
    .await
    .with_context(|| format!("{mechanism} on cloudlet {addr}"))?;
    print_report(&report, args.json, download_s);
    if args.hold {
        eprintln!("instance held at {}; Ctrl-C releases it", report.endpoint);
        let mut follows = forage_client::follow_requests(std::io::BufReader::new(std::io::stdin()));
        let ended = tokio::select! {
            _ = tokio::signal::ctrl_c() => None,
            e = session.ended_following(&mut follows) => Some(e),
        };
        match ended {
            None => session.close().await,
            Some(ended) => {
                let pairings = data.trust_peers();
                super::synthesis::report_end(ended, args.json, Some((&pairings, report.service.addr.as_str()))).await?
            }
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
        crate::output::print_json(&v);
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

pub async fn apps(data: &forage_datadir::DataDir, args: AppsArgs) -> anyhow::Result<()> {
    let addr = resolve(&args.cloudlet, None).await?;
    let credentials = forage_trust::DeviceTrust::new(&data.trust_peers()).credentials(addr, None)?;
    let platform = forage_service::this_platform();
    match args.command {
        None => {
            let apps = forage_client::list_apps(addr, &credentials, (!args.all).then_some(platform.as_str()))
                .await
                .with_context(|| format!("app store of {addr}"))?;
            if args.json {
                crate::output::print_json(&apps.iter().map(|a| serde_json::json!({"id": a.id, "service": a.service, "platform": a.platform, "file": a.file, "size": a.size, "sha256": a.sha256})).collect::<Vec<_>>());
            } else if apps.is_empty() {
                println!("no client apps for {} at {addr}", if args.all { "any platform" } else { &platform });
            } else {
                for a in apps {
                    println!("{:<24} {:<16} service {:<16} {} ({} bytes)", a.id, a.platform, a.service, a.file, a.size);
                }
            }
        }
        Some(AppsCommand::Get { id, output, no_start, request, hold }) => {
            let t = std::time::Instant::now();
            let (info, bytes) =
                forage_client::get_app(addr, &credentials, &id).await.with_context(|| format!("getting app {id}"))?;
            if !forage_service::plain(&info.file) {
                bail!("the app store names a file {:?} that is not a plain name", info.file);
            }
            std::fs::create_dir_all(&output).with_context(|| format!("creating {}", output.display()))?;
            let path = output.join(&info.file);
            let partial = output.join(format!(".{}.partial", info.file));
            std::fs::write(&partial, &bytes).with_context(|| format!("writing {}", partial.display()))?;
            std::fs::rename(&partial, &path).with_context(|| format!("writing {}", path.display()))?;
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
                let session = SessionArgs { cloudlet: addr.to_string(), request, hold, json: args.json };
                return provision_after(
                    data,
                    Provision::Push { app: id },
                    Some(&info.service),
                    &session,
                    Some(download_s),
                )
                .await;
            }
        }
    }
    Ok(())
}

pub async fn app(data: &forage_datadir::DataDir, cmd: AppCommand) -> anyhow::Result<()> {
    match cmd {
        AppCommand::Pack { command, name, port, probe, data, output } => {
            let name = name.unwrap_or_else(|| {
                Path::new(&command[0]).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
            });
            let bytes = appvirt::pack(&command, &name, port, probe, &data)?;
            let b = appvirt::AppBundle::open(&bytes).context("checking the bundle just packed")?;
            let partial = output.with_extension("partial");
            std::fs::write(&partial, &bytes).with_context(|| format!("writing {}", partial.display()))?;
            std::fs::rename(&partial, &output).with_context(|| format!("writing {}", output.display()))?;
            let libs = b.manifest.files.iter().filter(|f| f.path.contains(".so")).count();
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
            let package = std::fs::read(&bundle).with_context(|| format!("reading {}", bundle.display()))?;
            appvirt::AppBundle::open(&package).with_context(|| format!("{}", bundle.display()))?;
            provision(data, Provision::App { package }, None, &session).await
        }
    }
}
