//! forage-discovery: cloudlets announce themselves on the local network with DNS-SD over
//! multicast DNS as `_cloudlet._tcp`, and devices find them with zero configuration
//! (`mdns-sd`, a maintained pure-Rust responder and browser).
//!
//! TXT metadata (version 1, all values text):
//!
//! | key | value |
//! |---|---|
//! | `txtvers` | `1` |
//! | `api` | synthesis protocol versions, `1-1` |
//! | `http` | port of the HTTP management API, if served |
//! | `bases` | short digests (12 hex) of the base VMs held, comma-separated |
//! | `services` | services whose launch VMs are cached, comma-separated |
//! | `load` | running instances |
//! | `mem_mib` | free memory, MiB |
//! | `cores` | CPU cores |
//!
//! [`select`] ranks what answered with a pluggable utility function; the default prefers
//! a cloudlet holding the device's base, then fewer instances, then a shorter measured
//! round-trip time.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use mdns_sd::{ResolvedService, ServiceDaemon, ServiceEvent, ServiceInfo};
use serde::{Deserialize, Serialize};

pub const SERVICE_TYPE: &str = "_cloudlet._tcp.local.";

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("multicast DNS: {0}")]
    Mdns(#[from] mdns_sd::Error),
    #[error("no cloudlet answered within {0:?}")]
    NoneFound(Duration),
    #[error("cannot start the thread that watches the network")]
    Thread(#[source] std::io::Error),
}

/// What a cloudlet says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Advertisement {
    pub name: String,
    /// Where the synthesis protocol listens.
    pub addr: SocketAddr,
    pub http_port: Option<u16>,
    pub bases: Vec<String>,
    pub services: Vec<String>,
    pub load: u32,
    pub free_mem_mib: u64,
    pub cores: u32,
}

impl Advertisement {
    fn properties(&self) -> HashMap<String, String> {
        let mut p = HashMap::new();
        p.insert("txtvers".into(), "1".into());
        p.insert("api".into(), "1-1".into());
        if let Some(h) = self.http_port {
            p.insert("http".into(), h.to_string());
        }
        p.insert("bases".into(), self.bases.join(","));
        p.insert("services".into(), self.services.join(","));
        p.insert("load".into(), self.load.to_string());
        p.insert("mem_mib".into(), self.free_mem_mib.to_string());
        p.insert("cores".into(), self.cores.to_string());
        p
    }

    fn from_info(info: &ResolvedService) -> Option<Self> {
        let name = info.get_fullname().strip_suffix(&format!(".{SERVICE_TYPE}"))?.to_string();
        let ip = info
            .get_addresses()
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| info.get_addresses().iter().next())?
            .to_ip_addr();
        let val = |k: &str| info.get_property_val_str(k).unwrap_or_default().to_string();
        let list = |k: &str| val(k).split(',').filter(|s| !s.is_empty()).map(str::to_string).collect();
        Some(Self {
            name,
            addr: SocketAddr::new(ip, info.get_port()),
            http_port: val("http").parse().ok(),
            bases: list("bases"),
            services: list("services"),
            load: val("load").parse().unwrap_or(0),
            free_mem_mib: val("mem_mib").parse().unwrap_or(0),
            cores: val("cores").parse().unwrap_or(0),
        })
    }
}

/// A live announcement; withdrawn when dropped.
pub struct Advertiser {
    daemon: ServiceDaemon,
    fullname: String,
}

/// Announce `adv` on every interface that has `adv.addr`'s address family.
pub fn advertise(adv: &Advertisement) -> Result<Advertiser, DiscoveryError> {
    let daemon = ServiceDaemon::new()?;
    let host = format!("{}.local.", adv.name);
    let info = ServiceInfo::new(SERVICE_TYPE, &adv.name, &host, adv.addr.ip(), adv.addr.port(), adv.properties())?;
    let fullname = info.get_fullname().to_string();
    daemon.register(info)?;
    tracing::info!(name = %adv.name, addr = %adv.addr, "advertised as {SERVICE_TYPE}");
    Ok(Advertiser { daemon, fullname })
}

