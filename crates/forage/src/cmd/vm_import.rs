//! `forage vm import NAME FILE --disk DISK`: a VM saved by plain QEMU or `virsh save`
//! becomes VM NAME's save (`docs/import-saved-vm.md`).

use std::path::Path;

use anyhow::{bail, Context};
use forage_datadir::DataDir;
use forage_image::vms::{AppForward, VmPaths, VmRecord};
use forage_image::GuestImage;
use forage_vm::import::{import_saved, saved_ram_bytes, ImportRequest, SavedFormat};
use serde_json::json;

pub async fn import(
    data: &DataDir,
    name: &str,
    saved: &Path,
    disk: &Path,
    image: &str,
    port: Option<u16>,
    json: bool,
) -> anyhow::Result<()> {
    let paths = VmPaths::new(data, name)?;
    if paths.record.exists() || paths.snapshot.exists() {
        bail!("VM {name} exists already (forage vm rm {name} first)");
    }
    let image = GuestImage::open(data, image)?;
    let ram = saved_ram_bytes(saved).with_context(|| format!("reading {}", saved.display()))?;
    let guest_ports: Vec<u16> = port.into_iter().collect();
    let (mut target, _) = image.fresh_run(name, &paths.run, &guest_ports)?;
    let _ = std::fs::remove_file(&target.disks[0].path); // the image's disk: not this VM's
    if !ram.is_multiple_of(8192) {
        bail!("{}: guest RAM of {ram} bytes is not a whole number of 8 KiB (QEMU's -m)", saved.display());
    }
    // QEMU's own saves have whole MiB; forage's have a tail (forage_vm::spec::RAM_TAIL_KIB).
    target.memory_mib = ram >> 20;
    target.memory_tail_kib = (ram % (1 << 20)) >> 10;
    let accel = forage_vm::accel::choose();
    let req = ImportRequest {
        saved: saved.to_path_buf(),
        disk: disk.to_path_buf(),
        target,
        accel,
        out: paths.snapshot.clone(),
        qmp_socket: data.runtime_dir()?.join(format!("import-{name}.qmp")),
    };
    let result = import_saved(&req).await;
    let _ = std::fs::remove_dir_all(&paths.run.dir);
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            if !paths.record.exists() {
                let _ = std::fs::remove_dir_all(&paths.dir);
            }
            return Err(e).with_context(|| format!("importing {} as VM {name}", saved.display()));
        }
    };
    let spec = report.snapshot.manifest().spec.clone();
    let record = VmRecord {
        name: name.to_string(),
        image: image.manifest().name.clone(),
        accel,
        pid: None,
        spec,
        agent_port: 0,
        app: port.map(|p| AppForward { name: "service".into(), guest_port: p, host_port: 0 }),
    };
    paths.store(&record)?;
    let c = report.converted;
    let format = match report.format {
        SavedFormat::Qemu => "qemu",
        SavedFormat::Libvirt { .. } => "libvirt",
    };
    if json {
        crate::output::print_json(&json!({
            "event": "imported", "name": name, "format": format, "stream_offset": report.stream_offset,
            "memory_pages": c.memory_pages, "zero_pages": c.zero_pages, "rom_pages": c.rom_pages,
            "state_bytes": c.state_bytes, "seconds": report.took.as_secs_f64(), "dir": report.snapshot.dir(),
        }));
    } else {
        println!(
            "imported {} ({format} save, stream at byte {}) as VM {name} in {:.1} s: {} guest pages, {} ROM pages, device state {} KiB\nresume it: forage vm restore {name}",
            saved.display(),
            report.stream_offset,
            report.took.as_secs_f64(),
            c.memory_pages,
            c.rom_pages,
            c.state_bytes >> 10
        );
    }
    Ok(())
}
