//! The command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

mod base_disk;
mod cluster;
mod instances;
mod overlay;
mod packages;
mod substrate;
mod vm;
pub use base_disk::{DiskBaseArgs, DiskFormatArg};
pub use cluster::{ClusterCommand, NodeCommand};
pub use instances::{DrainArgs, HandoffArgs, InstancesArgs, StopArgs};
pub use overlay::{OverlayCommand, OverlayCreateArgs, ReduceArgs};
pub use packages::PackagesCommand;
pub use substrate::SubstrateCommand;
pub use vm::VmCommand;

#[derive(Parser, Debug)]
#[command(
    name = "forage",
    version,
    about = "Cloudlets provisioned just in time: VM synthesis, VM handoff, tactical cloudlets"
)]
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
    /// Base VMs: the state a cloudlet already holds
    #[command(subcommand)]
    Base(BaseCommand),
    /// VM overlays: a launch VM as a small difference against a base
    #[command(subcommand)]
    Overlay(OverlayCommand),
    /// Debian packages this host holds, whose files overlays may name instead of carrying
    #[command(subcommand)]
    Packages(PackagesCommand),
    /// Run a cloudlet: accept devices and synthesize their overlays (early start, pipelined
    /// or from the launch-VM cache), provision services, receive handoffs, with an HTTP
    /// management API
    Serve {
        /// Read the daemon's configuration from this TOML file (the flags' names, with
        /// underscores) instead of the flags
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(flatten)]
        daemon: forage_daemon::DaemonConfig,
    },
    /// List the cloudlets announcing themselves on the local network (mDNS `_cloudlet._tcp`)
    Discover {
        /// How long to listen for answers
        #[arg(long, default_value_t = 3.0, value_name = "S")]
        timeout: f64,
        #[arg(long)]
        json: bool,
    },
    /// Synthesize an overlay on a cloudlet and print the first response with its breakdown
    Synthesize {
        /// The overlay: a file, or an http(s):// URL the cloudlet fetches itself (range
        /// requests; the device only reads the header and manifest)
        file: PathBuf,
        /// Cloudlet address, or `auto`: the best one announcing itself on the local network
        /// (holds the overlay's base; fewest instances per core; shortest round trip)
        #[arg(long, default_value = "127.0.0.1:7878")]
        cloudlet: String,
        /// Keep the instance until Ctrl-C (otherwise it is released after the first
        /// response); meanwhile a line `follow HOST:PORT` on stdin asks it to move there
        #[arg(long)]
        hold: bool,
        /// Resume the launch VM before the overlay is all here, fetching what it touches
        /// first (the default; the flag only says so)
        #[arg(long, conflicts_with_all = ["no_early_start", "no_pipelining"])]
        early_start: bool,
        /// Wait for the whole overlay before resuming (pipelined synthesis only)
        #[arg(long)]
        no_early_start: bool,
        /// Let the cloudlet receive everything before applying anything (the unpipelined
        /// baseline; implies --no-early-start)
        #[arg(long)]
        no_pipelining: bool,
        /// Send the first line of FILE as the first request (default: the overlay's probe)
        #[arg(long, value_name = "FILE")]
        request: Option<PathBuf>,
        /// At the end, get the instance's residue (its changes) into FILE, to merge into
        /// the overlay with `forage overlay merge`
        #[arg(long, value_name = "FILE")]
        residue: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Service VMs held by this cloudlet (cached-VM offload, app store, baseline VMs per OS)
    #[command(subcommand)]
    Service(ServiceCommand),
    /// VM substrates: docked, shrunk VMs in a memory-budgeted pool, activated on request,
    /// multicast to other hosts
    #[command(subcommand)]
    Substrate(SubstrateCommand),
    /// Cached VM: start a transient copy-on-write instance of a service VM the cloudlet
    /// holds (or an activation of a substrate docked from it) and print its endpoint;
    /// with --substrate, activate that VM substrate of the cloudlet's pool instead
    Offload {
        /// Service id (see `forage service list` on the cloudlet, or GET /v1/services)
        #[arg(long, required_unless_present = "substrate", conflicts_with = "substrate")]
        service: Option<String>,
        /// Share a running instance of the service if there is one
        #[arg(long, requires = "service")]
        join: bool,
        /// A substrate of the cloudlet's pool (GET /v1/substrates) to activate
        #[arg(long)]
        substrate: Option<String>,
        /// vCPUs the activated substrate gets
        #[arg(long, default_value_t = 1, requires = "substrate")]
        vcpus: u32,
        /// Memory (MiB) the activated substrate gets (at most what it was docked for)
        #[arg(long, requires = "substrate", required_unless_present = "service")]
        memory: Option<u64>,
        #[command(flatten)]
        session: SessionArgs,
    },
    /// The cloudlet's app store: client apps for its services
    Apps(AppsArgs),
    /// On-demand provisioning: run a shell script inside a transient copy of the
    /// cloudlet's baseline VM (never on the host), then use the service it starts
    Provision {
        /// The provisioning script (sh); it must leave the service listening on --port
        script: PathBuf,
        /// Guest port the script's service listens on
        #[arg(long)]
        port: u16,
        /// Guest OS the script is written for
        #[arg(long, default_value = forage_image::GUEST_OS)]
        os: String,
        /// Kill the script after this long
        #[arg(long, default_value_t = 120, value_name = "S")]
        timeout: u32,
        /// Server code component of the cloudlet the script needs (put in the guest under
        /// /opt/components/NAME before it runs); repeatable
        #[arg(long = "component", value_name = "NAME")]
        components: Vec<String>,
        #[command(flatten)]
        session: SessionArgs,
    },
    /// Application virtualization: pack a program with its library closure, run it on a cloudlet
    #[command(subcommand)]
    App(AppCommand),
    /// VM handoff: move a running instance of this cloudlet to another cloudlet (paired
    /// with `forage pair --as-cloudlet`); its device is told the new endpoint
    Handoff(HandoffArgs),
    /// The instances this cloudlet's daemon runs (its HTTP API, with the operator's token)
    Instances(InstancesArgs),
    /// Stop an instance of this cloudlet (its id, or the endpoint its device was given)
    Stop(StopArgs),
    /// Move every running instance of this cloudlet to another one (e.g. before
    /// maintenance), one after the other; each device is told where its instance went
    Drain(DrainArgs),
    /// A cloudlet of many hosts coordinated through etcd (`forage serve --cluster URLS`)
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// One node of the cluster
    #[command(subcommand)]
    Node(NodeCommand),
    /// Overlay signers: this host's signing key, and the keys a cloudlet accepts
    #[command(subcommand)]
    Signer(SignerCommand),
    /// Pairing: on a cloudlet, show a one-time code (or write a bundle); on a device, pair
    /// with a cloudlet using its code. Every connection then uses these credentials.
    Pair(PairArgs),
    /// Reproduce the papers' measurements on this machine (runs `forage-bench`)
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// The quickstart demo (runs `forage-bench demo`)
    #[command(disable_help_flag = true)]
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Build a guest image from Debian packages (cached: a rerun with the same recipe is a no-op)
    Build {
        /// Image recipe: `tiny` (busybox initramfs, data disk) or `debian-12` (Debian
        /// bookworm with systemd on its disk, built with mmdebstrap)
        name: String,
        /// Rebuild even if cached
        #[arg(long)]
        force: bool,
        /// Size of the ext4 disk (default: tiny 64, debian-12 4096)
        #[arg(long, value_name = "MIB")]
        disk_mib: Option<u64>,
        /// Guest RAM (default: tiny 256, debian-12 1024)
        #[arg(long, value_name = "MIB")]
        memory_mib: Option<u64>,
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
pub enum BaseCommand {
    /// Boot an image, let it settle, save it, and index its chunks
    Create {
        name: String,
        /// Guest image: `tiny` or `debian-12` (built with `forage image build`)
        #[arg(long, default_value = "tiny")]
        image: String,
        /// Instead of booting the image: the saved VM NAME becomes the base (an imported
        /// VM, or one prepared by hand and saved)
        #[arg(long, value_name = "VM")]
        from_vm: Option<String>,
        /// Seconds to let the guest settle before the save
        #[arg(long, default_value_t = 5)]
        settle_s: u64,
        #[command(flatten)]
        disk: Box<DiskBaseArgs>,
        #[arg(long)]
        json: bool,
    },
    /// List base VMs
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one base VM
    Info {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a base VM
    Rm { name: String },
    /// Write a base VM to a versioned, checksummed package
    Export { name: String, file: PathBuf },
    /// Import a base VM package (checked completely before it is used)
    Import {
        file: PathBuf,
        /// Import under another name
        #[arg(long)]
        name: Option<String>,
    },
    /// Fetch a base VM from a peer cloudlet that holds it (e.g. another node of the
    /// cluster), paired with it as a cloudlet; checked whole before it is imported
    Fetch {
        name: String,
        /// The peer cloudlet's address, as paired (`forage pair import` of its bundle)
        #[arg(long)]
        from: std::net::SocketAddr,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct PairArgs {
    #[command(subcommand)]
    pub command: Option<PairCommand>,
    /// (device) the cloudlet to pair with
    #[arg(long, requires = "code")]
    pub cloudlet: Option<String>,
    /// (device) what the cloudlet's pairing QR code says (its web UI shows one):
    /// forage://pair?cloudlet=ADDR&name=NAME&code=CODE, instead of --cloudlet and --code
    #[arg(long, conflicts_with_all = ["cloudlet", "code", "bundle"])]
    pub uri: Option<String>,
    /// (device) the code `forage pair` showed on the cloudlet
    #[arg(long)]
    pub code: Option<String>,
    /// Who the credentials are for [device: this host's name]
    #[arg(long)]
    pub name: Option<String>,
    /// (cloudlet) write credentials for --name to this file, to carry over USB
    #[arg(long, value_name = "FILE", conflicts_with = "cloudlet")]
    pub bundle: Option<PathBuf>,
    /// (cloudlet, with --bundle) the address the device will reach the cloudlet at
    #[arg(long)]
    pub addr: Option<std::net::SocketAddr>,
    /// (cloudlet) the code or bundle gives credentials of a cloudlet (handoff), not of a
    /// device
    #[arg(long, conflicts_with = "cloudlet")]
    pub as_cloudlet: bool,
    /// (cloudlet) lifetime of the credentials the code or bundle gives
    #[arg(long, default_value_t = 7, conflicts_with = "cloudlet")]
    pub valid_days: u64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum SignerCommand {
    /// This host's public signing key (what cloudlets list to accept its overlays)
    Show,
    /// (cloudlet) accept overlays signed by KEY; once a key is listed, only listed
    /// signers' overlays are accepted
    Allow {
        key: String,
        /// A note kept beside the key (who it is)
        #[arg(long, default_value = "")]
        note: String,
    },
    /// (cloudlet) stop accepting KEY
    Remove { key: String },
    /// (cloudlet) the accepted keys
    List,
}

#[derive(Subcommand, Debug)]
pub enum PairCommand {
    /// Credentials issued here (cloudlet) and pairings held (device)
    List {
        #[arg(long)]
        json: bool,
    },
    /// (cloudlet) revoke the credentials of a name or serial
    Revoke { who: String },
    /// (device) keep the credentials of a bundle
    Import { file: PathBuf },
    /// (device) drop the pairing with a cloudlet
    Forget { cloudlet: String },
}

/// How a device holds a provisioned instance (offload, apps get, provision, app run).
#[derive(Args, Debug, Clone)]
pub struct SessionArgs {
    /// Cloudlet address, or `auto`: the best one announcing itself on the local network
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub cloudlet: String,
    /// Send this line to the service once it is up and print its answer
    #[arg(long, value_name = "LINE")]
    pub request: Option<String>,
    /// Keep the instance until Ctrl-C (otherwise it is released after the first answer);
    /// meanwhile a line `follow HOST:PORT` on stdin asks it to move there
    #[arg(long)]
    pub hold: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum ServiceCommand {
    /// Build a service VM from a base and an app folder (the app installed, answering,
    /// saved); without --app, the baseline VM of the base's OS
    Create {
        id: String,
        #[arg(long)]
        base: String,
        /// App folder with app.json (see docs/guest-agent.md)
        #[arg(long, value_name = "DIR")]
        app: Option<PathBuf>,
        /// A client app for the app store: ID=PLATFORM:FILE (platform `linux-x86_64`,
        /// `android-aarch64`..., or `any`); repeatable
        #[arg(long = "client-app", value_name = "ID=PLATFORM:FILE")]
        client_apps: Vec<String>,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long)]
        json: bool,
    },
    /// Import a service package (`forage service export`), or cold-boot a service disk
    /// (qcow2 or raw, with its app under /data/apps) and save it as a service VM
    Import {
        /// A service package
        package: Option<PathBuf>,
        /// Instead of a package: a disk to cold-boot with the guest image's kernel
        #[arg(long, conflicts_with = "package", requires_all = ["id", "port"])]
        disk: Option<PathBuf>,
        /// Service id (a package's own id by default)
        #[arg(long)]
        id: Option<String>,
        /// Guest port of the disk's service
        #[arg(long)]
        port: Option<u16>,
        /// A request line whose answer shows the disk's service works
        #[arg(long)]
        probe: Option<String>,
        /// Guest image whose kernel boots the disk
        #[arg(long, default_value = "tiny")]
        image: String,
        #[arg(long)]
        json: bool,
    },
    /// Write a service VM as a versioned package
    /// Fetch a service VM from a peer cloudlet that holds it (paired with it as a
    /// cloudlet); checked whole before it is imported
    Fetch {
        id: String,
        /// The peer cloudlet's address, as paired
        #[arg(long)]
        from: std::net::SocketAddr,
        #[arg(long)]
        json: bool,
    },
    Export {
        id: String,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// List the service VMs held here
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a service VM
    Rm { id: String },
    /// Add a server code component (file or folder) that on-demand provisioning scripts
    /// may ask for
    Component { name: String, path: PathBuf },
}

#[derive(Args, Debug)]
pub struct AppsArgs {
    #[command(subcommand)]
    pub command: Option<AppsCommand>,
    /// Cloudlet address, or `auto` (discovered)
    #[arg(long, global = true, default_value = "127.0.0.1:7878")]
    pub cloudlet: String,
    /// List apps for every platform, not only this device's
    #[arg(long)]
    pub all: bool,
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum AppsCommand {
    /// Cloudlet push: download a client app, then start its service on the cloudlet
    Get {
        id: String,
        /// Folder to save the app in
        #[arg(short, long, default_value = ".")]
        output: PathBuf,
        /// Only download the app
        #[arg(long)]
        no_start: bool,
        /// Send this line to the service once it is up and print its answer
        #[arg(long, value_name = "LINE")]
        request: Option<String>,
        /// Keep the instance until Ctrl-C
        #[arg(long)]
        hold: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum AppCommand {
    /// Pack a program with its loader, the closure of its shared libraries and data files
    Pack {
        /// The program and its arguments
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
        /// App name [default: the program's file name]
        #[arg(long)]
        name: Option<String>,
        /// Guest port the program listens on
        #[arg(long)]
        port: u16,
        /// A request line whose answer shows the program works
        #[arg(long)]
        probe: Option<String>,
        /// Data files or folders to include (at their paths); repeatable
        #[arg(long, value_name = "PATH")]
        data: Vec<PathBuf>,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Run a packed application in a transient VM of the same OS on a cloudlet
    Run {
        bundle: PathBuf,
        #[command(flatten)]
        session: SessionArgs,
    },
}
