//! What every bench needs: the bench base and app, the forage binary it drives, JSON lines.

use std::path::PathBuf;

use anyhow::Context;
use forage_datadir::DataDir;
use forage_synth::BaseVm;

/// "outer: inner: innermost", each cause once.
pub fn chain(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ")
}

/// Print `value` as one line of JSON.
pub fn print_json(value: &impl serde::Serialize) {
    println!("{}", serde_json::to_string(value).expect("serializable"));
}

/// The accelerator, with one warning line when it is TCG.
pub fn accel() -> forage_vm::Accel {
    forage_vm::accel::choose()
}

/// The tiny image, built if needed (quietly unless `!quiet`).
pub fn ensure_image(data: &DataDir, name: &str, quiet: bool) -> anyhow::Result<forage_image::BuildOutcome> {
    let out = forage_image::ensure(data, name).with_context(|| format!("building image {name}"))?;
    if !quiet {
        eprintln!(
            "image {name}: {} in {:.1} s ({})",
            if out.cached { "cached" } else { "built" },
            out.took.as_secs_f64(),
            out.image.dir().display()
        );
    }
    Ok(out)
}

/// The bench's base VM, created from the tiny image when absent.
pub async fn bench_base(data: &DataDir, name: &str, say: &dyn Fn(&str)) -> anyhow::Result<BaseVm> {
    if let Ok(b) = BaseVm::open(data, name) {
        return Ok(b);
    }
    let image = {
        let d = data.clone();
        tokio::task::spawn_blocking(move || ensure_image(&d, forage_image::TINY, true)).await??.image
    };
    say(&format!("creating base {name} ..."));
    Ok(BaseVm::create(data, name, &image, accel(), std::time::Duration::from_secs(5)).await?)
}

/// The `forage` binary the benches drive (daemons, devices): beside this one.
pub fn forage_exe() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let dir = me.parent().context("forage-bench has no folder")?;
    let exe = dir.join("forage");
    anyhow::ensure!(exe.is_file(), "{} is missing: build it (`cargo build --release -p forage`)", exe.display());
    Ok(exe)
}
