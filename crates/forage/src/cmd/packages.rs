//! `forage packages ...`: the Debian packages this host holds for overlays that name
//! their files (format 3).

use std::fs::File;
use std::io::BufReader;

use anyhow::Context;
use forage_datadir::DataDir;
use forage_format::{DebRef, OverlayReader};
use forage_synth::deb_volume::PackageStore;
use serde::Serialize;

use crate::cli::PackagesCommand;

/// `forage packages check --json`.
#[derive(Debug, Serialize)]
struct CheckReport<'a> {
    overlay_format: u32,
    packages: &'a [DebRef],
    missing: Vec<&'a DebRef>,
}

pub fn run(data: &DataDir, cmd: PackagesCommand) -> anyhow::Result<()> {
    let store = PackageStore::open(data);
    match cmd {
        PackagesCommand::Add { files, json } => {
            let mut added = Vec::new();
            for f in &files {
                let r = store.add(f).with_context(|| format!("adding {}", f.display()))?;
                if !json {
                    println!(
                        "{}={} ({}, {} KiB) sha256 {}",
                        r.package,
                        r.version,
                        r.architecture,
                        r.size >> 10,
                        r.sha256
                    );
                }
                added.push(r);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&added)?);
            }
        }
        PackagesCommand::List { json } => {
            let all = store.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                for r in &all {
                    println!("{}={} {} {} KiB", r.package, r.version, r.architecture, r.size >> 10);
                }
                println!("{} Debian packages in {}", all.len(), data.packages().display());
            }
        }
        PackagesCommand::Check { overlay, json } => {
            let file = File::open(&overlay).with_context(|| overlay.display().to_string())?;
            let r = OverlayReader::open(BufReader::new(file)).with_context(|| overlay.display().to_string())?;
            let m = r.manifest();
            let packages = m.packages.as_ref().map(|p| &p.debs[..]).unwrap_or_default();
            let missing = m.packages.as_ref().map(|p| store.missing(p)).unwrap_or_default();
            if json {
                let report = CheckReport { overlay_format: m.format, packages, missing };
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else if packages.is_empty() {
                println!("{} names no Debian packages (format {})", overlay.display(), m.format);
            } else {
                for d in &missing {
                    println!("missing {}={} ({}) sha256 {}", d.package, d.version, d.architecture, d.sha256);
                }
                println!(
                    "{} names {} Debian packages; this host lacks {} (`forage packages add FILE.deb...`)",
                    overlay.display(),
                    packages.len(),
                    missing.len()
                );
            }
        }
    }
    Ok(())
}
