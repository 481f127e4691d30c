//! `forage bench overlay`: the paper's Figure 6 on this machine, with its baseline run for
//! real. One base VM; a bench app that ships its data set as a tarball, unpacks it, deletes
//! the tarball and preloads the data (as the paper's apps downloaded and deleted their
//! install packages); two launch VMs from it: one with the semantic gap closed (fstrim,
//! free page reporting), one without. Then:
//! - baseline: `xdelta3` of the whole disk and memory images (launch without semantic gap),
//!   then LZMA (`xz -6`), as the paper;
//! - `zstd --patch-from --long -19` of the same;
//! - forage with dedup only, semantic gap only, both combined.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use forage_agent::app::AppPackage;
use forage_datadir::DataDir;
use forage_synth::create::{CreateOptions, LaunchInput};
use forage_synth::launch::{LaunchOptions, LaunchVm};
use forage_synth::BaseVm;
use serde::Serialize;
use serde_json::json;

use crate::cli::BenchOverlayArgs;
use crate::common::{bench_base, print_json};

/// The bench's row (`--json`), every size in bytes.
#[derive(Debug, Clone, Serialize)]
pub struct OverlayBenchRow {
    pub baseline_bytes: u64,
    pub zstd_patch_bytes: u64,
    pub baseline_on_semantic_vm_bytes: u64,
    pub data_set_lzma_bytes: u64,
    pub dedup_bytes: u64,
    pub semantic_bytes: u64,
    pub combined_bytes: u64,
    pub modified_bytes: u64,
    pub modified_bytes_without_semantic_gap: u64,
    pub create_mb_s: f64,
    pub apply_mb_s: f64,
    pub peak_rss_mb: f64,
    pub combined_vs_baseline: f64,
    pub combined_vs_zstd_patch: f64,
    pub codec: String,
    pub delta: String,
    pub app_data_mib: u64,
    pub refs: std::collections::BTreeMap<&'static str, u64>,
    pub free_by_source: std::collections::BTreeMap<String, u64>,
}

