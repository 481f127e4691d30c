//! Guest images for forage, built from Debian packages (`apt-get download`), never from the
//! web. The `tiny` image is:
//!
//! - `vmlinuz`: Debian's cloud kernel (virtio drivers are modules, ext4 is built in);
//! - `initrd.img`: busybox (from `busybox-static`), the virtio modules in load order, the
//!   forage guest agent, and an init that prints a ready marker on the serial console;
//! - `disk.raw`: an ext4 data disk mounted at `/data` with discard, where applications are
//!   installed (`/data/apps/NAME/`) by the agent: no application is baked into the image.
//!
//! Images are cached under `DATA/images/NAME` with an `image.json` that records the recipe
//! (package files, agent digest, init script); a build whose recipe matches is a no-op.

mod debs;
pub mod initramfs;
pub mod modules;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use forage_datadir::DataDir;
use forage_vm::{BalloonSpec, DirectBoot, DiskSpec, NicSpec, PortForward, VmSpec};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use initramfs::Entry;

pub const IMAGE_KIND: &str = "forage-guest-image";
pub const IMAGE_FORMAT: u32 = 1;
/// Printed by the guest's init on the serial console once the agent runs.
pub const READY_MARKER: &str = "FORAGE-READY";
/// Guest port of the agent (see `forage-agent`).
pub const AGENT_PORT: u16 = forage_agent::AGENT_PORT;
/// The only image recipe so far.
pub const TINY: &str = "tiny";
/// The operating system forage guest images run (Debian's kernel, busybox, x86-64): what
/// service VMs and packed applications name to be matched.
pub const GUEST_OS: &str = "linux-x86_64";

