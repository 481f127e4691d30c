//! `forage bench memory` (and `bench overlay --big`): memory at the papers' scale. The
//! largest overlay a kept launch VM gives (no semantic gap, no deduplication, no compression: every modified
//! chunk's bytes) is created, applied, and synthesized by a cloudlet on this host
//! (loopback, pipelined and early start), each in its own forage process whose peak RSS
//! is taken: wait4's for processes the bench waits for, VmHWM sampled every 100 ms for the
//! cloudlet daemon and its shims (which the bench does not wait for).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use forage_datadir::DataDir;
use forage_synth::launch::LaunchVm;
use serde::Serialize;

use crate::cli::{BenchMemoryArgs, OverlayCreateArgs};
use crate::common::{bench_apps, bench_base, default_base, forage_exe, print_json};
use crate::launch_cache::{self, Variant};
use crate::measure::{self, Usage};
use crate::synthesis::{pair_bench_device, wait_for_line, Guard};

/// The cloudlet's port on loopback.
const PORT: u16 = 7978;

/// One synthesis of the big overlay.
#[derive(Debug, Clone, Serialize)]
pub struct BigSynthesis {
    pub mode: String,
    pub device: Usage,
    /// Peak RSS (MB) of the cloudlet's processes by name (the daemon `forage`, its shims).
    pub cloudlet_peak_rss_mb: BTreeMap<String, f64>,
}

/// What `--big` measured.
#[derive(Debug, Clone, Serialize)]
pub struct BigRow {
    pub overlay_bytes: u64,
    pub create: Usage,
    pub apply: Usage,
    pub synthesis: Vec<BigSynthesis>,
}

impl BigRow {
    /// The largest peak of any forage process.
    pub fn worst_mb(&self) -> f64 {
        let mut worst = self.create.peak_rss_mb.max(self.apply.peak_rss_mb);
        for s in &self.synthesis {
            worst = worst.max(s.device.peak_rss_mb);
            worst = s.cloudlet_peak_rss_mb.values().fold(worst, |a, b| a.max(*b));
        }
        worst
    }
}

