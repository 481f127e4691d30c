//! `forage base create NAME --disk FILE ...`: the options of a base made from a disk image.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DiskFormatArg {
    Raw,
    Qcow2,
}

#[derive(Args, Debug, Clone)]
pub struct DiskBaseArgs {
    /// A raw or qcow2 disk image (a cloud image, a disk you built) to boot, configure with
    /// cloud-init, save and index as the base (docs/import-disk-image.md)
    #[arg(long, value_name = "FILE", conflicts_with_all = ["from_vm", "image"])]
    pub disk: Option<PathBuf>,
    /// The disk's format [default: raw or qcow2 by its header]; anything else is refused
    #[arg(long, value_enum, requires = "disk")]
    pub format: Option<DiskFormatArg>,
    /// Ready when this guest TCP port answers [default: when cloud-init's line appears on
    /// the serial console]
    #[arg(long, value_name = "PORT", requires = "disk")]
    pub ready_port: Option<u16>,
    /// Boot this kernel (with --initrd and --append) instead of the disk's bootloader
    #[arg(long, requires_all = ["disk", "initrd", "append"])]
    pub kernel: Option<PathBuf>,
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// The kernel command line, e.g. "root=/dev/vda1 console=ttyS0"
    #[arg(long, requires = "kernel", allow_hyphen_values = true)]
    pub append: Option<String>,
    /// The user cloud-init creates (sudo, no password)
    #[arg(long, default_value = "admin", requires = "disk")]
    pub user: String,
    /// An SSH public key file for that user
    #[arg(long, value_name = "FILE", requires = "disk")]
    pub ssh_key: Option<PathBuf>,
    /// Guest RAM
    #[arg(long, default_value_t = 1024, requires = "disk")]
    pub memory_mib: u64,
    /// Refuse disks whose virtual size is larger
    #[arg(long, default_value_t = 64, requires = "disk")]
    pub max_disk_gib: u64,
    /// Give up booting after this long (TCG: a Debian cloud image with cloud-init takes minutes)
    #[arg(long, default_value_t = 900, requires = "disk")]
    pub ready_timeout_s: u64,
}
