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
//!   link, to a QEMU that holds the base disk (started with `-incoming`; the bench app
//!   writes nothing to disk, so no disk needs to move - forage's disk chunks are reported).
//!
//! Each run checks the service at its new place (request count and working set).
//! Downtime: for forage, from the VM's stop at the source to the destination's
//! acknowledged resume; for QEMU, the downtime QEMU itself reports.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use forage_api::client::ApiClient;
use forage_api::HandoffReport;
use forage_client::ServiceEndpoint;
use forage_datadir::DataDir;
use forage_testkit::wan::{Netns, WanLink};
use serde::{Deserialize, Serialize};

use crate::cli::BenchHandoffArgs;
use crate::common::{bench_base, forage_exe, print_json};
use crate::synthesis::{wait_for_line, Guard};

const SERVICE: &str = "bench-handoff";
const PORT: u16 = 7878;
const API: u16 = 7879;
/// Where QEMU's live migration enters the destination namespace.
const MIGRATION_PORT: u16 = 7900;

/// One approach at one rate: a row of the table and of `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct HandoffRow {
    pub approach: String,
    pub mbps: f64,
    pub total_s: f64,
    pub downtime_s: f64,
    pub bytes: u64,
    /// Memory and disk that differ from the base (forage's measure, the same workload).
    pub modified_bytes: u64,
    pub mode: String,
    pub switches: Vec<String>,
    pub qemu_rounds: u64,
    pub disk_chunks: Option<u64>,
}

/// What one run measured, forage's or QEMU's.
#[derive(Debug, Clone)]
struct Run {
    total_s: f64,
    downtime_s: f64,
    bytes: u64,
    mode: String,
    switches: Vec<String>,
    qemu_rounds: u64,
    disk_chunks: Option<u64>,
}

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
        }
    }
}

/// What QEMU's `query-migrate` says of a completed migration (the fields the bench uses).
#[derive(Debug, Deserialize)]
struct MigrationInfo {
    status: String,
    #[serde(default)]
    downtime: Option<u64>,
    #[serde(default)]
    ram: Option<MigrationRam>,
    #[serde(rename = "error-desc", default)]
    error_desc: Option<String>,
}

#[derive(Debug, Deserialize)]
struct MigrationRam {
    transferred: u64,
    #[serde(rename = "dirty-sync-count")]
    dirty_sync_count: u64,
}

