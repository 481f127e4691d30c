//! The instance commands' arguments: `forage instances`, `stop`, `drain`, `handoff`.

use std::path::PathBuf;

use clap::Args;

#[derive(Args, Debug)]
pub struct InstancesArgs {
    /// Stopped and lost instances too, not only running ones
    #[arg(long)]
    pub all: bool,
    /// This cloudlet's HTTP management API
    #[arg(long, default_value = "127.0.0.1:7879")]
    pub api: std::net::SocketAddr,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct StopArgs {
    /// The instance: its id, or the endpoint its device was given
    pub instance: String,
    /// This cloudlet's HTTP management API
    #[arg(long, default_value = "127.0.0.1:7879")]
    pub api: std::net::SocketAddr,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct DrainArgs {
    /// The destination cloudlet, HOST:PORT (paired with this one as a cloudlet)
    #[arg(long)]
    pub to: std::net::SocketAddr,
    /// This cloudlet's HTTP management API (the daemon does the handoffs)
    #[arg(long, default_value = "127.0.0.1:7879")]
    pub api: std::net::SocketAddr,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct HandoffArgs {
    /// The instance: its id, or the endpoint its device was given (see GET /v1/instances)
    pub instance: String,
    /// The destination cloudlet, HOST:PORT
    #[arg(long)]
    pub to: std::net::SocketAddr,
    /// This cloudlet's HTTP management API (the daemon does the handoff)
    #[arg(long, default_value = "127.0.0.1:7879")]
    pub api: std::net::SocketAddr,
    /// A static operating mode (e.g. `xor+zstd-1`, `none+lzma-9`) instead of adapting
    #[arg(long)]
    pub mode: Option<String>,
    /// Stop iterating once the rest would take this long (QEMU's downtime limit)
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub downtime_ms: u64,
    /// Write the adaptation's trace (every 100 ms) to this CSV file
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}
