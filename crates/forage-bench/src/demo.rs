//! `forage demo` (`forage-bench demo`): the quickstart.
//!
//! Part 1, the VM lifecycle: builds (or reuses) the tiny guest, boots it, installs the
//! sample service through the guest agent, asks it for a result, saves the VM (memory
//! file + device state), kills QEMU, restores into a new QEMU, and shows that the guest
//! carried on: the service's request counter and the serial heartbeat continue.
//!
//! Part 2, a cloudlet: creates (or reuses) a base VM and the sample app's overlay, starts
//! a cloudlet on loopback, synthesizes the overlay on it as a device would, and prints the
//! first response with its breakdown.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use forage_agent::app::AppPackage;
use forage_datadir::DataDir;
use forage_image::vms::VmPaths;
use forage_synth::build::{BlobOrder, OverlayRequest};
use forage_synth::create::CreateOptions;
use serde::Serialize;

use crate::cli::DemoArgs;
use crate::common::{accel as choose_accel, ensure_image, print_json};

/// What part 1 measured (`--json`).
#[derive(Debug, Serialize)]
struct LifecycleReport {
    accel: forage_vm::Accel,
    boot_s: f64,
    install_s: f64,
    first_response_s: f64,
    save_s: f64,
    restore_s: f64,
    restored_response_s: f64,
    served_before: u64,
    served_after: u64,
    last_tick_before: u64,
    first_tick_after: u64,
    state_survived: bool,
    state_bytes: u64,
}

const VM_NAME: &str = "demo";

pub async fn run(data: &DataDir, args: DemoArgs) -> anyhow::Result<()> {
    let say = |s: String| {
        if !args.json {
            println!("{s}");
        }
    };
    let image = {
        let data = data.clone();
        let json = args.json;
        tokio::task::spawn_blocking(move || ensure_image(&data, forage_image::TINY, json)).await??.image
    };
    let app_dir = match &args.app {
        Some(d) => d.clone(),
        None => forage_image::locate_guest_binary("apps/hashsearch")?,
    };
    let app = AppPackage::open(&app_dir)?;
    let paths = VmPaths::new(data, VM_NAME)?;
    let _ = std::fs::remove_dir_all(&paths.dir);
    let accel = choose_accel();

    // 1. Boot.
    let ready = image
        .boot(VM_NAME, &paths.run, &[app.manifest().port], accel, Duration::from_secs(args.wait.ready_timeout_s))
        .await
        .context("booting the demo VM")?;
    say(format!(
        "1. booted the tiny guest ({accel}) in {:.2} s: ready marker on its serial console",
        ready.boot_time.as_secs_f64()
    ));

    // 2. Install the service and use it.
    let t = Instant::now();
    let (agent, package, d) = (SocketAddr::from((Ipv4Addr::LOCALHOST, ready.agent_port)), app.clone(), data.clone());
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut agent = forage_agent::AgentClient::connect(agent, Duration::from_secs(60))?;
        forage_image::app_debs::install_app(&d, &mut agent, &package)?;
        Ok(())
    })
    .await??;
    let install_s = t.elapsed().as_secs_f64();
    let service = SocketAddr::from((Ipv4Addr::LOCALHOST, ready.ports[0]));
    let t = Instant::now();
    let first = blocking_request(service, "search forage-demo 16").await?;
    let first_response_s = t.elapsed().as_secs_f64();
    say(format!("2. installed {} through the guest agent in {install_s:.2} s; first answer in {first_response_s:.2} s:\n   {first}", app.manifest().name));
    let served_before: u64 = field(&first, "served").unwrap_or("0").parse()?;

    // 3. Let the heartbeat tick, then save.
    let serial = ready.vm.spec().serial_log.clone();
    wait_for_tick(&serial, 3, Duration::from_secs(60)).await?;
    let vm = ready.vm;
    let t = Instant::now();
    let snap = vm.save(&paths.snapshot).await.context("saving the demo VM")?;
    let save_s = t.elapsed().as_secs_f64();
    let last_tick_before = last_tick(&serial).context("no heartbeat before the save")?;
    let m = snap.manifest();
    let in_use = forage_vm::sparse::allocated_bytes(&snap.memory_path()).unwrap_or(0);
    say(format!(
        "3. VM {VM_NAME} saved in {save_s:.2} s to {}: memory {} MiB ({} MiB in use, rest holes), device state {} KiB\n   QEMU has exited; the guest's last heartbeat was forage-tick {last_tick_before}",
        snap.dir().display(),
        m.memory.size >> 20,
        in_use >> 20,
        m.state.size >> 10
    ));
    drop(vm);

    // 4. Restore into a new QEMU.
    let t = Instant::now();
    let vm = forage_image::vms::restore_fresh(&snap, VM_NAME, &paths.run, accel).await?;
    let restore_s = t.elapsed().as_secs_f64();
    let ports = vm.spec().nic.as_ref().map(|n| n.forwards.clone()).unwrap_or_default();
    let new_service = ports
        .iter()
        .find(|f| f.guest_port == app.manifest().port)
        .map(|f| SocketAddr::from((Ipv4Addr::LOCALHOST, f.host_port)))
        .context("restored VM has no service port")?;
    let t = Instant::now();
    let again = blocking_request(new_service, "search forage-demo-2 16").await?;
    let restored_response_s = t.elapsed().as_secs_f64();
    let served_after: u64 = field(&again, "served").unwrap_or("0").parse()?;
    let first_tick_after = wait_for_tick(&vm.spec().serial_log, 1, Duration::from_secs(60)).await?;
    say(format!(
        "4. restored into a new QEMU (pid {}) in {restore_s:.2} s; service answered in {restored_response_s:.2} s:\n   {again}",
        vm.pid()
    ));

    // 5. Proof.
    let counter_ok = served_after == served_before + 1;
    let tick_ok = first_tick_after > last_tick_before && first_tick_after <= last_tick_before + 2;
    vm.shutdown().await?;
    if args.json {
        print_json(&LifecycleReport {
            accel,
            boot_s: ready.boot_time.as_secs_f64(),
            install_s,
            first_response_s,
            save_s,
            restore_s,
            restored_response_s,
            served_before,
            served_after,
            last_tick_before,
            first_tick_after,
            state_survived: counter_ok && tick_ok,
            state_bytes: snap.manifest().state.size,
        });
    } else {
        println!("5. state survived: service counter {served_before} -> {served_after}, heartbeat forage-tick {last_tick_before} -> {first_tick_after} (a fresh boot would restart both at 1)");
        println!("\n   boot {:.2} s | save {save_s:.2} s | restore {restore_s:.2} s | first response after restore {restored_response_s:.2} s", ready.boot_time.as_secs_f64());
    }
    if !(counter_ok && tick_ok) {
        bail!("the restored guest did not carry on: counter {served_before} -> {served_after}, tick {last_tick_before} -> {first_tick_after}");
    }
    cloudlet_part(data, &image, &app, accel, args.json).await
}

