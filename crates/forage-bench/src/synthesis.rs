//! `forage bench synthesis`: the paper's synthesis measurements (Tables 3 and 4) on an
//! emulated WAN. The device and the cloudlet are separate forage processes in two network
//! namespaces joined by a veth pair shaped with `tc tbf` (forage_testkit::wan); for every rate:
//! - transfer only: the overlay's bytes sent once over the same link (`bench blast` to
//!   `bench sink`), the floor every mode is compared with;
//! - baseline: the cloudlet receives the whole overlay, then applies it, then resumes;
//! - pipelined: receive, decompress and apply overlap; resume when all is applied;
//! - early start: resume once the manifest and device state are there, demand fetch.
//!
//! Apps: on the tiny image the bench app, whose first response (`search bench 12`) does
//! not touch its data set, so it uses a small part of the overlay: what early start is
//! for. On debian-12 the sample apps (`--app ocr --app vision`), their overlays made from
//! the launch VMs `bench overlay` keeps (profiled up to their first response).
//! Peak RSS: the device's `forage synthesize` (wait4) and the cloudlet daemon (VmHWM).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use forage_client::SynthesisReport;
use forage_datadir::DataDir;
use forage_synth::build::{BlobOrder, OverlayRequest};
use forage_synth::create::CreateOptions;
use serde::{Deserialize, Serialize};

use crate::cli::BenchSynthesisArgs;
use crate::common::{bench_base, forage_exe, print_json};

const CLOUDLET_PORT: u16 = 7878;
const SINK_PORT: u16 = 7999;
const MODES: [(&str, &[&str]); 3] =
    [("baseline", &["--no-pipelining"]), ("pipelined", &["--no-early-start"]), ("early_start", &[])];

/// One mode at one rate (the median run): a row of the table and of `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct SynthesisRow {
    pub app: String,
    pub mode: String,
    pub mbps: f64,
    pub runs: usize,
    /// Until the last of: every segment applied, the VM ready.
    pub total_s: f64,
    pub first_response_s: f64,
    pub resume_s: f64,
    pub ready_s: f64,
    pub transfer_s: f64,
    pub apply_s: f64,
    pub bytes: u64,
    pub overlay_bytes: u64,
    /// The same bytes sent once over the same link.
    pub transfer_only_s: f64,
    pub synthesis_vs_transfer: f64,
    pub accessed_fraction: Option<f64>,
    pub usage: Option<forage_client::OverlayUsage>,
    /// Peak resident memory of the device's `forage synthesize` processes so far, and of
    /// the cloudlet daemon (it receives, applies and serves: every mode so far at this rate).
    pub device_peak_rss_mb: f64,
    pub cloudlet_peak_rss_mb: Option<f64>,
}

/// What `forage-bench blast` prints.
#[derive(Debug, Serialize, Deserialize)]
struct Blasted {
    seconds: f64,
    bytes: u64,
}

