//! `forage vm import`: a VM saved by plain QEMU (guest RAM inside the stream, RAMBlock
//! `pc.ram`, `migrate "exec:cat > FILE"`) is imported, resumed, and carries on where it
//! was saved; the same stream behind libvirt's `virsh save` header imports to the same
//! memory; truncated and foreign files are refused with the byte offset and leave nothing.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use forage_agent::AgentClient;
use forage_image::RunPaths;
use forage_testkit::guest::*;
use forage_vm::import::libvirt;

fn forage(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_forage"));
    c.arg("--data-dir").arg(data_dir().root()).args(args);
    c
}

fn agent_run(port: u16, argv: &[&str]) -> String {
    let mut a = AgentClient::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), Duration::from_secs(60)).unwrap();
    a.exec_ok(argv, Duration::from_secs(30)).unwrap().stdout
}

/// Boot the tiny image's hardware the way an operator would with plain QEMU: `-m`, no
/// memory backend file, and save it with a plain `migrate` (RAM inside the stream).
fn plain_qemu_save(dir: &Path, saved: &Path) -> (String, std::path::PathBuf) {
    let img = image();
    let run = RunPaths { dir: dir.join("plain"), qmp_socket: dir.join("plain.qmp") };
    let (spec, ports) = img.fresh_run("plain", &run, &[]).unwrap();
    let mut qemu = spawn_plain(&spec, &[]);
    let start = Instant::now();
    while !std::fs::read_to_string(&spec.serial_log).unwrap_or_default().contains(&img.manifest().ready_marker) {
        assert!(start.elapsed() < READY, "plain QEMU guest not ready");
        std::thread::sleep(Duration::from_millis(200));
    }
    let boot_id = agent_run(ports[0], &["cat", "/proc/sys/kernel/random/boot_id"]);
    agent_run(ports[0], &["sh", "-c", "echo carried-on > /import-marker"]);
    migrate_and_quit(&spec.qmp_socket, saved);
    qemu.wait().unwrap();
    (boot_id, spec.disks[0].path.clone())
}

/// QEMU started with the spec's devices (and `extra` arguments), RAM as plain `-m`.
fn spawn_plain(spec: &forage_vm::VmSpec, extra: &[&str]) -> std::process::Child {
    let accel = forage_vm::accel::choose();
    let args: Vec<String> = spec.qemu_args(accel, false).iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let mut plain = Vec::new();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        if a == "-object" {
            let v = it.next().unwrap();
            if !v.starts_with("memory-backend-file") {
                plain.extend([a, v]);
            }
        } else {
            plain.push(a.replace(",memory-backend=ram0", ""));
        }
    }
    assert!(!plain.iter().any(|a| a.contains("memory-backend")), "{plain:?}");
    Command::new(forage_vm::process::qemu_binary().unwrap())
        .args(&plain)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// `stop`, `migrate "exec:cat > SAVED"` until completed, `quit`.
fn migrate_and_quit(qmp_socket: &Path, saved: &Path) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let qmp = forage_vm::qmp::Qmp::connect(qmp_socket, Duration::from_secs(10)).await.unwrap();
        qmp.execute("stop", None).await.unwrap();
        let uri = format!("exec:cat > {}", saved.display());
        qmp.execute("migrate", Some(serde_json::json!({ "uri": uri }))).await.unwrap();
        loop {
            let s = qmp.execute("query-migrate", None).await.unwrap();
            match s["status"].as_str() {
                Some("completed") => break,
                Some("failed") => panic!("migrate failed: {s}"),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let _ = qmp.execute("quit", None).await;
    });
}

