//! Launch VMs the benches build once and keep, in `DATA/bench/launch/KEY/`: the vision
//! app's takes about 20 minutes to install under TCG, and both benches use the same ones.
//! A key names the base (digest), the app (name and a hash of its `app.json`) and how the
//! VM was built (semantic gap on or off, caches dropped); `--fresh` rebuilds.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use forage_agent::app::{AppManifest, AppPackage};
use forage_datadir::DataDir;
use forage_image::app_debs::DebsInstalled;
use forage_synth::create::LaunchInput;
use forage_synth::ext4::Checkpoint;
use forage_synth::launch::{LaunchOptions, LaunchVm};
use forage_synth::BaseVm;
use forage_vm::Snapshot;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const RECORD: &str = "launch.json";

/// What a kept launch VM's folder records besides its snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    written_disk_chunks: Vec<u64>,
    discarded_disk_chunks: Vec<u64>,
    checkpoint: Checkpoint,
    app: AppManifest,
    install_s: f64,
    debs: Option<DebsInstalled>,
}

/// How a launch VM is built: the semantic gap closed or not, caches dropped or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    pub semantic: bool,
    pub drop_caches: bool,
}

impl Variant {
    fn tag(self) -> String {
        format!("{}{}", if self.semantic { "on" } else { "off" }, if self.drop_caches { "-dc" } else { "" })
    }

    pub fn options(self) -> LaunchOptions {
        LaunchOptions {
            semantic_disk: self.semantic,
            semantic_memory: self.semantic,
            drop_caches: self.drop_caches,
            app_ready: Duration::from_secs(600),
            ..LaunchOptions::default()
        }
    }
}

/// The launch VM of `app` on `base` built as `variant`: the kept one, or built now (and
/// kept). `say` hears progress.
pub async fn launch_vm(
    data: &DataDir,
    base: &BaseVm,
    app_dir: &Path,
    variant: Variant,
    fresh: bool,
    say: &dyn Fn(&str),
) -> anyhow::Result<LaunchVm> {
    let app = AppPackage::open(app_dir)?;
    let dir = folder(data, base, app_dir, &app, variant)?;
    if !fresh {
        if let Ok(l) = open(&dir) {
            say(&format!("launch VM of {} ({}): kept from an earlier run", app.manifest().name, variant.tag()));
            return Ok(l);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let partial = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    say(&format!("building the launch VM of {} ({}) ...", app.manifest().name, variant.tag()));
    let built = forage_synth::build::build_launch(data, base, &app, &variant.options(), &partial).await;
    let l = match built {
        Ok(l) => l,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e.into());
        }
    };
    if let Some(d) = &l.debs {
        say(&format!(
            "  {} Debian packages installed offline ({} MiB of .debs, guest disk +{} MiB) in {:.0} s",
            d.installed.len(),
            d.download_bytes >> 20,
            d.disk_growth_bytes.max(0) >> 20,
            d.took.as_secs_f64()
        ));
    }
    keep(l, &partial, &dir)
}

/// Keep `l`, whose snapshot is in `partial/snapshot`: its record written beside, the
/// folder renamed to `dir` (a kept launch VM is complete or absent), and reopened there.
pub fn keep(l: LaunchVm, partial: &Path, dir: &Path) -> anyhow::Result<LaunchVm> {
    let record = Record {
        written_disk_chunks: l.written_disk_chunks,
        discarded_disk_chunks: l.discarded_disk_chunks,
        checkpoint: l.checkpoint,
        app: l.app,
        install_s: l.install_time.as_secs_f64(),
        debs: l.debs,
    };
    std::fs::write(partial.join(RECORD), serde_json::to_vec(&record)?)?;
    std::fs::rename(partial, dir)?;
    open(dir)
}

/// Where kept launch VMs are: `DATA/bench/launch/`.
pub fn root(data: &DataDir) -> anyhow::Result<PathBuf> {
    let root = data.root().join("bench").join("launch");
    std::fs::create_dir_all(&root)?;
    Ok(root)
}

fn folder(data: &DataDir, base: &BaseVm, app_dir: &Path, app: &AppPackage, v: Variant) -> anyhow::Result<PathBuf> {
    let manifest = std::fs::read(app_dir.join("app.json")).context("the app's app.json")?;
    let key = format!(
        "{}-{}-{}-{}",
        &base.digest()[..12],
        app.manifest().name,
        &hex::encode(Sha256::digest(&manifest))[..8],
        v.tag()
    );
    Ok(root(data)?.join(key))
}

fn open(dir: &Path) -> anyhow::Result<LaunchVm> {
    let r: Record = serde_json::from_slice(&std::fs::read(dir.join(RECORD))?)?;
    Ok(LaunchVm {
        snapshot: Snapshot::open(&dir.join("snapshot"))?,
        written_disk_chunks: r.written_disk_chunks,
        discarded_disk_chunks: r.discarded_disk_chunks,
        checkpoint: r.checkpoint,
        app: r.app,
        install_time: Duration::from_secs_f64(r.install_s),
        debs: r.debs,
    })
}

/// The launch VM as overlay creation takes it (no service, no profile).
pub fn input(l: &LaunchVm) -> LaunchInput<'_> {
    LaunchInput {
        snapshot: &l.snapshot,
        written_disk_chunks: &l.written_disk_chunks,
        discarded_disk_chunks: &l.discarded_disk_chunks,
        checkpoint: l.checkpoint,
        service: None,
        accessed: None,
    }
}

/// The folder of a kept launch VM (its snapshot's parent), for child processes.
pub fn dir_of(l: &LaunchVm) -> PathBuf {
    l.snapshot.dir().parent().expect("a kept launch VM's snapshot is in its folder").to_path_buf()
}

/// Reopen a kept launch VM from its folder (in a child process).
pub fn reopen(dir: &Path) -> anyhow::Result<LaunchVm> {
    open(dir)
}
