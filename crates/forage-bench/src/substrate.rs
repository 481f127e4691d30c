//! `forage bench substrate`: VM substrates (#18) measured side by side with their peers in
//! the same run: activation to the first response against a cold boot and against today's
//! cached-VM resume (a saved VM restored from its snapshot); dock time; compressed size and
//! the density it allows; multicast to 4 hosts against 1 and against sequential unicast
//! (network namespaces on one bridge).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use forage_agent::AgentClient;
use forage_datadir::DataDir;
use forage_image::{GuestImage, RunPaths};
use forage_substrate::{ActivateRequest, DockRequest, DockSource, Pool};
use serde::Serialize;

use crate::cli::BenchSubstrateArgs;

#[derive(Debug, Serialize)]
struct Row {
    metric: String,
    value: f64,
    unit: &'static str,
    /// Against what, and the ratio value / peer.
    peer: Option<(String, f64)>,
    target: String,
    met: Option<bool>,
}

fn row(
    metric: &str,
    value: f64,
    unit: &'static str,
    peer: Option<(&str, f64)>,
    target: &str,
    met: Option<bool>,
) -> Row {
    Row { metric: metric.into(), value, unit, peer: peer.map(|(n, v)| (n.into(), v)), target: target.into(), met }
}

async fn first_response(port: u16) -> anyhow::Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    tokio::task::spawn_blocking(move || AgentClient::connect(addr, Duration::from_secs(120)).map(|_| ())).await??;
    Ok(())
}

fn run_paths(data: &DataDir, name: &str) -> anyhow::Result<RunPaths> {
    let dir = data.work().join("bench-substrate").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(RunPaths { dir, qmp_socket: data.runtime_dir()?.join(format!("bsub-{name}.qmp")) })
}

pub async fn run(data: &DataDir, a: BenchSubstrateArgs) -> anyhow::Result<()> {
    crate::common::ensure_image(data, &a.image, a.json)?;
    let image = GuestImage::open(data, &a.image)?;
    let accel = crate::common::accel();
    let say = |s: &str| {
        if !a.json {
            eprintln!("{s}");
        }
    };
    let mem = std::path::PathBuf::from(format!("/dev/shm/forage-bench-substrates-{}", std::process::id()));
    let root = data.work().join("bench-substrate").join("pool");
    let _ = std::fs::remove_dir_all(&root);
    let pool = Pool::at(root.clone(), mem.clone())?;
    let result = measure(data, &a, &image, accel, &pool, &say).await;
    let _ = std::fs::remove_dir_all(&mem);
    let _ = std::fs::remove_dir_all(data.work().join("bench-substrate"));
    let rows = result?;
    if a.json {
        crate::common::print_json(&rows);
        return Ok(());
    }
    println!("| metric | forage | peer (ratio) | target | |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        let peer = r.peer.as_ref().map(|(n, v)| format!("{n} {v:.3} {} ({:.2}x)", r.unit, r.value / v));
        let met = match r.met {
            Some(true) => "met",
            Some(false) => "missed",
            None => "",
        };
        println!("| {} | {:.3} {} | {} | {} | {met} |", r.metric, r.value, r.unit, peer.unwrap_or_default(), r.target);
    }
    Ok(())
}

