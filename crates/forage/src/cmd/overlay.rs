//! `forage overlay ...`

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use forage_datadir::DataDir;
use forage_format::{Manifest, OverlayReader};
use forage_synth::build::{BlobOrder, OverlayRequest};
use forage_synth::create::CreateOptions;
use forage_synth::BaseVm;
use serde_json::json;

use crate::cli::{OverlayCommand, OverlayCreateArgs, ReduceArgs};

impl ReduceArgs {
    pub fn create_options(&self) -> anyhow::Result<CreateOptions> {
        let named = CreateOptions::named(&self.codec, self.level, &self.delta).map_err(anyhow::Error::msg)?;
        Ok(CreateOptions {
            dedup: !self.no_dedup,
            semantic_disk: !self.no_semantic_disk,
            semantic_memory: !self.no_semantic_memory,
            segment_bytes: self.segment_kib.clamp(4, 16 << 10) << 10,
            ..named
        })
    }
}

pub async fn run(data: &DataDir, cmd: OverlayCommand) -> anyhow::Result<()> {
    match cmd {
        OverlayCommand::Create(args) => create(data, args).await,
        OverlayCommand::Inspect { file, json } => inspect(&file, json),
        OverlayCommand::Verify { file, json } => verify(&file, json),
        OverlayCommand::Sign { file } => {
            let signer = sign_overlay(data, &file)?;
            println!("{} signed by {signer} (written to {}.sig)", file.display(), file.display());
            Ok(())
        }
        OverlayCommand::Merge { parent, residue, output, base, reduce, json } => {
            merge(data, &parent, &residue, &output, base.as_deref(), &reduce, json).await
        }
        OverlayCommand::Apply { file, base, out, json } => {
            let b = BaseVm::open(data, &base)?;
            let accel = forage_vm::accel::detect().accel;
            let f2 = file.clone();
            let (snap, report) =
                tokio::task::spawn_blocking(move || forage_synth::apply::apply(&f2, &b, &out, accel)).await??;
            let rest = report.took.saturating_sub(report.base_copy + report.package_volume);
            let mbps = report.rebuilt_bytes as f64 / 1e6 / rest.as_secs_f64().max(1e-6);
            if json {
                crate::output::print_json(
                    &json!({"out": snap.dir(), "seconds": report.took.as_secs_f64(), "rebuilt_bytes": report.rebuilt_bytes, "apply_mb_s": mbps, "segments": report.segments, "free_chunks": report.free_chunks, "package_volume_seconds": report.package_volume.as_secs_f64()}),
                );
            } else {
                let volume = match report.package_volume.as_secs_f64() {
                    s if s >= 0.01 => format!("{s:.2} s finding or building the package volume, "),
                    _ => String::new(),
                };
                println!(
                    "applied {} to base {base} in {:.2} s ({volume}{:.2} s copying the base, then {:.0} MB/s of modified state over {} segments) -> {}\nresume it: forage vm restore NAME --from {}",
                    file.display(), report.took.as_secs_f64(), report.base_copy.as_secs_f64(), mbps, report.segments, snap.dir().display(), snap.dir().display()
                );
            }
            Ok(())
        }
    }
}

impl OverlayCreateArgs {
    /// What `forage_synth::build` makes of these arguments.
    pub fn request(&self) -> anyhow::Result<OverlayRequest> {
        let order = match self.order.as_str() {
            "access" => BlobOrder::Access,
            "offset" => BlobOrder::Offset,
            other => bail!("unknown order {other} (access or offset)"),
        };
        Ok(OverlayRequest {
            base: self.base.clone(),
            app: self.app.clone().context("--app or --from-vm is required")?,
            options: self.reduce.create_options()?,
            order,
            output: self.output.clone(),
            packages: self.packages,
        })
    }
}

/// Sign `ovl` with this host's signing key (created the first time): `OVL.sig` beside it.
/// Returns the signer's public key.
pub fn sign_overlay(data: &DataDir, ovl: &Path) -> anyhow::Result<String> {
    Ok(forage_synth::build::sign_overlay(data, ovl)?)
}

