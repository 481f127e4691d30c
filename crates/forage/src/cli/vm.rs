//! `forage vm ...` arguments.

use std::path::PathBuf;

use clap::{Args, Subcommand};

#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Boot a VM from an image and supervise it in the foreground (Ctrl-C stops it)
    Boot {
        name: String,
        /// Guest image: `tiny` or `debian-12` (apps naming Debian packages need debian-12)
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
        /// Restore this snapshot folder (e.g. `forage overlay apply --out DIR`) as VM NAME
        #[arg(long, value_name = "DIR", conflicts_with = "base")]
        from: Option<PathBuf>,
        /// Resume base B as VM NAME, its disk a qcow2 layer over the base's that records
        /// the VM's writes (a launch VM prepared by hand: `forage overlay create --from-vm`)
        #[arg(long, value_name = "B")]
        base: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Import a VM saved by plain QEMU (`migrate "exec:cat > FILE"`) or by `virsh save`,
    /// with its disk, as VM NAME's save (then `forage vm restore NAME`)
    Import {
        name: String,
        /// The saved VM: a QEMU migration stream, or a `virsh save` file
        saved: PathBuf,
        /// Its disk (raw or qcow2)
        #[arg(long)]
        disk: PathBuf,
        /// Guest image whose hardware (devices, kernel command line) the VM was saved with
        #[arg(long, default_value = "tiny")]
        image: String,
        /// Guest port of the VM's service, forwarded to the host when it is restored
        #[arg(long)]
        port: Option<u16>,
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
