//! `forage overlay ...` arguments.

use std::path::PathBuf;

use clap::{Args, Subcommand};

#[derive(Subcommand, Debug)]
pub enum OverlayCommand {
    /// Build a launch VM (base + app, running) and write its overlay (signed: OUT.sig)
    Create(OverlayCreateArgs),
    /// Sign an overlay with this host's key (FILE.sig beside it)
    Sign { file: PathBuf },
    /// Describe an overlay: base, reference kinds, bytes per stage, order
    Inspect {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Check an overlay end to end: manifest, every segment's checksum and compression
    Verify {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Rebuild the launch VM from an overlay and its base (resume it with `forage vm restore --from`)
    Apply {
        file: PathBuf,
        #[arg(long)]
        base: String,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Fold a residue (an instance's changes, sent back by a cloudlet) into the overlay it
    /// was made from: writes an ordinary overlay that rebuilds the instance
    Merge {
        /// The overlay the residue was made from
        parent: PathBuf,
        residue: PathBuf,
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
        /// Base VM [default: the local base whose digest the parent names]
        #[arg(long)]
        base: Option<String>,
        #[command(flatten)]
        reduce: ReduceArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug, Clone)]
pub struct OverlayCreateArgs {
    #[arg(long)]
    pub base: String,
    /// App folder (app.json + files) to install in the launch VM
    #[arg(long, value_name = "DIR", required_unless_present_any = ["from_vm", "interactive"])]
    pub app: Option<PathBuf>,
    /// Instead of --app: the saved VM NAME is the launch VM (`forage vm restore NAME
    /// --base B`, changed by hand, `forage vm save NAME`; or `forage vm import`)
    #[arg(long, value_name = "NAME", conflicts_with = "app")]
    pub from_vm: Option<String>,
    /// Instead of --app: resume the base with its serial console on this terminal; the
    /// overlay is made when the session ends (Ctrl-] or end of input)
    #[arg(long, conflicts_with_all = ["app", "from_vm"])]
    pub interactive: bool,
    /// With --from-vm or --interactive: the guest port of the VM's service [default: the
    /// VM's app port]
    #[arg(long)]
    pub port: Option<u16>,
    /// With --from-vm or --interactive: a request line whose answer shows the service works
    #[arg(long)]
    pub probe: Option<String>,
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
    #[command(flatten)]
    pub reduce: ReduceArgs,
    /// Chunk order in the overlay: offset, or access (profiled resume up to the first response)
    #[arg(long, default_value = "access", value_parser = ["offset", "access"])]
    pub order: String,
    /// With --app naming Debian packages: name the chunks that hold the packages' files
    /// instead of carrying them (overlay format 3). A cloudlet then needs those .debs
    /// (`forage packages add`); this host keeps them (DATA/packages)
    #[arg(long, requires = "app")]
    pub packages: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ReduceArgs {
    /// Segment compression
    #[arg(long, default_value = "lzma", value_parser = ["lzma", "zstd", "none"])]
    pub codec: String,
    /// Compression level (lzma 0-9, default 6; zstd 1-22, default 19)
    #[arg(long)]
    pub level: Option<i32>,
    /// Per-chunk delta against the same-position base chunk
    #[arg(long, default_value = "bsdiff", value_parser = ["bsdiff", "xor", "none"])]
    pub delta: String,
    /// Turn off deduplication (all five rules)
    #[arg(long)]
    pub no_dedup: bool,
    /// Turn off the disk semantic gap (TRIM and ext4 free blocks)
    #[arg(long)]
    pub no_semantic_disk: bool,
    /// Turn off the memory semantic gap (free page reporting)
    #[arg(long)]
    pub no_semantic_memory: bool,
    /// Segment size before compression: smaller segments make demand fetches (early
    /// start) quicker, larger ones compress a little better
    #[arg(long, default_value_t = 1024, value_name = "KIB")]
    pub segment_kib: usize,
}
