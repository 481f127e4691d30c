//! `forage bench handoff`: VM handoff against QEMU's own live migration (the VM handoff
//! paper's Figure 7 and Table 5, and its Figure 17 trace), measured here.
//!
//! Two cloudlets (`forage serve`) run in two network namespaces joined by a veth shaped
//! with `tc tbf`. Both hold the bench service VM (the same package: hashsearch). For
//! every approach, a device starts a cached-VM instance at the source; the app grows a
//! working set of records and keeps rewriting its hot part (`grow`, `churn`), then:
//! - **forage**: `forage handoff` to the other cloudlet, adaptive, and in each static
//!   mode of a candidate list (the best and worst are reported);
//! - **qemu-live-migration**: QEMU's `migrate` of the same kind of instance over the same
//!   link, to a QEMU that holds the instance's disk already (started with `-incoming`);
//! - **qemu-copy-storage**: the same, to a QEMU with an empty disk that QEMU fills over
//!   NBD with `blockdev-mirror` first, as libvirt's `--copy-storage-all` does
//!   ([`crate::handoff_qemu`]).
//!
//! Each run checks the service at its new place (request count and working set).
//! Downtime: for forage, from the VM's stop at the source to the destination's
//! acknowledged resume; for QEMU, the downtime QEMU itself reports.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use forage_api::client::ApiClient;
use forage_api::HandoffReport;
use forage_client::ServiceEndpoint;
use forage_datadir::DataDir;
use forage_testkit::wan::{Netns, WanLink};

use crate::cli::{BenchHandoffArgs, QemuApproach};
use crate::common::{bench_base, forage_exe, print_json};
use crate::handoff_qemu::qemu_migrate;
pub use crate::handoff_table::HandoffRow;
use crate::handoff_table::{median_index, print_table, row, summary, STATIC};
pub(crate) use crate::handoff_workload::{Run, Workload, SERVICE};
use crate::link_schedule::{Link, Shaping};
use crate::synthesis::{wait_for_line, Guard};

const PORT: u16 = 7878;
const API: u16 = 7879;

impl From<&HandoffReport> for Run {
    fn from(r: &HandoffReport) -> Self {
        Self {
            total_s: r.total_s,
            downtime_s: r.downtime_s,
            bytes: r.bytes,
            mode: r.mode.clone(),
            switches: r.switches.clone(),
            qemu_rounds: r.qemu_rounds,
            disk_chunks: Some(r.disk_chunks),
            converged: true,
            time: Some(crate::handoff_workload::TimeSplit::of(r)),
        }
    }
}

