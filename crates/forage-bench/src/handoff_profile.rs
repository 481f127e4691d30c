//! `forage bench handoff-profile`: the offline lookup table of VM handoff's adaptation
//! (the VM handoff paper, section 6.2). The reference workload is the bench app's launch
//! VM: its memory chunks that differ from the base's are the modified state; an even
//! sample of them goes through every operating mode (delta none/xor/bsdiff × codec),
//! measuring P (seconds per chunk on one core) and R (output/input).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use anyhow::Context;
use forage_datadir::DataDir;
use forage_handoff::adapt::{all_modes, LookupTable};

use crate::cli::BenchHandoffProfileArgs;
use crate::common::{bench_base, print_json};

const CHUNK: usize = 4096;

pub async fn profile(data: &DataDir, args: BenchHandoffProfileArgs) -> anyhow::Result<()> {
    let say = |s: &str| {
        if !args.json {
            eprintln!("{s}");
        }
    };
    let base = bench_base(data, &args.base, forage_image::TINY, &say).await?;
    let work = data.work().join(format!("bench-handoff-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let result = async {
        let app = forage_agent::app::AppPackage::open(&crate::bench_app::bench_app(&work, args.data_mib)?)?;
        say("building the bench app's launch VM (the reference workload) ...");
        let launch = forage_synth::build::build_launch(
            data,
            &base,
            &app,
            &forage_synth::launch::LaunchOptions::default(),
            &work.join("launch"),
        )
        .await?;
        let (new, old) = (launch.snapshot.memory_path(), base.memory_path());
        let n = args.chunks.max(1);
        let chunks = tokio::task::spawn_blocking(move || modified_sample(&new, &old, n)).await??;
        say(&format!("profiling {} operating modes on {} modified memory chunks ...", all_modes().len(), chunks.len()));
        let t = Instant::now();
        let table =
            tokio::task::spawn_blocking(move || forage_handoff::encode::profile(&all_modes(), &chunks, CHUNK as u64))
                .await?;
        let out = args.output.clone().unwrap_or_else(|| data.root().join("handoff-lookup.json"));
        std::fs::write(&out, serde_json::to_vec_pretty(&table)?)
            .with_context(|| format!("writing {}", out.display()))?;
        if args.json {
            print_json(&table);
        } else {
            print_table(&table);
            println!("profiled in {:.0} s; lookup table written to {}", t.elapsed().as_secs_f64(), out.display());
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// Up to `n` chunks of `new` that differ from `old`, spread evenly, each with its base.
fn modified_sample(
    new: &std::path::Path,
    old: &std::path::Path,
    n: usize,
) -> anyhow::Result<Vec<forage_handoff::encode::SampleChunk>> {
    let (a, b) = (
        File::open(new).with_context(|| format!("{}", new.display()))?,
        File::open(old).with_context(|| format!("{}", old.display()))?,
    );
    let size = a.metadata()?.len();
    let (mut x, mut y) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut modified = Vec::new();
    for i in 0..size / CHUNK as u64 {
        a.read_exact_at(&mut x, i * CHUNK as u64)?;
        b.read_exact_at(&mut y, i * CHUNK as u64)?;
        if x != y {
            modified.push(i);
        }
    }
    let stride = modified.len().div_ceil(n).max(1);
    let mut out = Vec::new();
    for &i in modified.iter().step_by(stride) {
        a.read_exact_at(&mut x, i * CHUNK as u64)?;
        b.read_exact_at(&mut y, i * CHUNK as u64)?;
        out.push((x.clone(), Some(y.clone())));
    }
    Ok(out)
}

fn print_table(t: &LookupTable) {
    let mut rows = t.modes.clone();
    rows.sort_by(|a, b| a.1.r.total_cmp(&b.1.r));
    println!("  {:<16} {:>12} {:>8} {:>16} {:>16}", "mode", "P us/chunk", "R", "1 core chunks/s", "10 Mbit/s chunks/s");
    for (m, p) in rows {
        println!(
            "  {:<16} {:>12.1} {:>8.3} {:>16.0} {:>16.0}",
            m.to_string(),
            p.p * 1e6,
            p.r,
            1.0 / p.p.max(1e-12),
            10e6 / 8.0 / (CHUNK as f64 * p.r.max(1e-9))
        );
    }
    if let (Some(f), Some(s)) = (t.fastest(), t.smallest()) {
        println!("  fastest: {f}; smallest output: {s}");
    }
}
