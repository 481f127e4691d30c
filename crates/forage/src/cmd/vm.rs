//! `forage vm ...`: boot, save and restore VMs by hand.
//!
//! `boot` and `restore` supervise QEMU in the foreground (Ctrl-C stops the VM); `save`,
//! `pause`, `resume`, `stop` and `exec` act from another terminal through the VM's QMP
//! socket or agent. Each VM has a folder `DATA/vms/NAME/` with `vm.json` (spec, pid,
//! ports), `run/` (live memory file, disk, serial and QEMU logs) and `snapshot/` (its save).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use forage_agent::app::AppPackage;
use forage_agent::AgentClient;
use forage_datadir::DataDir;
use forage_image::{GuestImage, RunPaths};
use forage_vm::{Accel, Snapshot, Vm};
use serde_json::json;

use crate::cli::VmCommand;
use forage_image::vms::{AppForward, VmPaths, VmRecord};

/// Is `pid` a live QEMU?
pub fn qemu_alive(pid: Option<u32>) -> bool {
    let Some(pid) = pid else { return false };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z'));
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    !zombie && String::from_utf8_lossy(&cmd).contains("qemu-system")
}

fn state(paths: &VmPaths, r: &VmRecord) -> &'static str {
    if qemu_alive(r.pid) {
        "running"
    } else if paths.snapshot.join(forage_vm::snapshot::MANIFEST_FILE).exists() {
        "saved"
    } else {
        "stopped"
    }
}

pub async fn run(data: &DataDir, cmd: VmCommand) -> anyhow::Result<()> {
    match cmd {
        VmCommand::Boot { name, image, app, wait, json } => {
            boot(data, &name, &image, app.as_deref(), wait.ready_timeout_s, json).await
        }
        VmCommand::Save { name, force, json } => save(data, &name, force, json).await,
        VmCommand::Restore { name, from, base, json } => {
            restore(data, &name, from.as_deref(), base.as_deref(), json).await
        }
        VmCommand::Import { name, saved, disk, image, port, json } => {
            super::vm_import::import(data, &name, &saved, &disk, &image, port, json).await
        }
        VmCommand::Pause { name } => attached(data, &name).await?.pause().await.map_err(Into::into),
        VmCommand::Resume { name } => attached(data, &name).await?.resume().await.map_err(Into::into),
        VmCommand::Stop { name } => attached(data, &name).await?.shutdown().await.map_err(Into::into),
        VmCommand::Exec { name, timeout_s, command } => exec(data, &name, timeout_s, &command).await,
        VmCommand::List { json } => list(data, json),
        VmCommand::Rm { name } => rm(data, &name),
    }
}

async fn boot(
    data: &DataDir,
    name: &str,
    image: &str,
    app: Option<&Path>,
    ready_s: u64,
    json: bool,
) -> anyhow::Result<()> {
    let paths = VmPaths::new(data, name)?;
    if let Ok(r) = paths.load() {
        if qemu_alive(r.pid) {
            bail!("VM {name} is already running (pid {})", r.pid.unwrap_or(0));
        }
    }
    let image = GuestImage::open(data, image)?;
    let app = app.map(AppPackage::open).transpose()?;
    let guest_ports: Vec<u16> = app.iter().map(|a| a.manifest().port).collect();
    let _ = std::fs::remove_dir_all(&paths.run.dir);
    let accel = forage_vm::accel::choose();
    let ready = image
        .boot(name, &paths.run, &guest_ports, accel, Duration::from_secs(ready_s))
        .await
        .with_context(|| format!("booting VM {name}"))?;
    if !json {
        eprintln!("VM {name} ready in {:.1} s ({accel}, pid {})", ready.boot_time.as_secs_f64(), ready.vm.pid());
    }
    let app_fwd = match app {
        Some(app) => {
            let t = Instant::now();
            install(data, ready.agent_port, app.clone()).await?;
            if !json {
                eprintln!("app {} installed and started in {:.1} s", app.manifest().name, t.elapsed().as_secs_f64());
            }
            Some(AppForward {
                name: app.manifest().name.clone(),
                guest_port: app.manifest().port,
                host_port: ready.ports[0],
            })
        }
        None => None,
    };
    let record = VmRecord {
        name: name.to_string(),
        image: image.manifest().name.clone(),
        accel,
        pid: Some(ready.vm.pid()),
        spec: ready.vm.spec().clone(),
        agent_port: ready.agent_port,
        app: app_fwd,
    };
    paths.store(&record)?;
    announce(&record, ready.boot_time, json);
    supervise(ready.vm, name, &paths, json).await
}

/// Install an app through the guest agent at `agent_port`, its Debian packages first
/// (resolved and downloaded on this host, installed offline in the guest).
pub async fn install(data: &DataDir, agent_port: u16, app: AppPackage) -> anyhow::Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, agent_port));
    let data = data.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut agent = AgentClient::connect(addr, Duration::from_secs(60))?;
        if let Some(debs) = forage_image::app_debs::install_app(&data, &mut agent, &app)? {
            eprintln!("{debs}");
        }
        Ok(())
    })
    .await?
}

