//! `forage-bench`'s command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "forage-bench", version, about = "forage's benches and its quickstart demo")]
pub struct Cli {
    /// Data directory [default: $FORAGE_HOME, else $XDG_DATA_HOME/forage, else ~/.local/share/forage]
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// More logging (debug)
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The quickstart demo: build the tiny guest, boot it, install the sample service,
    /// save, restore, then a cloudlet synthesizing an overlay of it with early start
    Demo(DemoArgs),
    #[command(flatten)]
    Bench(BenchCommand),
}

#[derive(Args, Debug, Clone)]
pub struct WaitArgs {
    /// How long to wait for the guest to be ready
    #[arg(long, default_value_t = 180, value_name = "SECONDS")]
    pub ready_timeout_s: u64,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Overlay size against xdelta3+LZMA and zstd --patch-from (the paper's Figure 6),
    /// creation and apply throughput, peak memory
    Overlay(BenchOverlayArgs),
    /// Synthesis over an emulated WAN (two network namespaces, tc tbf): baseline,
    /// pipelined and early start; first-response times and the share of the overlay used
    /// before the first response (the paper's Tables 3 and 4)
    Synthesis(BenchSynthesisArgs),
    /// Application-ready time and payload of the five provisioning mechanisms over an
    /// emulated WAN (the tactical-cloudlet paper's Table I)
    Provision(BenchProvisionArgs),
    /// VM handoff against QEMU's live migration over an emulated WAN (two cloudlets in two
    /// network namespaces, tc tbf): total time, downtime and bytes for the adaptive run,
    /// the best and worst static mode and QEMU; a trace of the adaptive run (CSV and SVG)
    Handoff(BenchHandoffArgs),
    /// The offline profile of VM handoff's operating modes (P and R of every delta and
    /// codec on the bench app's modified memory): the lookup table adaptation scales
    HandoffProfile(BenchHandoffProfileArgs),
    /// Peak RSS of every forage process creating, applying and synthesizing (on loopback)
    /// the largest overlay of each app: no semantic gap, no compression (target <= 256 MB)
    Memory(BenchMemoryArgs),
    /// VM substrates: activation to the first response against a cold boot and a
    /// cached-VM resume, dock time, compressed size and density, multicast to 4 hosts
    /// against 1 and against sequential unicast (network namespaces on one bridge)
    Substrate(BenchSubstrateArgs),
    /// A cloudlet of many hosts: 3 etcd members and 3 `forage serve --cluster` nodes on
    /// loopback, concurrent placement requests spread over the nodes; where they went and
    /// the time to place each (median, p95)
    Cluster(BenchClusterArgs),
    /// (internal) one overlay of a kept launch VM, printed as JSON
    #[command(hide = true)]
    OverlayCreate(OverlayCreateArgs),
    /// (internal) the oracle of a kept launch VM (as `bench overlay` computes it), as JSON
    #[command(hide = true)]
    OverlayOracle {
        /// The kept launch VM's folder (DATA/bench/launch/KEY)
        #[arg(long)]
        launch: PathBuf,
        #[arg(long)]
        base: String,
    },
    /// (internal) receive one connection's bytes and acknowledge them
    #[command(hide = true)]
    Sink {
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
    /// (internal) send N bytes and print the seconds until the sink acknowledged them
    #[command(hide = true)]
    Blast {
        #[arg(long)]
        to: std::net::SocketAddr,
        #[arg(long)]
        bytes: u64,
    },
}

#[derive(Args, Debug, Clone)]
pub struct BenchClusterArgs {
    /// Placement requests sent at once, round-robin over the nodes' APIs
    #[arg(long, default_value_t = 20)]
    pub requests: usize,
    /// A base VM of this data folder: its package is imported into nodes n1 and n2 only,
    /// and every other request asks for it (with --overlay: into all three nodes)
    #[arg(long)]
    pub base: Option<String>,
    /// Real requests: each is placed (with a reservation) and then synthesizes this
    /// overlay of --base on the chosen node, asks its service once and holds it until
    /// all have answered; then every instance is stopped
    #[arg(long, requires = "base", value_name = "FILE")]
    pub overlay: Option<std::path::PathBuf>,
    /// The service request each real request sends once its instance runs
    #[arg(long, default_value = "search cluster 8")]
    pub request_line: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct BenchSubstrateArgs {
    /// Guest image to dock
    #[arg(long, default_value = "tiny")]
    pub image: String,
    /// Skip the multicast rows (they need root for the network namespaces)
    #[arg(long)]
    pub no_multicast: bool,
    #[arg(long, default_value_t = 180, value_name = "SECONDS")]
    pub ready_timeout_s: u64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct BenchSynthesisArgs {
    /// Guest image of the base: tiny (the bench app) or debian-12 (name the apps)
    #[arg(long, default_value = "tiny")]
    pub image: String,
    /// App to measure (repeat): a sample app built by `make guest` (ocr, vision) or an
    /// app folder [tiny: the bench app]; debian-12 apps reuse the launch VMs kept by
    /// `bench overlay`
    #[arg(long)]
    pub app: Vec<String>,
    /// Base VM to use (created if absent) [default: bench, or bench-IMAGE]
    #[arg(long)]
    pub base: Option<String>,
    /// Link rate in Mbit/s (the paper's WiFi: 38); repeat for several rates
    #[arg(long, default_values_t = vec![38.0])]
    pub mbps: Vec<f64>,
    /// Size of the data set the bench app installs and preloads (its first response does
    /// not touch it)
    #[arg(long, default_value_t = 16, value_name = "MIB")]
    pub data_mib: u64,
    /// Segment size of the bench overlay before compression
    #[arg(long, default_value_t = 256, value_name = "KIB")]
    pub segment_kib: usize,
    /// Runs per mode (the median is reported)
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    #[arg(long)]
    pub json: bool,
}

/// One of QEMU's own migrations, the handoff bench's peers.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuApproach {
    /// RAM and devices to a destination that has the base disk
    Live,
    /// The disk too, by NBD and drive-mirror, to a destination with an empty disk
    CopyStorage,
}

#[derive(Args, Debug, Clone)]
pub struct BenchHandoffArgs {
    /// Guest image of the base: tiny (hashsearch, whose working set grows and churns) or
    /// debian-12 (with --app)
    #[arg(long, default_value = "tiny")]
    pub image: String,
    /// A sample app (ocr, vision) as the service instead of hashsearch: its probe is
    /// asked before the move and must answer right after it
    #[arg(long)]
    pub app: Option<String>,
    /// Base VM of the bench service VM [default: bench, or bench-IMAGE]
    #[arg(long)]
    pub base: Option<String>,
    /// Link rates in Mbit/s (the paper: 5, 10, 25) [default: 5, 10, 25 unless
    /// --changing-link is given]
    #[arg(long)]
    pub mbps: Vec<f64>,
    /// The app's working set (records it keeps in memory): the modified state
    #[arg(long, default_value_t = 32, value_name = "MIB")]
    pub working_mib: u64,
    /// Part of the working set rewritten every 100 ms while the VM moves
    #[arg(long, default_value_t = 512, value_name = "KIB")]
    pub hot_kib: u64,
    /// Static operating modes to run (best and worst are reported), comma-separated
    #[arg(long, default_value = "none+none,none+zstd-1,xor+zstd-3,none+bzip2-9,none+lzma-1,bsdiff+lzma-9")]
    pub modes: String,
    /// QEMU's downtime limit, for forage and QEMU alike
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub downtime_ms: u64,
    /// Skip QEMU's live migration (it takes minutes at 5 Mbit/s)
    #[arg(long)]
    pub no_qemu: bool,
    /// Which of QEMU's migrations run, comma-separated: `live` (the destination has the
    /// base disk), `copy-storage` (QEMU moves the disk too, as libvirt's
    /// `--copy-storage-all`)
    #[arg(long, value_enum, value_delimiter = ',', default_value = "live,copy-storage")]
    pub qemu: Vec<QemuApproach>,
    /// Run every forage mode this many times per link, interleaved (adaptive, each static
    /// mode, then again), and report each mode's median run with the spread: single runs
    /// of the same mode differ by up to a second under TCG
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=9))]
    pub repeat: u32,
    /// Skip the uncounted first handoff (the first between two new cloudlets is slower:
    /// the base is read cold and the imports' writes are still being flushed)
    #[arg(long)]
    pub no_warm_up: bool,
    /// Cancel QEMU's migration if it has not completed after this long, and report that
    /// it did not converge (a VM that dirties memory faster than the link carries never
    /// fits QEMU's downtime limit)
    #[arg(long, default_value_t = 900, value_name = "S")]
    pub qemu_give_up_s: u64,
    /// Give QEMU's migration the auto-converge capability (it throttles the guest's vCPUs
    /// until the rest fits, as libvirt's `migrate --auto-converge`)
    #[arg(long)]
    pub qemu_auto_converge: bool,
    /// Also run every approach on a link whose rate changes during each handoff (the
    /// paper's Figure 18: 5 -> 35 -> 5 Mbit/s), as SECONDS:MBPS steps from the start
    #[arg(long, value_name = "S:MBPS,...", num_args = 0..=1, default_missing_value = "0:5,4:35,8:5")]
    pub changing_link: Option<String>,
    /// Where the traces go [default: DATA/bench/handoff]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct BenchHandoffProfileArgs {
    /// Base VM to use (created as `bench` if absent)
    #[arg(long, default_value = "bench")]
    pub base: String,
    /// Size of the bench app's data set
    #[arg(long, default_value_t = 16, value_name = "MIB")]
    pub data_mib: u64,
    /// Modified chunks profiled (spread evenly over all modified chunks)
    #[arg(long, default_value_t = 512)]
    pub chunks: usize,
    /// Where to write the table [default: DATA/handoff-lookup.json]
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct BenchProvisionArgs {
    /// Base VM to use (created as `bench` if absent)
    #[arg(long, default_value = "bench")]
    pub base: String,
    /// Link rate in Mbit/s
    #[arg(long, default_value_t = 38.0)]
    pub mbps: f64,
    /// Runs per mechanism (the median is reported)
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct BenchOverlayArgs {
    /// Guest image of the base: tiny (the bench app) or debian-12 (name the apps)
    #[arg(long, default_value = "tiny")]
    pub image: String,
    /// App to measure (repeat): a sample app built by `make guest` (ocr, vision) or an
    /// app folder [tiny: the bench app]
    #[arg(long)]
    pub app: Vec<String>,
    /// Base VM to use (created if absent) [default: bench, or bench-IMAGE]
    #[arg(long)]
    pub base: Option<String>,
    /// Size of the data set the bench app installs and preloads (tiny)
    #[arg(long, default_value_t = 16, value_name = "MIB")]
    pub data_mib: u64,
    /// Segment compression (lzma, zstd or none)
    #[arg(long, default_value = "lzma")]
    pub codec: String,
    /// Compression level (lzma 0-9, default 6; zstd 1-22, default 19)
    #[arg(long)]
    pub level: Option<i32>,
    /// Per-chunk delta (bsdiff, xor or none)
    #[arg(long, default_value = "bsdiff")]
    pub delta: String,
    /// Build the launch VMs again (they are kept in DATA/bench/launch between runs)
    #[arg(long)]
    pub fresh: bool,
    /// Drop the guest's page cache, dentries and inodes before the launch VMs' save
    #[arg(long)]
    pub drop_caches: bool,
    /// Instead of an app on a forage image: a disk image as the base (`forage base create
    /// --disk`; the Debian disk of scripts/debian-disk-image.sh unless --disk names one)
    /// and a launch VM changed by hand through qemu-guest-agent and saved, as `forage
    /// overlay create --from-vm` takes it [base: bench-disk]
    #[arg(long, conflicts_with_all = ["image", "app", "big", "drop_caches"])]
    pub disk_image: bool,
    /// The disk image of --disk-image (raw, or qcow2 named *.qcow2) [default: built]
    #[arg(long, value_name = "FILE", requires = "disk_image")]
    pub disk: Option<PathBuf>,
    /// Also the largest overlay of each app (no semantic gap, no compression) created,
    /// applied and synthesized on loopback: each forage process's peak RSS (target <= 256 MB)
    #[arg(long)]
    pub big: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct BenchMemoryArgs {
    /// Guest image of the base: tiny (the bench app) or debian-12 (name the apps)
    #[arg(long, default_value = "tiny")]
    pub image: String,
    /// App to measure (repeat): a sample app built by `make guest` (ocr, vision) or an
    /// app folder [tiny: the bench app]
    #[arg(long)]
    pub app: Vec<String>,
    /// Base VM to use (created if absent) [default: bench, or bench-IMAGE]
    #[arg(long)]
    pub base: Option<String>,
    /// Size of the data set the bench app installs and preloads (tiny)
    #[arg(long, default_value_t = 16, value_name = "MIB")]
    pub data_mib: u64,
    /// Build the launch VMs again (they are kept in DATA/bench/launch between runs)
    #[arg(long)]
    pub fresh: bool,
    #[arg(long)]
    pub json: bool,
}

/// (internal) one overlay of a kept launch VM, made in its own process so that its time
/// and peak memory are its own.
#[derive(Args, Debug, Clone)]
pub struct OverlayCreateArgs {
    /// The kept launch VM's folder (DATA/bench/launch/KEY)
    #[arg(long)]
    pub launch: PathBuf,
    #[arg(long)]
    pub base: String,
    #[arg(short, long)]
    pub output: PathBuf,
    #[arg(long)]
    pub no_dedup: bool,
    #[arg(long)]
    pub no_semantic: bool,
    /// Record the app's service (name, port, probe) in the overlay, so that it can be
    /// synthesized and answer
    #[arg(long)]
    pub service: bool,
    #[arg(long, default_value = "lzma")]
    pub codec: String,
    #[arg(long)]
    pub level: Option<i32>,
    #[arg(long, default_value = "bsdiff")]
    pub delta: String,
    /// Name the chunks that hold files of the launch VM's Debian packages (format 3)
    #[arg(long)]
    pub packages: bool,
}

impl OverlayCreateArgs {
    /// The command line that asks for these (after the binary and global options).
    pub fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> =
            vec!["overlay-create".into(), "--launch".into(), self.launch.clone().into()];
        a.extend(["--base".into(), self.base.clone().into(), "--output".into(), self.output.clone().into()]);
        a.extend(["--codec".into(), self.codec.clone().into(), "--delta".into(), self.delta.clone().into()]);
        if let Some(l) = self.level {
            a.extend(["--level".into(), l.to_string().into()]);
        }
        if self.no_dedup {
            a.push("--no-dedup".into());
        }
        if self.no_semantic {
            a.push("--no-semantic".into());
        }
        if self.packages {
            a.push("--packages".into());
        }
        if self.service {
            a.push("--service".into());
        }
        a
    }
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
