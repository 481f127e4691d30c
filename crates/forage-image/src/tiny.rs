//! The `tiny` recipe: Debian's cloud kernel, a busybox initramfs (virtio modules in load
//! order, the forage agent, an init that prints the ready marker) and an ext4 data disk
//! mounted at `/data`. Everything from `apt-get download`, nothing from the web.

use std::path::Path;
use std::time::Instant;

use forage_datadir::DataDir;
use sha2::{Digest, Sha256};

use crate::initramfs::{self, Entry};
use crate::manifest::{ImageManifest, RootFs, IMAGE_FORMAT, IMAGE_KIND};
use crate::{debs, modules, BuildOptions, BuildOutcome, ImageError, AGENT_PORT, READY_MARKER};

pub const NAME: &str = "tiny";
pub const DEFAULT_DISK_MIB: u64 = 64;
pub const DEFAULT_MEMORY_MIB: u64 = 256;

/// Part of the recipe digest. It was the image format (1) before there was more than one
/// recipe; kept at 1 so that tiny images built then stay cached.
const RECIPE_VERSION: u32 = 1;
const INIT_SCRIPT: &str = include_str!("../guest/init.sh");
const KERNEL_META: &str = "linux-image-cloud-amd64";
const BUSYBOX: &str = "busybox-static";
/// What the init script loads: block, network and balloon over virtio-pci.
const WANTED_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "virtio_net", "virtio_balloon"];
const KERNEL_CMDLINE: &str = "console=ttyS0 panic=-1 quiet loglevel=3 mitigations=off 8250.nr_uarts=1";

pub(crate) fn build(
    data: &DataDir,
    opts: &BuildOptions,
    agent: &[u8],
    agent_sha256: String,
) -> Result<BuildOutcome, ImageError> {
    let start = Instant::now();
    let disk_mib = opts.disk_mib.unwrap_or(DEFAULT_DISK_MIB);
    let memory_mib = opts.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB);
    crate::check_static(&opts.agent_binary, agent)?;
    let kernel_package = debs::resolve_meta(KERNEL_META, "linux-image-", &data.deb_cache())?;
    let recipe = recipe_digest(&kernel_package, &agent_sha256, disk_mib, memory_mib);
    if let Some(cached) = crate::cached(data, NAME, &recipe, opts, start) {
        return Ok(cached);
    }
    let kernel_deb = debs::fetch_and_unpack(&kernel_package, &data.deb_cache(), &data.extract_cache())?;
    let busybox_deb = debs::fetch_and_unpack(BUSYBOX, &data.deb_cache(), &data.extract_cache())?;

    let work = crate::partial_dir(data, NAME)?;
    let result =
        assemble(&work, &kernel_deb, &busybox_deb, agent, disk_mib).map(|(kernel_file, modules)| ImageManifest {
            kind: IMAGE_KIND.into(),
            format: IMAGE_FORMAT,
            name: NAME.into(),
            recipe_digest: recipe,
            os: "busybox".into(),
            root: RootFs::Initramfs,
            kernel_package: kernel_deb.file.clone(),
            busybox_package: Some(busybox_deb.file.clone()),
            agent_sha256,
            modules,
            kernel: kernel_file,
            initrd: "initrd.img".into(),
            disk: "disk.raw".into(),
            disk_mib,
            disk_mount: "/data".into(),
            cmdline: KERNEL_CMDLINE.into(),
            memory_mib,
            ready_marker: READY_MARKER.into(),
            agent_port: AGENT_PORT,
            guest_agent: false,
            virtio_rng: false,
            packages: Vec::new(),
        });
    match result {
        Ok(manifest) => crate::finish(data, &work, manifest, start),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work);
            Err(e)
        }
    }
}

