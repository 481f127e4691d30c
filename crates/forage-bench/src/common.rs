//! What every bench needs: the bench base and app, the forage binary it drives, JSON lines.

use std::path::{Path, PathBuf};

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

/// The bench's base VM, created from `image` when absent.
pub async fn bench_base(data: &DataDir, name: &str, image: &str, say: &dyn Fn(&str)) -> anyhow::Result<BaseVm> {
    if let Ok(b) = BaseVm::open(data, name) {
        anyhow::ensure!(
            b.manifest().image == image,
            "base {name} is of image {}, not {image}: name another with --base",
            b.manifest().image
        );
        return Ok(b);
    }
    let img = {
        let (d, i) = (data.clone(), image.to_string());
        tokio::task::spawn_blocking(move || ensure_image(&d, &i, true)).await??.image
    };
    say(&format!("creating base {name} of image {image} ..."));
    Ok(BaseVm::create(data, name, &img, accel(), std::time::Duration::from_secs(5)).await?)
}

/// The base the benches use for `image` unless told otherwise.
pub fn default_base(image: &str) -> String {
    if image == forage_image::TINY {
        "bench".into()
    } else {
        format!("bench-{image}")
    }
}

/// The app folders a bench runs: those named (a folder, or a sample app built by `make
/// guest` into target/guest/apps), else on the tiny image the bench app (hashsearch with
/// a data set of `data_mib`, written into `work`).
pub fn bench_apps(image: &str, named: &[String], work: &Path, data_mib: u64) -> anyhow::Result<Vec<PathBuf>> {
    if named.is_empty() {
        anyhow::ensure!(
            image == forage_image::TINY,
            "name the apps to run on image {image} (--app ocr --app vision: the sample apps `make guest` builds)"
        );
        return Ok(vec![crate::bench_app::bench_app(work, data_mib)?]);
    }
    named
        .iter()
        .map(|a| {
            let p = Path::new(a);
            if p.join("app.json").is_file() {
                Ok(p.to_path_buf())
            } else {
                forage_image::locate_guest_binary(&format!("apps/{a}")).with_context(|| {
                    format!("app {a}: not a folder with an app.json, nor a sample app (run `make guest`)")
                })
            }
        })
        .collect()
}

/// The `forage` binary the benches drive (daemons, devices): beside this one.
pub fn forage_exe() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let dir = me.parent().context("forage-bench has no folder")?;
    let exe = dir.join("forage");
    anyhow::ensure!(exe.is_file(), "{} is missing: build it (`cargo build --release -p forage`)", exe.display());
    Ok(exe)
}
