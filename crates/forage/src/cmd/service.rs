//! `forage service`: the cloudlet's service VM repository.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use forage_agent::app::AppPackage;
use forage_datadir::DataDir;
use forage_image::{GuestImage, RunPaths};
use forage_service::{
    now_unix, package, Repository, ServiceManifest, ServiceVm, SERVICE_FORMAT, SERVICE_KIND,
};
use forage_synth::launch::LaunchOptions;
use forage_synth::BaseVm;
use serde_json::json;

use crate::cli::ServiceCommand;

pub async fn run(data: &DataDir, cmd: ServiceCommand) -> anyhow::Result<()> {
    let repo = Repository::new(data);
    DataDir::ensure(repo.root())?;
    match cmd {
        ServiceCommand::Create {
            id,
            base,
            app,
            client_apps,
            description,
            json,
        } => {
            let apps = client_apps
                .iter()
                .map(|s| parse_client_app(s))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let t = Instant::now();
            let svc = create(
                data,
                &repo,
                &id,
                &base,
                app.as_deref(),
                &description,
                &apps,
                json,
            )
            .await?;
            report(
                &svc,
                json,
                &format!("created in {:.1} s", t.elapsed().as_secs_f64()),
            );
        }
        ServiceCommand::Import {
            package: Some(pkg),
            id,
            json,
            ..
        } => {
            super::pair::check_package(data, forage_trust::signing::SERVICE_PACKAGE, &pkg)?;
            let svc = package::import(data, &repo, &pkg, id.as_deref())
                .with_context(|| format!("importing {}", pkg.display()))?;
            report(&svc, json, "imported");
        }
        ServiceCommand::Import {
            package: None,
            disk: Some(disk),
            id: Some(id),
            port: Some(port),
            probe,
            image,
            json,
        } => {
            let t = Instant::now();
            let svc = cold_boot(data, &repo, &disk, &id, port, probe, &image, json).await?;
            report(
                &svc,
                json,
                &format!(
                    "cold-booted from {} and saved in {:.1} s",
                    disk.display(),
                    t.elapsed().as_secs_f64()
                ),
            );
        }
        ServiceCommand::Import { .. } => {
            bail!("give a service package, or --disk with --id and --port")
        }
        ServiceCommand::Export { id, output } => {
            let svc = repo.open(&id)?;
            let size = package::export(&svc, &output)
                .with_context(|| format!("exporting service {id}"))?;
            super::pair::sign_package(data, forage_trust::signing::SERVICE_PACKAGE, &output)?;
            println!(
                "service {id} exported to {} ({:.1} MiB, signed)",
                output.display(),
                size as f64 / (1 << 20) as f64
            );
        }
        ServiceCommand::List { json } => {
            let rows: Vec<_> = repo.list().iter().map(describe).collect();
            if json {
                super::print_json(&rows);
            } else if rows.is_empty() {
                println!(
                    "no service VMs (create one: forage service create ID --base NAME --app DIR)"
                );
            } else {
                for r in rows {
                    let port = r["port"]
                        .as_u64()
                        .map(|p| format!("port {p}"))
                        .unwrap_or_else(|| "baseline".into());
                    println!(
                        "{:<20} {:<14} {:<10} apps: {}",
                        r["id"].as_str().unwrap_or(""),
                        r["os"].as_str().unwrap_or(""),
                        port,
                        r["client_apps"]
                    );
                }
            }
        }
        ServiceCommand::Rm { id } => {
            repo.remove(&id)?;
            println!("service {id} removed");
        }
        ServiceCommand::Component { name, path } => {
            let at = repo.add_component(&name, &path)?;
            println!(
                "component {name} added at {} (scripts get it under /opt/components/{name})",
                at.display()
            );
        }
    }
    Ok(())
}

fn describe(s: &ServiceVm) -> serde_json::Value {
    let m = s.manifest();
    json!({"id": m.id, "os": m.os, "port": m.port, "baseline": m.is_baseline(), "description": m.description, "source": m.source,
           "client_apps": m.client_apps.iter().map(|a| format!("{} ({})", a.id, a.platform)).collect::<Vec<_>>(), "dir": s.dir()})
}

fn report(s: &ServiceVm, json: bool, what: &str) {
    if json {
        super::print_json(&describe(s));
    } else {
        let kind = if s.manifest().is_baseline() {
            format!("baseline VM of {}", s.manifest().os)
        } else {
            format!("port {}", s.manifest().port.unwrap_or(0))
        };
        println!("service {} ({kind}) {what}", s.id());
    }
}

/// `ID=PLATFORM:FILE`.
fn parse_client_app(s: &str) -> anyhow::Result<(String, String, std::path::PathBuf)> {
    let (id, rest) = s
        .split_once('=')
        .context("--client-app wants ID=PLATFORM:FILE")?;
    let (platform, file) = rest
        .split_once(':')
        .context("--client-app wants ID=PLATFORM:FILE")?;
    Ok((id.to_string(), platform.to_string(), file.into()))
}