pub(crate) fn announce(r: &VmRecord, took: Duration, json: bool) {
    let service = r.app.as_ref().map(|a| format!("127.0.0.1:{}", a.host_port));
    if json {
        crate::output::print_json(&json!({
            "event": "running", "name": r.name, "pid": r.pid, "accel": r.accel,
            "seconds": took.as_secs_f64(), "agent": format!("127.0.0.1:{}", r.agent_port),
            "service": service, "serial_log": r.spec.serial_log,
        }));
    } else {
        println!("VM {} running (pid {}), agent 127.0.0.1:{}", r.name, r.pid.unwrap_or(0), r.agent_port);
        if let (Some(a), Some(s)) = (&r.app, service) {
            println!("service {} at {s}", a.name);
        }
        println!("serial console: {}", r.spec.serial_log.display());
        println!("save it from another terminal: forage vm save {}   (Ctrl-C here stops it)", r.name);
    }
}

/// Wait in the foreground until QEMU exits (e.g. after `forage vm save`) or we are told
/// to stop (Ctrl-C, SIGTERM), in which case the VM is stopped.
pub(crate) async fn supervise(vm: Vm, name: &str, paths: &VmPaths, json: bool) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let since = std::time::SystemTime::now();
    tokio::select! {
        status = vm.wait_exit() => {
            // A save writes the snapshot description just after QEMU exits.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let saved = std::fs::metadata(paths.snapshot.join(forage_vm::snapshot::MANIFEST_FILE))
                .and_then(|m| m.modified())
                .is_ok_and(|t| t >= since);
            if json {
                crate::output::print_json(&json!({"event": "exited", "name": name, "saved": saved}));
            } else if saved {
                println!("VM {name} was saved to {} and has exited", paths.snapshot.display());
            } else {
                println!("VM {name} exited ({}); QEMU said:\n{}", status.map(|s| s.to_string()).unwrap_or_default(), vm.qemu_log_tail(5));
            }
        }
        _ = tokio::signal::ctrl_c() => { vm.shutdown().await?; if !json { println!("VM {name} stopped"); } }
        _ = term.recv() => { vm.shutdown().await?; if !json { println!("VM {name} stopped"); } }
    }
    Ok(())
}

async fn attached(data: &DataDir, name: &str) -> anyhow::Result<Vm> {
    let paths = VmPaths::new(data, name)?;
    let r = paths.load()?;
    if !qemu_alive(r.pid) {
        bail!("VM {name} is not running ({})", state(&paths, &r));
    }
    Ok(Vm::attach(r.spec, r.accel, r.pid.unwrap_or(0), &paths.qemu_log()).await?)
}

async fn save(data: &DataDir, name: &str, force: bool, json: bool) -> anyhow::Result<()> {
    let paths = VmPaths::new(data, name)?;
    let vm = attached(data, name).await?;
    let had_save = paths.snapshot.join(forage_vm::snapshot::MANIFEST_FILE).exists();
    if had_save && !force {
        bail!("VM {name} already has a save at {}: pass --force to replace it", paths.snapshot.display());
    }
    // Save next to the old one and swap only when the new one is complete: a failed save
    // keeps both the running VM and the previous save.
    let fresh = paths.dir.join("snapshot.new");
    let _ = std::fs::remove_dir_all(&fresh);
    let t = Instant::now();
    vm.save(&fresh).await.with_context(|| format!("saving VM {name}"))?;
    if paths.snapshot.exists() {
        std::fs::remove_dir_all(&paths.snapshot).with_context(|| paths.snapshot.display().to_string())?;
    }
    std::fs::rename(&fresh, &paths.snapshot).with_context(|| paths.snapshot.display().to_string())?;
    let snap = Snapshot::open(&paths.snapshot)?;
    report_snapshot(name, &snap, t.elapsed(), json);
    Ok(())
}

pub fn report_snapshot(name: &str, snap: &Snapshot, took: Duration, json: bool) {
    let m = snap.manifest();
    let mem_alloc = forage_vm::sparse::allocated_bytes(&snap.memory_path()).unwrap_or(0);
    if json {
        crate::output::print_json(&json!({
            "event": "saved", "name": name, "dir": snap.dir(), "seconds": took.as_secs_f64(),
            "memory_bytes": m.memory.size, "memory_allocated_bytes": mem_alloc, "state_bytes": m.state.size,
        }));
    } else {
        println!(
            "VM {name} saved in {:.2} s to {}: memory {} MiB ({} MiB in use, rest holes), device state {} KiB",
            took.as_secs_f64(),
            snap.dir().display(),
            m.memory.size >> 20,
            mem_alloc >> 20,
            m.state.size >> 10
        );
    }
}

