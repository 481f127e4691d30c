//! The load policy: a cloudlet under pressure hands instances off to a paired cloudlet
//! that announces room for them (the VM handoff paper's "the cloudlet is overloaded").
//!
//! Every `move_check_s` the daemon reads its host's pressure: memory in use
//! (`1 - MemAvailable/MemTotal`, /proc/meminfo) and the 1-minute load average per core
//! (/proc/loadavg). While a configured threshold is exceeded it browses
//! `_cloudlet._tcp` (mDNS, 2 s) and keeps the announcements of cloudlets that this one is
//! paired with *as their client* (it holds credentials recorded with their address) and
//! whose TXT `mem` leaves room for the instance's QEMU (its resident memory) plus
//! [`HEADROOM_MIB`]. It moves the newest running instance to the one with the most free
//! memory, logs the move with its reason, and waits [`COOLDOWN`] before the next, so the
//! host's figures can follow. One move at a time: a handoff takes the link.

use std::sync::Arc;
use std::time::Duration;

use forage_api::HandoffReason;
use forage_cloudlet::{Cloudlet, HandoffOptions};
use forage_discovery::Found;

/// Free memory a destination must keep beyond the instance's.
pub const HEADROOM_MIB: u64 = 1024;
/// Time after a move (done or failed) before the next.
pub const COOLDOWN: Duration = Duration::from_secs(10);

/// When the host is under pressure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadPolicy {
    /// Move instances while this fraction of memory is in use (0..1).
    pub memory_above: Option<f64>,
    /// Move instances while the 1-minute load average per core is above this.
    pub load_above: Option<f64>,
    pub check_every: Duration,
}

/// The host's pressure, as the policy reads it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pressure {
    pub memory_used: f64,
    pub load_per_core: f64,
}

impl Pressure {
    pub fn now() -> Option<Self> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let field = |name: &str| -> Option<f64> {
            meminfo.lines().find(|l| l.starts_with(name))?.split_whitespace().nth(1)?.parse().ok()
        };
        let (total, available) = (field("MemTotal:")?, field("MemAvailable:")?);
        let load: f64 = std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()?;
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
        Some(Self { memory_used: 1.0 - available / total.max(1.0), load_per_core: load / cores })
    }
}

impl LoadPolicy {
    /// Why the host should shed an instance, if it should.
    pub fn exceeded(&self, p: &Pressure) -> Option<String> {
        if let Some(limit) = self.memory_above.filter(|&l| p.memory_used > l) {
            return Some(format!("memory {:.0}% in use > {:.0}%", p.memory_used * 100.0, limit * 100.0));
        }
        if let Some(limit) = self.load_above.filter(|&l| p.load_per_core > l) {
            return Some(format!("load {:.2} per core > {limit:.2}", p.load_per_core));
        }
        None
    }

    pub fn enabled(&self) -> bool {
        self.memory_above.is_some() || self.load_above.is_some()
    }
}

/// Run the policy for as long as the daemon runs.
pub fn start(cloudlet: Arc<Cloudlet>, policy: LoadPolicy) {
    if !policy.enabled() {
        return;
    }
    tracing::info!(
        ?policy,
        "load policy on: instances move to paired cloudlets with room when the host is under pressure"
    );
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(policy.check_every).await;
            let Some(why) = Pressure::now().and_then(|p| policy.exceeded(&p)) else { continue };
            if shed_one(&cloudlet, &why).await {
                tokio::time::sleep(COOLDOWN).await;
            }
        }
    });
}

