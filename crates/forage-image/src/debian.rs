//! The `debian-12` recipe: Debian bookworm built by `mmdebstrap` from Debian's packages
//! (deb.debian.org, never the web), root file system on the virtio disk (raw, ext4 with
//! 4 KiB blocks, made with `mkfs.ext4 -d` from the tree: no loop mount), Debian's cloud
//! kernel booted directly with the initramfs initramfs-tools built inside the tree,
//! systemd as init, qemu-guest-agent on virtio-serial, and the forage agent as a systemd
//! service. The guest's own files (units, network, hooks) are in `guest/debian-12/`.
//!
//! ```text
//! mmdebstrap --variant=minbase --include=systemd,udev,linux-image-cloud-amd64,...
//!   setup hook      initramfs-tools config (before the kernel's postinst builds the initrd)
//!                   + the cached .debs of earlier builds (sync-in)
//!   customize hook  forage's files (sync-in overlay/), units enabled and masked
//!                   + the .debs back to the cache (sync-out)
//! tree/boot/vmlinuz-*, initrd.img-*  ->  vmlinuz, initrd.img
//! tree/var/lib/dpkg/status           ->  the package list in image.json
//! mkfs.ext4 -b 4096 -d tree          ->  disk.raw (sparse)
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use forage_datadir::DataDir;
use sha2::{Digest, Sha256};

use crate::manifest::{ImageManifest, RootFs, IMAGE_FORMAT, IMAGE_KIND};
use crate::{BuildOptions, BuildOutcome, ImageError, AGENT_PORT, READY_MARKER};

pub const NAME: &str = "debian-12";
pub const DEFAULT_DISK_MIB: u64 = 4096;
pub const DEFAULT_MEMORY_MIB: u64 = 1024;
/// The Debian release of the guest.
pub const SUITE: &str = "bookworm";
/// The guest's package sources: its `/etc/apt/sources.list`, and what the host resolves
/// applications' packages against ([`crate::apt`]).
pub const APT_SOURCES: &[&str] = &[
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
];