async fn measure(
    data: &DataDir,
    a: &BenchSubstrateArgs,
    image: &GuestImage,
    accel: forage_vm::Accel,
    pool: &Pool,
    say: &dyn Fn(&str),
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    // Cold boot to the first response, then today's cached VM: save it, restore it.
    say("cold boot ...");
    let run = run_paths(data, "cold")?;
    let t = Instant::now();
    let g = image.boot("bench-cold", &run, &[], accel, Duration::from_secs(a.ready_timeout_s)).await?;
    first_response(g.agent_port).await?;
    let cold = t.elapsed().as_secs_f64();
    let snap = g.vm.save(&run.dir.join("snapshot")).await?;
    say("cached-VM resume ...");
    let run2 = run_paths(data, "cached")?;
    let t = Instant::now();
    let vm = forage_image::vms::restore_fresh(&snap, "bench-cached", &run2, accel).await?;
    let port = vm.spec().nic.as_ref().and_then(|n| n.forwards.first()).map(|f| f.host_port).unwrap_or(0);
    first_response(port).await?;
    let cached = t.elapsed().as_secs_f64();
    vm.shutdown().await?;

    say("dock ...");
    let cores = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    let req = DockRequest {
        name: "bench".into(),
        image: image.clone(),
        source: DockSource::Boot { app: None, max_vcpus: cores, max_memory_mib: image.manifest().memory_mib },
        public: false,
        detach_nic: false,
        zstd_level: forage_substrate::format::DEFAULT_LEVEL,
        accel,
        ready_timeout: Duration::from_secs(a.ready_timeout_s),
    };
    let d = forage_substrate::dock(data, pool, req).await?;
    // The first activation verifies and decodes the substrate (once per substrate); the
    // next ones copy its memory and device state from the decoded folder.
    let mut activations = Vec::new();
    for i in 0..2 {
        say("activate ...");
        let req = ActivateRequest {
            substrate: "bench".into(),
            vcpus: cores,
            memory_mib: image.manifest().memory_mib,
            accel,
            run: run_paths(data, &format!("activated{i}"))?,
            vm_name: format!("bench-substrate-{i}"),
            detached: false,
        };
        let act = forage_substrate::activate(data, pool, req).await?;
        act.vm.shutdown().await?;
        activations.push(act.report);
    }
    let act = &activations[1];
    let activation = act.first_response_seconds;
    let budget = 8u64 << 30;
    let fit = budget / d.compressed_bytes.max(1);
    let mib = |b: u64| b as f64 / 1048576.0;
    // The targets: 0.3 s for a tiny guest, 1 s for Debian; dock and size for Debian.
    let img = image.manifest().name.clone();
    let debian = img.starts_with("debian");
    let limit = if debian { 1.0 } else { 0.3 };
    let first = format!("activation -> first response ({img})");
    rows.push(row(
        &first,
        activation,
        "s",
        Some(("cold boot", cold)),
        &format!("<= {limit} s"),
        Some(activation <= limit),
    ));
    rows.push(row(&first, activation, "s", Some(("cached-VM resume", cached)), "", None));
    rows.push(row(
        "first activation (verifies and decodes the substrate)",
        activations[0].first_response_seconds,
        "s",
        None,
        "",
        None,
    ));
    let a0 = &activations[0];
    rows.push(row(
        "  of which manifest / verify+decode / restore",
        a0.manifest_seconds + a0.decode_seconds + a0.restore_seconds,
        "s",
        None,
        &format!("{:.3} / {:.3} / {:.3}", a0.manifest_seconds, a0.decode_seconds, a0.restore_seconds),
        None,
    ));
    rows.push(row(
        &format!("activation grown to {} vCPUs, {} MiB", cores, image.manifest().memory_mib),
        act.total_seconds,
        "s",
        None,
        &format!("guest sees {} vCPUs, MemTotal {} MiB", act.guest_vcpus, act.guest_mem_total_bytes >> 20),
        None,
    ));
    rows.push(row(
        "  of which manifest / copy from the decoded folder / restore",
        act.manifest_seconds + act.decode_seconds + act.restore_seconds,
        "s",
        None,
        &format!("{:.3} / {:.3} / {:.3}", act.manifest_seconds, act.decode_seconds, act.restore_seconds),
        None,
    ));
    rows.push(row(
        &format!("dock ({} MiB {img} VM)", d.memory_bytes >> 20),
        d.dock_seconds,
        "s",
        None,
        if debian { "<= 1 s (1 GiB Debian)" } else { "<= 1 s for 1 GiB Debian (--image debian-12)" },
        debian.then_some(d.dock_seconds <= 1.0),
    ));
    rows.push(row(
        "  of which shrink / save / encode",
        d.dock_seconds,
        "s",
        None,
        &format!("{:.3} / {:.3} / {:.3}", d.shrink_seconds, d.save_seconds, d.encode_seconds),
        None,
    ));
    rows.push(row(
        "substrate compressed",
        mib(d.compressed_bytes),
        "MiB",
        Some(("raw", mib(d.raw_bytes))),
        if debian { "<= 16 MiB" } else { "<= 16 MiB for Debian (--image debian-12)" },
        debian.then_some(d.compressed_bytes <= 16 << 20),
    ));
    rows.push(row("substrates in 8 GiB (computed from its size)", fit as f64, "", None, ">= 200", Some(fit >= 200)));
    // The same VM docked at zstd's highest level (`dock --level 19`): smaller, slower.
    say("dock at zstd level 19 ...");
    let small = DockRequest {
        name: "bench-small".into(),
        image: image.clone(),
        source: DockSource::Boot { app: None, max_vcpus: cores, max_memory_mib: image.manifest().memory_mib },
        public: false,
        detach_nic: false,
        zstd_level: 19,
        accel,
        ready_timeout: Duration::from_secs(a.ready_timeout_s),
    };
    let d19 = forage_substrate::dock(data, pool, small).await?;
    rows.push(row(
        "substrate compressed, dock --level 19",
        mib(d19.compressed_bytes),
        "MiB",
        Some(("level 3", mib(d.compressed_bytes))),
        &format!(
            "{}; encode {:.1} s against {:.1} s",
            if debian { "<= 16 MiB" } else { "<= 16 MiB for Debian (--image debian-12)" },
            d19.encode_seconds,
            d.encode_seconds
        ),
        debian.then_some(d19.compressed_bytes <= 16 << 20),
    ));
    let fit19 = budget / d19.compressed_bytes.max(1);
    rows.push(row("substrates in 8 GiB at level 19", fit19 as f64, "", None, ">= 200", Some(fit19 >= 200)));
    if !a.no_multicast {
        say("multicast ...");
        let (one, four, unicast) = multicast(data, pool).await?;
        rows.push(row("multicast to 4 hosts", four, "s", Some(("to 1 host", one)), "<= 1.3x", Some(four <= 1.3 * one)));
        rows.push(row("multicast to 4 hosts", four, "s", Some(("sequential unicast to 4", unicast)), "", None));
    }
    Ok(rows)
}