pub async fn run(data: &DataDir, args: BenchHandoffArgs) -> anyhow::Result<()> {
    let say = |s: &str| {
        if !args.json {
            eprintln!("{s}");
        }
    };
    let base_name = args.base.clone().unwrap_or_else(|| crate::common::default_base(&args.image));
    let base = bench_base(data, &base_name, &args.image, &say).await?;
    let workload = Workload::of(&args)?;
    let work = data.work().join(format!("bench-handoff-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let out_dir = args.out.clone().unwrap_or_else(|| data.root().join("bench").join("handoff"));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("{}", out_dir.display()))?;
    let result = async {
        say(&format!(
            "service VM {SERVICE} ({} on base {}) for both cloudlets ...",
            workload.name(),
            base.manifest().name
        ));
        let rig = tokio::task::block_in_place(|| Rig::new(data, &work, &args, &base_name, workload))?;
        let mut links: Vec<Link> = args.mbps.iter().map(|&m| Link::Fixed(m)).collect();
        if links.is_empty() && args.changing_link.is_none() {
            links = [5.0, 10.0, 25.0].into_iter().map(Link::Fixed).collect();
        }
        if let Some(s) = &args.changing_link {
            links.push(Link::parse(s)?);
        }
        if !args.no_warm_up {
            tokio::task::block_in_place(|| rig.warm_up(&links[0], &args, &say))?;
        }
        let mut rows = Vec::new();
        let mut failed = None;
        for link in &links {
            if let Err(e) = tokio::task::block_in_place(|| rig.measure_link(link, &args, &out_dir, &say, &mut rows)) {
                // What was measured is still printed.
                failed = Some(e);
                break;
            }
        }
        if args.json {
            print_json(&rows);
        } else {
            print_table(&rows, &args, &links, &rig.workload);
        }
        failed.map_or(Ok(()), Err)
    }
    .await;
    // The cloudlets' logs (every mode switch, every handoff's steps; why a run failed).
    for side in ["source", "destination"] {
        let _ = std::fs::copy(work.join(side).join("cloudlet.log"), out_dir.join(format!("{side}.log")));
    }
    if result.is_err() {
        eprintln!("the cloudlets' logs: {}/{{source,destination}}.log", out_dir.display());
    }
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// The two cloudlets, the device and the link between them.
struct Rig {
    exe: PathBuf,
    link: Arc<Mutex<WanLink>>,
    src: PathBuf,
    dst: PathBuf,
    device: PathBuf,
    src_addr: String,
    dst_addr: String,
    accel: forage_vm::Accel,
    workload: Workload,
    _daemons: Vec<Guard>,
}

impl Rig {
    fn new(
        data: &DataDir,
        work: &Path,
        args: &BenchHandoffArgs,
        base: &str,
        workload: Workload,
    ) -> anyhow::Result<Self> {
        let exe = forage_exe()?;
        let forage = |dir: &Path, argv: &[&str]| -> anyhow::Result<String> {
            let out = Command::new(&exe).arg("--data-dir").arg(dir).args(argv).stdin(Stdio::null()).output()?;
            if !out.status.success() {
                bail!("forage {}: {}", argv.join(" "), String::from_utf8_lossy(&out.stderr).trim());
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let repo = forage_service::Repository::new(data);
        if repo.open(SERVICE).is_ok() {
            forage(data.root(), &["service", "rm", SERVICE])?;
        }
        let app = workload.app_dir()?;
        forage(data.root(), &["service", "create", SERVICE, "--base", base, "--app", &app.to_string_lossy()])?;
        let pkg = work.join("service.fsvc");
        forage(data.root(), &["service", "export", SERVICE, "-o", &pkg.to_string_lossy()])?;
        let (src, dst, device) = (work.join("source"), work.join("destination"), work.join("device"));
        let image = data.images().join(&args.image);
        for dir in [&src, &dst] {
            std::fs::create_dir_all(dir.join("images"))?;
            let copied = Command::new("cp").arg("-r").arg(&image).arg(dir.join("images")).status()?;
            if !copied.success() {
                bail!("copying the guest image to {}", dir.display());
            }
            forage(dir, &["service", "import", &pkg.to_string_lossy(), "--id", SERVICE])?;
        }
        std::fs::create_dir_all(&device)?;
        let link = WanLink::create(args.mbps.first().copied().unwrap_or(5.0))
            .context("emulating the WAN link (needs root, iproute2 and tc)")?;
        let (src_addr, dst_addr) = (format!("{}:{PORT}", link.a.addr), format!("{}:{PORT}", link.b.addr));
        let bundle = |name: &str| work.join(format!("{name}.fpair")).to_string_lossy().into_owned();
        forage(
            &dst,
            &[
                "pair",
                "--bundle",
                &bundle("source"),
                "--name",
                "bench-source",
                "--as-cloudlet",
                "--addr",
                &dst_addr,
                "--valid-days",
                "1",
            ],
        )?;
        forage(&src, &["pair", "import", &bundle("source")])?;
        forage(
            &src,
            &[
                "pair",
                "--bundle",
                &bundle("device"),
                "--name",
                "bench-device",
                "--addr",
                &src_addr,
                "--valid-days",
                "1",
            ],
        )?;
        forage(&device, &["pair", "import", &bundle("device")])?;
        let mut daemons = Vec::new();
        for (ns, dir, addr, name) in
            [(&link.a, &src, &src_addr, "bench-source"), (&link.b, &dst, &dst_addr, "bench-destination")]
        {
            let log = dir.join("cloudlet.log");
            let child = ns
                .command(&exe)
                .arg("--data-dir")
                .arg(dir)
                .args([
                    "serve",
                    "--listen",
                    addr,
                    "--api",
                    &format!("127.0.0.1:{API}"),
                    "--no-advertise",
                    "--no-cache",
                    // The bench's instances serve the bench's workload, not a device
                    // through the relay: the idle timeout would stop them mid-table.
                    "--idle-timeout",
                    "0",
                    "--name",
                    name,
                ])
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?)
                .spawn()?;
            daemons.push(Guard(child));
            wait_for_line(&log, "listening", Duration::from_secs(30))?;
        }
        let accel = forage_vm::accel::detect().accel;
        Ok(Self {
            exe,
            link: Arc::new(Mutex::new(link)),
            src,
            dst,
            device,
            src_addr,
            dst_addr,
            accel,
            workload,
            _daemons: daemons,
        })
    }

    fn ns(&self, side: char) -> Netns {
        let link = self.link.lock().unwrap_or_else(|p| p.into_inner());
        if side == 'a' {
            link.a.clone()
        } else {
            link.b.clone()
        }
    }

    fn measure_link(
        &self,
        link: &Link,
        args: &BenchHandoffArgs,
        out_dir: &Path,
        say: &dyn Fn(&str),
        rows: &mut Vec<HandoffRow>,
    ) -> anyhow::Result<()> {
        let label = link.label();
        say(&format!("at {label} Mbit/s:"));
        let statics: Vec<&str> = args.modes.split(',').map(str::trim).filter(|m| !m.is_empty()).collect();
        let modes: Vec<Option<&str>> = std::iter::once(None).chain(statics.iter().copied().map(Some)).collect();
        // Interleaved rounds, so that a slow spell of the machine falls on every mode.
        let mut runs: Vec<Vec<HandoffReport>> = vec![Vec::new(); modes.len()];
        for round in 0..args.repeat {
            for (mode, runs) in modes.iter().zip(runs.iter_mut()) {
                let report = self.forage_run(*mode, args, link)?;
                let of = if args.repeat > 1 { format!(" ({}/{})", round + 1, args.repeat) } else { String::new() };
                // What the first decision of an adaptive run was made on.
                let prior = match (mode, report.prior) {
                    (None, Some(p)) => {
                        format!(" (prior: link {:.2} MB/s, encoders x{:.2})", p.link_bps / 1e6, p.cpu_scale)
                    }
                    _ => String::new(),
                };
                say(&format!(
                    "  forage {}{of}: {}{prior}",
                    mode.map_or("adaptive".into(), |m| format!("static {m}")),
                    summary(&Run::from(&report))
                ));
                runs.push(report);
            }
        }
        let mut runs = runs.into_iter().map(|r| (r.iter().map(Run::from).collect::<Vec<Run>>(), r));
        let Some((adaptive, adaptive_reports)) = runs.next() else { return Ok(()) };
        let Some(median) = median_index(&adaptive) else { return Ok(()) };
        let adaptive_report = &adaptive_reports[median];
        let stem = out_dir.join(format!("handoff-trace-{}mbps", label.replace([':', ','], "-")));
        let csv = stem.with_extension("csv");
        let mut f = std::io::BufWriter::new(std::fs::File::create(&csv).with_context(|| format!("{}", csv.display()))?);
        forage_handoff::pipeline::write_trace_csv(&adaptive_report.trace, &mut f)
            .with_context(|| format!("{}", csv.display()))?;
        let svg = stem.with_extension("svg");
        crate::plot::plot(&svg, adaptive_report, link.first_mbps())?;
        say(&format!("  trace of the adaptive mode's median run: {} and {}", csv.display(), svg.display()));
        let modified = adaptive_report.modified_bytes;
        rows.push(row("forage-adaptive", link, &adaptive, modified));
        for (mode, (mode_runs, _)) in statics.iter().zip(runs) {
            rows.push(row(&format!("{STATIC}{mode}"), link, &mode_runs, modified));
        }
        if !args.no_qemu && args.qemu.contains(&QemuApproach::Live) {
            let r = self.qemu_run(args, false, link)?;
            say(&format!("  qemu live migration (disk already there): {}", summary(&r)));
            rows.push(row("qemu-live-migration", link, std::slice::from_ref(&r), modified));
        }
        if !args.no_qemu && args.qemu.contains(&QemuApproach::CopyStorage) {
            let d = self.qemu_run(args, true, link)?;
            say(&format!("  qemu live migration + NBD drive-mirror of the disk: {}", summary(&d)));
            rows.push(row("qemu-copy-storage", link, std::slice::from_ref(&d), modified));
        }
        Ok(())
    }

    /// One handoff that is not counted. The first between the bench's two new cloudlets
    /// took 5.9 s where the next took 3.7 s (Debian app, 25 Mbit/s): the bases are read
    /// cold and the service imports' gigabytes are still being written back. Without it,
    /// whichever mode runs first (the adaptive one) pays for that.
    fn warm_up(&self, link: &Link, args: &BenchHandoffArgs, say: &dyn Fn(&str)) -> anyhow::Result<()> {
        let synced = Command::new("sync").status().map(|s| s.success()).unwrap_or(false);
        if !synced {
            say("  (sync failed: the imports' writes may still be flushing)");
        }
        let r = Run::from(&self.forage_run(None, args, link).context("the warm-up handoff")?);
        say(&format!("warm-up handoff at {} Mbit/s (not counted): {}", link.label(), summary(&r)));
        Ok(())
    }

    /// The link at its rate, or following its schedule from now until the guard drops.
    fn shape(&self, link: &Link) -> anyhow::Result<Shaping> {
        crate::link_schedule::shape(&self.link, link)
    }

    /// A device's instance at the source, its working set grown and churning.
    fn instance(
        &self,
        args: &BenchHandoffArgs,
    ) -> anyhow::Result<(ServiceEndpoint, Guard, BufReader<std::process::ChildStdout>)> {
        let mut child = self
            .ns('a')
            .command(&self.exe)
            .arg("--data-dir")
            .arg(&self.device)
            .args(["offload", "--service", SERVICE, "--cloudlet", &self.src_addr, "--hold", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut out = BufReader::new(child.stdout.take().context("the device's output")?);
        let guard = Guard(child);
        let mut line = String::new();
        out.read_line(&mut line)?;
        let held: forage_client::ProvisionReport =
            serde_json::from_str(&line).with_context(|| format!("the device printed {line:?}"))?;
        let endpoint = held.service;
        match &self.workload {
            Workload::Hashsearch => {
                self.ask('a', &endpoint, &format!("grow {}", args.working_mib))?;
                self.ask('a', &endpoint, &format!("churn {}", args.hot_kib))?;
            }
            Workload::App(_) => self.check('a', &endpoint, args)?,
        }
        std::thread::sleep(Duration::from_secs(2));
        Ok((endpoint, guard, out))
    }

    fn ask(&self, side: char, endpoint: &ServiceEndpoint, line: &str) -> anyhow::Result<String> {
        let (ep, line) = (endpoint.clone(), line.to_string());
        let what = line.clone();
        let answer = self
            .ns(side)
            .run(move || forage_client::service::request_line(&ep, &line, Duration::from_secs(120)))?
            .with_context(|| format!("asking the service at {} {what:?}", endpoint.addr))?;
        if !answer.starts_with("ok") {
            bail!("the service at {} answered {answer:?}", endpoint.addr);
        }
        Ok(answer)
    }

    /// The service answers at `endpoint`: with the whole working set (hashsearch), or
    /// its probe's right answer (an app).
    fn check(&self, side: char, endpoint: &ServiceEndpoint, args: &BenchHandoffArgs) -> anyhow::Result<()> {
        let (ep, l) = (endpoint.clone(), self.workload.check_line());
        let answer = self
            .ns(side)
            .run(move || forage_client::service::request_line(&ep, &l, Duration::from_secs(300)))?
            .with_context(|| format!("asking the service at {}", endpoint.addr))?;
        if !self.workload.answer_ok(args, &answer) {
            bail!("the service at {} answered {answer:?}", endpoint.addr);
        }
        Ok(())
    }

    fn forage_run(&self, mode: Option<&str>, args: &BenchHandoffArgs, link: &Link) -> anyhow::Result<HandoffReport> {
        let (endpoint, mut device, _out) = self.instance(args)?;
        let mut argv = vec![
            "handoff".to_string(),
            endpoint.addr.clone(),
            "--to".into(),
            self.dst_addr.clone(),
            "--api".into(),
            format!("127.0.0.1:{API}"),
            "--json".into(),
        ];
        if let Some(m) = mode {
            argv.extend(["--mode".into(), m.to_string()]);
        }
        let shaping = self.shape(link)?;
        let out = self.ns('a').command(&self.exe).arg("--data-dir").arg(&self.src).args(&argv).output()?;
        drop(shaping);
        if !out.status.success() {
            bail!("forage handoff ({}): {}", mode.unwrap_or("adaptive"), String::from_utf8_lossy(&out.stderr).trim());
        }
        let report: HandoffReport = serde_json::from_slice(&out.stdout).context("forage handoff's report")?;
        // The device keeps its token; the relay and its CA are the destination's.
        let at = ServiceEndpoint {
            addr: report.endpoint.clone(),
            token: endpoint.token.clone(),
            ca_sha256: report.ca_sha256.clone(),
        };
        // From the device's side of the link, as its client would.
        self.check('a', &at, args)?;
        let _ = device.0.wait();
        self.stop_all('b')?;
        Ok(report)
    }

    /// Stop every instance of one side's cloudlet (its API, with its token).
    fn stop_all(&self, side: char) -> anyhow::Result<()> {
        let dir = if side == 'a' { &self.src } else { &self.dst };
        let token = forage_api::token::read(&dir.join("trust").join("api-token"))?;
        self.ns(side).run(move || -> anyhow::Result<()> {
            let api = ApiClient::new(([127, 0, 0, 1], API).into(), &token);
            for i in api.instances(false)?.instances {
                let _ = api.stop(&i.id);
            }
            Ok(())
        })??;
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    }

    /// QEMU's own live migration of an instance over the link, to a QEMU holding the
    /// base disk or (`copy_storage`) to one with an empty disk that QEMU fills itself.
    fn qemu_run(&self, args: &BenchHandoffArgs, copy_storage: bool, link: &Link) -> anyhow::Result<Run> {
        let (endpoint, device, _out) = self.instance(args)?;
        let src_data = DataDir::at(self.src.clone());
        let token = forage_api::token::read(&self.src.join("trust").join("api-token"))?;
        let ep = endpoint.addr.clone();
        let id = self.ns('a').run(move || ApiClient::new(([127, 0, 0, 1], API).into(), &token).instance_at(&ep))??;
        let ctl = src_data.runtime_dir()?.join(format!("session-{id}.ctl"));
        let run = self.dst.join("qemu-live");
        let _ = std::fs::remove_dir_all(&run);
        std::fs::create_dir_all(&run)?;
        let rt = tokio::runtime::Handle::current();
        let shaping = self.shape(link)?;
        let result = rt.block_on(qemu_migrate(
            &self.dst,
            &run,
            &ctl,
            self.accel,
            &self.ns('b'),
            args,
            copy_storage,
            &self.workload,
        ));
        drop(shaping);
        drop(device); // the source instance ends with its device
        let _ = std::fs::remove_dir_all(&run);
        result
    }
}
