//! `forage base ...`

use std::time::{Duration, Instant};

use anyhow::Context;
use forage_datadir::DataDir;
use forage_image::GuestImage;
use forage_proto::PackageKind;
use forage_synth::{package, BaseVm};
use serde_json::json;

use crate::cli::BaseCommand;

fn describe(b: &BaseVm) -> serde_json::Value {
    let m = b.manifest();
    json!({
        "name": m.name, "digest": m.digest, "image": m.image, "memory_bytes": m.memory_size,
        "disk_bytes": m.disk_size, "indexed_chunks": m.indexed_chunks, "created_unix": m.created_unix,
        "dir": b.dir(), "disk_introspection": m.disk_introspection,
    })
}

pub async fn run(data: &DataDir, cmd: BaseCommand) -> anyhow::Result<()> {
    match cmd {
        BaseCommand::Create { name, disk, json, .. } if disk.disk.is_some() => {
            super::base_disk::create(data, &name, &disk, json).await?;
        }
        BaseCommand::Create { name, from_vm: Some(vm), json, .. } => {
            let paths = forage_image::vms::VmPaths::new(data, &vm)?;
            let snap = forage_vm::Snapshot::open(&paths.snapshot).with_context(|| format!("VM {vm} has no save"))?;
            let t = Instant::now();
            let base = BaseVm::from_saved(data, &name, &format!("vm:{vm}"), &snap)
                .with_context(|| format!("making VM {vm}'s save base {name}"))?;
            if json {
                crate::output::print_json(&describe(&base));
            } else {
                println!(
                    "base {name} made from VM {vm} in {:.1} s, digest {}",
                    t.elapsed().as_secs_f64(),
                    base.digest()
                );
            }
        }
        BaseCommand::Create { name, image, settle_s, json, .. } => {
            let img = GuestImage::open(data, &image)?;
            let t = Instant::now();
            if !json {
                eprintln!("creating base {name} from image {image}: boot, settle {settle_s} s, save, index ...");
            }
            let base = BaseVm::create(data, &name, &img, forage_vm::accel::choose(), Duration::from_secs(settle_s))
                .await
                .with_context(|| format!("creating base {name}"))?;
            if json {
                crate::output::print_json(&describe(&base));
            } else {
                println!("base {name} created in {:.1} s, digest {}", t.elapsed().as_secs_f64(), base.digest());
            }
        }
        BaseCommand::List { json } => {
            let rows: Vec<_> = BaseVm::list(data)
                .into_iter()
                .map(|(name, b)| match b {
                    Ok(b) => describe(&b),
                    Err(e) => json!({"name": name, "error": e.to_string()}),
                })
                .collect();
            if json {
                crate::output::print_json(&rows);
            } else if rows.is_empty() {
                println!("no base VMs (create one: forage base create NAME --image tiny)");
            } else {
                for r in rows {
                    match r.get("error") {
                        Some(e) => println!("{:<16} broken: {e}", r["name"].as_str().unwrap_or("")),
                        None => println!(
                            "{:<16} {}  image {}  {} MiB RAM  {} MiB disk",
                            r["name"].as_str().unwrap_or(""),
                            package::short(r["digest"].as_str().unwrap_or("")),
                            r["image"].as_str().unwrap_or(""),
                            r["memory_bytes"].as_u64().unwrap_or(0) >> 20,
                            r["disk_bytes"].as_u64().unwrap_or(0) >> 20
                        ),
                    }
                }
            }
        }
        BaseCommand::Info { name, json } => {
            let b = BaseVm::open(data, &name)?;
            let d = describe(&b);
            if json {
                crate::output::print_json(&d);
            } else {
                println!("{}", serde_json::to_string_pretty(&d)?);
            }
        }
        BaseCommand::Rm { name } => {
            BaseVm::remove(data, &name)?;
            println!("base {name} removed");
        }
        BaseCommand::Export { name, file } => {
            let b = BaseVm::open(data, &name)?;
            let t = Instant::now();
            let f2 = file.clone();
            let size = tokio::task::spawn_blocking(move || package::export(&b, &f2)).await??;
            forage_synth::build::sign_package(data, forage_trust::signing::BASE_PACKAGE, &file)?;
            println!(
                "base {name} exported: {} MiB in {:.1} s (signed: {}.sig)",
                size >> 20,
                t.elapsed().as_secs_f64(),
                file.display()
            );
        }
        BaseCommand::Import { file, name } => {
            forage_synth::build::check_package(data, forage_trust::signing::BASE_PACKAGE, &file)?;
            let data2 = data.clone();
            let b = tokio::task::spawn_blocking(move || package::import(&data2, &file, name.as_deref())).await??;
            println!("base {} imported, digest {} (checked)", b.manifest().name, b.digest());
        }
        BaseCommand::Fetch { name, from, json } => fetch(data, PackageKind::Base, &name, from, json).await?,
    }
    Ok(())
}

/// `forage base|service fetch NAME --from ADDR`: from a peer cloudlet, over the peer protocol.
pub(super) async fn fetch(
    data: &DataDir,
    what: PackageKind,
    name: &str,
    from: std::net::SocketAddr,
    json: bool,
) -> anyhow::Result<()> {
    if !json {
        eprintln!("fetching {} {name} from cloudlet {from}...", what.as_str());
    }
    let me = super::pair::hostname();
    let r = forage_cloudlet::package_transfer::fetch(data, &me, from, what, name).await?;
    if json {
        crate::output::print_json(&r);
    } else {
        println!(
            "{} {} fetched from cloudlet {}: {} MiB in {:.1} s (checked{})",
            what.as_str(),
            r.name,
            r.from,
            r.package_bytes >> 20,
            r.seconds,
            r.base_digest.as_deref().map(|d| format!(", digest {d}")).unwrap_or_default()
        );
    }
    Ok(())
}