fn recipe_digest(kernel_package: &str, agent_sha256: &str, disk_mib: u64, memory_mib: u64) -> String {
    let mut h = Sha256::new();
    for part in [
        RECIPE_VERSION.to_string().as_str(),
        kernel_package,
        BUSYBOX,
        agent_sha256,
        INIT_SCRIPT,
        &WANTED_MODULES.join(","),
        KERNEL_CMDLINE,
        &disk_mib.to_string(),
        &memory_mib.to_string(),
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())
}

/// Put kernel, initramfs and data disk into `work`; returns the kernel file name and the
/// modules loaded at boot.
fn assemble(
    work: &Path,
    kernel_deb: &debs::UnpackedDeb,
    busybox_deb: &debs::UnpackedDeb,
    agent: &[u8],
    disk_mib: u64,
) -> Result<(String, Vec<String>), ImageError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ImageError::Io { path, source }
    };
    let not_in = |what: &str, deb: &debs::UnpackedDeb| ImageError::NotInPackage {
        what: what.to_string(),
        package: deb.file.clone(),
    };
    // Kernel
    let boot = kernel_deb.root.join("boot");
    let vmlinuz = crate::find_prefixed(&boot, "vmlinuz-")?.ok_or_else(|| not_in("boot/vmlinuz-*", kernel_deb))?;
    let kernel_version = vmlinuz.file_name().unwrap().to_string_lossy().trim_start_matches("vmlinuz-").to_string();
    std::fs::copy(&vmlinuz, work.join("vmlinuz")).map_err(io(&vmlinuz))?;
    // Modules
    let mod_dir = kernel_deb.root.join("lib/modules").join(&kernel_version);
    let mods = modules::closure(&mod_dir, WANTED_MODULES)?;
    let mod_data: Vec<(String, Vec<u8>)> = mods
        .iter()
        .map(|m| std::fs::read(&m.path).map(|d| (format!("lib/modules/{}.ko", m.name), d)).map_err(io(&m.path)))
        .collect::<Result<_, _>>()?;
    let mod_list: String = mods.iter().map(|m| format!("{}\n", m.name)).collect();
    // Busybox
    let bb_path = busybox_deb.root.join("bin/busybox");
    let busybox = std::fs::read(&bb_path).map_err(|_| not_in("bin/busybox", busybox_deb))?;

    let mut entries = vec![
        Entry::Dir("bin"),
        Entry::Dir("sbin"),
        Entry::Dir("dev"),
        Entry::CharDev { path: "dev/console", major: 5, minor: 1 },
        Entry::CharDev { path: "dev/null", major: 1, minor: 3 },
        Entry::Dir("etc"),
        Entry::Dir("etc/forage"),
        Entry::Dir("lib"),
        Entry::Dir("lib/modules"),
        Entry::Dir("proc"),
        Entry::Dir("sys"),
        Entry::Dir("tmp"),
        Entry::Dir("run"),
        Entry::Dir("data"),
        Entry::Dir("root"),
        Entry::File { path: "bin/busybox", mode: 0o755, data: &busybox },
        Entry::Symlink { path: "bin/sh", target: "busybox" },
        Entry::File { path: "sbin/forage-agent", mode: 0o755, data: agent },
        Entry::File { path: "init", mode: 0o755, data: INIT_SCRIPT.as_bytes() },
        Entry::File { path: "etc/forage/modules", mode: 0o644, data: mod_list.as_bytes() },
    ];
    for (path, data) in &mod_data {
        entries.push(Entry::File { path, mode: 0o644, data });
    }
    initramfs::write(&work.join("initrd.img"), &entries)?;
    // Data disk: an empty ext4 with /apps.
    let staging = work.join("disk.staging");
    std::fs::create_dir_all(staging.join("apps")).map_err(io(&staging))?;
    let made = crate::make_ext4(&work.join("disk.raw"), &staging, "forage-data", disk_mib);
    let _ = std::fs::remove_dir_all(&staging);
    made?;
    Ok(("vmlinuz".into(), mods.into_iter().map(|m| m.name).collect()))
}