async fn create(data: &DataDir, args: OverlayCreateArgs) -> anyhow::Result<()> {
    if args.interactive {
        return super::overlay_interactive::create(data, &args).await;
    }
    if let Some(vm) = &args.from_vm {
        return super::overlay_from_vm::create(data, vm, &args).await;
    }
    forage_vm::accel::choose(); // one warning line if this is TCG
    let quiet = args.json;
    let built = forage_synth::build::build_overlay(data, &args.request()?, &|s| {
        if !quiet {
            eprintln!("{s}");
        }
    })
    .await
    .with_context(|| {
        format!(
            "building the overlay of {} on base {}",
            args.app.as_deref().unwrap_or(Path::new("")).display(),
            args.base
        )
    })?;
    let (report, launch_s) = (built.report, built.launch.as_secs_f64());
    let s = &report.manifest.stats;
    let mbps = s.modified_bytes as f64 / 1e6 / report.took.as_secs_f64().max(1e-6);
    if args.json {
        crate::output::print_json(
            &json!({"file": args.output, "bytes": report.bytes, "modified_bytes": s.modified_bytes, "launch_s": launch_s, "create_s": report.took.as_secs_f64(), "create_mb_s": mbps, "refs": report.manifest.ref_counts()}),
        );
    } else {
        println!(
            "overlay {}: {} KiB for {} MiB of modified state ({:.1}%), created in {:.1} s ({mbps:.1} MB/s) after {launch_s:.1} s building the launch VM",
            args.output.display(),
            report.bytes >> 10,
            s.modified_bytes >> 20,
            100.0 * report.bytes as f64 / s.modified_bytes.max(1) as f64,
            report.took.as_secs_f64()
        );
    }
    Ok(())
}

/// The base named, or else the local base the parent overlay was made for.
fn base_for(data: &DataDir, parent: &Path, name: Option<&str>) -> anyhow::Result<BaseVm> {
    if let Some(name) = name {
        return Ok(BaseVm::open(data, name)?);
    }
    let m = open(parent)?.manifest().clone();
    BaseVm::list(data)
        .into_iter()
        .filter_map(|(_, b)| b.ok())
        .find(|b| b.digest() == m.base.digest)
        .with_context(|| {
            format!(
                "no local base VM has digest {} (base {} where {} was made): import it with `forage base import`, or name one with --base",
                forage_synth::package::short(&m.base.digest),
                m.base.name,
                parent.display()
            )
        })
}

async fn merge(
    data: &DataDir,
    parent: &Path,
    residue: &Path,
    output: &Path,
    base: Option<&str>,
    reduce: &ReduceArgs,
    json: bool,
) -> anyhow::Result<()> {
    let b = base_for(data, parent, base)?;
    let opts = reduce.create_options()?;
    let accel = forage_vm::accel::detect().accel;
    let (p, r, o) = (parent.to_path_buf(), residue.to_path_buf(), output.to_path_buf());
    let base_name = b.manifest().name.clone();
    let report =
        tokio::task::spawn_blocking(move || forage_synth::residue::merge(&b, &p, &r, &opts, &o, accel)).await??;
    let m = &report.manifest;
    if json {
        crate::output::print_json(
            &json!({"file": output, "parent": parent, "residue": residue, "base": base_name, "bytes": report.bytes, "seconds": report.took.as_secs_f64(), "modified_bytes": m.stats.modified_bytes, "refs": m.ref_counts()}),
        );
    } else {
        println!(
            "merged residue {} into {} -> {}: {} KiB for {} MiB of modified state, in {:.1} s on base {base_name}",
            residue.display(),
            parent.display(),
            output.display(),
            report.bytes >> 10,
            m.stats.modified_bytes >> 20,
            report.took.as_secs_f64()
        );
    }
    Ok(())
}

