//! `forage bench overlay`: the paper's Figure 6 on this machine, with its peers run for
//! real in the same run, per app:
//! - baseline: `xdelta3` of the whole disk and memory images | `xz -6` (the paper's),
//!   `zstd --patch-from --long -19`, both of the launch VM built without the semantic gap
//!   (no TRIM, no free page reporting), as the paper's baseline;
//! - the oracle (`peers::oracle`): changed chunks, deduplicated, ext4 free blocks out, one
//!   `xz -6` stream, of the launch VM with the semantic gap closed;
//! - forage with dedup only, the semantic gap only, and both, each created by its own
//!   process (`forage-bench overlay-create`) so its time, CPU and peak RSS are its own;
//!   then `forage overlay apply` of the combined overlay, measured the same way.
//!
//! `--disk-image`: instead of an app, a disk image as the base and a launch VM changed
//! by hand (`overlay_disk`).
//!
//! Apps: the debian-12 sample apps (`--image debian-12 --app ocr --app vision`), or on
//! the tiny image the bench app (hashsearch with a data set it unpacks from a tarball,
//! deletes, and preloads, as the paper's apps downloaded and deleted their packages).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};
use forage_datadir::DataDir;
use forage_synth::launch::LaunchVm;
use forage_synth::BaseVm;
use serde::{Deserialize, Serialize};

use crate::cli::{BenchOverlayArgs, OverlayCreateArgs};
use crate::common::{bench_base, forage_exe, print_json};
use crate::launch_cache::{self, Variant};
use crate::measure::{self, Usage};
use crate::peers::{self, Oracle, Sized};

/// One forage overlay as its creating process reports it (`overlay-create --json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedOverlay {
    pub bytes: u64,
    /// Of `bytes`, chunk segments apportioned by their memory and disk payload, and the
    /// rest (header, manifest, device state).
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub other_bytes: u64,
    pub manifest_bytes: u64,
    pub modified_bytes: u64,
    pub segments: u64,
    pub refs: std::collections::BTreeMap<String, u64>,
    pub free_by_source: std::collections::BTreeMap<String, u64>,
    /// What ext4 introspection did (one line).
    pub fs: String,
}

/// The variant whose overlay names the files of the app's Debian packages (format 3).
const WITH_PACKAGES: &str = "combined + Debian packages";

/// A forage variant in the table: what it made and what making it cost.
#[derive(Debug, Clone, Serialize)]
pub struct VariantRow {
    pub name: String,
    pub overlay: CreatedOverlay,
    pub create: Usage,
}

/// The bench's row for one app (`--json`), sizes in bytes.
#[derive(Debug, Clone, Serialize)]
pub struct OverlayBenchRow {
    pub image: String,
    /// How the launch VM was made.
    pub launch_vm: String,
    pub app: String,
    pub debs: Option<usize>,
    pub baseline: Sized,
    pub zstd_patch: Sized,
    pub oracle: Oracle,
    pub forage: Vec<VariantRow>,
    pub apply: Usage,
    pub modified_bytes: u64,
    pub modified_bytes_without_semantic_gap: u64,
    pub combined_vs_oracle: f64,
    pub combined_vs_baseline: f64,
    pub combined_vs_zstd_patch: f64,
    /// The combined overlay naming the files of the app's Debian packages (format 3: the
    /// cloudlet holds the .debs), against the oracle; apps with Debian packages only.
    pub with_packages_vs_oracle: Option<f64>,
    /// `forage overlay apply` of that overlay (its package volume built first, if new).
    pub apply_packages: Option<Usage>,
    pub codec: String,
    pub delta: String,
    /// `--big`: memory at scale.
    pub big: Option<crate::big::BigRow>,
}