/// Move the newest running instance to the roomiest paired cloudlet; whether one was tried.
async fn shed_one(cloudlet: &Arc<Cloudlet>, why: &str) -> bool {
    let mut instances = match cloudlet.state.list_instances(true) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!("load policy: the instance list: {e}");
            return false;
        }
    };
    instances.sort_by_key(|i| std::cmp::Reverse(i.started_unix_ms));
    let Some(instance) = instances.iter().find(|i| cloudlet.movable(&i.id)) else { return false };
    let need_mib = resident_mib(instance.qemu_pid);
    let found = match tokio::task::spawn_blocking(|| forage_discovery::discover(Duration::from_secs(2))).await {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => {
            tracing::warn!("load policy ({why}): browsing for cloudlets: {e}");
            return false;
        }
        Err(_) => return false,
    };
    let peers = forage_trust::DeviceTrust::new(&cloudlet.data.trust_peers()).peers();
    // Paired with that very address (the handoff uses only such a pairing).
    let paired = |f: &Found| {
        let addr = f.ad.addr.to_string();
        peers.iter().any(|p| p.record.addr.as_deref() == Some(&addr))
    };
    let Some(to) = choose(&found, &cloudlet.name, need_mib, paired) else {
        tracing::info!(why, need_mib, "load policy: no paired cloudlet announces room for the newest instance");
        return false;
    };
    tracing::info!(
        instance = instance.id,
        to = %to.ad.addr,
        destination = to.ad.name,
        reason = %HandoffReason::Load,
        why,
        "load policy: moving an instance"
    );
    let options = HandoffOptions { reason: HandoffReason::Load, ..Default::default() };
    match cloudlet.handoff(&instance.id, to.ad.addr, options).await {
        Ok(r) => {
            tracing::info!(instance = instance.id, endpoint = r.endpoint, total_s = r.total_s, "load policy: moved")
        }
        Err(e) => tracing::warn!(instance = instance.id, "load policy: did not move: {e}"),
    }
    true
}

/// The announcement with the most free memory among other, paired cloudlets with room
/// for `need_mib` and [`HEADROOM_MIB`].
pub fn choose<'a>(found: &'a [Found], us: &str, need_mib: u64, paired: impl Fn(&Found) -> bool) -> Option<&'a Found> {
    found
        .iter()
        .filter(|f| f.ad.name != us && f.ad.free_mem_mib >= need_mib + HEADROOM_MIB && paired(f))
        .max_by_key(|f| f.ad.free_mem_mib)
}

/// A process's resident memory (VmRSS), in MiB; 0 if unknown.
fn resident_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|kib| kib / 1024)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ad(name: &str, mem: u64) -> Found {
        Found {
            ad: forage_discovery::Advertisement {
                name: name.into(),
                addr: "10.0.0.2:7878".parse().unwrap(),
                http_port: None,
                bases: vec![],
                services: vec![],
                load: 0,
                free_mem_mib: mem,
                cores: 2,
            },
            rtt_ms: None,
        }
    }

    #[test]
    fn pressure_over_a_threshold_says_why() {
        let p = LoadPolicy { memory_above: Some(0.9), load_above: Some(1.5), check_every: Duration::from_secs(1) };
        assert_eq!(p.exceeded(&Pressure { memory_used: 0.5, load_per_core: 1.0 }), None);
        assert_eq!(
            p.exceeded(&Pressure { memory_used: 0.95, load_per_core: 1.0 }).as_deref(),
            Some("memory 95% in use > 90%")
        );
        assert_eq!(
            p.exceeded(&Pressure { memory_used: 0.5, load_per_core: 2.0 }).as_deref(),
            Some("load 2.00 per core > 1.50")
        );
        assert!(!LoadPolicy { memory_above: None, load_above: None, check_every: Duration::ZERO }.enabled());
    }

    #[test]
    fn the_destination_is_another_paired_cloudlet_with_room() {
        let found = [ad("us", 9000), ad("small", 1500), ad("big", 8000), ad("stranger", 20000)];
        let paired = |f: &Found| f.ad.name != "stranger";
        assert_eq!(choose(&found, "us", 512, paired).map(|f| f.ad.name.as_str()), Some("big"));
        assert_eq!(choose(&found, "us", 7500, paired).map(|f| f.ad.name.as_str()), None, "no room anywhere");
    }
}
