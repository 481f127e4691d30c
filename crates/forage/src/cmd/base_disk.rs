//! `forage base create NAME --disk FILE`: a disk image brought from elsewhere becomes a
//! base (`forage_synth::disk_base`, docs/import-disk-image.md).

use std::time::Duration;

use anyhow::Context;
use forage_datadir::DataDir;
use forage_synth::disk_base::{DiskBaseRequest, GuestAgentUse, KernelBoot, Readiness};
use forage_synth::disk_image::InputFormat;
use forage_synth::BaseVm;
use serde_json::json;

use crate::cli::{DiskBaseArgs, DiskFormatArg};

/// Most bytes read of an SSH public key file.
const MAX_SSH_KEY_BYTES: u64 = 16 * 1024;

pub async fn create(data: &DataDir, name: &str, args: &DiskBaseArgs, json: bool) -> anyhow::Result<()> {
    let disk = args.disk.clone().expect("called with --disk");
    let ssh_key = match &args.ssh_key {
        Some(p) => {
            let len = std::fs::metadata(p).with_context(|| format!("SSH key {}", p.display()))?.len();
            anyhow::ensure!(len <= MAX_SSH_KEY_BYTES, "SSH key {}: {len} bytes is not a public key", p.display());
            let text = std::fs::read_to_string(p).with_context(|| format!("SSH key {}", p.display()))?;
            Some(text.trim().to_string())
        }
        None => None,
    };
    let kernel = match (&args.kernel, &args.initrd, &args.append) {
        (Some(k), Some(i), Some(a)) => Some(KernelBoot { kernel: k.clone(), initrd: i.clone(), append: a.clone() }),
        _ => None,
    };
    let req = DiskBaseRequest {
        disk: disk.clone(),
        format: args.format.map(|f| match f {
            DiskFormatArg::Raw => InputFormat::Raw,
            DiskFormatArg::Qcow2 => InputFormat::Qcow2,
        }),
        max_disk_bytes: args.max_disk_gib.saturating_mul(1 << 30),
        ready: args.ready_port.map(Readiness::Port).unwrap_or(Readiness::SerialMarker),
        kernel,
        user: args.user.clone(),
        ssh_key,
        memory_mib: args.memory_mib,
        accel: forage_vm::accel::choose(),
        timeout: Duration::from_secs(args.ready_timeout_s),
    };
    if !json {
        let how = match args.ready_port {
            Some(p) => format!("guest port {p} answers"),
            None => "cloud-init says so on the serial console".into(),
        };
        eprintln!(
            "creating base {name} from disk {}: convert, boot, ready when {how}, save, index ...",
            disk.display()
        );
    }
    let report = BaseVm::from_disk(data, name, &req)
        .await
        .with_context(|| format!("making base {name} of {}", disk.display()))?;
    let b = &report.base;
    if json {
        // The fields of `forage base info --json`, and how the disk became the base.
        let m = b.manifest();
        crate::output::print_json(&json!({
            "name": m.name, "digest": m.digest, "image": m.image, "memory_bytes": m.memory_size,
            "disk_bytes": m.disk_size, "indexed_chunks": m.indexed_chunks, "created_unix": m.created_unix,
            "dir": b.dir(), "disk_introspection": m.disk_introspection,
            "input_format": report.input.format.name(), "boot_s": report.boot_time.as_secs_f64(),
            "seconds": report.took.as_secs_f64(),
            "guest_agent": matches!(report.guest_agent, GuestAgentUse::Used { .. }),
            "guest_agent_said": report.guest_agent.to_string(),
        }));
    } else {
        println!("{}", report.guest_agent);
        println!(
            "base {name} made from {} ({}, {} MiB) in {:.1} s (boot to ready {:.1} s), digest {}",
            disk.display(),
            report.input.format.name(),
            report.input.virtual_size >> 20,
            report.took.as_secs_f64(),
            report.boot_time.as_secs_f64(),
            b.digest()
        );
    }
    Ok(())
}
