//! `forage substrate ...`.

use std::time::Duration;

use anyhow::{bail, Context};
use forage_agent::app::AppPackage;
use forage_datadir::DataDir;
use forage_image::vms::{AppForward, VmPaths, VmRecord};
use forage_image::GuestImage;
use forage_substrate::{format, ActivateRequest, Channel, DockRequest, DockSource, Pool};
use serde_json::json;

use super::vm::{announce, qemu_alive, supervise};
use crate::cli::SubstrateCommand;
use crate::output::print_json;

pub async fn run(data: &DataDir, cmd: SubstrateCommand) -> anyhow::Result<()> {
    // An instance is docked by the daemon, into the daemon's pool: nothing here is opened.
    if let SubstrateCommand::Dock {
        name, from, api, app, max_vcpus, max_memory, public, detach_nic, level, json, ..
    } = &cmd
    {
        if let Some(id) = from.strip_prefix("instance:") {
            let other_level = *level != forage_substrate::format::DEFAULT_LEVEL;
            if app.is_some() || max_vcpus.is_some() || max_memory.is_some() || *detach_nic || other_level {
                bail!(
                    "--app, --max-vcpus, --max-memory, --detach-nic and --level go with an image; an instance is docked as it runs"
                );
            }
            return dock_instance(data, *api, id, name.clone(), *public, *json).await;
        }
    }
    let pool = Pool::open(data)?;
    match cmd {
        SubstrateCommand::Dock {
            name,
            from,
            api: _,
            app,
            max_vcpus,
            max_memory,
            public,
            detach_nic,
            level,
            ready_timeout,
            json,
        } => {
            let (image, source) = match dock_from(data, &from)? {
                From::Image(image) => {
                    let cores = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
                    let source = DockSource::Boot {
                        app: app.as_deref().map(AppPackage::open).transpose()?,
                        max_vcpus: max_vcpus.unwrap_or(cores),
                        max_memory_mib: max_memory.unwrap_or(image.manifest().memory_mib),
                    };
                    (image, source)
                }
                From::Saved(image, source) => {
                    if app.is_some() || max_vcpus.is_some() || max_memory.is_some() {
                        bail!("--app, --max-vcpus and --max-memory go with an image; {from} is docked as it was saved");
                    }
                    (image, source)
                }
            };
            let req = DockRequest {
                name,
                image,
                source,
                public,
                detach_nic,
                zstd_level: level,
                accel: forage_vm::accel::choose(),
                ready_timeout: Duration::from_secs(ready_timeout),
            };
            let r = forage_substrate::dock(data, &pool, req).await?;
            if json {
                print_json(&r);
            } else {
                println!(
                    "substrate {} docked in {:.2} s (shrink {:.2}, NIC {:.2}, save {:.2}, encode {:.2}; boot before it {:.1} s)",
                    r.name,
                    r.dock_seconds,
                    r.shrink_seconds,
                    r.unplug_seconds,
                    r.save_seconds,
                    r.encode_seconds,
                    r.boot_seconds
                );
                if !r.nic_detached {
                    println!("its NIC stays; activation gives it new forwards");
                }
                print_sizes(
                    r.memory_bytes,
                    r.docked_memory_bytes,
                    r.memory_data_bytes,
                    r.compressed_bytes,
                    r.raw_bytes,
                );
                spilled(&r.spilled);
            }
            Ok(())
        }
        SubstrateCommand::Activate { name, vm, vcpus, memory, once, json } => {
            activate(data, &pool, &name, vm, vcpus, memory, once, json).await
        }
        SubstrateCommand::List { json } => {
            let s = pool.summary()?;
            if json {
                print_json(&s);
                return Ok(());
            }
            println!(
                "pool: {:.1} of {:.1} MiB in memory ({}), {:.1} MiB spilled to disk",
                s.memory_bytes as f64 / 1048576.0,
                s.budget_bytes as f64 / 1048576.0,
                s.memory_dir.display(),
                s.disk_bytes as f64 / 1048576.0
            );
            for e in &s.substrates {
                println!("{:<24} {:>9.1} MiB  {:?}", e.name, e.bytes as f64 / 1048576.0, e.tier);
            }
            Ok(())
        }
        SubstrateCommand::Info { name, json } => {
            let e = pool.entry(&name)?;
            let m = format::verify(&e.path).with_context(|| format!("substrate {name} is refused"))?;
            if json {
                print_json(&json!({ "pool": e, "manifest": m }));
            } else {
                let spec = &m.snapshot.spec;
                println!("substrate {} ({:?}, {:.1} MiB): {}", m.name, e.tier, e.bytes as f64 / 1048576.0, m.source);
                println!(
                    "image {}; up to {} vCPUs and {} MiB; docked with {} MiB",
                    m.image,
                    spec.max_vcpus.unwrap_or(spec.vcpus),
                    spec.memory_mib,
                    m.docked_memory_bytes >> 20
                );
                match &m.nic {
                    Some(n) => println!(
                        "no NIC (activation plugs one in on PCI slot {:#x} for guest ports {:?}){}",
                        n.pci_slot,
                        n.guest_ports,
                        if m.public { "; public: activations renew the guest's identity" } else { "" }
                    ),
                    None => println!(
                        "its NIC stays (activation gives it new forwards){}",
                        if m.public { "; public: activations renew the guest's identity" } else { "" }
                    ),
                }
                let records = if m.format >= 3 { "windows" } else { "extents" };
                for s in &m.sections {
                    let refs = match s.image_pages {
                        0 => String::new(),
                        n => format!(" + {n} pages kept as the image's disk blocks"),
                    };
                    println!(
                        "  {:<8} {:>10} bytes, {:>10} of data in {:>6} {records}, {:>10} encoded{refs}",
                        s.name, s.raw_size, s.data_bytes, s.extents, s.encoded_bytes
                    );
                }
            }
            Ok(())
        }
        SubstrateCommand::Rm { name } => {
            if let Some(vm) = running_activation(data, &name) {
                bail!("VM {vm} runs on substrate {name}'s disk; stop it first: forage vm stop {vm}");
            }
            pool.remove(&name)?;
            println!("substrate {name} removed");
            Ok(())
        }
        SubstrateCommand::Budget { mib } => {
            spilled(&pool.set_budget(mib << 20)?);
            println!("pool budget: {mib} MiB");
            Ok(())
        }
        SubstrateCommand::Push { name, receivers, interface, portbase, wait, unicast, json } => {
            if unicast && receivers != 1 {
                bail!("--unicast sends to exactly one receiver");
            }
            let ch = Channel { interface, portbase, unicast };
            let r = forage_substrate::push(&pool, &name, receivers, &ch, Duration::from_secs(wait)).await?;
            if json {
                print_json(&r);
            } else {
                println!(
                    "substrate {} ({:.1} MiB) multicast to {} receivers in {:.2} s",
                    r.name,
                    r.bytes as f64 / 1048576.0,
                    r.receivers,
                    r.seconds
                );
            }
            Ok(())
        }
        SubstrateCommand::Receive { interface, portbase, wait, json } => {
            let ch = Channel { interface, portbase, unicast: false };
            let (_, r) = forage_substrate::receive(&pool, &ch, Duration::from_secs(wait)).await?;
            if json {
                print_json(&r);
            } else {
                println!("substrate {} received and verified ({} bytes, sha256 {})", r.name, r.bytes, r.sha256);
            }
            Ok(())
        }
    }
}