const INIT_SCRIPT: &str = include_str!("../guest/init.sh");
const KERNEL_META: &str = "linux-image-cloud-amd64";
const BUSYBOX: &str = "busybox-static";
/// What the init script loads: block, network and balloon over virtio-pci.
const WANTED_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "virtio_net", "virtio_balloon"];
const KERNEL_CMDLINE: &str = "console=ttyS0 panic=-1 quiet loglevel=3 mitigations=off 8250.nr_uarts=1";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("guest image {name} is not built in {dir}: run `forage image build {name}`")]
    NotBuilt { name: String, dir: PathBuf },
    #[error("unknown image recipe {name:?}: the only one is \"tiny\"")]
    UnknownRecipe { name: String },
    #[error("{path}: unreadable image description: {detail}")]
    BadManifest { path: PathBuf, detail: String },
    #[error("apt knows no package {package}: {hint}")]
    PackageUnknown { package: String, hint: String },
    #[error("apt-get download {package} failed: {apt_said}")]
    Download { package: String, apt_said: String },
    #[error("cannot unpack {file}: {detail}")]
    Unpack { file: PathBuf, detail: String },
    #[error("{tool} is needed to build guest images: {detail} (install it with apt-get)")]
    Tool { tool: &'static str, detail: String },
    #[error("{what} not found in the unpacked {package} package")]
    NotInPackage { what: String, package: String },
    #[error("kernel module {module} is needed but not in the kernel package")]
    ModuleMissing { module: String },
    #[error("{path}: not a readable kernel module: {detail}")]
    BadModule { path: PathBuf, detail: String },
    #[error("the guest binary {name} was not found (looked in {looked}); build it with `make guest`")]
    GuestBinaryMissing { name: String, looked: String },
    #[error("{path} cannot run in the guest: {detail}")]
    NotStatic { path: PathBuf, detail: String },
    #[error("{what} is too large for the initramfs")]
    TooLarge { what: String },
    #[error("mkfs.ext4 failed on {path}: {detail}")]
    Mkfs { path: PathBuf, detail: String },
    #[error(transparent)]
    DataDir(#[from] forage_datadir::DataDirError),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `image.json`: what an image is made of and how to boot it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageManifest {
    pub kind: String,
    pub format: u32,
    pub name: String,
    /// Digest of everything the image was built from; equal digests, equal images.
    pub recipe_digest: String,
    pub kernel_package: String,
    pub busybox_package: String,
    pub agent_sha256: String,
    pub modules: Vec<String>,
    pub kernel: String,
    pub initrd: String,
    pub disk: String,
    pub disk_mib: u64,
    pub cmdline: String,
    pub memory_mib: u64,
    pub ready_marker: String,
    pub agent_port: u16,
}

/// A built guest image.
#[derive(Debug, Clone)]
pub struct GuestImage {
    dir: PathBuf,
    manifest: ImageManifest,
}

/// Where one run of an image keeps its files.
#[derive(Debug, Clone)]
pub struct RunPaths {
    pub dir: PathBuf,
    pub qmp_socket: PathBuf,
}

impl GuestImage {
    /// Open a built image by name.
    pub fn open(data: &DataDir, name: &str) -> Result<Self, ImageError> {
        let dir = data.image(name)?;
        let path = dir.join("image.json");
        let text = std::fs::read(&path).map_err(|_| ImageError::NotBuilt {
            name: name.to_string(),
            dir: dir.clone(),
        })?;
        let bad = |detail: String| ImageError::BadManifest {
            path: path.clone(),
            detail,
        };
        let manifest: ImageManifest = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        if manifest.kind != IMAGE_KIND || manifest.format > IMAGE_FORMAT {
            return Err(bad(format!("{} format {} is not one this forage reads", manifest.kind, manifest.format)));
        }
        Ok(Self { dir, manifest })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &ImageManifest {
        &self.manifest
    }

    pub fn disk(&self) -> PathBuf {
        self.dir.join(&self.manifest.disk)
    }

    /// A VM spec that boots this image in `run`, with a fresh copy of the data disk
    /// (made here, holes kept) and the given extra guest ports forwarded to loopback.
    /// Returns the spec and the host port of the agent, then of each extra port.
    pub fn fresh_run(&self, name: &str, run: &RunPaths, guest_ports: &[u16]) -> Result<(VmSpec, Vec<u16>), ImageError> {
        std::fs::create_dir_all(&run.dir).map_err(|source| ImageError::Io {
            path: run.dir.clone(),
            source,
        })?;
        let disk = run.dir.join("disk0.raw");
        forage_vm::sparse::copy_sparse(&self.disk(), &disk).map_err(|source| ImageError::Io {
            path: disk.clone(),
            source,
        })?;
        let forwards = loopback_forwards(std::iter::once(self.manifest.agent_port).chain(guest_ports.iter().copied()))
            .map_err(|source| ImageError::Io {
                path: "127.0.0.1".into(),
                source,
            })?;
        let host_ports = forwards.iter().map(|f| f.host_port).collect();
        let spec = VmSpec {
            name: name.to_string(),
            machine: "pc".into(),
            cpu_model: None,
            vcpus: 1,
            memory_mib: self.manifest.memory_mib,
            memory_file: run.dir.join(forage_vm::snapshot::MEMORY_FILE),
            boot: Some(DirectBoot {
                kernel: self.dir.join(&self.manifest.kernel),
                initrd: self.dir.join(&self.manifest.initrd),
                cmdline: self.manifest.cmdline.clone(),
            }),
            disks: vec![DiskSpec {
                path: disk,
                format: forage_vm::DiskFormat::Raw,
                read_only: false,
                discard: true,
            }],
            nic: Some(NicSpec { forwards }),
            balloon: Some(BalloonSpec {
                free_page_reporting: true,
            }),
            guest_agent: None,
            serial_log: run.dir.join("serial.log"),
            qmp_socket: run.qmp_socket.clone(),
            control_socket: Some(run.qmp_socket.with_extension("ctl")),
        };
        // The memory file must not exist yet: QEMU creates it at the configured size.
        let _ = std::fs::remove_file(&spec.memory_file);
        Ok((spec, host_ports))
    }
}

/// Forwards from free loopback ports to the given guest ports. The kernel picks each free
/// port; QEMU binds it moments later.
pub fn loopback_forwards(guest_ports: impl IntoIterator<Item = u16>) -> std::io::Result<Vec<PortForward>> {
    forwards_on(std::net::Ipv4Addr::LOCALHOST, guest_ports)
}

/// Forwards from free ports of `host_addr` to the given guest ports.
pub fn forwards_on(host_addr: std::net::Ipv4Addr, guest_ports: impl IntoIterator<Item = u16>) -> std::io::Result<Vec<PortForward>> {
    let mut held = Vec::new();
    let mut out = Vec::new();
    for guest_port in guest_ports {
        let l = std::net::TcpListener::bind((host_addr, 0))?;
        out.push(PortForward {
            host_addr,
            host_port: l.local_addr()?.port(),
            guest_port,
        });
        held.push(l); // keep bound until all are chosen, so none repeats
    }
    Ok(out)
}

/// How to build an image.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The static guest agent binary (see [`locate_guest_binary`]).
    pub agent_binary: PathBuf,
    pub disk_mib: u64,
    pub memory_mib: u64,
    /// Rebuild even if the recipe matches the cached image.
    pub force: bool,
}

#[derive(Debug)]
pub struct BuildOutcome {
    pub image: GuestImage,
    pub cached: bool,
    pub took: Duration,
}

/// Build (or find cached) the image `name`.
pub fn build(data: &DataDir, name: &str, opts: &BuildOptions) -> Result<BuildOutcome, ImageError> {
    if name != TINY {
        return Err(ImageError::UnknownRecipe { name: name.to_string() });
    }
    let start = Instant::now();
    let agent = std::fs::read(&opts.agent_binary).map_err(|source| ImageError::Io {
        path: opts.agent_binary.clone(),
        source,
    })?;
    check_static(&opts.agent_binary, &agent)?;
    let agent_sha256 = hex::encode(Sha256::digest(&agent));
    let kernel_package = debs::resolve_meta(KERNEL_META, "linux-image-", &data.deb_cache())?;
    let recipe = recipe_digest(&kernel_package, &agent_sha256, opts);
    if !opts.force {
        if let Ok(image) = GuestImage::open(data, name) {
            if image.manifest.recipe_digest == recipe {
                return Ok(BuildOutcome {
                    image,
                    cached: true,
                    took: start.elapsed(),
                });
            }
        }
    }
    let kernel_deb = debs::fetch_and_unpack(&kernel_package, &data.deb_cache(), &data.extract_cache())?;
    let busybox_deb = debs::fetch_and_unpack(BUSYBOX, &data.deb_cache(), &data.extract_cache())?;

    let final_dir = data.image(name)?;
    let work = data.images().join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    DataDir::ensure(&work)?;
    let result = assemble(&work, &kernel_deb, &busybox_deb, &agent, opts).map(|(kernel_file, modules)| ImageManifest {
        kind: IMAGE_KIND.into(),
        format: IMAGE_FORMAT,
        name: name.into(),
        recipe_digest: recipe,
        kernel_package: kernel_deb.file.clone(),
        busybox_package: busybox_deb.file.clone(),
        agent_sha256,
        modules,
        kernel: kernel_file,
        initrd: "initrd.img".into(),
        disk: "disk.raw".into(),
        disk_mib: opts.disk_mib,
        cmdline: KERNEL_CMDLINE.into(),
        memory_mib: opts.memory_mib,
        ready_marker: READY_MARKER.into(),
        agent_port: AGENT_PORT,
    });
    let manifest = match result {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work);
            return Err(e);
        }
    };
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ImageError::Io { path, source }
    };
    let mpath = work.join("image.json");
    std::fs::write(&mpath, serde_json::to_vec_pretty(&manifest).expect("serializes")).map_err(io(&mpath))?;
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&work, &final_dir).map_err(io(&final_dir))?;
    Ok(BuildOutcome {
        image: GuestImage::open(data, name)?,
        cached: false,
        took: start.elapsed(),
    })
}