impl Advertiser {
    /// Announce changed metadata (load, free memory, services held): registering the same
    /// name again replaces its records and sends them out at once (cache-flush), so
    /// browsers see the new TXT without waiting for the old one to expire.
    pub fn update(&self, adv: &Advertisement) -> Result<(), DiscoveryError> {
        let host = format!("{}.local.", adv.name);
        let info = ServiceInfo::new(SERVICE_TYPE, &adv.name, &host, adv.addr.ip(), adv.addr.port(), adv.properties())?;
        self.daemon.register(info)?;
        tracing::debug!(name = %adv.name, load = adv.load, "announcement refreshed");
        Ok(())
    }
}

impl Drop for Advertiser {
    fn drop(&mut self) {
        if let Ok(done) = self.daemon.unregister(&self.fullname) {
            let _ = done.recv_timeout(Duration::from_secs(1));
        }
        let _ = self.daemon.shutdown();
    }
}

/// A cloudlet that answered, with the round-trip time of a TCP connect to it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Found {
    #[serde(flatten)]
    pub ad: Advertisement,
    pub rtt_ms: Option<f64>,
}

/// Browse for `timeout` and return every cloudlet that answered (malformed answers are
/// skipped by the responder library; ours only reads the fields it knows).
pub fn discover(timeout: Duration) -> Result<Vec<Found>, DiscoveryError> {
    let daemon = ServiceDaemon::new()?;
    let events = daemon.browse(SERVICE_TYPE)?;
    let deadline = Instant::now() + timeout;
    let mut found: HashMap<String, Advertisement> = HashMap::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match events.recv_timeout(left) {
            Ok(ServiceEvent::ServiceResolved(info)) => {
                if let Some(ad) = Advertisement::from_info(&info) {
                    found.insert(ad.name.clone(), ad);
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let _ = daemon.shutdown();
    let mut out: Vec<Found> = found.into_values().map(|ad| Found { rtt_ms: rtt(ad.addr), ad }).collect();
    out.sort_by(|a, b| a.ad.name.cmp(&b.ad.name));
    Ok(out)
}

fn rtt(addr: SocketAddr) -> Option<f64> {
    let t = Instant::now();
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    Some(t.elapsed().as_secs_f64() * 1000.0)
}

/// A cloudlet a [`Watcher`] has seen, and when it last heard from it.
#[derive(Debug, Clone, Serialize)]
pub struct Seen {
    #[serde(flatten)]
    pub found: Found,
    pub last_seen: std::time::SystemTime,
}

/// Browses without end (the operator's view of the network): every cloudlet that
/// announces itself, kept current, and forgotten when it withdraws its announcement.
pub struct Watcher {
    daemon: ServiceDaemon,
    seen: std::sync::Arc<std::sync::Mutex<HashMap<String, Seen>>>,
}

/// Start watching the local network for cloudlets.
pub fn watch() -> Result<Watcher, DiscoveryError> {
    let daemon = ServiceDaemon::new()?;
    let events = daemon.browse(SERVICE_TYPE)?;
    let seen: std::sync::Arc<std::sync::Mutex<HashMap<String, Seen>>> = Default::default();
    let map = seen.clone();
    // Ends when the daemon shuts down (the channel closes).
    std::thread::Builder::new()
        .name("cloudlet-watch".into())
        .spawn(move || {
            while let Ok(event) = events.recv() {
                match event {
                    ServiceEvent::ServiceResolved(info) => {
                        let Some(ad) = Advertisement::from_info(&info) else { continue };
                        let found = Found { rtt_ms: rtt(ad.addr), ad };
                        let entry = Seen { found, last_seen: std::time::SystemTime::now() };
                        map.lock().unwrap_or_else(|p| p.into_inner()).insert(entry.found.ad.name.clone(), entry);
                    }
                    ServiceEvent::ServiceRemoved(_, fullname) => {
                        if let Some(name) = fullname.strip_suffix(&format!(".{SERVICE_TYPE}")) {
                            map.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
                        }
                    }
                    _ => {}
                }
            }
        })
        .map_err(DiscoveryError::Thread)?;
    Ok(Watcher { daemon, seen })
}

impl Watcher {
    /// Every cloudlet seen and not withdrawn, by name.
    pub fn seen(&self) -> Vec<Seen> {
        let mut all: Vec<Seen> = self.seen.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        all.sort_by(|a, b| a.found.ad.name.cmp(&b.found.ad.name));
        all
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.daemon.shutdown();
    }
}

/// What the device wants; the utility function scores a cloudlet for it.
#[derive(Debug, Clone, Default)]
pub struct Need {
    /// Short digest (12 hex) of the base the device's overlay needs, if any.
    pub base: Option<String>,
    pub service: Option<String>,
}

/// Higher is better; `None` rules the cloudlet out.
pub type Utility = dyn Fn(&Found, &Need) -> Option<f64>;

/// The default utility: must hold the base (if one is needed); a cached service counts
/// much; then fewer instances per core, then a shorter round trip; unreachable: out.
pub fn default_utility(f: &Found, need: &Need) -> Option<f64> {
    let rtt = f.rtt_ms?;
    if let Some(b) = &need.base {
        if !f.ad.bases.iter().any(|h| b.starts_with(h.as_str()) || h.starts_with(b.as_str())) {
            return None;
        }
    }
    let cached = need.service.as_ref().is_some_and(|s| f.ad.services.contains(s));
    let load = f.ad.load as f64 / f.ad.cores.max(1) as f64;
    Some(if cached { 100.0 } else { 0.0 } - 10.0 * load - rtt / 10.0)
}

/// The best cloudlet for `need` by `utility`, if any qualifies.
pub fn select<'a>(found: &'a [Found], need: &Need, utility: &Utility) -> Option<&'a Found> {
    found
        .iter()
        .filter_map(|f| utility(f, need).map(|u| (u, f)))
        .max_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal))
        .map(|(_, f)| f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(name: &str, bases: &[&str], load: u32, rtt: Option<f64>) -> Found {
        Found {
            ad: Advertisement {
                name: name.into(),
                addr: "127.0.0.1:7878".parse().unwrap(),
                http_port: None,
                bases: bases.iter().map(|s| s.to_string()).collect(),
                services: vec![],
                load,
                free_mem_mib: 1024,
                cores: 2,
            },
            rtt_ms: rtt,
        }
    }

    #[test]
    fn selection_prefers_the_base_then_load_then_rtt() {
        let all = vec![
            found("far", &["aaaaaaaaaaaa"], 0, Some(50.0)),
            found("busy", &["aaaaaaaaaaaa"], 8, Some(1.0)),
            found("idle", &["aaaaaaaaaaaa"], 0, Some(1.0)),
            found("other", &["bbbbbbbbbbbb"], 0, Some(0.5)),
            found("gone", &["aaaaaaaaaaaa"], 0, None),
        ];
        let need = Need { base: Some("aaaaaaaaaaaa1234".into()), service: None };
        assert_eq!(select(&all, &need, &default_utility).unwrap().ad.name, "idle");
        let custom = |f: &Found, _: &Need| f.rtt_ms.map(|r| -r);
        assert_eq!(select(&all, &Need::default(), &custom).unwrap().ad.name, "other");
        assert!(select(&all, &Need { base: Some("cccccccccccc".into()), service: None }, &default_utility).is_none());
    }

    #[test]
    fn txt_round_trip() {
        let ad = found("c1", &["aaaaaaaaaaaa", "bbbbbbbbbbbb"], 3, None).ad;
        let info = ServiceInfo::new(SERVICE_TYPE, &ad.name, "c1.local.", ad.addr.ip(), ad.addr.port(), ad.properties())
            .unwrap();
        assert_eq!(Advertisement::from_info(&info.as_resolved_service()).unwrap(), ad);
    }
}