/// Part 2: base, overlay, cloudlet, synthesis, first response.
async fn cloudlet_part(
    data: &DataDir,
    image: &forage_image::GuestImage,
    app: &AppPackage,
    accel: forage_vm::Accel,
    json: bool,
) -> anyhow::Result<()> {
    use forage_synth::BaseVm;
    let say = |s: String| {
        if !json {
            println!("{s}");
        }
    };
    say(String::new());
    let base = match BaseVm::open(data, "demo-base") {
        Ok(b) => b,
        Err(_) => {
            let t = Instant::now();
            let b = BaseVm::create(data, "demo-base", image, accel, Duration::from_secs(3)).await?;
            say(format!(
                "6. base VM demo-base created in {:.1} s (digest {})",
                t.elapsed().as_secs_f64(),
                forage_synth::package::short(b.digest())
            ));
            b
        }
    };
    let ovl = data.root().join("overlays").join(format!("{}.ovl", app.manifest().name));
    let current = std::fs::File::open(&ovl)
        .ok()
        .and_then(|f| forage_format::OverlayReader::open(std::io::BufReader::new(f)).ok())
        .is_some_and(|r| r.manifest().base.digest == base.digest());
    if !current {
        std::fs::create_dir_all(ovl.parent().expect("has a parent"))?;
        let t = Instant::now();
        let request = OverlayRequest {
            base: "demo-base".into(),
            app: app_dir(app)?,
            options: CreateOptions::default(),
            order: BlobOrder::Access,
            output: ovl.clone(),
            packages: false,
        };
        forage_synth::build::build_overlay(data, &request, &|_| {}).await?;
        say(format!(
            "7. overlay of {} created in {:.1} s: {} KiB",
            app.manifest().name,
            t.elapsed().as_secs_f64(),
            std::fs::metadata(&ovl)?.len() >> 10
        ));
    }
    let cloudlet = std::sync::Arc::new(forage_cloudlet::Cloudlet::open(
        "demo-cloudlet".into(),
        data.clone(),
        accel,
        Ipv4Addr::LOCALHOST,
    )?);
    // Start from an empty launch-VM cache so that the first synthesis shows early start.
    let digest = forage_client::OverlayFile::open(&ovl).await?.digest;
    cloudlet.cache.evict(&digest);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(forage_cloudlet::serve(listener, cloudlet.clone()));
    // Pairing, done here for the user on loopback: the cloudlet shows a one-time code, the
    // device types it; every connection after that is TLS 1.3 with both sides' certificates.
    // A name is held by one credential at a time: an earlier run's demo device goes first.
    if cloudlet.trust.issued().iter().any(|i| i.name == "demo-device" && i.revoked_unix.is_none()) {
        cloudlet.trust.revoke("demo-device")?;
    }
    let code = cloudlet.trust.new_code(forage_trust::Grant::default())?;
    let devices = forage_trust::DeviceTrust::new(&data.trust_peers());
    let peer =
        forage_client::pair(addr, &code.text, "demo-device", &devices).await.context("pairing the demo device")?;
    say(format!("8. cloudlet demo-cloudlet listening on {addr} (TLS 1.3, mutual authentication), holding base demo-base; the device paired with code {} (credentials until {}) and synthesizes {} with early start:", code.text, forage_trust::date(peer.not_after_unix), ovl.display()));
    let credentials = Some(devices.credentials(addr, Some(&peer.cloudlet))?);
    let mut reports = Vec::new();
    let opts = forage_client::SynthesisOptions {
        device: "demo-device".into(),
        early_start: true,
        credentials,
        ..Default::default()
    };
    let (report, session) =
        forage_client::synthesize(&ovl, addr, &opts).await.context("synthesizing the demo overlay")?;
    say(report.to_string());
    reports.push(report);
    session.close().await;
    // The cloudlet keeps the launch VM: a second synthesis starts from its cache.
    let t = Instant::now();
    while cloudlet.cache.lookup(&digest).is_none() && t.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    say("9. the same overlay again: the cloudlet has its launch VM cached".into());
    let (report, session) =
        forage_client::synthesize(&ovl, addr, &opts).await.context("synthesizing from the cache")?;
    say(report.to_string());
    reports.push(report);
    session.close().await;
    if json {
        print_json(&reports);
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // let the cloudlet stop the instance
    server.abort();
    Ok(())
}

fn app_dir(app: &AppPackage) -> anyhow::Result<std::path::PathBuf> {
    Ok(forage_image::locate_guest_binary(&format!("apps/{}", app.manifest().name))?)
}

/// One request line to the service at `addr`, retried while the guest's service comes up.
async fn blocking_request(addr: SocketAddr, line: &'static str) -> anyhow::Result<String> {
    let answer = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        loop {
            match forage_agent::app::request_line(addr, line, Duration::from_secs(120)) {
                Ok(a) => return Ok(a),
                Err(e) if t.elapsed() > Duration::from_secs(60) => {
                    return Err(anyhow::Error::new(e).context(format!("service at {addr} did not answer")))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    })
    .await??;
    if !answer.starts_with("ok") {
        bail!("service at {addr} answered: {answer}");
    }
    Ok(answer)
}

/// The value of `key=` in an answer like `ok nonce=1 served=2`.
fn field<'a>(answer: &'a str, key: &str) -> Option<&'a str> {
    answer.split_whitespace().find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// The highest `forage-tick N` on the serial console.
fn last_tick(serial: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(serial).ok()?;
    text.lines().filter_map(|l| l.trim().strip_prefix("forage-tick ")?.parse().ok()).max()
}

/// Wait until the heartbeat reaches at least `n`; returns the first tick seen.
async fn wait_for_tick(serial: &Path, n: u64, wait: Duration) -> anyhow::Result<u64> {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(serial).unwrap_or_default();
        let ticks: Vec<u64> =
            text.lines().filter_map(|l| l.trim().strip_prefix("forage-tick ")?.parse().ok()).collect();
        if ticks.len() as u64 >= n {
            return Ok(ticks[0]);
        }
        if start.elapsed() > wait {
            bail!("no heartbeat on {} after {wait:?}", serial.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