fn manifest(
    id: &str,
    port: Option<u16>,
    probe: Option<String>,
    image: &str,
    description: &str,
    source: String,
) -> ServiceManifest {
    ServiceManifest {
        kind: SERVICE_KIND.into(),
        format: SERVICE_FORMAT,
        id: id.into(),
        os: forage_image::GUEST_OS.into(),
        image: image.into(),
        port,
        probe,
        description: description.into(),
        source,
        client_apps: Vec::new(),
        created_unix: now_unix(),
    }
}

#[allow(clippy::too_many_arguments)]
async fn create(
    data: &DataDir,
    repo: &Repository,
    id: &str,
    base: &str,
    app: Option<&Path>,
    description: &str,
    client_apps: &[(String, String, std::path::PathBuf)],
    quiet: bool,
) -> anyhow::Result<ServiceVm> {
    if repo.open(id).is_ok() {
        bail!("service {id} already exists (forage service rm {id} first)");
    }
    let base = BaseVm::open(data, base)?;
    let staging = repo.staging(id)?;
    let result = async {
        let (port, probe, source) = match app {
            Some(dir) => {
                let app = AppPackage::open(dir)?;
                if !quiet {
                    eprintln!(
                        "service {id}: resuming base {}, installing {} ...",
                        base.manifest().name,
                        app.manifest().name
                    );
                }
                let opts = LaunchOptions::default();
                let work = staging.join("work");
                let launch = forage_synth::build::build_launch(data, &base, &app, &opts, &work).await?;
                std::fs::rename(launch.snapshot.dir(), staging.join("snapshot"))?;
                let _ = std::fs::remove_dir_all(&work);
                (
                    Some(app.manifest().port),
                    app.manifest().probe.clone(),
                    format!(
                        "app {} on base {}",
                        app.manifest().name,
                        base.manifest().name
                    ),
                )
            }
            None => {
                let to = staging.join("snapshot");
                DataDir::ensure(&to)?;
                for e in std::fs::read_dir(base.snapshot().dir())? {
                    let e = e?;
                    forage_vm::sparse::copy_sparse(&e.path(), &to.join(e.file_name()))
                        .with_context(|| format!("copying {}", e.path().display()))?;
                }
                (None, None, format!("base {}", base.manifest().name))
            }
        };
        let m = manifest(id, port, probe, &base.manifest().image, description, source);
        Ok::<_, anyhow::Error>(repo.install(&staging, m, client_apps)?)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

/// Boot `disk` (copied, as raw) with the image's kernel, wait for its service, save.
#[allow(clippy::too_many_arguments)]
async fn cold_boot(
    data: &DataDir,
    repo: &Repository,
    disk: &Path,
    id: &str,
    port: u16,
    probe: Option<String>,
    image: &str,
    quiet: bool,
) -> anyhow::Result<ServiceVm> {
    if repo.open(id).is_ok() {
        bail!("service {id} already exists (forage service rm {id} first)");
    }
    let img = GuestImage::open(data, image)?;
    let staging = repo.staging(id)?;
    let result = async {
        let run = RunPaths {
            dir: staging.join("run"),
            qmp_socket: data
                .runtime_dir()?
                .join(format!("import-{}.qmp", std::process::id())),
        };
        DataDir::ensure(&run.dir)?;
        let raw = run.dir.join("imported.raw");
        let out = std::process::Command::new("qemu-img")
            .args(["convert", "-q", "-O", "raw"])
            .arg(disk)
            .arg(&raw)
            .output()
            .context("running qemu-img")?;
        if !out.status.success() {
            bail!(
                "{} is not a disk image qemu-img reads: {}",
                disk.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        if !quiet {
            eprintln!(
                "service {id}: cold-booting {} with image {image} ...",
                disk.display()
            );
        }
        let guest = img
            .boot_from(
                &format!("import-{id}"),
                &run,
                Some(&raw),
                &[port],
                super::accel(),
                Duration::from_secs(180),
            )
            .await?;
        let host_port = guest.ports[0];
        let agent_port = guest.agent_port;
        let probe2 = probe.clone();
        tokio::task::spawn_blocking(move || {
            wait_service(
                agent_port,
                host_port,
                port,
                probe2.as_deref(),
                Duration::from_secs(120),
            )
        })
        .await??;
        let mut vm = guest.vm;
        vm.save(&staging.join("snapshot")).await?;
        drop(vm);
        let _ = std::fs::remove_dir_all(&run.dir);
        let m = manifest(
            id,
            Some(port),
            probe,
            image,
            "",
            format!("cold boot of {}", disk.display()),
        );
        Ok(repo.install(&staging, m, &[])?)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

fn wait_service(
    agent_port: u16,
    host_port: u16,
    port: u16,
    probe: Option<&str>,
    wait: Duration,
) -> anyhow::Result<()> {
    let local = |p| std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, p));
    let mut agent = forage_agent::AgentClient::connect(local(agent_port), Duration::from_secs(30))?;
    let t = Instant::now();
    while t.elapsed() < wait {
        let up = match probe {
            Some(line) => {
                forage_agent::app::request_line(local(host_port), line, Duration::from_secs(5))
                    .is_ok()
            }
            None => agent.listening(port).unwrap_or(false),
        };
        if up {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("nothing answered on guest port {port} of the imported disk within {}s (is its app under /data/apps with a start script?)", wait.as_secs())
}