/// `forage bench memory`: [`measure`] for every app, from the launch VMs built without
/// the semantic gap (kept with `bench overlay`'s).
pub async fn run(data: &DataDir, args: BenchMemoryArgs) -> anyhow::Result<()> {
    let say = |s: &str| {
        if !args.json {
            eprintln!("{s}");
        }
    };
    let base_name = args.base.clone().unwrap_or_else(|| default_base(&args.image));
    let base = bench_base(data, &base_name, &args.image, &say).await?;
    let work = data.work().join(format!("bench-memory-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let result = async {
        for app in bench_apps(&args.image, &args.app, &work, args.data_mib)? {
            let off = Variant { semantic: false, drop_caches: false };
            let launch = launch_cache::launch_vm(data, &base, &app, off, args.fresh, &say).await?;
            let row = measure(data, &base_name, &launch, &work, &say)?;
            if args.json {
                print_json(&row);
            } else {
                println!("memory at scale, image {} + app {}:", args.image, launch.app.name);
                print(&row);
            }
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// The row as a line of the table.
pub fn print(b: &BigRow) {
    let mark = |ok: bool| if ok { "met" } else { "missed" };
    let cloudlet: Vec<String> = b
        .synthesis
        .iter()
        .map(|s| {
            let peaks: Vec<String> = s.cloudlet_peak_rss_mb.iter().map(|(n, m)| format!("{n} {m:.0}")).collect();
            format!("{}: device {:.0}, cloudlet {}", s.mode, s.device.peak_rss_mb, peaks.join(", "))
        })
        .collect();
    println!(
        "  big overlay ({:.0} MiB, no semantic gap, no dedup, no compression), peak RSS MB: create {:.0} ({:.0} s, {:.1} cores), apply {:.0} ({:.0} s); synthesis {}; worst {:.0} (target <= 256: {})",
        b.overlay_bytes as f64 / (1u64 << 20) as f64,
        b.create.peak_rss_mb,
        b.create.wall_s,
        b.create.cores(),
        b.apply.peak_rss_mb,
        b.apply.wall_s,
        cloudlet.join("; "),
        b.worst_mb(),
        mark(b.worst_mb() <= 256.0)
    );
}

/// Create, apply and synthesize the big overlay of `launch` (built without the semantic
/// gap) against `base_name`, in `work`.
pub fn measure(
    data: &DataDir,
    base_name: &str,
    launch: &LaunchVm,
    work: &Path,
    say: &dyn Fn(&str),
) -> anyhow::Result<BigRow> {
    let ovl = work.join("big.ovl");
    let create = OverlayCreateArgs {
        launch: launch_cache::dir_of(launch),
        base: base_name.to_string(),
        output: ovl.clone(),
        no_dedup: true,
        no_semantic: true,
        service: true,
        codec: "none".into(),
        level: None,
        delta: "none".into(),
        packages: false,
    };
    say("big overlay: no semantic gap, no dedup, no compression ...");
    let me = std::env::current_exe()?;
    let created = measure::run(Command::new(&me).arg("--data-dir").arg(data.root()).args(create.to_args()))?;
    let overlay_bytes = std::fs::metadata(&ovl)?.len();
    say(&format!(
        "  {} MiB in {:.0} s, peak RSS {:.0} MB; applying ...",
        overlay_bytes >> 20,
        created.usage.wall_s,
        created.usage.peak_rss_mb
    ));
    let exe = forage_exe()?;
    let applied = work.join("big-applied");
    let apply = measure::run(
        Command::new(&exe)
            .arg("--data-dir")
            .arg(data.root())
            .args(["overlay", "apply", "--json", "--base", base_name, "--out"])
            .arg(&applied)
            .arg(&ovl),
    )?
    .usage;
    let _ = std::fs::remove_dir_all(&applied);
    say(&format!(
        "  applied in {:.0} s, peak RSS {:.0} MB; synthesizing on loopback ...",
        apply.wall_s, apply.peak_rss_mb
    ));
    let synthesis = synthesize(data, &ovl, say);
    let _ = std::fs::remove_file(&ovl);
    Ok(BigRow { overlay_bytes, create: created.usage, apply, synthesis: synthesis? })
}

fn synthesize(data: &DataDir, ovl: &Path, say: &dyn Fn(&str)) -> anyhow::Result<Vec<BigSynthesis>> {
    let exe = forage_exe()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], PORT));
    pair_bench_device(data, addr)?;
    let log = data.work().join(format!("bench-big-cloudlet-{}.log", std::process::id()));
    let mut out = Vec::new();
    for (mode, flags) in [("pipelined", &["--no-early-start"][..]), ("early_start", &[][..])] {
        // A cloudlet per mode: each one's peaks are its own.
        let child = Command::new(&exe)
            .arg("--data-dir")
            .arg(data.root())
            .args(["serve", "--listen", &addr.to_string(), "--no-api", "--no-cache", "--no-advertise"])
            .args(["--name", "bench-big"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting the cloudlet")?;
        let cloudlet = Guard(child);
        wait_for_line(&log.to_path_buf(), "listening", Duration::from_secs(30))?;
        let sampler = TreeSampler::start(cloudlet.0.id());
        let device = measure::run(
            Command::new(&exe)
                .arg("--data-dir")
                .arg(data.root())
                .arg("synthesize")
                .arg(ovl)
                .args(["--cloudlet", &addr.to_string(), "--json"])
                .args(flags),
        )
        .with_context(|| format!("{mode} synthesis of the big overlay; cloudlet log: {}", log.display()))?
        .usage;
        // The instance is released after the first response; let the session end.
        std::thread::sleep(Duration::from_secs(2));
        let peaks = sampler.stop();
        drop(cloudlet);
        say(&format!(
            "  {mode}: {:.0} s, device peak RSS {:.0} MB, cloudlet {peaks:?}",
            device.wall_s, device.peak_rss_mb
        ));
        out.push(BigSynthesis { mode: mode.into(), device, cloudlet_peak_rss_mb: peaks });
    }
    let _ = std::fs::remove_file(&log);
    Ok(out)
}

/// Samples the peak RSS (VmHWM) of a process and its descendants, by process name.
struct TreeSampler {
    stop: Arc<AtomicBool>,
    peaks: Arc<Mutex<BTreeMap<String, f64>>>,
    thread: std::thread::JoinHandle<()>,
}

impl TreeSampler {
    fn start(root: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peaks = Arc::new(Mutex::new(BTreeMap::new()));
        let (s, p) = (stop.clone(), peaks.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                for (name, mb) in tree(root) {
                    let mut peaks = p.lock().expect("not poisoned");
                    let e = peaks.entry(name).or_insert(0.0);
                    *e = f64::max(*e, mb);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Self { stop, peaks, thread }
    }

    fn stop(self) -> BTreeMap<String, f64> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        let peaks = self.peaks.lock().expect("not poisoned");
        peaks.clone()
    }
}

/// (name, VmHWM MB) of `root` and every descendant (QEMU left out: guest RAM, not forage's).
fn tree(root: u32) -> Vec<(String, f64)> {
    let mut parent: Vec<(u32, u32, String)> = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // pid (comm) state ppid ...: comm may hold spaces, so split after its last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let comm = stat[open + 1..close].to_string();
        let Some(ppid) = stat[close + 1..].split_whitespace().nth(1).and_then(|s| s.parse().ok()) else { continue };
        parent.push((pid, ppid, comm));
    }
    let mut members = vec![root];
    let mut grew = true;
    while grew {
        grew = false;
        for (pid, ppid, _) in &parent {
            if members.contains(ppid) && !members.contains(pid) {
                members.push(*pid);
                grew = true;
            }
        }
    }
    parent
        .into_iter()
        .filter(|(pid, _, comm)| members.contains(pid) && comm.starts_with("forage"))
        .filter_map(|(pid, _, comm)| measure::peak_rss_mb(pid).map(|mb| (comm, mb)))
        .collect()
}
