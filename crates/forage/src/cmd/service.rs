//! `forage service`: the cloudlet's service VM repository.

use std::time::Instant;

use anyhow::{bail, Context};
use forage_datadir::DataDir;
use forage_service::create::{create, import_disk, DiskImport, NewService};
use forage_service::{package, Repository, ServiceVm};

use crate::cli::ServiceCommand;

pub async fn run(data: &DataDir, cmd: ServiceCommand) -> anyhow::Result<()> {
    let repo = Repository::new(data);
    DataDir::ensure(repo.root())?;
    match cmd {
        ServiceCommand::Create { id, base, app, client_apps, description, json } => {
            let apps = client_apps.iter().map(|s| parse_client_app(s)).collect::<anyhow::Result<Vec<_>>>()?;
            let t = Instant::now();
            let new =
                NewService { id: &id, base: &base, app: app.as_deref(), description: &description, client_apps: &apps };
            let svc = create(data, &repo, &new, &|line| say(json, line)).await?;
            report(&svc, json, &format!("created in {:.1} s", t.elapsed().as_secs_f64()));
        }
        ServiceCommand::Import { package: Some(pkg), id, json, .. } => {
            forage_synth::build::check_package(data, forage_trust::signing::SERVICE_PACKAGE, &pkg)?;
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
            let import = DiskImport { id: &id, disk: &disk, port, probe, image: &image };
            let svc = import_disk(data, &repo, &import, forage_vm::accel::choose(), &|line| say(json, line)).await?;
            report(
                &svc,
                json,
                &format!("cold-booted from {} and saved in {:.1} s", disk.display(), t.elapsed().as_secs_f64()),
            );
        }
        ServiceCommand::Import { .. } => {
            bail!("give a service package, or --disk with --id and --port")
        }
        ServiceCommand::Fetch { id, from, json } => {
            super::base::fetch(data, forage_proto::PackageKind::Service, &id, from, json).await?
        }
        ServiceCommand::Export { id, output } => {
            let svc = repo.open(&id)?;
            let size = package::export(&svc, &output).with_context(|| format!("exporting service {id}"))?;
            forage_synth::build::sign_package(data, forage_trust::signing::SERVICE_PACKAGE, &output)?;
            println!(
                "service {id} exported to {} ({:.1} MiB, signed)",
                output.display(),
                size as f64 / (1 << 20) as f64
            );
        }
        ServiceCommand::List { json } => {
            let rows: Vec<_> = repo.list().iter().map(ServiceVm::summary).collect();
            if json {
                crate::output::print_json(&rows);
            } else if rows.is_empty() {
                println!("no service VMs (create one: forage service create ID --base NAME --app DIR)");
            }
            for r in rows.iter().filter(|_| !json) {
                let port = r.port.map(|p| format!("port {p}")).unwrap_or_else(|| "baseline".into());
                println!("{:<20} {:<14} {:<10} apps: {:?}", r.id, r.os, port, r.client_apps);
            }
        }
        ServiceCommand::Rm { id } => {
            repo.remove(&id)?;
            println!("service {id} removed");
        }
        ServiceCommand::Component { name, path } => {
            let at = repo.add_component(&name, &path)?;
            println!("component {name} added at {} (scripts get it under /opt/components/{name})", at.display());
        }
    }
    Ok(())
}

fn say(quiet: bool, line: &str) {
    if !quiet {
        eprintln!("{line}");
    }
}

fn report(s: &ServiceVm, json: bool, what: &str) {
    if json {
        crate::output::print_json(&s.summary());
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
    let (id, rest) = s.split_once('=').context("--client-app wants ID=PLATFORM:FILE")?;
    let (platform, file) = rest.split_once(':').context("--client-app wants ID=PLATFORM:FILE")?;
    Ok((id.to_string(), platform.to_string(), file.into()))
}
