//! `forage substrate ...`: dock VMs into substrates, keep them in a memory-budgeted pool,
//! activate them, multicast them to other hosts.

use std::path::PathBuf;

use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum SubstrateCommand {
    /// Run a VM (boot a guest image, optionally installing an app; or restore a service
    /// VM of the repository or a base VM), shrink it to one vCPU and the memory it uses,
    /// and save it as substrate NAME in the pool. `--from instance:ID` docks a running
    /// instance of this cloudlet's daemon instead, through its API: the instance ends
    Dock {
        name: String,
        /// What to dock: `image:NAME` (`forage image build NAME`), `service:ID` (`forage
        /// service list`), `base:NAME` (`forage base list`); a plain name is the first of
        /// these that exists. `instance:ID` (`forage instances`): a running instance of
        /// the daemon, docked by the daemon (`--api`); docking ends it, its device is told
        /// why, and what runs from the substrate later is a new VM
        #[arg(long = "from", value_name = "IMAGE|SERVICE|BASE|instance:ID", default_value = "tiny")]
        from: String,
        /// The daemon's HTTP management API (`--from instance:ID` only)
        #[arg(long, default_value = "127.0.0.1:7879")]
        api: std::net::SocketAddr,
        /// An app folder to install first (images only): the substrate is then that service
        #[arg(long, value_name = "DIR")]
        app: Option<PathBuf>,
        /// vCPUs an activation may ask for (images only) [default: this host's cores]
        #[arg(long)]
        max_vcpus: Option<u32>,
        /// Memory an activation may ask for, MiB (images only) [default: the image's]
        #[arg(long, value_name = "MIB")]
        max_memory: Option<u64>,
        /// A public substrate: each activation renews the guest's identity (host name,
        /// machine-id, SSH host keys)
        #[arg(long)]
        public: bool,
        /// Unplug the NIC before the save; activation plugs one in with its forwards
        /// (images only: the tiny guest brings it up, Debian guests do not yet)
        #[arg(long)]
        detach_nic: bool,
        /// zstd level of the substrate (1 fastest to 19 smallest; 19 makes a Debian
        /// substrate about a fifth smaller and takes tens of seconds under TCG)
        #[arg(long, default_value_t = forage_substrate::format::DEFAULT_LEVEL, value_name = "N",
              value_parser = clap::value_parser!(i32).range(1..=19))]
        level: i32,
        #[arg(long, default_value_t = 180, value_name = "S")]
        ready_timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// Start a VM from substrate NAME with the given size; it then runs as `forage vm`
    /// VM --as (stop it with Ctrl-C or `forage vm stop`)
    Activate {
        name: String,
        /// The VM's name [default: NAME-N, the first free]
        #[arg(long = "as", value_name = "VM")]
        vm: Option<String>,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Guest memory, MiB [default: all the substrate was docked for]
        #[arg(long, value_name = "MIB")]
        memory: Option<u64>,
        /// Print the report and stop the VM instead of keeping it in the foreground
        #[arg(long)]
        once: bool,
        #[arg(long)]
        json: bool,
    },
    /// The substrates in the pool and where they are (memory or spilled to disk)
    List {
        #[arg(long)]
        json: bool,
    },
    /// A substrate's description (verified whole)
    Info {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a substrate (and its base disk)
    Rm { name: String },
    /// Set the pool's memory budget; least recently used substrates spill to disk
    Budget {
        #[arg(value_name = "MIB")]
        mib: u64,
    },
    /// Multicast substrate NAME (UDP, TTL 1, udpcast) to hosts running `forage substrate
    /// receive` on the same link; returns when all have it
    Push {
        name: String,
        /// How many receivers to wait for
        #[arg(long, default_value_t = 1)]
        receivers: usize,
        #[arg(long, default_value = "eth0")]
        interface: String,
        #[arg(long, default_value_t = forage_substrate::push::DEFAULT_PORTBASE)]
        portbase: u16,
        /// Seconds to wait for the receivers
        #[arg(long, default_value_t = 30)]
        wait: u64,
        /// Unicast to the one receiver instead (udpcast's point-to-point mode)
        #[arg(long)]
        unicast: bool,
        #[arg(long)]
        json: bool,
    },
    /// Receive one multicast substrate, verify it, and add it to this host's pool
    Receive {
        #[arg(long, default_value = "eth0")]
        interface: String,
        #[arg(long, default_value_t = forage_substrate::push::DEFAULT_PORTBASE)]
        portbase: u16,
        /// Seconds to wait for the whole substrate
        #[arg(long, default_value_t = 300)]
        wait: u64,
        #[arg(long)]
        json: bool,
    },
}
