//! `DaemonConfig`: what `forage serve` runs with. The same type is filled by the command
//! line (`forage serve --listen ...`) and read from a TOML file (`forage serve --config
//! FILE`, e.g. `/etc/forage/serve.toml` under systemd); unknown keys are refused.
//!
//! ```toml
//! listen = "10.0.0.5:7878"
//! name = "field-1"
//! api = "127.0.0.1:7879"
//! idle_timeout_s = 600
//! fetch_allow = ["10.0.0.0/24"]   # overlay servers on the LAN
//! fetch_allow_http = true
//! move_when_memory_above = 0.9   # load policy: shed instances to paired cloudlets
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Address devices connect to
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub listen: SocketAddr,
    /// Address service relays listen on [default: the listen address]
    #[arg(long)]
    pub service_addr: Option<Ipv4Addr>,
    /// Name announced to devices
    #[arg(long, default_value = "cloudlet")]
    pub name: String,
    /// Address of the HTTP management API (status, sessions, instances, cache,
    /// /metrics, /openapi.json); keep it on loopback or a management network
    #[arg(long, default_value = "127.0.0.1:7879")]
    pub api: SocketAddr,
    /// Do not serve the HTTP API
    #[arg(long)]
    pub no_api: bool,
    /// Do not keep launch VMs for later syntheses of the same overlay
    #[arg(long)]
    pub no_cache: bool,
    /// Do not announce the cloudlet on the local network (mDNS, `_cloudlet._tcp`)
    #[arg(long)]
    pub no_advertise: bool,
    /// Stop an instance whose service saw no traffic for this long (0: never)
    #[arg(long = "idle-timeout", default_value_t = 600, value_name = "S")]
    pub idle_timeout_s: u64,
    /// Also fetch overlays by URL from this network (CIDR; repeat); by default only
    /// public addresses are fetched from
    #[arg(long, value_name = "CIDR")]
    pub fetch_allow: Vec<ipnet::IpNet>,
    /// Fetch plain http:// overlay URLs (from the --fetch-allow networks only)
    #[arg(long)]
    pub fetch_allow_http: bool,
    /// Open device connections, in all
    #[arg(long, default_value_t = 512)]
    pub max_connections: usize,
    /// Open device connections from one address
    #[arg(long, default_value_t = 32)]
    pub max_connections_per_source: usize,
    /// Sessions at once, in all
    #[arg(long, default_value_t = 64)]
    pub max_sessions: usize,
    /// Sessions at once of one device or cloudlet
    #[arg(long, default_value_t = 8)]
    pub max_sessions_per_peer: usize,
    /// Load policy: while more than this fraction of the host's memory is in use (0..1),
    /// hand instances off to a paired cloudlet announcing room for them
    #[arg(long, value_name = "FRACTION")]
    pub move_when_memory_above: Option<f64>,
    /// Load policy: the same while the 1-minute load average per core is above this
    #[arg(long, value_name = "LOAD")]
    pub move_when_load_above: Option<f64>,
    /// Load policy: how often the host's pressure is read
    #[arg(long, default_value_t = 10, value_name = "S")]
    pub move_check_s: u64,
    /// Join a cloudlet of many hosts: etcd client URLs (http://HOST:PORT, or https://
    /// with --etcd-ca; comma-separated)
    #[arg(long, value_name = "URLS", value_delimiter = ',')]
    pub cluster: Vec<String>,
    /// The CA (PEM) that signed the etcd members' certificates, for https:// URLs
    #[arg(long, value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,
    /// This node's certificate (PEM) for etcd's --client-cert-auth (with --etcd-key)
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// The key (PEM) of --etcd-cert
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// The cluster's name (its keys' prefix in etcd)
    #[arg(long, default_value = "forage")]
    pub cluster_name: String,
    /// Seconds the node stays listed after it stops renewing its lease
    #[arg(long, default_value_t = 10, value_name = "S")]
    pub cluster_lease_s: u64,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        let l = forage_cloudlet::Limits::default();
        Self {
            listen: "127.0.0.1:7878".parse().expect("an address"),
            service_addr: None,
            name: "cloudlet".into(),
            api: "127.0.0.1:7879".parse().expect("an address"),
            no_api: false,
            no_cache: false,
            no_advertise: false,
            idle_timeout_s: 600,
            fetch_allow: Vec::new(),
            fetch_allow_http: false,
            max_connections: l.connections,
            max_connections_per_source: l.connections_per_source,
            max_sessions: l.sessions,
            max_sessions_per_peer: l.sessions_per_peer,
            move_when_memory_above: None,
            move_when_load_above: None,
            move_check_s: 10,
            cluster: Vec::new(),
            etcd_ca: None,
            etcd_cert: None,
            etcd_key: None,
            cluster_name: "forage".into(),
            cluster_lease_s: 10,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("listening on {listen}: say which address service relays listen on (service_addr)")]
    NoServiceAddr { listen: SocketAddr },
}

