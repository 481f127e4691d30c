//! `forage overlay create --base B --from-vm NAME`: the overlay of a launch VM prepared
//! by hand or imported (`forage_synth::saved`).

use anyhow::{bail, Context};
use forage_datadir::DataDir;
use forage_format::manifest::Service;
use forage_image::vms::VmPaths;
use forage_synth::BaseVm;
use forage_vm::Snapshot;
use serde_json::json;

use crate::cli::OverlayCreateArgs;

pub async fn create(data: &DataDir, vm: &str, args: &OverlayCreateArgs) -> anyhow::Result<()> {
    if args.order == "access" && !args.json {
        eprintln!("--from-vm: chunks in offset order (access order needs the app's manifest to profile)");
    }
    let base = BaseVm::open(data, &args.base)?;
    let paths = VmPaths::new(data, vm)?;
    let record = paths.load()?;
    if super::vm::qemu_alive(record.pid) {
        bail!("VM {vm} is running: save it first (forage vm save {vm})");
    }
    let snapshot = Snapshot::open(&paths.snapshot).with_context(|| format!("VM {vm} has no save"))?;
    let port = args.port.or(record.app.as_ref().map(|a| a.guest_port));
    let service = port.map(|port| Service {
        name: record.app.as_ref().map(|a| a.name.clone()).unwrap_or_else(|| "service".into()),
        port,
        probe: args.probe.clone(),
    });
    let opts = args.reduce.create_options()?;
    let work = data.work().join(format!("overlay-from-{vm}-{}", std::process::id()));
    let out = args.output.clone();
    let (report, tracking) = tokio::task::spawn_blocking(move || {
        forage_synth::saved::overlay_of_saved_vm(&base, &snapshot, service, &opts, &out, &work)
    })
    .await?
    .with_context(|| format!("making the overlay of VM {vm} on base {}", args.base))?;
    let signer = forage_synth::build::sign_overlay(data, &args.output)?;
    let s = &report.manifest.stats;
    if args.json {
        crate::output::print_json(&json!({
            "file": args.output, "bytes": report.bytes, "modified_bytes": s.modified_bytes,
            "modified_disk_chunks": s.modified_disk_chunks, "modified_memory_chunks": s.modified_memory_chunks,
            "disk_tracking": tracking.to_string(), "fs": report.fs.to_string(),
            "create_s": report.took.as_secs_f64(), "signer": signer, "refs": report.manifest.ref_counts(),
        }));
    } else {
        println!("{tracking}\n{}", report.fs);
        println!(
            "overlay {}: {} KiB for {} MiB of modified state, created in {:.1} s",
            args.output.display(),
            report.bytes >> 10,
            s.modified_bytes >> 20,
            report.took.as_secs_f64()
        );
    }
    Ok(())
}
