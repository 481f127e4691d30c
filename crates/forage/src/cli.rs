//! The command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "forage", version, about = "Cloudlets provisioned just in time: VM synthesis, VM handoff, tactical cloudlets")]
pub struct Cli {
    /// Where forage keeps images, VMs and caches [default: $FORAGE_HOME, else $XDG_DATA_HOME/forage]
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Debug logging
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Build and inspect guest images
    #[command(subcommand)]
    Image(ImageCommand),
    /// Boot, save and restore VMs by hand
    #[command(subcommand)]
    Vm(VmCommand),
    /// The quickstart demo: build the tiny guest, boot it, install the sample service,
    /// save, restore, and show that the guest carried on
    Demo(DemoArgs),
}

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Build a guest image from Debian packages (cached: a rerun with the same recipe is a no-op)
    Build {
        /// Image recipe (only `tiny` so far)
        name: String,
        /// Rebuild even if cached
        #[arg(long)]
        force: bool,
        /// Size of the ext4 data disk
        #[arg(long, default_value_t = 64, value_name = "MIB")]
        disk_mib: u64,
        /// Guest RAM
        #[arg(long, default_value_t = 256, value_name = "MIB")]
        memory_mib: u64,
        #[arg(long)]
        json: bool,
    },
    /// List built images
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Boot a VM from an image and supervise it in the foreground (Ctrl-C stops it)
    Boot {
        name: String,
        #[arg(long, default_value = "tiny")]
        image: String,
        /// Install this app folder (with app.json) once the guest is ready, and forward its port
        #[arg(long, value_name = "DIR")]
        app: Option<PathBuf>,
        #[command(flatten)]
        wait: WaitArgs,
        #[arg(long)]
        json: bool,
    },
    /// Save a running VM (from another terminal): memory file + device state, then QEMU exits
    Save {
        name: String,
        /// Replace an earlier save of this VM
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Restore a saved VM and supervise it in the foreground; the save is kept
    Restore {
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
        #[arg(long)]
        json: bool,
    },
    /// Pause a running VM's vCPUs
    Pause { name: String },
    /// Resume a paused VM
    Resume { name: String },
    /// Stop a running VM at once
    Stop { name: String },
    /// Run a command in the guest through its agent
    Exec {
        name: String,
        #[arg(long, default_value_t = 60)]
        timeout_s: u64,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// List VMs and their state
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a VM that is not running, with its save
    Rm { name: String },
}

#[derive(Args, Debug, Clone)]
pub struct WaitArgs {
    /// How long to wait for the guest to be ready
    #[arg(long, default_value_t = 180, value_name = "SECONDS")]
    pub ready_timeout_s: u64,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// App folder to install (default: the sample hashsearch service built by `make guest`)
    #[arg(long, value_name = "DIR")]
    pub app: Option<PathBuf>,
    #[command(flatten)]
    pub wait: WaitArgs,
    #[arg(long)]
    pub json: bool,
}
