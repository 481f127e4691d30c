//! Guest images for forage, built from Debian packages, never from the web. Two recipes:
//!
//! - `tiny` ([`tiny`]): Debian's cloud kernel, a busybox initramfs with the forage agent
//!   and an init that prints a ready marker, and an ext4 data disk mounted at `/data`;
//!   from `apt-get download`. Boots in seconds under TCG.
//! - `debian-12` ([`debian`]): Debian bookworm built by `mmdebstrap`, root file system on
//!   the virtio disk, Debian's cloud kernel and initramfs, systemd, qemu-guest-agent on a
//!   virtio-serial channel, the forage agent as a service, apt pointing at deb.debian.org.
//!
//! Applications are never baked into an image: the agent installs them (`/data/apps/NAME/`)
//! and [`app_debs`] installs the Debian packages they name, resolved and downloaded on the
//! host against the guest's own package status.
//!
//! Images are cached under `DATA/images/NAME` with an `image.json` ([`manifest`]) that
//! records the recipe digest; a build whose recipe matches is a no-op. A build happens in
//! `images/.NAME.partial-PID/` and is renamed into place when complete.

pub mod app_debs;
pub mod apt;
mod build;
pub mod cloud_seed;
pub mod debian;
mod debs;
mod ensure;
mod error;
mod guest;
pub mod initramfs;
pub mod manifest;
pub mod modules;
mod recipe;
mod run;
pub mod tiny;
pub mod vms;

pub use manifest::{ImageManifest, ManifestError, RootFs, IMAGE_FORMAT, IMAGE_KIND};
pub use run::{forwards_on, loopback_forwards, BootError, GuestImage, ReadyGuest, RunPaths};

pub use build::{build, DEBIAN_12, RECIPES, TINY};
pub use ensure::ensure;
pub use error::ImageError;
pub use guest::{AGENT_PORT, GUEST_OS, READY_MARKER};
pub(crate) use recipe::{cached, check_static, find_prefixed, finish, make_ext4, partial_dir};
pub use recipe::{locate_guest_binary, BuildOptions, BuildOutcome};