/// `--from instance:ID`: the daemon docks its running instance (`POST
/// /v1/instances/{id}/dock`); the instance ends.
async fn dock_instance(
    data: &DataDir,
    api: std::net::SocketAddr,
    id: &str,
    name: String,
    public: bool,
    json: bool,
) -> anyhow::Result<()> {
    let client = super::handoff::client(data, api)?;
    let id = id.to_string();
    let request = forage_api::InstanceDockRequest { name, public };
    let r = tokio::task::spawn_blocking(move || client.dock(&id, &request)).await??;
    if json {
        print_json(&r);
        return Ok(());
    }
    println!(
        "instance {} docked as substrate {} in {:.2} s (shrink {:.2}, encode {:.2}; restore of the saved instance before it {:.1} s); the instance has ended",
        r.instance, r.substrate, r.dock_seconds, r.shrink_seconds, r.encode_seconds, r.restore_seconds
    );
    print_sizes(r.memory_bytes, r.docked_memory_bytes, r.memory_data_bytes, r.compressed_bytes, r.raw_bytes);
    spilled(&r.spilled);
    Ok(())
}

/// A dock's sizes, the same line for a dock and an instance's dock.
fn print_sizes(memory: u64, docked: u64, data: u64, compressed: u64, raw: u64) {
    println!(
        "memory {} MiB -> {} MiB in the guest, {} MiB of data; substrate {:.1} MiB compressed ({:.1} MiB raw)",
        memory >> 20,
        docked >> 20,
        data >> 20,
        compressed as f64 / 1048576.0,
        raw as f64 / 1048576.0
    );
}

enum From {
    Image(GuestImage),
    /// A saved VM and the image whose kernel it boots.
    Saved(GuestImage, DockSource),
}

