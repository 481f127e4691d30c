//! `image.json`: what a guest image is made of and how to boot it. Versioned: format 1
//! (the tiny image before debian-12 existed) reads as format 2 with tiny's values for the
//! fields it lacks; a newer format is refused with a message saying so.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const IMAGE_KIND: &str = "forage-guest-image";
/// Version of `image.json` written by this forage. 2: root on disk or initramfs, the disk's
/// mount point, the qemu-ga channel, the OS and its Debian packages.
pub const IMAGE_FORMAT: u32 = 2;

/// Where the guest's root file system lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RootFs {
    /// In the initramfs (tiny): the disk is a data disk.
    #[default]
    Initramfs,
    /// On the virtio disk (`/dev/vda`), booted by the initramfs.
    Disk,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageManifest {
    pub kind: String,
    pub format: u32,
    pub name: String,
    /// Digest of everything the image was built from; equal digests, equal images.
    pub recipe_digest: String,
    /// What the guest runs: `busybox` (tiny) or `debian-12`.
    #[serde(default = "busybox")]
    pub os: String,
    #[serde(default)]
    pub root: RootFs,
    pub kernel_package: String,
    /// The busybox package of an initramfs image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub busybox_package: Option<String>,
    pub agent_sha256: String,
    /// Kernel modules the tiny init loads (a Debian guest's udev loads its own).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules: Vec<String>,
    pub kernel: String,
    pub initrd: String,
    pub disk: String,
    pub disk_mib: u64,
    /// Where the guest mounts the disk (`/data` on tiny, `/` on debian-12). Apps live in
    /// `/data/apps` either way.
    #[serde(default = "data_mount")]
    pub disk_mount: String,
    pub cmdline: String,
    pub memory_mib: u64,
    pub ready_marker: String,
    pub agent_port: u16,
    /// The guest runs qemu-ga on a virtio-serial channel (VMs get a `GuestAgentSpec`).
    #[serde(default)]
    pub guest_agent: bool,
    /// VMs get a virtio-rng device (entropy from the host).
    #[serde(default)]
    pub virtio_rng: bool,
    /// Debian packages installed in the guest (`name=version`), for Debian images.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<String>,
}

fn busybox() -> String {
    "busybox".into()
}

fn data_mount() -> String {
    "/data".into()
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: unreadable image description: {detail}")]
    Bad { path: PathBuf, detail: String },
    #[error("{path}: image format {found} is newer than this forage reads ({IMAGE_FORMAT}); rebuild the image with this forage (`forage image build NAME --force`) or use a newer forage")]
    Newer { path: PathBuf, found: u64 },
}

impl ImageManifest {
    /// Parse `image.json` text read from `path` (named in errors).
    pub fn parse(path: &Path, text: &[u8]) -> Result<Self, ManifestError> {
        let bad = |detail: String| ManifestError::Bad { path: path.to_path_buf(), detail };
        let raw: serde_json::Value = serde_json::from_slice(text).map_err(|e| bad(e.to_string()))?;
        if raw["kind"] != IMAGE_KIND {
            return Err(bad(format!("kind is {}, expected {IMAGE_KIND}", raw["kind"])));
        }
        let found = raw["format"].as_u64().ok_or_else(|| bad("no format number".into()))?;
        if found > IMAGE_FORMAT as u64 {
            return Err(ManifestError::Newer { path: path.to_path_buf(), found });
        }
        let m: ImageManifest = serde_json::from_value(raw).map_err(|e| bad(e.to_string()))?;
        for file in [&m.kernel, &m.initrd, &m.disk] {
            if file.is_empty() || file.contains('/') || file == "." || file == ".." {
                return Err(bad(format!("file name {file:?} is not a plain name inside the image folder")));
            }
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v1() -> serde_json::Value {
        serde_json::json!({
            "kind": IMAGE_KIND, "format": 1, "name": "tiny", "recipe_digest": "ab",
            "kernel_package": "linux-image-6.1.0-56-cloud-amd64_6.1.158-1_amd64.deb",
            "busybox_package": "busybox-static_1%3a1.35.0-4+b3_amd64.deb", "agent_sha256": "cd",
            "modules": ["virtio"], "kernel": "vmlinuz", "initrd": "initrd.img", "disk": "disk.raw",
            "disk_mib": 64, "cmdline": "console=ttyS0", "memory_mib": 256,
            "ready_marker": "FORAGE-READY", "agent_port": 7000
        })
    }

    #[test]
    fn format_1_reads_as_tiny() {
        let m = ImageManifest::parse(Path::new("image.json"), v1().to_string().as_bytes()).unwrap();
        assert_eq!(
            (m.root, m.disk_mount.as_str(), m.guest_agent, m.os.as_str()),
            (RootFs::Initramfs, "/data", false, "busybox")
        );
        assert!(m.busybox_package.unwrap().starts_with("busybox-static"));
    }

    #[test]
    fn newer_format_is_refused_by_name() {
        let mut v = v1();
        v["format"] = 3.into();
        v["root_hash"] = "x".into(); // a field this forage does not know
        let err = ImageManifest::parse(Path::new("/i/image.json"), v.to_string().as_bytes()).unwrap_err();
        assert!(matches!(err, ManifestError::Newer { found: 3, .. }));
        assert!(err.to_string().contains("/i/image.json: image format 3 is newer"), "{err}");
    }

    #[test]
    fn unknown_fields_and_escaping_names_are_refused() {
        let mut v = v1();
        v["rootfs"] = "disk".into();
        assert!(ImageManifest::parse(Path::new("i"), v.to_string().as_bytes()).is_err());
        let mut v = v1();
        v["kernel"] = "../../etc/passwd".into();
        assert!(ImageManifest::parse(Path::new("i"), v.to_string().as_bytes())
            .unwrap_err()
            .to_string()
            .contains("plain name"));
    }
}
