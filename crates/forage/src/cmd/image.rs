//! `forage image ...`

use forage_datadir::DataDir;
use forage_image::GuestImage;
use serde_json::json;

use crate::cli::ImageCommand;

pub async fn run(data: &DataDir, cmd: ImageCommand) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Build {
            name,
            force,
            disk_mib,
            memory_mib,
            json,
        } => {
            let agent = forage_image::locate_guest_binary("forage-agent")?;
            let opts = forage_image::BuildOptions {
                agent_binary: agent,
                disk_mib,
                memory_mib,
                force,
            };
            if !json {
                eprintln!("building image {name} in {} ...", data.root().display());
            }
            let data2 = data.clone();
            let out = tokio::task::spawn_blocking(move || forage_image::build(&data2, &name, &opts)).await??;
            let m = out.image.manifest();
            if json {
                super::print_json(&json!({
                    "name": m.name, "dir": out.image.dir(), "cached": out.cached,
                    "seconds": out.took.as_secs_f64(), "kernel_package": m.kernel_package,
                    "busybox_package": m.busybox_package, "modules": m.modules,
                    "recipe_digest": m.recipe_digest,
                }));
            } else {
                println!(
                    "image {}: {} in {:.1} s at {}\n  kernel {}\n  busybox {}\n  modules {}",
                    m.name,
                    if out.cached { "cached" } else { "built" },
                    out.took.as_secs_f64(),
                    out.image.dir().display(),
                    m.kernel_package,
                    m.busybox_package,
                    m.modules.join(" ")
                );
            }
            Ok(())
        }
        ImageCommand::List { json } => {
            let mut rows = Vec::new();
            if let Ok(entries) = std::fs::read_dir(data.images()) {
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name.starts_with('.') {
                        continue;
                    }
                    match GuestImage::open(data, &name) {
                        Ok(img) => rows.push(json!({"name": name, "dir": img.dir(), "kernel_package": img.manifest().kernel_package, "memory_mib": img.manifest().memory_mib, "disk_mib": img.manifest().disk_mib})),
                        Err(e) => rows.push(json!({"name": name, "error": e.to_string()})),
                    }
                }
            }
            if json {
                super::print_json(&rows);
            } else if rows.is_empty() {
                println!("no images in {} (build one: forage image build tiny)", data.images().display());
            } else {
                for r in rows {
                    match r.get("error") {
                        Some(e) => println!("{}  broken: {}", r["name"].as_str().unwrap_or("?"), e),
                        None => println!(
                            "{}  {} MiB RAM, {} MiB disk, {}",
                            r["name"].as_str().unwrap_or("?"),
                            r["memory_mib"],
                            r["disk_mib"],
                            r["kernel_package"].as_str().unwrap_or("?")
                        ),
                    }
                }
            }
            Ok(())
        }
    }
}