pub async fn run(data: &DataDir, args: BenchHandoffArgs) -> anyhow::Result<()> {
    let say = |s: &str| {
        if !args.json {
            eprintln!("{s}");
        }
    };
    if args.mbps.is_empty() {
        bail!("give at least one --mbps");
    }
    let base = bench_base(data, &args.base, forage_image::TINY, &say).await?;
    let work = data.work().join(format!("bench-handoff-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let out_dir = args.out.clone().unwrap_or_else(|| data.root().join("bench").join("handoff"));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("{}", out_dir.display()))?;
    let result = async {
        say(&format!("service VM {SERVICE} (hashsearch on base {}) for both cloudlets ...", base.manifest().name));
        let rig = tokio::task::block_in_place(|| Rig::new(data, &work, &args))?;
        let mut rows = Vec::new();
        for &mbps in &args.mbps {
            rows.extend(tokio::task::block_in_place(|| rig.measure_rate(mbps, &args, &out_dir, &say))?);
        }
        if args.json {
            print_json(&rows);
        } else {
            print_table(&rows, &args);
        }
        Ok::<_, anyhow::Error>(())
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
    link: std::sync::Mutex<WanLink>,
    src: PathBuf,
    dst: PathBuf,
    device: PathBuf,
    src_addr: String,
    dst_addr: String,
    accel: forage_vm::Accel,
    _daemons: Vec<Guard>,
}

impl Rig {
    fn new(data: &DataDir, work: &Path, args: &BenchHandoffArgs) -> anyhow::Result<Self> {
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
        let app = forage_image::locate_guest_binary("apps/hashsearch")?;
        forage(data.root(), &["service", "create", SERVICE, "--base", &args.base, "--app", &app.to_string_lossy()])?;
        let pkg = work.join("service.fsvc");
        forage(data.root(), &["service", "export", SERVICE, "-o", &pkg.to_string_lossy()])?;
        let (src, dst, device) = (work.join("source"), work.join("destination"), work.join("device"));
        let image = data.images().join(forage_image::TINY);
        for dir in [&src, &dst] {
            std::fs::create_dir_all(dir.join("images"))?;
            let copied = Command::new("cp").arg("-r").arg(&image).arg(dir.join("images")).status()?;
            if !copied.success() {
                bail!("copying the guest image to {}", dir.display());
            }
            forage(dir, &["service", "import", &pkg.to_string_lossy(), "--id", SERVICE])?;
        }
        std::fs::create_dir_all(&device)?;
        let link = WanLink::create(args.mbps[0]).context("emulating the WAN link (needs root, iproute2 and tc)")?;
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
            link: std::sync::Mutex::new(link),
            src,
            dst,
            device,
            src_addr,
            dst_addr,
            accel,
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

    fn measure_rate(
        &self,
        mbps: f64,
        args: &BenchHandoffArgs,
        out_dir: &Path,
        say: &dyn Fn(&str),
    ) -> anyhow::Result<Vec<HandoffRow>> {
        self.link.lock().unwrap_or_else(|p| p.into_inner()).set_rate(mbps)?;
        say(&format!("at {mbps} Mbit/s:"));
        let adaptive_report = self.forage_run(None, args)?;
        let adaptive = Run::from(&adaptive_report);
        say(&format!("  forage adaptive: {}", summary(&adaptive)));
        let stem = out_dir.join(format!("handoff-trace-{mbps}mbps"));
        let csv = stem.with_extension("csv");
        let mut f = std::io::BufWriter::new(std::fs::File::create(&csv).with_context(|| format!("{}", csv.display()))?);
        forage_handoff::pipeline::write_trace_csv(&adaptive_report.trace, &mut f)
            .with_context(|| format!("{}", csv.display()))?;
        let svg = stem.with_extension("svg");
        crate::plot::plot(&svg, &adaptive_report, mbps)?;
        say(&format!("  trace: {} and {}", csv.display(), svg.display()));
        let mut statics = Vec::new();
        for mode in args.modes.split(',').map(str::trim).filter(|m| !m.is_empty()) {
            let r = Run::from(&self.forage_run(Some(mode), args)?);
            say(&format!("  forage static {mode}: {}", summary(&r)));
            statics.push(r);
        }
        let qemu = if args.no_qemu {
            None
        } else {
            let r = self.qemu_run(args)?;
            say(&format!("  qemu live migration: {}", summary(&r)));
            Some(r)
        };
        let modified = adaptive_report.modified_bytes;
        let mut rows = vec![row("forage-adaptive", mbps, &adaptive, modified)];
        let by_total = |a: &&Run, b: &&Run| a.total_s.total_cmp(&b.total_s);
        if let (Some(best), Some(worst)) = (statics.iter().min_by(by_total), statics.iter().max_by(by_total)) {
            rows.push(row("forage-static-best", mbps, best, modified));
            rows.push(row("forage-static-worst", mbps, worst, modified));
        }
        if let Some(q) = &qemu {
            rows.push(row("qemu-live-migration", mbps, q, modified));
        }
        Ok(rows)
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
        self.ask('a', &endpoint, &format!("grow {}", args.working_mib))?;
        self.ask('a', &endpoint, &format!("churn {}", args.hot_kib))?;
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

    /// The service answers at `endpoint` with the whole working set.
    fn check(&self, side: char, endpoint: &ServiceEndpoint, args: &BenchHandoffArgs) -> anyhow::Result<()> {
        let count = self.ask(side, endpoint, "count")?;
        if !count.contains(&format!("working={}", args.working_mib << 20)) {
            bail!("after the move the service says {count:?}");
        }
        Ok(())
    }

    fn forage_run(&self, mode: Option<&str>, args: &BenchHandoffArgs) -> anyhow::Result<HandoffReport> {
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
        let out = self.ns('a').command(&self.exe).arg("--data-dir").arg(&self.src).args(&argv).output()?;
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

    /// QEMU's own live migration of an instance to a QEMU holding the base, over the link.
    fn qemu_run(&self, args: &BenchHandoffArgs) -> anyhow::Result<Run> {
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
        let result = rt.block_on(qemu_migrate(&self.dst, &run, &ctl, self.accel, &self.ns('b'), args));
        drop(device); // the source instance ends with its device
        let _ = std::fs::remove_dir_all(&run);
        result
    }
}

/// Start the destination QEMU (the service VM's hardware, its base disk, fresh RAM),
/// relay the link's port to it, migrate the source over it, run the destination.
async fn qemu_migrate(
    dst: &Path,
    run: &Path,
    ctl: &Path,
    accel: forage_vm::Accel,
    ns_b: &Netns,
    args: &BenchHandoffArgs,
) -> anyhow::Result<Run> {
    use serde_json::json as j;
    let svc = forage_service::Repository::new(&DataDir::at(dst.to_path_buf())).open(SERVICE)?;
    let snap = svc.snapshot()?;
    let port = svc.manifest().port.context("the bench service has a port")?;
    let forwards = forage_image::loopback_forwards([port])?;
    let qmp_path = DataDir::at(dst.to_path_buf()).runtime_dir()?.join("bench-qemu-live.qmp");
    let mut spec = snap.relocated_spec(run, &qmp_path, Some(forwards.clone()));
    std::fs::File::create(&spec.memory_file)?.set_len(snap.manifest().memory.size)?;
    forage_vm::sparse::copy_sparse(&snap.disk_paths()[0], &spec.disks[0].path)?;
    spec.control_socket = None;
    let sock = run.join("incoming.sock");
    let vm = forage_vm::Vm::incoming(spec, accel, &run.join("qemu.log"), &format!("unix:{}", sock.display())).await?;
    // QEMU listens on a unix socket (not in a namespace); the relay listens on the
    // destination's address, in its namespace, and carries the stream to it.
    let addr = SocketAddr::from((ns_b.addr, MIGRATION_PORT));
    let listener = ns_b.run(move || std::net::TcpListener::bind(addr))??;
    let relay_sock = sock.clone();
    std::thread::spawn(move || {
        if let Ok((tcp, _)) = listener.accept() {
            if let Ok(unix) = std::os::unix::net::UnixStream::connect(&relay_sock) {
                let (mut r, mut w) = (tcp, unix);
                let _ = std::io::copy(&mut r, &mut w);
            }
        }
    });
    let src = forage_vm::qmp::Qmp::connect(ctl, Duration::from_secs(10)).await?;
    src.execute(
        "migrate-set-capabilities",
        Some(j!({ "capabilities": [{ "capability": "x-ignore-shared", "state": false }] })),
    )
    .await?;
    src.execute(
        "migrate-set-parameters",
        Some(j!({ "downtime-limit": args.downtime_ms, "max-bandwidth": 1u64 << 40 })),
    )
    .await?;
    let t0 = Instant::now();
    src.execute("migrate", Some(j!({ "uri": format!("tcp:{addr}") }))).await?;
    let info = loop {
        let v: MigrationInfo =
            serde_json::from_value(src.execute("query-migrate", None).await?).context("QEMU's query-migrate")?;
        match v.status.as_str() {
            "completed" => break v,
            "failed" | "cancelled" => bail!("QEMU's migration {}: {}", v.status, v.error_desc.unwrap_or_default()),
            _ => {}
        }
        if t0.elapsed() > Duration::from_secs(3600) {
            bail!("QEMU's migration did not finish in an hour");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    loop {
        if vm.status().await? != "inmigrate" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    vm.resume().await?;
    let total_s = t0.elapsed().as_secs_f64();
    let local = SocketAddr::from((forwards[0].host_addr, forwards[0].host_port));
    let count = forage_agent::app::request_line(local, "count", Duration::from_secs(120))?;
    let _ = vm.shutdown().await;
    if !count.contains(&format!("working={}", args.working_mib << 20)) {
        bail!("after QEMU's migration the service says {count:?}");
    }
    let ram = info.ram.context("QEMU's completed migration reports no RAM figures")?;
    Ok(Run {
        total_s,
        downtime_s: info.downtime.unwrap_or(0) as f64 / 1000.0,
        bytes: ram.transferred,
        mode: "qemu".into(),
        switches: Vec::new(),
        qemu_rounds: ram.dirty_sync_count,
        disk_chunks: None,
    })
}

fn row(approach: &str, mbps: f64, r: &Run, modified_bytes: u64) -> HandoffRow {
    HandoffRow {
        approach: approach.into(),
        mbps,
        total_s: r.total_s,
        downtime_s: r.downtime_s,
        bytes: r.bytes,
        modified_bytes,
        mode: r.mode.clone(),
        switches: r.switches.clone(),
        qemu_rounds: r.qemu_rounds,
        disk_chunks: r.disk_chunks,
    }
}

fn summary(r: &Run) -> String {
    format!(
        "total {:.1} s, downtime {:.2} s, {:.1} MiB sent, mode {}",
        r.total_s,
        r.downtime_s,
        r.bytes as f64 / (1 << 20) as f64,
        r.mode
    )
}

fn print_table(rows: &[HandoffRow], args: &BenchHandoffArgs) {
    println!(
        "VM handoff over an emulated WAN (tc tbf): hashsearch with a {} MiB working set, {} KiB of it rewritten every 100 ms; destination holds the base:",
        args.working_mib, args.hot_kib
    );
    println!(
        "  {:<22} {:>6} {:>9} {:>11} {:>12} {:>14}  mode",
        "approach", "Mbit/s", "total s", "downtime s", "bytes", "modified bytes"
    );
    for r in rows {
        println!(
            "  {:<22} {:>6} {:>9.1} {:>11.2} {:>12} {:>14}  {}",
            r.approach, r.mbps, r.total_s, r.downtime_s, r.bytes, r.modified_bytes, r.mode
        );
    }
    for &m in &args.mbps {
        let get = |a: &str| rows.iter().find(|r| r.approach == a && r.mbps == m);
        if let (Some(ad), Some(q)) = (get("forage-adaptive"), get("qemu-live-migration")) {
            println!(
                "  at {m} Mbit/s: forage {:.1}x faster than QEMU live migration (target >= 10x at 10 Mbit/s)",
                q.total_s / ad.total_s
            );
        }
        if let (Some(ad), Some(best)) = (get("forage-adaptive"), get("forage-static-best")) {
            println!(
                "  at {m} Mbit/s: adaptive {:+.0}% against the best static mode (target within 5%)",
                (ad.total_s / best.total_s - 1.0) * 100.0
            );
        }
        if let Some(r) = get("forage-adaptive").filter(|r| r.bytes > 0) {
            println!(
                "  at {m} Mbit/s: adaptive sent 1/{:.1} of the modified state (target <= 1/5)",
                r.modified_bytes as f64 / r.bytes as f64
            );
        }
    }
}