/// A child process killed when dropped.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn run(data: &DataDir, args: BenchSynthesisArgs) -> anyhow::Result<()> {
    let say = |s: &str| {
        if !args.json {
            eprintln!("{s}");
        }
    };
    let base_name = args.base.clone().unwrap_or_else(|| crate::common::default_base(&args.image));
    let base = bench_base(data, &base_name, &args.image, &say).await?;
    let work = data.work().join(format!("bench-synthesis-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let result = async {
        let apps = crate::common::bench_apps(&args.image, &args.app, &work, args.data_mib)?;
        let options =
            CreateOptions { segment_bytes: args.segment_kib.clamp(4, 16 << 10) << 10, ..CreateOptions::default() };
        let mut rows = Vec::new();
        for app_dir in &apps {
            let (app, ovl) = overlay(data, &base, &base_name, app_dir, &args, &options, &work, &say).await?;
            let bytes = std::fs::metadata(&ovl)?.len();
            say(&format!("{app}: overlay {} KiB against base {}", bytes >> 10, base.manifest().name));
            for &mbps in &args.mbps {
                rows.extend(at_rate(data, &app, &ovl, bytes, mbps, args.runs.max(1), &say)?);
            }
            let _ = std::fs::remove_file(&ovl);
        }
        if args.json {
            print_json(&rows);
        } else {
            print_table(&args.image, &rows);
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// The overlay of one app in access order, written in `work`: on the tiny image built
/// from scratch; on others from the launch VM `bench overlay` keeps (built if absent).
#[allow(clippy::too_many_arguments)]
async fn overlay(
    data: &DataDir,
    base: &forage_synth::BaseVm,
    base_name: &str,
    app_dir: &Path,
    args: &BenchSynthesisArgs,
    options: &CreateOptions,
    work: &Path,
    say: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<(String, PathBuf)> {
    let name = forage_agent::app::AppPackage::open(app_dir)?.manifest().name.clone();
    let ovl = work.join(format!("{name}.ovl"));
    if args.image == forage_image::TINY {
        say("building the bench app's launch VM and its overlay (access order) ...");
        let request = OverlayRequest {
            base: base_name.to_string(),
            app: app_dir.to_path_buf(),
            options: options.clone(),
            order: BlobOrder::Access,
            output: ovl.clone(),
            packages: false,
        };
        forage_synth::build::build_overlay(data, &request, &|_| {}).await?;
    } else {
        let variant = crate::launch_cache::Variant { semantic: true, drop_caches: false };
        let launch = crate::launch_cache::launch_vm(data, base, app_dir, variant, false, say).await?;
        let scratch = work.join(format!("{name}-profile"));
        say(&format!("{name}: its overlay in access order ..."));
        forage_synth::build::overlay_of_launch(data, base, &launch, options, BlobOrder::Access, &ovl, &scratch, say)
            .await?;
        let _ = std::fs::remove_dir_all(&scratch);
    }
    Ok((name, ovl))
}

fn at_rate(
    data: &DataDir,
    app: &str,
    ovl: &Path,
    bytes: u64,
    mbps: f64,
    runs: usize,
    say: &dyn Fn(&str),
) -> anyhow::Result<Vec<SynthesisRow>> {
    let link =
        forage_testkit::wan::WanLink::create(mbps).context("emulating the WAN link (needs root, iproute2 and tc)")?;
    let (exe, me) = (forage_exe()?, std::env::current_exe()?);
    let root = data.root().to_path_buf();
    let (device, cloudlet) = (&link.a, &link.b);
    let cloudlet_addr = SocketAddr::from((cloudlet.addr, CLOUDLET_PORT));

    // Transfer only: the floor.
    let mut transfer = Vec::new();
    for _ in 0..runs {
        let _sink = Guard(
            cloudlet
                .command(&me)
                .args(["sink", "--listen", &SocketAddr::from((cloudlet.addr, SINK_PORT)).to_string()])
                .spawn()?,
        );
        std::thread::sleep(Duration::from_millis(300));
        let out = device
            .command(&me)
            .args([
                "blast",
                "--to",
                &SocketAddr::from((cloudlet.addr, SINK_PORT)).to_string(),
                "--bytes",
                &bytes.to_string(),
            ])
            .output()?;
        if !out.status.success() {
            bail!("transfer-only run failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let v: Blasted = serde_json::from_slice(&out.stdout).context("transfer-only output")?;
        transfer.push(v.seconds);
    }
    let transfer_only_s = median(&mut transfer);
    say(&format!("{mbps} Mbit/s: {bytes} bytes take {transfer_only_s:.2} s to transfer"));

    pair_bench_device(data, cloudlet_addr)?;
    // The cloudlet, in its namespace, without a cache (every run synthesizes for real),
    // one process per mode: its peak RSS is then that mode's alone (VmHWM only grows).
    let log = data.work().join(format!("bench-cloudlet-{}.log", std::process::id()));
    let start_cloudlet = || -> anyhow::Result<Guard> {
        let mut serve = cloudlet.command(&exe);
        serve.arg("--data-dir").arg(&root).args([
            "serve",
            "--listen",
            &cloudlet_addr.to_string(),
            "--no-api",
            "--no-cache",
            "--name",
            "bench-cloudlet",
        ]);
        let proc = Guard(serve.stdout(Stdio::null()).stderr(std::fs::File::create(&log)?).spawn()?);
        wait_for_line(&log, "listening", Duration::from_secs(30))?;
        Ok(proc)
    };
    let mut device_rss = 0f64;

    let mut rows = Vec::new();
    for (mode, flags) in MODES {
        let cloudlet_proc = start_cloudlet()?;
        let mut reports = Vec::new();
        for run in 0..runs {
            let out = crate::measure::run(
                device
                    .command(&exe)
                    .arg("--data-dir")
                    .arg(&root)
                    .arg("synthesize")
                    .arg(ovl)
                    .args(["--cloudlet", &cloudlet_addr.to_string(), "--json"])
                    .args(flags),
            )
            .with_context(|| format!("{mode} synthesis (run {run}); cloudlet log: {}", log.display()))?;
            let r: SynthesisReport =
                serde_json::from_slice(&out.stdout).with_context(|| format!("{mode} synthesis output"))?;
            say(&format!(
                "  {mode}: first response {:.2} s, device peak RSS {:.0} MB",
                r.first_response_s, out.usage.peak_rss_mb
            ));
            device_rss = device_rss.max(out.usage.peak_rss_mb);
            reports.push(r);
            std::thread::sleep(Duration::from_millis(500)); // the cloudlet stops the instance
        }
        reports.sort_by(|a, b| a.first_response_s.total_cmp(&b.first_response_s));
        let r = &reports[reports.len() / 2];
        let total_s = r.complete_s.max(r.ready_s);
        rows.push(SynthesisRow {
            app: app.to_string(),
            mode: mode.into(),
            mbps,
            runs,
            total_s,
            first_response_s: r.first_response_s,
            resume_s: r.resume_s,
            ready_s: r.ready_s,
            transfer_s: r.transfer_s,
            apply_s: r.apply_s,
            bytes: r.bytes_sent,
            overlay_bytes: bytes,
            transfer_only_s,
            synthesis_vs_transfer: total_s / transfer_only_s.max(1e-9),
            accessed_fraction: r.accessed_fraction,
            usage: r.usage.clone(),
            device_peak_rss_mb: device_rss,
            cloudlet_peak_rss_mb: crate::measure::peak_rss_mb(cloudlet_proc.0.id()),
        });
        drop(cloudlet_proc);
    }
    let _ = std::fs::remove_file(&log);
    Ok(rows)
}

/// Pair the bench's device with the bench's cloudlet at `addr` (they share a data
/// directory): a bundle written and imported, as over USB.
pub fn pair_bench_device(data: &DataDir, addr: SocketAddr) -> anyhow::Result<()> {
    let exe = forage_exe()?;
    let bundle = data.work().join(format!("bench-device-{}.fpair", std::process::id()));
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let out = std::process::Command::new(&exe).arg("--data-dir").arg(data.root()).args(args).output()?;
        if !out.status.success() {
            bail!("forage {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    };
    let path = bundle.to_string_lossy().into_owned();
    // A credential of that name from an earlier rate or run: revoked (none is no error),
    // since a name is held until its credential expires.
    let _ = run(&["pair", "revoke", "bench-device"]);
    run(&["pair", "--bundle", &path, "--name", "bench-device", "--addr", &addr.to_string(), "--valid-days", "1"])?;
    let imported = run(&["pair", "import", &path]);
    let _ = std::fs::remove_file(&bundle);
    imported
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("numbers"));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub fn wait_for_line(log: &PathBuf, needle: &str, wait: Duration) -> anyhow::Result<()> {
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return Ok(());
        }
        if t.elapsed() > wait {
            bail!("the bench cloudlet did not start: {}", text.trim());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn print_table(image: &str, rows: &[SynthesisRow]) {
    println!("VM synthesis over an emulated WAN (tc tbf), image {image}, overlay in access order:");
    println!(
        "  {:<18} {:<12} {:>6} {:>9} {:>9} {:>8} {:>10} {:>9} {:>10} {:>7} {:>7}   accessed at 1st response",
        "app",
        "mode",
        "Mbit/s",
        "total s",
        "first s",
        "resume s",
        "bytes",
        "xfer-only",
        "synth/xfer",
        "dev MB",
        "cl. MB"
    );
    for r in rows {
        let accessed = match (r.accessed_fraction, &r.usage) {
            (Some(a), Some(u)) => format!("{:.1}% ({} fetched)", a * 100.0, u.demand_fetches),
            _ => "-".into(),
        };
        println!(
            "  {:<18} {:<12} {:>6} {:>9.2} {:>9.2} {:>8.2} {:>10} {:>9.2} {:>9.2}x {:>7.0} {:>7}  {}",
            r.app,
            r.mode,
            r.mbps,
            r.total_s,
            r.first_response_s,
            r.resume_s,
            r.bytes,
            r.transfer_only_s,
            r.synthesis_vs_transfer,
            r.device_peak_rss_mb,
            r.cloudlet_peak_rss_mb.map(|m| format!("{m:.0}")).unwrap_or_else(|| "-".into()),
            accessed
        );
    }
    let mut keys: Vec<(&str, f64)> = Vec::new();
    for r in rows {
        if !keys.contains(&(r.app.as_str(), r.mbps)) {
            keys.push((r.app.as_str(), r.mbps));
        }
    }
    for (app, mbps) in keys {
        let get = |mode: &str| rows.iter().find(|r| r.app == app && r.mode == mode && r.mbps == mbps);
        let (Some(p), Some(e)) = (get("pipelined"), get("early_start")) else { continue };
        let bound = 1.1 * p.transfer_only_s + p.resume_s;
        let ratio = e.first_response_s / p.first_response_s.max(1e-9);
        println!(
            "  {app} at {mbps} Mbit/s: pipelined total {:.2} s vs 1.1 x transfer + resume = {:.2} s ({}); early start's first response {:.2} s = {:.0}% of pipelined's (target <= 40%: {})",
            p.total_s,
            bound,
            if p.total_s <= bound { "met" } else { "missed" },
            e.first_response_s,
            100.0 * ratio,
            if ratio <= 0.4 { "met" } else { "missed" }
        );
    }
}

/// `bench sink`: receive one connection's bytes, acknowledge with one byte.
pub fn sink(listen: SocketAddr) -> anyhow::Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    let (mut s, _) = l.accept()?;
    let mut buf = vec![0u8; 1 << 16];
    while s.read(&mut buf)? > 0 {}
    s.write_all(b"k")?;
    Ok(())
}

/// `bench blast`: send `bytes` bytes and print how long until the sink had them all.
pub fn blast(to: SocketAddr, bytes: u64) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut s = TcpStream::connect(to).with_context(|| format!("connecting to {to}"))?;
    s.set_nodelay(true).ok();
    let buf = vec![0x5au8; 1 << 16];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack)?;
    print_json(&Blasted { seconds: start.elapsed().as_secs_f64(), bytes });
    Ok(())
}