fn open(file: &Path) -> anyhow::Result<OverlayReader<std::io::BufReader<std::fs::File>>> {
    let f = std::fs::File::open(file).with_context(|| format!("cannot open overlay {}", file.display()))?;
    OverlayReader::open(std::io::BufReader::new(f)).with_context(|| format!("overlay {}", file.display()))
}

pub fn describe(m: &Manifest, file_bytes: u64) -> serde_json::Value {
    let s = &m.stats;
    json!({
        "format": m.format, "base_digest": m.base.digest, "base_name": m.base.name, "parent": m.parent,
        "disk_bytes": m.disk_size, "memory_bytes": m.memory_size, "bytes": file_bytes,
        "modified_disk_chunks": s.modified_disk_chunks, "modified_memory_chunks": s.modified_memory_chunks,
        "refs": m.ref_counts(), "free_by_source": s.free_by_source,
        "blobs": m.blobs.len(), "blobs_raw": s.blobs_raw, "blobs_delta": s.blobs_delta,
        "stages": {"modified_bytes": s.modified_bytes, "dedup_bytes": s.dedup_bytes, "delta_bytes": s.delta_bytes, "compressed_bytes": s.compressed_bytes},
        "segments": m.segments.len(), "codec": m.segments.first().map(|s| s.codec.name()),
        "order": m.order, "service": m.service, "created_unix": m.created_unix, "creator": m.creator,
        "packages": m.packages,
    })
}

fn inspect(file: &Path, json: bool) -> anyhow::Result<()> {
    let r = open(file)?;
    let size = std::fs::metadata(file)?.len();
    let d = describe(r.manifest(), size);
    if json {
        crate::output::print_json(&d);
        return Ok(());
    }
    let m = r.manifest();
    let s = &m.stats;
    let what = if m.is_residue() { "residue" } else { "overlay" };
    println!("{what} {} (format {}), {} KiB", file.display(), m.format, size >> 10);
    println!("  base      {} ({})", m.base.digest, m.base.name);
    if let Some(parent) = &m.parent {
        println!(
            "  parent    {parent} (changes since that overlay's launch VM: `forage overlay merge PARENT {}`)",
            file.display()
        );
    }
    println!(
        "  {}  {} memory + {} disk chunks = {} MiB",
        if m.is_residue() { "changed " } else { "modified" },
        s.modified_memory_chunks,
        s.modified_disk_chunks,
        s.modified_bytes >> 20
    );
    println!("  refs      {}", m.ref_counts().iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "));
    if let Some(p) = &m.packages {
        println!(
            "  packages  {} Debian packages, {} blocks of files (`forage packages check {}`)",
            p.debs.len(),
            p.blocks,
            file.display()
        );
    }
    if !s.free_by_source.is_empty() {
        println!(
            "  free      {}",
            s.free_by_source.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
        );
    }
    println!("  blobs     {} ({} raw, {} delta)", m.blobs.len(), s.blobs_raw, s.blobs_delta);
    println!(
        "  bytes     modified {} -> dedup {} -> delta {} -> compressed {}",
        s.modified_bytes, s.dedup_bytes, s.delta_bytes, s.compressed_bytes
    );
    println!("  segments  {} ({})", m.segments.len(), m.segments.first().map(|s| s.codec.name()).unwrap_or_default());
    println!("  order     {}", serde_json::to_string(&m.order)?);
    if let Some(svc) = &m.service {
        println!("  service   {} on guest port {}", svc.name, svc.port);
    }
    Ok(())
}

fn verify(file: &Path, json: bool) -> anyhow::Result<()> {
    let t = Instant::now();
    let mut r = open(file)?;
    let mut n = 0;
    while r.next_segment().with_context(|| format!("overlay {}", file.display()))?.is_some() {
        n += 1;
    }
    r.finish().with_context(|| format!("overlay {}", file.display()))?;
    if json {
        crate::output::print_json(
            &json!({"file": file, "ok": true, "segments": n, "seconds": t.elapsed().as_secs_f64()}),
        );
    } else {
        println!("overlay {} is intact: manifest and {n} segments check out", file.display());
    }
    Ok(())
}