/// Bumped when the recipe changes in a way the digest's other inputs do not show.
/// 2: VMs of the image get a virtio-rng device.
const RECIPE_VERSION: u32 = 2;
/// Besides `minbase` (Priority: required, and apt).
const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "udev",
    "kmod",
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "lz4",
    "qemu-guest-agent",
    "iproute2",
    "procps",
];
/// Documentation is not installed (in the image, nor by apt in the guest later).
const DPKG_OPTIONS: &[&str] = &[
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/info/*",
];
/// The root is mounted read-write with its final options by the initramfs (the guest's
/// systemd-remount-fs is masked), with no fsck: images boot from a clean file system and
/// saved VMs are resumed, not rebooted.
const KERNEL_CMDLINE: &str = "root=/dev/vda rw rootfstype=ext4 rootflags=discard,errors=remount-ro \
    fsck.mode=skip console=ttyS0 panic=-1 quiet loglevel=3 systemd.show_status=0 udev.log_level=3 \
    rd.udev.log_level=3 mitigations=off 8250.nr_uarts=1 net.ifnames=0";

const SETUP_HOOK: &str = include_str!("../guest/debian-12/setup-hook.sh");
const CUSTOMIZE_HOOK: &str = include_str!("../guest/debian-12/customize-hook.sh");

/// A file forage puts into the guest's tree.
struct GuestFile {
    path: &'static str,
    mode: u32,
    text: &'static str,
}

macro_rules! guest_file {
    ($path:literal, $mode:literal) => {
        GuestFile { path: $path, mode: $mode, text: include_str!(concat!("../guest/debian-12/overlay/", $path)) }
    };
}

const OVERLAY: &[GuestFile] = &[
    guest_file!("etc/fstab", 0o644),
    guest_file!("etc/hostname", 0o644),
    guest_file!("etc/hosts", 0o644),
    guest_file!("etc/systemd/network/20-forage.network", 0o644),
    guest_file!("etc/systemd/journald.conf.d/forage.conf", 0o644),
    guest_file!("etc/udev/rules.d/80-forage-page-reporting.rules", 0o644),
    guest_file!("etc/modprobe.d/forage.conf", 0o644),
    guest_file!("etc/systemd/system/forage-agent.service", 0o644),
    guest_file!("etc/systemd/system/forage-apps.service", 0o644),
    guest_file!("etc/systemd/system/forage-heartbeat.service", 0o644),
    guest_file!("etc/systemd/system/forage-ready.service", 0o644),
    guest_file!("usr/local/lib/forage/start-apps", 0o755),
];
/// Where the forage agent goes in the guest.
const AGENT_PATH: &str = "usr/local/sbin/forage-agent";

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
    check_notifies(&opts.agent_binary, agent)?;
    let recipe = recipe_digest(&agent_sha256, disk_mib, memory_mib);
    if let Some(cached) = crate::cached(data, NAME, &recipe, opts, start) {
        return Ok(cached);
    }
    check_root()?;
    let work = crate::partial_dir(data, NAME)?;
    let log = data.images().join(format!(".{NAME}.build.log"));
    let result = assemble(data, &work, &log, agent, disk_mib);
    let (kernel_package, packages) = match result {
        Ok(r) => r,
        Err(e) => {
            remove_tree(&work.join("tree"));
            if !has_mounts_under(&work) {
                let _ = std::fs::remove_dir_all(&work);
            }
            return Err(e);
        }
    };
    let _ = std::fs::rename(&log, work.join("build.log"));
    let manifest = ImageManifest {
        kind: IMAGE_KIND.into(),
        format: IMAGE_FORMAT,
        name: NAME.into(),
        recipe_digest: recipe,
        os: NAME.into(),
        root: RootFs::Disk,
        kernel_package,
        busybox_package: None,
        agent_sha256,
        modules: Vec::new(),
        kernel: "vmlinuz".into(),
        initrd: "initrd.img".into(),
        disk: "disk.raw".into(),
        disk_mib,
        disk_mount: "/".into(),
        cmdline: KERNEL_CMDLINE.into(),
        memory_mib,
        ready_marker: READY_MARKER.into(),
        agent_port: AGENT_PORT,
        guest_agent: true,
        virtio_rng: true,
        packages,
    };
    crate::finish(data, &work, manifest, start)
}

/// The agent's unit is `Type=notify`: an agent built before it told systemd that it
/// listens (it reads `NOTIFY_SOCKET`) leaves the unit activating until systemd's start
/// timeout kills it, and the ready marker, which waits for the agent, never comes.
fn check_notifies(path: &Path, agent: &[u8]) -> Result<(), ImageError> {
    const NOTIFY: &[u8] = b"NOTIFY_SOCKET";
    if agent.windows(NOTIFY.len()).any(|w| w == NOTIFY) {
        return Ok(());
    }
    Err(ImageError::StaleGuestBinary {
        path: path.to_path_buf(),
        recipe: NAME,
        detail: "it does not tell systemd when it listens (NOTIFY_SOCKET), so the guest never gets ready",
    })
}

fn recipe_digest(agent_sha256: &str, disk_mib: u64, memory_mib: u64) -> String {
    let mut h = Sha256::new();
    let mut part = |s: &str| {
        h.update(s.as_bytes());
        h.update([0]);
    };
    part(NAME);
    part(&RECIPE_VERSION.to_string());
    part(SUITE);
    APT_SOURCES.iter().for_each(|s| part(s));
    PACKAGES.iter().for_each(|s| part(s));
    DPKG_OPTIONS.iter().for_each(|s| part(s));
    part(KERNEL_CMDLINE);
    part(SETUP_HOOK);
    part(CUSTOMIZE_HOOK);
    for f in OVERLAY {
        part(f.path);
        part(&f.mode.to_string());
        part(f.text);
    }
    part(agent_sha256);
    part(&disk_mib.to_string());
    part(&memory_mib.to_string());
    hex::encode(h.finalize())
}

/// mmdebstrap's root mode (chroot) keeps file owners as they must be in the guest.
fn check_root() -> Result<(), ImageError> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata("/proc/self") {
        Ok(m) if m.uid() == 0 => Ok(()),
        _ => Err(ImageError::Tool {
            tool: "mmdebstrap",
            detail: format!("building {NAME} needs root (mmdebstrap --mode=root keeps the guest's file owners)"),
        }),
    }
}

/// Build the tree with mmdebstrap, take the boot files out, make the disk. Returns the
/// kernel package (`name=version`) and every installed package.
fn assemble(
    data: &DataDir,
    work: &Path,
    log: &Path,
    agent: &[u8],
    disk_mib: u64,
) -> Result<(String, Vec<String>), ImageError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ImageError::Io { path, source }
    };
    let recipe = work.join("recipe");
    let overlay = recipe.join("overlay");
    let write = |rel: &Path, mode: u32, bytes: &[u8]| -> Result<(), ImageError> {
        use std::os::unix::fs::PermissionsExt;
        let path = recipe.join(rel);
        std::fs::create_dir_all(path.parent().expect("inside recipe")).map_err(io(&path))?;
        std::fs::write(&path, bytes).map_err(io(&path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(io(&path))
    };
    write(Path::new("setup-hook.sh"), 0o755, SETUP_HOOK.as_bytes())?;
    write(Path::new("customize-hook.sh"), 0o755, CUSTOMIZE_HOOK.as_bytes())?;
    for f in OVERLAY {
        write(&Path::new("overlay").join(f.path), f.mode, f.text.as_bytes())?;
    }
    write(&Path::new("overlay").join(AGENT_PATH), 0o755, agent)?;
    // Directories the overlay creates must have the guest's usual modes.
    let status = Command::new("chmod").arg("-R").arg("u=rwX,go=rX").arg(&overlay).status();
    if !status.is_ok_and(|s| s.success()) {
        return Err(ImageError::Tool {
            tool: "chmod",
            detail: format!("cannot set the modes of {}", overlay.display()),
        });
    }
    let debs = data.root().join("cache").join("mmdebstrap");
    std::fs::create_dir_all(&debs).map_err(io(&debs))?;
    let tree = work.join("tree");
    run_mmdebstrap(&recipe, &overlay, &debs, &tree, log)?;

    let boot = tree.join("boot");
    let vmlinuz = crate::find_prefixed(&boot, "vmlinuz-")?.ok_or_else(|| not_in_tree("boot/vmlinuz-*"))?;
    let initrd = crate::find_prefixed(&boot, "initrd.img-")?.ok_or_else(|| not_in_tree("boot/initrd.img-*"))?;
    std::fs::copy(&vmlinuz, work.join("vmlinuz")).map_err(io(&vmlinuz))?;
    std::fs::copy(&initrd, work.join("initrd.img")).map_err(io(&initrd))?;
    let status_file = tree.join("var/lib/dpkg/status");
    let status = std::fs::read_to_string(&status_file).map_err(io(&status_file))?;
    let packages = installed_packages(&status);
    let kernel_release = vmlinuz.file_name().unwrap().to_string_lossy().trim_start_matches("vmlinuz-").to_string();
    let kernel_package = packages
        .iter()
        .find(|p| p.starts_with(&format!("linux-image-{kernel_release}=")))
        .cloned()
        .unwrap_or_else(|| format!("linux-image-{kernel_release}"));
    // mmdebstrap empties the machine id (for reproducible trees); an image with none
    // would get a new one at every boot. One per image build.
    let machine_id = tree.join("etc/machine-id");
    let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map_err(io(Path::new("/proc/sys/kernel/random/uuid")))?;
    std::fs::write(&machine_id, format!("{}\n", uuid.trim().replace('-', ""))).map_err(io(&machine_id))?;
    let made = crate::make_ext4(&work.join("disk.raw"), &tree, "forage-root", disk_mib);
    remove_tree(&tree);
    let _ = std::fs::remove_dir_all(&recipe);
    made?;
    Ok((kernel_package, packages))
}

fn not_in_tree(what: &str) -> ImageError {
    ImageError::NotInPackage { what: what.to_string(), package: format!("{NAME} tree built by mmdebstrap") }
}

fn run_mmdebstrap(recipe: &Path, overlay: &Path, debs: &Path, tree: &Path, log: &Path) -> Result<(), ImageError> {
    let q = |p: &Path| shell_quote(&p.to_string_lossy());
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(["--mode=root", "--variant=minbase", "--format=directory", "--skip=essential/unlink"])
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg("--aptopt=APT::Install-Recommends \"false\"")
        .args(DPKG_OPTIONS.iter().map(|o| format!("--dpkgopt={o}")))
        .arg(format!("--setup-hook={} \"$1\"", q(&recipe.join("setup-hook.sh"))))
        // The .debs of earlier builds (mmdebstrap's documented way to cache them).
        .arg("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/")
        .arg(format!("--setup-hook=sync-in {} /var/cache/apt/archives/", q(debs)))
        .arg(format!("--customize-hook=sync-in {} /", q(overlay)))
        .arg(format!("--customize-hook={} \"$1\"", q(&recipe.join("customize-hook.sh"))))
        .arg(format!("--customize-hook=sync-out /var/cache/apt/archives {}", q(debs)))
        .arg(SUITE)
        .arg(tree)
        .args(APT_SOURCES);
    let log_file = std::fs::File::create(log).map_err(|source| ImageError::Io { path: log.to_path_buf(), source })?;
    let log_err = log_file.try_clone().map_err(|source| ImageError::Io { path: log.to_path_buf(), source })?;
    tracing::info!(tree = %tree.display(), "mmdebstrap");
    let status = cmd
        .stdin(std::process::Stdio::null())
        .stdout(log_file)
        .stderr(log_err)
        .status()
        .map_err(|e| ImageError::Tool { tool: "mmdebstrap", detail: e.to_string() })?;
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(12).collect();
        return Err(ImageError::Mmdebstrap {
            log: log.to_path_buf(),
            tail: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    Ok(())
}

/// `name=version` of every installed package in a dpkg status file.
pub fn installed_packages(status: &str) -> Vec<String> {
    let mut out = Vec::new();
    for para in status.split("\n\n") {
        let field = |name: &str| {
            para.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':'))).map(str::trim)
        };
        if let (Some(p), Some(v), Some(s)) = (field("Package"), field("Version"), field("Status")) {
            if s.ends_with(" installed") {
                out.push(format!("{p}={v}"));
            }
        }
    }
    out.sort();
    out
}

/// Remove a tree mmdebstrap built, unless something is still mounted inside it (a killed
/// mmdebstrap can leave /proc, /sys or /dev mounted there: removing through them would
/// touch the host's). Mounts are lazily unmounted first.
fn remove_tree(tree: &Path) {
    if !tree.exists() {
        return;
    }
    for m in mounts_under(tree).into_iter().rev() {
        let _ = Command::new("umount").arg("--lazy").arg(&m).status();
    }
    if has_mounts_under(tree) {
        tracing::warn!(tree = %tree.display(), "file systems still mounted inside; not removing it");
        return;
    }
    let _ = std::fs::remove_dir_all(tree);
}

fn has_mounts_under(dir: &Path) -> bool {
    !mounts_under(dir).is_empty()
}

/// Mount points at or under `dir` (from /proc/self/mounts; octal escapes decoded).
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mounts") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| l.split(' ').nth(1))
        .map(|m| PathBuf::from(unescape_mount(m)))
        .filter(|m| m.starts_with(dir))
        .collect()
}

fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installed_packages_from_status() {
        let status = "Package: libc6\nStatus: install ok installed\nVersion: 2.36-9+deb12u13\n\n\
                      Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n\n\
                      Package: apt\nStatus: install ok installed\nPriority: required\nVersion: 2.6.1\nDescription: x\n y\n";
        assert_eq!(installed_packages(status), ["apt=2.6.1", "libc6=2.36-9+deb12u13"]);
    }

    #[test]
    fn an_agent_that_does_not_notify_systemd_is_refused() {
        let p = Path::new("target/guest/forage-agent");
        assert!(check_notifies(p, b"\x7fELF ... NOTIFY_SOCKET ...").is_ok());
        let e = check_notifies(p, b"\x7fELF ... READY ...").unwrap_err();
        assert!(e.to_string().contains("make guest") && !e.to_string().contains('\n'), "{e}");
    }

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(unescape_mount(r"/a\040b/c"), "/a b/c");
        assert_eq!(unescape_mount(r"/plain"), "/plain");
    }

    #[test]
    fn every_guest_file_is_in_the_recipe_digest() {
        let a = recipe_digest("agent", 4096, 1024);
        assert_eq!(a, recipe_digest("agent", 4096, 1024));
        assert_ne!(a, recipe_digest("agent2", 4096, 1024));
        assert_ne!(a, recipe_digest("agent", 8192, 1024));
        assert!(OVERLAY.iter().all(|f| !f.text.is_empty()));
    }
}