/// Push the bench substrate to 1 and 4 hosts by multicast and to 4 by unicast in turn;
/// seconds of each.
async fn multicast(data: &DataDir, pool: &Pool) -> anyhow::Result<(f64, f64, f64)> {
    let lan = forage_testkit::lan::Lan::create(5).context("network namespaces on a bridge (needs root)")?;
    let forage = crate::common::forage_exe()?;
    let file = pool.entry("bench")?.path;
    let tmp = data.work().join("bench-substrate").join("hosts");
    let host_data = |i: usize| tmp.join(format!("h{i}"));
    let sender = DataDir::at(host_data(0));
    let spool = Pool::open(&sender)?;
    let staged = spool.staging("bench")?;
    std::fs::copy(&file, &staged)?;
    spool.insert("bench", &staged)?;
    let round = |receivers: &[usize], unicast: bool| -> anyhow::Result<f64> {
        let mut children = Vec::new();
        for &i in receivers {
            let d = DataDir::at(host_data(i));
            if let Ok(p) = Pool::open(&d) {
                let _ = p.remove("bench");
            }
            let h = &lan.hosts[i];
            children.push(
                h.command(&forage)
                    .arg("--data-dir")
                    .arg(d.root())
                    .args(["substrate", "receive", "--interface", &h.device, "--wait", "120", "--json"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()?,
            );
        }
        std::thread::sleep(Duration::from_millis(300));
        let h0 = &lan.hosts[0];
        let mut push = h0.command(&forage);
        push.arg("--data-dir").arg(sender.root()).args([
            "substrate",
            "push",
            "bench",
            "--receivers",
            &receivers.len().to_string(),
            "--interface",
            &h0.device,
        ]);
        if unicast {
            push.arg("--unicast");
        }
        push.arg("--json");
        let out = push.output()?;
        anyhow::ensure!(out.status.success(), "push: {}", String::from_utf8_lossy(&out.stderr));
        for c in children {
            let o = c.wait_with_output()?;
            anyhow::ensure!(o.status.success(), "receiver: {}", String::from_utf8_lossy(&o.stderr));
        }
        // udp-sender's own time: from the receivers' joining to the last acknowledged
        // slice (the receivers' verification afterwards is not the transfer).
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        report["seconds"].as_f64().context("push report without seconds")
    };
    let one = round(&[1], false)?;
    let four = round(&[1, 2, 3, 4], false)?;
    let mut unicast = 0.0;
    for i in 1..5 {
        unicast += round(&[i], true)?;
    }
    for i in 0..5 {
        if let Ok(p) = Pool::open(&DataDir::at(host_data(i))) {
            let _ = std::fs::remove_dir_all(p.memory_dir());
        }
    }
    let _ = std::fs::remove_dir_all(Path::new(&tmp));
    Ok((one, four, unicast))
}