async fn restore(
    data: &DataDir,
    name: &str,
    from: Option<&Path>,
    base: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let paths = VmPaths::new(data, name)?;
    let base = base.map(|b| forage_synth::BaseVm::open(data, b)).transpose()?;
    let snap = match &base {
        Some(b) => b.snapshot().clone(),
        None => Snapshot::open(from.unwrap_or(&paths.snapshot))?,
    };
    let from = base.as_ref().map(|b| b.snapshot().dir()).or(from);
    let mut record = match (paths.load(), from) {
        (Ok(r), _) => r,
        (Err(_), Some(_)) => {
            // A VM new to this data directory: describe it from the snapshot.
            std::fs::create_dir_all(&paths.dir).with_context(|| paths.dir.display().to_string())?;
            let spec = snap.manifest().spec.clone();
            let app = spec
                .nic
                .as_ref()
                .and_then(|n| n.forwards.iter().find(|f| f.guest_port != forage_agent::AGENT_PORT))
                .map(|f| AppForward { name: "service".into(), guest_port: f.guest_port, host_port: 0 });
            VmRecord {
                name: name.to_string(),
                image: "snapshot".into(),
                accel: snap.manifest().accel,
                pid: None,
                spec,
                agent_port: 0,
                app,
            }
        }
        (Err(e), None) => return Err(e.into()),
    };
    if qemu_alive(record.pid) {
        bail!("VM {name} is running (pid {}); save or stop it first", record.pid.unwrap_or(0));
    }
    let t = Instant::now();
    let accel = forage_vm::accel::choose();
    let vm = match &base {
        Some(b) => {
            record.image = format!("base:{}", b.manifest().name);
            forage_image::vms::restore_layered(&snap, name, &paths.run, accel, &b.disk_path()).await?
        }
        None => restore_snapshot(&snap, name, &paths.run, accel).await?,
    };
    let took = t.elapsed();
    // New host ports, same guest ports.
    let fwd = vm.spec().nic.as_ref().map(|n| n.forwards.clone()).unwrap_or_default();
    let host_port = |guest: u16| fwd.iter().find(|f| f.guest_port == guest).map(|f| f.host_port);
    record.agent_port = host_port(forage_agent::AGENT_PORT).unwrap_or(0);
    if let Some(app) = record.app.as_mut() {
        app.host_port = host_port(app.guest_port).unwrap_or(0);
    }
    record.pid = Some(vm.pid());
    record.spec = vm.spec().clone();
    paths.store(&record)?;
    if !json {
        eprintln!("VM {name} restored in {:.2} s", took.as_secs_f64());
    }
    announce(&record, took, json);
    supervise(vm, name, &paths, json).await
}

/// Restore `snap` into a fresh `run` folder with newly chosen loopback ports.
pub async fn restore_snapshot(snap: &Snapshot, name: &str, run: &RunPaths, accel: Accel) -> anyhow::Result<Vm> {
    Ok(forage_image::vms::restore_fresh(snap, name, run, accel).await?)
}

async fn exec(data: &DataDir, name: &str, timeout_s: u64, command: &[String]) -> anyhow::Result<()> {
    let paths = VmPaths::new(data, name)?;
    let r = paths.load()?;
    if !qemu_alive(r.pid) {
        bail!("VM {name} is not running");
    }
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, r.agent_port));
    let argv: Vec<String> = command.to_vec();
    let out = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut agent = AgentClient::connect(addr, Duration::from_secs(10))?;
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        Ok(agent.exec(&args, Duration::from_secs(timeout_s))?)
    })
    .await??;
    print!("{}", out.stdout);
    eprint!("{}", out.stderr);
    if out.timed_out {
        bail!("command timed out after {timeout_s} s in VM {name}");
    }
    if out.code != 0 {
        bail!("command exited with code {} in VM {name}", out.code);
    }
    Ok(())
}

fn list(data: &DataDir, json: bool) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    if let Ok(entries) = std::fs::read_dir(data.vms()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(paths) = VmPaths::new(data, &name) else { continue };
            let Ok(r) = paths.load() else { continue };
            rows.push(json!({
                "name": name, "image": r.image, "state": state(&paths, &r),
                "pid": if qemu_alive(r.pid) { r.pid } else { None },
                "agent": format!("127.0.0.1:{}", r.agent_port),
                "service": r.app.as_ref().map(|a| format!("127.0.0.1:{}", a.host_port)),
            }));
        }
    }
    if json {
        crate::output::print_json(&rows);
    } else if rows.is_empty() {
        println!("no VMs (boot one: forage vm boot NAME)");
    } else {
        for r in rows {
            println!(
                "{:<16} {:<8} image {}  service {}",
                r["name"].as_str().unwrap_or(""),
                r["state"].as_str().unwrap_or(""),
                r["image"].as_str().unwrap_or(""),
                r["service"].as_str().unwrap_or("-")
            );
        }
    }
    Ok(())
}

fn rm(data: &DataDir, name: &str) -> anyhow::Result<()> {
    let paths = VmPaths::new(data, name)?;
    let r = paths.load()?;
    if qemu_alive(r.pid) {
        bail!("VM {name} is running; stop it first: forage vm stop {name}");
    }
    std::fs::remove_dir_all(&paths.dir).with_context(|| paths.dir.display().to_string())?;
    println!("VM {name} removed");
    Ok(())
}
