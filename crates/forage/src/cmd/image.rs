//! `forage image ...`

use forage_datadir::DataDir;
use forage_image::GuestImage;
use serde_json::json;

use crate::cli::ImageCommand;

pub async fn run(data: &DataDir, cmd: ImageCommand) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Build { name, force, disk_mib, memory_mib, json } => {
            let agent = forage_image::locate_guest_binary("forage-agent")?;
            let opts = forage_image::BuildOptions { agent_binary: agent, disk_mib, memory_mib, force };
            if !json {
                eprintln!("building image {name} in {} ...", data.root().display());
            }
            let data2 = data.clone();
            let out = tokio::task::spawn_blocking(move || forage_image::build(&data2, &name, &opts)).await??;
            let m = out.image.manifest();
            let allocated = forage_vm::sparse::allocated_bytes(&out.image.disk()).unwrap_or(0);
            if json {
                crate::output::print_json(&json!({
                    "name": m.name, "dir": out.image.dir(), "cached": out.cached,
                    "seconds": out.took.as_secs_f64(), "os": m.os, "root": m.root,
                    "kernel_package": m.kernel_package, "busybox_package": m.busybox_package,
                    "modules": m.modules, "packages": m.packages.len(), "guest_agent": m.guest_agent,
                    "disk_mib": m.disk_mib, "disk_allocated_bytes": allocated, "memory_mib": m.memory_mib,
                    "recipe_digest": m.recipe_digest,
                }));
            } else {
                println!(
                    "image {}: {} in {:.1} s at {}\n  os {}, root on {}{}\n  kernel {}\n  disk {} MiB ({} MiB allocated), memory {} MiB",
                    m.name,
                    if out.cached { "cached" } else { "built" },
                    out.took.as_secs_f64(),
                    out.image.dir().display(),
                    m.os,
                    match m.root {
                        forage_image::RootFs::Disk => "the disk",
                        forage_image::RootFs::Initramfs => "the initramfs",
                    },
                    if m.guest_agent { ", qemu-guest-agent on virtio-serial" } else { "" },
                    m.kernel_package,
                    m.disk_mib,
                    allocated >> 20,
                    m.memory_mib,
                );
                if let Some(busybox) = &m.busybox_package {
                    println!("  busybox {busybox}\n  modules {}", m.modules.join(" "));
                }
                if !m.packages.is_empty() {
                    println!("  {} Debian packages", m.packages.len());
                }
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
                        Ok(img) => rows.push(json!({"name": name, "dir": img.dir(), "os": img.manifest().os, "kernel_package": img.manifest().kernel_package, "memory_mib": img.manifest().memory_mib, "disk_mib": img.manifest().disk_mib})),
                        Err(e) => rows.push(json!({"name": name, "error": e.to_string()})),
                    }
                }
            }
            if json {
                crate::output::print_json(&rows);
            } else if rows.is_empty() {
                println!("no images in {} (build one: forage image build tiny, or debian-12)", data.images().display());
            } else {
                for r in rows {
                    match r.get("error") {
                        Some(e) => println!("{}  broken: {}", r["name"].as_str().unwrap_or("?"), e),
                        None => println!(
                            "{}  {}, {} MiB RAM, {} MiB disk, {}",
                            r["name"].as_str().unwrap_or("?"),
                            r["os"].as_str().unwrap_or("?"),
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