pub async fn run(data: &DataDir, args: BenchOverlayArgs) -> anyhow::Result<()> {
    for tool in ["xdelta3", "xz", "zstd", "tar", "qemu-img", "nice"] {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!("{tool} is needed by the bench: apt-get install xdelta3 xz-utils zstd tar qemu-utils");
        }
    }
    let say = |s: &str| {
        if !args.json {
            eprintln!("{s}");
        }
    };
    if args.disk_image {
        return run_disk_image(data, &args, &say).await;
    }
    let base_name = args.base.clone().unwrap_or_else(|| crate::common::default_base(&args.image));
    let base = bench_base(data, &base_name, &args.image, &say).await?;
    let work = scratch(data)?;
    let result = async {
        let apps = crate::common::bench_apps(&args.image, &args.app, &work, args.data_mib)?;
        let mut rows = Vec::new();
        for app in &apps {
            let row = one_app(data, &base, &base_name, app, &args, &work, &say).await?;
            if args.json {
                print_json(&row);
            } else {
                print_row(&row);
            }
            rows.push(row);
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// The bench's scratch folder, new.
fn scratch(data: &DataDir) -> anyhow::Result<std::path::PathBuf> {
    let work = data.work().join(format!("bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    Ok(work)
}

/// `--disk-image`: a disk image as the base, a launch VM changed by hand
/// (`overlay_disk`), the same rows.
async fn run_disk_image(data: &DataDir, args: &BenchOverlayArgs, say: &dyn Fn(&str)) -> anyhow::Result<()> {
    let base_name = args.base.clone().unwrap_or_else(|| "bench-disk".into());
    let base = tokio::task::block_in_place(|| crate::overlay_disk::disk_base(data, &base_name, args, say))?;
    let launch = crate::overlay_disk::hand_made_launch(data, &base, &base_name, args.fresh, say).await?;
    let work = scratch(data)?;
    let what = Compared {
        image: format!("disk image ({})", base.manifest().image),
        launch_vm: "changed by hand through qemu-guest-agent, saved, as --from-vm takes it".into(),
    };
    let row = compare(data, &base, &base_name, what, &launch, &launch, args, &work, say).await;
    let _ = std::fs::remove_dir_all(&work);
    let row = row?;
    if args.json {
        print_json(&row);
    } else {
        print_row(&row);
    }
    Ok(())
}

/// What the row is of.
struct Compared {
    image: String,
    launch_vm: String,
}

async fn one_app(
    data: &DataDir,
    base: &BaseVm,
    base_name: &str,
    app_dir: &Path,
    args: &BenchOverlayArgs,
    work: &Path,
    say: &dyn Fn(&str),
) -> anyhow::Result<OverlayBenchRow> {
    let on_v = Variant { semantic: true, drop_caches: args.drop_caches };
    let off_v = Variant { semantic: false, drop_caches: args.drop_caches };
    let on = launch_cache::launch_vm(data, base, app_dir, on_v, args.fresh, say).await?;
    let off = launch_cache::launch_vm(data, base, app_dir, off_v, args.fresh, say).await?;
    let what = Compared {
        image: args.image.clone(),
        launch_vm: "built from the app folder (semantic gap closed, and not for the baseline)".into(),
    };
    compare(data, base, base_name, what, &on, &off, args, work, say).await
}

/// The rows of one launch VM: `on` built with the semantic gap closed, `off` without
/// (the baseline's and the dedup-only variant's), both the same VM when nothing closed it.
#[allow(clippy::too_many_arguments)]
async fn compare(
    data: &DataDir,
    base: &BaseVm,
    base_name: &str,
    what: Compared,
    on: &LaunchVm,
    off: &LaunchVm,
    args: &BenchOverlayArgs,
    work: &Path,
    say: &dyn Fn(&str),
) -> anyhow::Result<OverlayBenchRow> {
    let app = on.app.name.clone();

    say(&format!("{app}: baseline (xdelta3 | xz -6), zstd --patch-from and the oracle, side by side ..."));
    let scratch = work.join(format!("{app}-zstd"));
    let (baseline, zstd_patch, oracle) = std::thread::scope(|s| {
        let b = s.spawn(|| peers::baseline(base, off));
        let z = s.spawn(|| peers::zstd_patch(base, off, &scratch));
        let o = s.spawn(|| peers::oracle(base, on));
        let panicked = |_| anyhow::anyhow!("a peer's thread panicked");
        let b = b.join().map_err(panicked)?;
        let z = z.join().map_err(panicked)?;
        let o = o.join().map_err(panicked)?;
        Ok::<_, anyhow::Error>((b?, z?, o?))
    })?;
    say(&format!(
        "  baseline {} bytes ({:.0} s), zstd {} bytes ({:.0} s), oracle {} bytes ({:.0} s)",
        baseline.total(),
        baseline.seconds,
        zstd_patch.total(),
        zstd_patch.seconds,
        oracle.bytes,
        oracle.seconds
    ));

    let mut variants = vec![
        ("dedup only", off, true, false, false),
        ("semantic gap only", on, false, true, false),
        ("combined", on, true, true, false),
    ];
    if on.debs.as_ref().is_some_and(|d| !d.files.is_empty()) {
        variants.push((WITH_PACKAGES, on, true, true, true));
    }
    let mut forage = Vec::new();
    for (name, launch, dedup, semantic, packages) in variants {
        say(&format!("{app}: forage, {name} ..."));
        let out = work.join(format!("{app}-{}.ovl", name.replace(' ', "-")));
        let create = OverlayCreateArgs {
            launch: launch_cache::dir_of(launch),
            base: base_name.to_string(),
            output: out.clone(),
            no_dedup: !dedup,
            no_semantic: !semantic,
            service: false,
            codec: args.codec.clone(),
            level: args.level,
            delta: args.delta.clone(),
            packages,
        };
        let m = measure::run(
            Command::new(std::env::current_exe()?).arg("--data-dir").arg(data.root()).args(create.to_args()),
        )?;
        let overlay: CreatedOverlay = serde_json::from_slice(&m.stdout).context("overlay-create's report")?;
        say(&format!(
            "  {} bytes in {:.0} s ({:.1} cores), peak RSS {:.0} MB; {}",
            overlay.bytes,
            m.usage.wall_s,
            m.usage.cores(),
            m.usage.peak_rss_mb,
            overlay.fs
        ));
        forage.push(VariantRow { name: name.to_string(), overlay, create: m.usage });
    }
    let mut applies = Vec::new();
    for name in ["combined", WITH_PACKAGES].into_iter().filter(|n| forage.iter().any(|v| v.name == *n)) {
        say(&format!("{app}: forage overlay apply of the {name} overlay ..."));
        let applied = work.join(format!("{app}-applied"));
        let ovl = work.join(format!("{app}-{}.ovl", name.replace(' ', "-")));
        let m = measure::run(
            Command::new(forage_exe()?)
                .arg("--data-dir")
                .arg(data.root())
                .args(["overlay", "apply", "--json", "--base", base_name, "--out"])
                .arg(&applied)
                .arg(&ovl),
        )?;
        applies.push(m.usage);
        let _ = std::fs::remove_dir_all(&applied);
    }
    for v in &forage {
        let _ = std::fs::remove_file(work.join(format!("{app}-{}.ovl", v.name.replace(' ', "-"))));
    }
    let apply = applies[0];
    let apply_packages = applies.get(1).copied();

    let big = if args.big { Some(crate::big::measure(data, base_name, off, work, say)?) } else { None };
    let combined = forage.iter().find(|v| v.name == "combined").expect("measured").overlay.clone();
    let with_packages = forage.iter().find(|v| v.name == WITH_PACKAGES).map(|v| v.overlay.bytes);
    let without = forage.iter().find(|v| v.name == "dedup only").expect("measured").overlay.modified_bytes;
    Ok(OverlayBenchRow {
        image: what.image,
        launch_vm: what.launch_vm,
        app,
        debs: on.debs.as_ref().map(|d| d.installed.len()),
        combined_vs_oracle: combined.bytes as f64 / oracle.bytes.max(1) as f64,
        combined_vs_baseline: combined.bytes as f64 / baseline.total().max(1) as f64,
        combined_vs_zstd_patch: combined.bytes as f64 / zstd_patch.total().max(1) as f64,
        with_packages_vs_oracle: with_packages.map(|b| b as f64 / oracle.bytes.max(1) as f64),
        apply_packages,
        baseline,
        zstd_patch,
        oracle,
        forage,
        apply,
        modified_bytes: combined.modified_bytes,
        modified_bytes_without_semantic_gap: without,
        codec: args.codec.clone(),
        delta: args.delta.clone(),
        big,
    })
}

/// `forage-bench overlay-create`: one overlay of a kept launch VM, in its own process;
/// prints a [`CreatedOverlay`].
pub fn create_one(data: &DataDir, a: OverlayCreateArgs) -> anyhow::Result<()> {
    let base = BaseVm::open(data, &a.base)?;
    let launch = launch_cache::reopen(&a.launch)?;
    let mut opts =
        forage_synth::create::CreateOptions::named(&a.codec, a.level, &a.delta).map_err(anyhow::Error::msg)?;
    opts.dedup = !a.no_dedup;
    opts.semantic_disk = !a.no_semantic;
    opts.semantic_memory = !a.no_semantic;
    if a.packages {
        let index = forage_synth::deb_volume::index_installed(data, &launch.app.name, launch.debs.as_ref())?;
        opts.packages = Some(std::sync::Arc::new(index));
    }
    let mut input = launch_cache::input(&launch);
    if a.service {
        let app = &launch.app;
        input.service =
            Some(forage_format::manifest::Service { name: app.name.clone(), port: app.port, probe: app.probe.clone() });
    }
    let r = forage_synth::create::create(&base, &input, &opts, &a.output)?;
    let m = &r.manifest;
    let split = forage_synth::create::bytes_by_space(m);
    let manifest_bytes = r.bytes - m.segments_bytes();
    let report = CreatedOverlay {
        bytes: r.bytes,
        memory_bytes: split.memory,
        disk_bytes: split.disk,
        other_bytes: r.bytes - split.memory - split.disk,
        manifest_bytes,
        modified_bytes: m.stats.modified_bytes,
        segments: m.segments.len() as u64,
        refs: m.ref_counts().into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        free_by_source: m.stats.free_by_source.clone(),
        fs: r.fs.to_string(),
    };
    print_json(&report);
    Ok(())
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn print_row(r: &OverlayBenchRow) {
    let base = r.baseline.total().max(1) as f64;
    println!(
        "overlay size (Figure 6), image {} + app {}{}: modified state {:.0} MiB ({:.0} MiB without the semantic gap); segments {}, delta {}",
        r.image,
        r.app,
        r.debs.map(|n| format!(" ({n} Debian packages)")).unwrap_or_default(),
        mib(r.modified_bytes),
        mib(r.modified_bytes_without_semantic_gap),
        r.codec,
        r.delta
    );
    println!("  launch VM: {}", r.launch_vm);
    println!(
        "  {:<36} {:>11} {:>9} {:>9} {:>9} {:>7} {:>8} {:>6} {:>8}",
        "approach", "bytes", "memory", "disk", "other", "%base", "create s", "cores", "RSS MB"
    );
    let line = |name: &str, total: u64, mem: Option<u64>, disk: Option<u64>, other: Option<u64>, u: Option<Usage>| {
        let f = |v: Option<u64>| v.map(|v| format!("{:.1}M", mib(v))).unwrap_or_else(|| "-".into());
        let (t, c, rss) = match u {
            Some(u) => (format!("{:.0}", u.wall_s), format!("{:.1}", u.cores()), format!("{:.0}", u.peak_rss_mb)),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "  {name:<36} {total:>11} {:>9} {:>9} {:>9} {:>6.1}% {t:>8} {c:>6} {rss:>8}",
            f(mem),
            f(disk),
            f(other),
            100.0 * total as f64 / base
        );
    };
    line("baseline: xdelta3 | xz -6", r.baseline.total(), Some(r.baseline.memory), Some(r.baseline.disk), None, None);
    line(
        "zstd --patch-from --long -19",
        r.zstd_patch.total(),
        Some(r.zstd_patch.memory),
        Some(r.zstd_patch.disk),
        None,
        None,
    );
    line("oracle: dedup, ext4 free out, one xz -6", r.oracle.bytes, None, None, None, None);
    for v in &r.forage {
        let o = &v.overlay;
        line(
            &format!("forage, {}", v.name),
            o.bytes,
            Some(o.memory_bytes),
            Some(o.disk_bytes),
            Some(o.other_bytes),
            Some(v.create),
        );
    }
    let mark = |ok: bool| if ok { "met" } else { "missed" };
    if let (Some(ratio), Some(u)) = (r.with_packages_vs_oracle, r.apply_packages) {
        println!(
            "  {WITH_PACKAGES} / oracle {ratio:.3} (<= 0.9: {}, beyond the oracle's terms: it knows only the base, this overlay also names blocks of the {} .debs the cloudlet holds); its apply {:.1} s, peak RSS {:.0} MB",
            if ratio <= 0.9 { "yes" } else { "no" },
            r.debs.unwrap_or(0),
            u.wall_s,
            u.peak_rss_mb
        );
    }
    println!(
        "  combined / oracle {:.3} (target <= 0.9: {}); / baseline {:.3} (<= 0.40: {}); / zstd --patch-from {:.3} (<= 0.60: {})",
        r.combined_vs_oracle,
        mark(r.combined_vs_oracle <= 0.9),
        r.combined_vs_baseline,
        mark(r.combined_vs_baseline <= 0.4),
        r.combined_vs_zstd_patch,
        mark(r.combined_vs_zstd_patch <= 0.6)
    );
    println!(
        "  oracle: {} memory + {} disk unique chunks, {} modified chunks dropped as ext4 free; {:.0} s",
        r.oracle.memory_chunks, r.oracle.disk_chunks, r.oracle.ext4_free_chunks, r.oracle.seconds
    );
    println!(
        "  apply (forage overlay apply, combined): {:.1} s, peak RSS {:.0} MB; peers took baseline {:.0} s, zstd {:.0} s",
        r.apply.wall_s, r.apply.peak_rss_mb, r.baseline.seconds, r.zstd_patch.seconds
    );
    if let Some(c) = r.forage.iter().find(|v| v.name == "combined") {
        println!("  combined: references {:?}; free chunks by source {:?}", c.overlay.refs, c.overlay.free_by_source);
        println!("  combined: {}", c.overlay.fs);
    }
    if let Some(b) = &r.big {
        crate::big::print(b);
    }
}