fn json_out(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn plain_qemu_and_virsh_saves_import_and_resume() {
    if skip_vm_tests() {
        return;
    }
    let tmp = tempfile::tempdir_in(data_dir().root()).unwrap();
    let saved = tmp.path().join("saved.qemu");
    let (boot_id, disk) = plain_qemu_save(tmp.path(), &saved);
    let (s, d) = (saved.to_str().unwrap(), disk.to_str().unwrap());
    for n in ["imp", "imp-virsh", "imp-cut", "imp-foreign"] {
        let _ = forage(&["vm", "rm", n]).output();
    }

    // Plain QEMU's save: imported, restored, the same kernel (boot id) and a file in its RAM-only root.
    let ev = json_out(&forage(&["vm", "import", "imp", s, "--disk", d, "--json"]).output().unwrap());
    assert_eq!(ev["format"], "qemu");
    assert!(ev["memory_pages"].as_u64().unwrap() > 1000 && ev["rom_pages"].as_u64().unwrap() > 0, "{ev}");
    let mut restored = forage(&["vm", "restore", "imp", "--json"]).stdout(Stdio::piped()).spawn().unwrap();
    let mut out = std::io::BufReader::new(restored.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let ev: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(ev["event"], "running", "{ev}");
    let port: u16 = ev["agent"].as_str().unwrap().rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(agent_run(port, &["cat", "/proc/sys/kernel/random/boot_id"]), boot_id, "the guest was rebooted");
    assert_eq!(agent_run(port, &["cat", "/import-marker"]).trim(), "carried-on");
    assert!(forage(&["vm", "stop", "imp"]).status().unwrap().success());
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert!(line.contains("\"exited\""), "{line}");
    assert!(restored.wait().unwrap().success());

    // The same stream behind libvirt's header (as `virsh save` writes it).
    let virsh = tmp.path().join("saved.virsh");
    let mut bytes = libvirt::encode("<domain type='kvm'><name>plain</name></domain>\n", true, 8192);
    bytes.extend(std::fs::read(&saved).unwrap());
    std::fs::write(&virsh, &bytes).unwrap();
    let ev = json_out(
        &forage(&["vm", "import", "imp-virsh", virsh.to_str().unwrap(), "--disk", d, "--json"]).output().unwrap(),
    );
    assert_eq!((ev["format"].as_str(), ev["stream_offset"].as_u64()), (Some("libvirt"), Some(92 + 8192)));
    let vms = data_dir().vms();
    let mem = |n: &str| std::fs::read(vms.join(n).join("snapshot/memory.raw")).unwrap();
    assert!(mem("imp") == mem("imp-virsh"), "both wrappings give the same guest memory");

    // Truncated inside guest RAM: refused with the byte where the stream ends, nothing kept.
    let cut = tmp.path().join("saved.cut");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = forage(&["vm", "import", "imp-cut", cut.to_str().unwrap(), "--disk", d]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("byte ") && err.contains("truncated"), "{err}");
    assert!(!vms.join("imp-cut").exists(), "a refused import leaves nothing");

    // Foreign bytes: refused at byte 0 before anything starts.
    let foreign = tmp.path().join("saved.foreign");
    std::fs::write(&foreign, b"\x7fELF\x02\x01\x01 not a saved VM at all").unwrap();
    let out = forage(&["vm", "import", "imp-foreign", foreign.to_str().unwrap(), "--disk", d]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("byte 0: not a saved VM"), "{err}");
    assert!(!vms.join("imp-foreign").exists());

    // The imported VM becomes a base (indexed, its own copy).
    let _ = forage_synth::BaseVm::remove(&data_dir(), "imp-base");
    let b = json_out(&forage(&["base", "create", "imp-base", "--from-vm", "imp", "--json"]).output().unwrap());
    assert_eq!(b["image"], "vm:imp");
    assert!(b["indexed_chunks"].as_u64().unwrap() > 1000, "{b}");
    forage_synth::BaseVm::remove(&data_dir(), "imp-base").unwrap();

    for n in ["imp", "imp-virsh"] {
        assert!(forage(&["vm", "rm", n]).status().unwrap().success());
    }
}

/// A VM with a device the target does not have (a virtio-rng), saved before it ever ran
/// (`-S`: no boot needed), is refused naming that device and the byte of its section.
#[test]
fn a_save_of_other_hardware_is_refused_with_the_device_and_offset() {
    if skip_vm_tests() {
        return;
    }
    let img = image();
    let tmp = tempfile::tempdir_in(data_dir().root()).unwrap();
    let run = RunPaths { dir: tmp.path().join("other"), qmp_socket: tmp.path().join("other.qmp") };
    let (spec, _) = img.fresh_run("other", &run, &[]).unwrap();
    assert!(!spec.virtio_rng, "the tiny image has no virtio-rng");
    let mut qemu = spawn_plain(&spec, &["-S", "-device", "virtio-rng-pci,id=extra-rng"]);
    let saved = tmp.path().join("other.qemu");
    migrate_and_quit(&spec.qmp_socket, &saved);
    qemu.wait().unwrap();
    let _ = forage(&["vm", "rm", "imp-other"]).output();
    let (s, d) = (saved.to_str().unwrap(), spec.disks[0].path.to_str().unwrap());
    let out = forage(&["vm", "import", "imp-other", s, "--disk", d]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("virtio-rng") && err.contains("is not one the target VM offers"), "{err}");
    let offset: u64 = err.split("byte ").nth(1).unwrap().split(':').next().unwrap().parse().unwrap();
    let bytes = std::fs::read(&saved).unwrap();
    assert_eq!(bytes[offset as usize], 0x04, "the offset is that of the device's FULL section: {err}");
    assert!(!data_dir().vms().join("imp-other").exists());
}