impl DaemonConfig {
    /// Read a TOML configuration file.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })
    }

    /// The address service relays listen on.
    pub fn service_addr(&self) -> Result<Ipv4Addr, ConfigError> {
        match (self.service_addr, self.listen.ip()) {
            (Some(a), _) => Ok(a),
            (None, std::net::IpAddr::V4(a)) if !a.is_unspecified() => Ok(a),
            _ => Err(ConfigError::NoServiceAddr { listen: self.listen }),
        }
    }

    pub fn limits(&self) -> forage_cloudlet::Limits {
        forage_cloudlet::Limits {
            connections: self.max_connections,
            connections_per_source: self.max_connections_per_source,
            sessions: self.max_sessions,
            sessions_per_peer: self.max_sessions_per_peer,
            ..Default::default()
        }
    }

    pub fn fetch_policy(&self) -> forage_remote::FetchPolicy {
        forage_remote::FetchPolicy { allow_http: self.fetch_allow_http, allow: self.fetch_allow.clone(), any: false }
    }

    pub fn load_policy(&self) -> crate::balance::LoadPolicy {
        crate::balance::LoadPolicy {
            memory_above: self.move_when_memory_above,
            load_above: self.move_when_load_above,
            check_every: std::time::Duration::from_secs(self.move_check_s.max(1)),
        }
    }

    /// How to join the cluster, if `--cluster` was given.
    pub fn cluster(&self) -> Option<forage_cluster::ClusterConfig> {
        (!self.cluster.is_empty()).then(|| forage_cluster::ClusterConfig {
            endpoints: self.cluster.clone(),
            cluster: self.cluster_name.clone(),
            lease_ttl_s: self.cluster_lease_s.max(2),
            tls: self.etcd_ca.as_ref().map(|ca| forage_cluster::EtcdTls {
                ca: ca.clone(),
                cert: self.etcd_cert.clone(),
                key: self.etcd_key.clone(),
            }),
        })
    }

    pub fn idle_timeout(&self) -> Option<std::time::Duration> {
        (self.idle_timeout_s > 0).then(|| std::time::Duration::from_secs(self.idle_timeout_s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_fills_the_same_type_and_unknown_keys_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("serve.toml");
        std::fs::write(&p, "listen = \"10.0.0.5:7878\"\nname = \"field-1\"\nfetch_allow = [\"10.0.0.0/24\"]\n")
            .unwrap();
        let c = DaemonConfig::read(&p).unwrap();
        assert_eq!(c.name, "field-1");
        assert_eq!(c.service_addr().unwrap(), "10.0.0.5".parse::<Ipv4Addr>().unwrap());
        assert!(c.fetch_policy().allows("10.0.0.9".parse().unwrap(), true));
        assert_eq!(c.idle_timeout_s, 600, "defaults fill what the file does not say");
        std::fs::write(&p, "listne = \"10.0.0.5:7878\"\n").unwrap();
        assert!(matches!(DaemonConfig::read(&p), Err(ConfigError::Parse { .. })));
    }

    #[test]
    fn the_command_line_fills_the_same_defaults() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            c: DaemonConfig,
        }
        assert_eq!(Cli::parse_from(["serve"]).c, DaemonConfig::default());
    }
}