/// The initramfs has no dynamic loader: refuse binaries that need one.
fn check_static(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    use object::Object;
    let file = object::File::parse(data).map_err(|e| ImageError::NotStatic {
        path: path.to_path_buf(),
        detail: format!("not an ELF executable: {e}"),
    })?;
    if file.section_by_name(".interp").is_some() {
        return Err(ImageError::NotStatic {
            path: path.to_path_buf(),
            detail: "it is dynamically linked (build it with `make guest`)".into(),
        });
    }
    Ok(())
}

fn recipe_digest(kernel_package: &str, agent_sha256: &str, opts: &BuildOptions) -> String {
    let mut h = Sha256::new();
    for part in [
        IMAGE_FORMAT.to_string().as_str(),
        kernel_package,
        BUSYBOX,
        agent_sha256,
        INIT_SCRIPT,
        &WANTED_MODULES.join(","),
        KERNEL_CMDLINE,
        &opts.disk_mib.to_string(),
        &opts.memory_mib.to_string(),
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
    opts: &BuildOptions,
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
    let vmlinuz = std::fs::read_dir(&boot)
        .map_err(io(&boot))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-")))
        .ok_or_else(|| not_in("boot/vmlinuz-*", kernel_deb))?;
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
    // Data disk
    make_data_disk(&work.join("disk.raw"), opts.disk_mib)?;
    Ok(("vmlinuz".into(), mods.into_iter().map(|m| m.name).collect()))
}

/// 4 KiB file system blocks, so that file data lines up with 4 KiB chunks and guest pages
/// (mkfs would pick 1 KiB blocks for a small disk, and no file page would ever match a
/// disk chunk).
fn make_data_disk(path: &Path, mib: u64) -> Result<(), ImageError> {
    let staging = path.with_extension("staging");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(staging.join("apps")).map_err(|source| ImageError::Io {
        path: staging.clone(),
        source,
    })?;
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "forage-data", "-b", "4096", "-E", "root_owner=0:0,nodiscard", "-d"])
        .arg(&staging)
        .arg(path)
        .arg(format!("{mib}M"))
        .output()
        .map_err(|e| ImageError::Tool {
            tool: "mkfs.ext4 (e2fsprogs)",
            detail: e.to_string(),
        })?;
    let _ = std::fs::remove_dir_all(&staging);
    if !out.status.success() {
        return Err(ImageError::Mkfs {
            path: path.to_path_buf(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Find a static guest binary (or app folder) built by `make guest`: `$FORAGE_GUEST_DIR`,
/// then `../guest` and `../../guest` from the running executable (cargo's target layout:
/// `target/release/forage` and `target/debug/deps/<test>` both find `target/guest/`), then
/// `../lib/forage/guest` (an installed layout). Never the executable's own folder: cargo
/// puts dynamically linked builds of the same binaries there.
pub fn locate_guest_binary(name: &str) -> Result<PathBuf, ImageError> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("FORAGE_GUEST_DIR").filter(|d| !d.is_empty()) {
        dirs.push(PathBuf::from(d));
    }
    if let Some(exe_dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        dirs.push(exe_dir.join("../guest"));
        dirs.push(exe_dir.join("../../guest"));
        dirs.push(exe_dir.join("../lib/forage/guest"));
    }
    dirs.iter()
        .map(|d| d.join(name))
        .find(|p| p.exists())
        .ok_or_else(|| ImageError::GuestBinaryMissing {
            name: name.to_string(),
            looked: dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "),
        })
}

/// A booted guest, ready on its serial console, with loopback ports for its agent and
/// any extra guest ports.
pub struct ReadyGuest {
    pub vm: forage_vm::Vm,
    pub agent_port: u16,
    /// Host ports, in the order of the requested guest ports.
    pub ports: Vec<u16>,
    /// From QEMU start to the ready marker.
    pub boot_time: Duration,
}

impl GuestImage {
    /// Boot this image in `run` and wait for its ready marker (`timeout`). On timeout the
    /// error carries the serial console's last lines and QEMU is killed.
    pub async fn boot(
        &self,
        name: &str,
        run: &RunPaths,
        guest_ports: &[u16],
        accel: forage_vm::Accel,
        timeout: Duration,
    ) -> Result<ReadyGuest, BootError> {
        self.boot_from(name, run, None, guest_ports, accel, timeout).await
    }

    /// [`boot`](Self::boot) with `disk` (raw, used in place) as the data disk instead of a
    /// copy of the image's: a cold boot of a disk brought from elsewhere.
    pub async fn boot_from(
        &self,
        name: &str,
        run: &RunPaths,
        disk: Option<&Path>,
        guest_ports: &[u16],
        accel: forage_vm::Accel,
        timeout: Duration,
    ) -> Result<ReadyGuest, BootError> {
        let start = Instant::now();
        let (mut spec, mut ports) = self.fresh_run(name, run, guest_ports)?;
        if let Some(disk) = disk {
            let _ = std::fs::remove_file(&spec.disks[0].path);
            spec.disks[0].path = disk.to_path_buf();
        }
        let vm = forage_vm::Vm::boot(spec, accel, &run.dir.join("qemu.log")).await?;
        vm.wait_for_serial(&self.manifest.ready_marker, timeout).await?;
        let agent_port = ports.remove(0);
        Ok(ReadyGuest {
            vm,
            agent_port,
            ports,
            boot_time: start.elapsed(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Vm(#[from] forage_vm::VmError),
}
