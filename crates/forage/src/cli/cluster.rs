//! `forage cluster ...`: a cloudlet of many hosts, through this node's HTTP API.

use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// The cluster as this node sees it: live nodes (capacity, load, what they hold),
    /// instances (lost ones too), whether etcd has quorum
    Status {
        /// This node's HTTP management API
        #[arg(long, default_value = "127.0.0.1:7879")]
        api: std::net::SocketAddr,
        #[arg(long)]
        json: bool,
    },
    /// As a device (with its pairing, over the device protocol): ask a node of the cluster
    /// where the instance whose service answered at ENDPOINT is, e.g. once it stopped
    /// answering ("instance lost: node n1 gone (...)")
    Where {
        /// The service endpoint (`HOST:PORT`) from Ready or Moved
        endpoint: String,
        /// A node of the cluster this device is paired with
        #[arg(long, default_value = "127.0.0.1:7878")]
        cloudlet: std::net::SocketAddr,
        #[arg(long)]
        json: bool,
    },
    /// Where a device's request would be placed now (the best live node)
    Place {
        /// The base VM's digest the overlay applies to
        #[arg(long)]
        base: Option<String>,
        /// The overlay's digest (a node with its launch VM cached wins)
        #[arg(long)]
        overlay: Option<String>,
        /// A service VM
        #[arg(long)]
        service: Option<String>,
        /// This node's HTTP management API
        #[arg(long, default_value = "127.0.0.1:7879")]
        api: std::net::SocketAddr,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// Hand every instance of node NODE off to the other nodes of the cluster (the VM
    /// handoff, one after the other), and wait until it has none
    Drain {
        /// The node's name (see `forage cluster status`)
        node: String,
        /// This node's HTTP management API (any node of the cluster)
        #[arg(long, default_value = "127.0.0.1:7879")]
        api: std::net::SocketAddr,
        /// Give up waiting after this long (the drain goes on)
        #[arg(long, default_value_t = 3600, value_name = "S")]
        wait_s: u64,
    },
}