/// What `--from` names: `image:NAME`, `service:ID`, `base:NAME`, or a plain name, the first
/// of these that exists.
fn dock_from(data: &DataDir, from: &str) -> anyhow::Result<From> {
    let (kind, name) = match from.split_once(':') {
        Some((k, n)) => (Some(k), n),
        None => (None, from),
    };
    let service = || -> anyhow::Result<From> {
        let svc = forage_service::Repository::new(data).open(name)?;
        let m = svc.manifest();
        let source = DockSource::Saved {
            snapshot: Box::new(svc.snapshot()?),
            service_port: m.port,
            label: format!("service:{}", m.id),
        };
        Ok(From::Saved(GuestImage::open(data, &m.image)?, source))
    };
    let base = || -> anyhow::Result<From> {
        let b = forage_synth::BaseVm::open(data, name)?;
        let source = DockSource::Saved {
            snapshot: Box::new(b.snapshot().clone()),
            service_port: None,
            label: format!("base:{}", b.manifest().name),
        };
        Ok(From::Saved(GuestImage::open(data, &b.manifest().image)?, source))
    };
    match kind {
        Some("image") => Ok(From::Image(GuestImage::open(data, name)?)),
        Some("service") => service(),
        Some("base") => base(),
        Some(k) => bail!("--from {from}: {k} is not image, service, base or instance"),
        None => match GuestImage::open(data, name) {
            Ok(image) => Ok(From::Image(image)),
            Err(image_err) => service()
                .or_else(|_| base())
                .map_err(|_| anyhow::anyhow!("no image, service or base VM named {name} (as an image: {image_err})")),
        },
    }
}

fn spilled(names: &[String]) {
    if !names.is_empty() {
        eprintln!("spilled to disk (over the pool's memory budget): {}", names.join(", "));
    }
}

/// A running `forage vm` activated from substrate `name`.
fn running_activation(data: &DataDir, name: &str) -> Option<String> {
    let prefix = format!("substrate:{name}");
    std::fs::read_dir(data.vms()).ok()?.flatten().find_map(|e| {
        let vm = e.file_name().to_string_lossy().into_owned();
        let r = VmPaths::new(data, &vm).ok()?.load().ok()?;
        (r.image == prefix && qemu_alive(r.pid)).then_some(vm)
    })
}

#[allow(clippy::too_many_arguments)]
async fn activate(
    data: &DataDir,
    pool: &Pool,
    name: &str,
    vm: Option<String>,
    vcpus: u32,
    memory: Option<u64>,
    once: bool,
    json: bool,
) -> anyhow::Result<()> {
    let vm_name = match vm {
        Some(v) => v,
        None => (1..)
            .map(|i| format!("{name}-{i}"))
            .find(|v| VmPaths::new(data, v).map(|p| !p.record.exists()).unwrap_or(false))
            .expect("a free name"),
    };
    let paths = VmPaths::new(data, &vm_name)?;
    if let Ok(r) = paths.load() {
        if qemu_alive(r.pid) {
            bail!("VM {vm_name} is already running (pid {})", r.pid.unwrap_or(0));
        }
    }
    let memory_mib = match memory {
        Some(m) => m,
        None => format::verify(&pool.entry(name)?.path)?.snapshot.spec.memory_mib,
    };
    let req = ActivateRequest {
        substrate: name.to_string(),
        vcpus,
        memory_mib,
        accel: forage_vm::accel::choose(),
        run: paths.run.clone(),
        vm_name: vm_name.clone(),
        detached: false,
    };
    let a = forage_substrate::activate(data, pool, req).await?;
    let r = &a.report;
    let record = VmRecord {
        name: vm_name.clone(),
        image: format!("substrate:{name}"),
        accel: a.vm.accel(),
        pid: Some(a.vm.pid()),
        spec: a.vm.spec().clone(),
        agent_port: r.agent_port,
        app: r.service_port.map(|(guest_port, host_port)| AppForward { name: "service".into(), guest_port, host_port }),
    };
    paths.store(&record)?;
    if json {
        print_json(&json!({ "event": "activated", "report": r }));
    } else {
        println!(
            "substrate {name} activated as VM {vm_name}: first response in {:.2} s (manifest {:.2}, {} {:.2}, restore {:.2}), grown in {:.2} s{}",
            r.first_response_seconds,
            r.manifest_seconds,
            if r.decoded_now { "verify+decode" } else { "copy" },
            r.decode_seconds,
            r.restore_seconds,
            r.total_seconds,
            if r.reloaded_from_disk { " (read back from disk)" } else { "" }
        );
        println!("the guest sees {} vCPUs and {} MiB (MemTotal)", r.guest_vcpus, r.guest_mem_total_bytes >> 20);
        if r.nic_plugged {
            println!("a NIC was plugged in with this VM's forwards in {:.3} s", r.plug_seconds);
        }
        if !r.renewed.is_empty() {
            println!("public substrate: the guest renewed {}", r.renewed.join(", "));
        }
    }
    if once {
        a.vm.shutdown().await?;
        return Ok(());
    }
    announce(&record, Duration::from_secs_f64(r.total_seconds), json);
    supervise(a.vm, &vm_name, &paths, json).await
}