pub async fn run(data: &DataDir, args: BenchOverlayArgs) -> anyhow::Result<()> {
    for tool in ["xdelta3", "xz", "zstd", "tar", "qemu-img"] {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!("{tool} is needed by the bench: apt-get install xdelta3 xz-utils zstd tar qemu-utils");
        }
    }
    let say = |s: &str| {
        if !args.json {
            eprintln!("{s}");
        }
    };
    let base = bench_base(data, &args.base, &say).await?;
    let work = data.work().join(format!("bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let result = async {
        let app_dir = bench_app(&work, args.data_mib)?;
        let app = AppPackage::open(&app_dir)?;
        say("launch VM with the semantic gap closed ...");
        let on =
            forage_synth::build::build_launch(data, &base, &app, &LaunchOptions::default(), &work.join("on")).await?;
        say("launch VM without (no TRIM, no free page reporting) ...");
        let off_opts = LaunchOptions { semantic_disk: false, semantic_memory: false, ..LaunchOptions::default() };
        let off = forage_synth::build::build_launch(data, &base, &app, &off_opts, &work.join("off")).await?;

        say("baseline: xdelta3 + LZMA of whole images ...");
        let baseline = delta_tool_bytes(&base, &off, &work, Tool::Xdelta3Lzma)?;
        let baseline_on = delta_tool_bytes(&base, &on, &work, Tool::Xdelta3Lzma)?;
        say("zstd --patch-from --long ...");
        let zstd_patch = delta_tool_bytes(&base, &off, &work, Tool::ZstdPatch)?;

        let opts = CreateOptions::named(&args.codec, args.level, &args.delta).map_err(anyhow::Error::msg)?;
        let variant = |dedup: bool, semantic: bool| CreateOptions {
            dedup,
            semantic_disk: semantic,
            semantic_memory: semantic,
            ..opts.clone()
        };
        say("forage: dedup only, semantic only, combined ...");
        let dedup = forage_synth::create::create(&base, &input(&off), &variant(true, false), &work.join("dedup.ovl"))?;
        let semantic =
            forage_synth::create::create(&base, &input(&on), &variant(false, true), &work.join("semantic.ovl"))?;
        let t = Instant::now();
        let combined =
            forage_synth::create::create(&base, &input(&on), &variant(true, true), &work.join("combined.ovl"))?;
        let create_s = t.elapsed().as_secs_f64();
        let modified = combined.manifest.stats.modified_bytes;
        let modified_off = off_modified(&base, &off)?;

        let accel = forage_vm::accel::detect().accel;
        let (_, applied) = forage_synth::apply::apply(&work.join("combined.ovl"), &base, &work.join("applied"), accel)?;
        let apply_s = (applied.took - applied.base_copy).as_secs_f64();
        let peak_rss_mb = peak_rss_kib() as f64 / 1024.0;
        // The floor: the app's own data set, compressed alone as the segments are.
        let floor = forage_format::SegmentCodec::Lzma { level: 6 }.compress(&dataset(args.data_mib << 20)).len() as u64;
        let row = OverlayBenchRow {
            baseline_bytes: baseline,
            zstd_patch_bytes: zstd_patch,
            baseline_on_semantic_vm_bytes: baseline_on,
            data_set_lzma_bytes: floor,
            dedup_bytes: dedup.bytes,
            semantic_bytes: semantic.bytes,
            combined_bytes: combined.bytes,
            modified_bytes: modified,
            modified_bytes_without_semantic_gap: modified_off,
            create_mb_s: modified as f64 / 1e6 / create_s.max(1e-6),
            apply_mb_s: modified as f64 / 1e6 / apply_s.max(1e-6),
            peak_rss_mb,
            combined_vs_baseline: combined.bytes as f64 / baseline as f64,
            combined_vs_zstd_patch: combined.bytes as f64 / zstd_patch as f64,
            codec: opts.codec.name().to_string(),
            delta: format!("{:?}", opts.delta),
            app_data_mib: args.data_mib,
            refs: combined.manifest.ref_counts(),
            free_by_source: combined.manifest.stats.free_by_source.clone(),
        };
        if args.json {
            print_json(&row);
        } else {
            print_table(&row);
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn input(l: &LaunchVm) -> LaunchInput<'_> {
    LaunchInput {
        snapshot: &l.snapshot,
        written_disk_chunks: &l.written_disk_chunks,
        discarded_disk_chunks: &l.discarded_disk_chunks,
        service: None,
        accessed: None,
    }
}

/// Modified bytes of a launch VM as forage counts them, without dropping anything.
fn off_modified(base: &BaseVm, l: &LaunchVm) -> anyhow::Result<u64> {
    let o = CreateOptions {
        dedup: false,
        semantic_disk: false,
        semantic_memory: false,
        codec: forage_format::SegmentCodec::None,
        delta: None,
        ..CreateOptions::default()
    };
    let p = std::env::temp_dir().join(format!("forage-bench-count-{}.ovl", std::process::id()));
    let r = forage_synth::create::create(base, &input(l), &o, &p)?;
    let _ = std::fs::remove_file(&p);
    Ok(r.manifest.stats.modified_bytes)
}

#[derive(Clone, Copy)]
enum Tool {
    Xdelta3Lzma,
    ZstdPatch,
}

/// Bytes of whole-image deltas of disk and memory made by an external tool.
fn delta_tool_bytes(base: &BaseVm, l: &LaunchVm, work: &Path, tool: Tool) -> anyhow::Result<u64> {
    let pairs = [
        (base.disk_path(), l.snapshot.disk_paths()[0].clone(), "disk"),
        (base.memory_path(), l.snapshot.memory_path(), "memory"),
    ];
    let mut total = 0;
    for (src, target, name) in pairs {
        let out = work.join(format!("{name}.delta"));
        let status = match tool {
            Tool::Xdelta3Lzma => {
                let vc = work.join(format!("{name}.vcdiff"));
                run_tool(
                    Command::new("xdelta3")
                        .args(["-e", "-9", "-f", "-S", "none", "-B", "536870912", "-s"])
                        .arg(&src)
                        .arg(&target)
                        .arg(&vc),
                )?;
                let st = run_tool(Command::new("xz").args(["-6", "-k", "-f", "-T1"]).arg(&vc));
                std::fs::rename(vc.with_extension("vcdiff.xz"), &out).ok();
                let _ = std::fs::remove_file(&vc);
                st
            }
            Tool::ZstdPatch => run_tool(
                Command::new("zstd")
                    .args(["-19", "--long=30", "-q", "-f", "-T1"])
                    .arg(format!("--patch-from={}", src.display()))
                    .arg(&target)
                    .arg("-o")
                    .arg(&out),
            ),
        };
        status?;
        total += std::fs::metadata(&out).with_context(|| out.display().to_string())?.len();
        let _ = std::fs::remove_file(&out);
    }
    Ok(total)
}

fn run_tool(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!("{:?} failed: {}", cmd.get_program(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The bench app: hashsearch shipped with a data set in a tarball that the install step
/// unpacks and deletes, and that the service preloads into memory.
pub fn bench_app(work: &Path, data_mib: u64) -> anyhow::Result<PathBuf> {
    let sample = forage_image::locate_guest_binary("apps/hashsearch")?;
    let dir = work.join("app");
    let stage = work.join("payload");
    std::fs::create_dir_all(&dir)?;
    std::fs::create_dir_all(&stage)?;
    std::fs::copy(sample.join("hashsearch"), dir.join("hashsearch"))?;
    std::fs::write(stage.join("data.bin"), dataset(data_mib << 20))?;
    run_tool(Command::new("tar").arg("czf").arg(dir.join("payload.tar.gz")).arg("-C").arg(&stage).arg("data.bin"))?;
    std::fs::write(
        dir.join("app.json"),
        json!({
            "format": 1, "name": "hashsearch-bench", "port": 8080,
            "install": ["sh", "-c", "tar xzf payload.tar.gz && rm payload.tar.gz"],
            "start": ["./hashsearch", "8080", "--preload", "data.bin"],
            "probe": "search bench 12",
        })
        .to_string(),
    )?;
    Ok(dir)
}

/// A deterministic data set that compresses like text (about 3:1).
fn dataset(len: u64) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "cloudlet",
        "overlay",
        "synthesis",
        "handoff",
        "edge",
        "vm",
        "base",
        "chunk",
        "segment",
        "delta",
        "mobile",
        "offload",
        "latency",
        "fluid",
        "object",
        "speech",
        "face",
    ];
    let mut out = Vec::with_capacity(len as usize);
    let mut x: u64 = 0x2545F4914F6CDD1D;
    while (out.len() as u64) < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(WORDS[(x % WORDS.len() as u64) as usize].as_bytes());
        out.extend_from_slice(format!(" {} ", x % 10_000).as_bytes());
    }
    out.truncate(len as usize);
    out
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:").and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()))
        .unwrap_or(0)
}

fn print_table(r: &OverlayBenchRow) {
    let b = r.baseline_bytes.max(1) as f64;
    let row = |name: &str, v: u64| println!("  {name:<34} {:>12} bytes  {:>6.1}% of baseline", v, 100.0 * v as f64 / b);
    println!(
        "overlay size (Figure 6), bench app with a {} MiB data set, {} segments, delta {}:",
        r.app_data_mib, r.codec, r.delta
    );
    row("baseline: xdelta3 + LZMA", r.baseline_bytes);
    row("zstd --patch-from --long -19", r.zstd_patch_bytes);
    row("forage, dedup only", r.dedup_bytes);
    row("forage, semantic gap only", r.semantic_bytes);
    row("forage, combined", r.combined_bytes);
    row("(xdelta3 + LZMA of the semantic-gap VM)", r.baseline_on_semantic_vm_bytes);
    row("(the app's data set alone, LZMA)", r.data_set_lzma_bytes);
    println!(
        "  modified state: {} bytes ({} without closing the semantic gap)",
        r.modified_bytes, r.modified_bytes_without_semantic_gap
    );
    println!(
        "  combined / baseline {:.3} (target <= 0.20); combined / zstd-patch {:.3} (target < 1)",
        r.combined_vs_baseline, r.combined_vs_zstd_patch
    );
    println!(
        "  create {:.1} MB/s, apply {:.1} MB/s of modified state (target >= 100), peak RSS {:.0} MB",
        r.create_mb_s, r.apply_mb_s, r.peak_rss_mb
    );
    println!("  references: {:?}", r.refs);
    println!("  free chunks by source: {:?}", r.free_by_source);
}
