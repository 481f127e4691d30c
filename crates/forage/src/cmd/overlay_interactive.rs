//! `forage overlay create --base B --interactive`: the base resumed with its serial
//! console on this terminal (the disk on a qcow2 layer, so its writes are recorded); when
//! the session ends (Ctrl-], or the end of input) the VM is saved and its overlay made
//! (`forage_synth::saved`), as the original tools did with a VNC window.

use std::io::{IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use forage_datadir::DataDir;
use forage_format::manifest::Service;
use forage_image::RunPaths;
use forage_synth::BaseVm;
use forage_vm::Snapshot;
use serde_json::json;

use crate::cli::OverlayCreateArgs;

/// Ctrl-] ends the session (as telnet's escape).
const END_OF_SESSION: u8 = 0x1d;

pub async fn create(data: &DataDir, args: &OverlayCreateArgs) -> anyhow::Result<()> {
    let base = BaseVm::open(data, &args.base)?;
    let name = format!("interactive-{}", std::process::id());
    let work = data.work().join(&name);
    let _ = std::fs::remove_dir_all(&work);
    let runtime = data.runtime_dir()?;
    let run = RunPaths { dir: work.join("run"), qmp_socket: runtime.join(format!("{name}.qmp")) };
    let console = runtime.join(format!("{name}.console"));
    let result = async {
        let accel = forage_vm::accel::choose();
        let (snap, disk) = (base.snapshot().clone(), base.disk_path());
        let vm = forage_image::vms::restore_layered_with_console(&snap, &name, &run, accel, &disk, &console).await?;
        eprintln!(
            "base {} resumed as {name}; its serial console follows. End the session with Ctrl-] \
             (or the end of input): the VM is then saved and its overlay made.",
            args.base
        );
        let c2 = console.clone();
        tokio::task::spawn_blocking(move || session(&c2)).await?.context("serial console session")?;
        eprintln!("\nsession ended: saving the VM ...");
        vm.save(&work.join("snapshot")).await.context("saving the VM")?;
        drop(vm);
        let snapshot = Snapshot::open(&work.join("snapshot"))?;
        let service = args.port.map(|port| Service { name: "service".into(), port, probe: args.probe.clone() });
        let opts = args.reduce.create_options()?;
        let (out, scratch) = (args.output.clone(), work.join("overlay"));
        let b2 = base.clone();
        let (report, tracking) = tokio::task::spawn_blocking(move || {
            forage_synth::saved::overlay_of_saved_vm(&b2, &snapshot, service, &opts, &out, &scratch)
        })
        .await??;
        let signer = forage_synth::build::sign_overlay(data, &args.output)?;
        anyhow::Ok((report, tracking, signer))
    }
    .await;
    let _ = std::fs::remove_dir_all(&work);
    let _ = std::fs::remove_file(&console);
    let (report, tracking, signer) = result.with_context(|| format!("interactive overlay on base {}", args.base))?;
    let s = &report.manifest.stats;
    if args.json {
        crate::output::print_json(&json!({
            "file": args.output, "bytes": report.bytes, "modified_bytes": s.modified_bytes,
            "modified_disk_chunks": s.modified_disk_chunks, "modified_memory_chunks": s.modified_memory_chunks,
            "disk_tracking": tracking.to_string(), "fs": report.fs.to_string(), "signer": signer,
        }));
    } else {
        println!("{tracking}\n{}", report.fs);
        println!(
            "overlay {}: {} KiB for {} MiB of modified state",
            args.output.display(),
            report.bytes >> 10,
            s.modified_bytes >> 20
        );
    }
    Ok(())
}

/// Relay this terminal and the VM's serial console until Ctrl-] or the end of input; the
/// terminal is in raw mode meanwhile (keys go to the guest as typed).
fn session(console: &Path) -> std::io::Result<()> {
    let start = Instant::now();
    let sock = loop {
        match UnixStream::connect(console) {
            Ok(s) => break s,
            Err(e) if start.elapsed() > Duration::from_secs(10) => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let mut from_guest = sock.try_clone()?;
    // Ends by itself when QEMU closes the console (at the save).
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut out = std::io::stdout();
        while let Ok(n) = from_guest.read(&mut buf) {
            if n == 0 || out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                break;
            }
        }
    });
    let tty = std::io::stdin().is_terminal();
    if tty {
        stty(&["raw", "-echo"]);
    }
    let r = relay_input(&sock);
    if tty {
        stty(&["sane"]);
    }
    r
}

fn relay_input(mut sock: &UnixStream) -> std::io::Result<()> {
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 1024];
    loop {
        let n = stdin.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        if let Some(end) = buf[..n].iter().position(|&b| b == END_OF_SESSION) {
            return sock.write_all(&buf[..end]);
        }
        sock.write_all(&buf[..n])?;
    }
}

/// `stty` on this terminal (best effort: the session works without raw mode).
fn stty(args: &[&str]) {
    let _ = Command::new("stty").args(args).stdin(Stdio::inherit()).status();
}
