//! Emulated WAN links: two network namespaces joined by a veth pair whose both ends are
//! shaped with `tc qdisc tbf` (netem is not available on these machines). Benches put a
//! device and a cloudlet (or two cloudlets) on either side.
//!
//! The namespaces are this process's own test hosts; their addresses (10.213.0.1 and
//! .2) exist only inside them, so links never collide and no traffic leaves the machine.
//! Needs root (CAP_NET_ADMIN). Everything is removed when the [`WanLink`] is dropped.
//!
//! Configuration goes through the `ip` and `tc` tools of iproute2: a netlink crate would
//! need the tbf parameters (rate tables, burst in ticks) computed by hand, which `tc` does.

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum WanError {
    #[error("`{command}` failed: {detail} (emulated links need root and iproute2)")]
    Command { command: String, detail: String },
    #[error("rate {0} Mbit/s is not a usable link rate")]
    BadRate(f64),
}

/// One side of a link.
#[derive(Debug, Clone)]
pub struct Netns {
    pub name: String,
    pub addr: Ipv4Addr,
    pub device: String,
}

impl Netns {
    /// `program` to be run inside this namespace (`ip netns exec NAME program`).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Run `f` on a thread that has entered this namespace (sockets `f` opens live in it).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
        let ns = std::fs::File::open(format!("/run/netns/{}", self.name))?;
        std::thread::scope(|s| {
            s.spawn(move || {
                use std::os::fd::AsFd;
                rustix::thread::move_into_link_name_space(
                    ns.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )?;
                Ok(f())
            })
            .join()
            .expect("no panic")
        })
    }
}

/// Two namespaces joined by a shaped veth pair.
#[derive(Debug)]
pub struct WanLink {
    pub a: Netns,
    pub b: Netns,
    rate_mbps: f64,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl WanLink {
    /// Create a link shaped to `rate_mbps` in each direction.
    pub fn create(rate_mbps: f64) -> Result<Self, WanError> {
        check_rate(rate_mbps)?;
        let id = format!("fw{}x{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let side = |s: &str, last: u8| Netns {
            name: format!("{id}{s}"),
            addr: Ipv4Addr::new(10, 213, 0, last),
            device: format!("{id}{s}"),
        };
        let link = Self { a: side("a", 1), b: side("b", 2), rate_mbps };
        // From here on, Drop cleans up whatever was made.
        for ns in [&link.a, &link.b] {
            run(Command::new("ip").args(["netns", "add", &ns.name]))?;
        }
        run(Command::new("ip").args(["link", "add", &link.a.device, "type", "veth", "peer", "name", &link.b.device]))?;
        for ns in [&link.a, &link.b] {
            run(Command::new("ip").args(["link", "set", &ns.device, "netns", &ns.name]))?;
            run(Command::new("ip").args([
                "-n",
                &ns.name,
                "addr",
                "add",
                &format!("{}/30", ns.addr),
                "dev",
                &ns.device,
            ]))?;
            run(Command::new("ip").args(["-n", &ns.name, "link", "set", &ns.device, "up"]))?;
            run(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]))?;
            run(Command::new("tc")
                .args(["-n", &ns.name, "qdisc", "add", "dev", &ns.device, "root"])
                .args(tbf(rate_mbps)))?;
        }
        Ok(link)
    }

    pub fn rate_mbps(&self) -> f64 {
        self.rate_mbps
    }

    /// Change the rate of both directions (e.g. to step through 5, 10, 25 Mbit/s).
    pub fn set_rate(&mut self, rate_mbps: f64) -> Result<(), WanError> {
        check_rate(rate_mbps)?;
        for ns in [&self.a, &self.b] {
            run(Command::new("tc")
                .args(["-n", &ns.name, "qdisc", "change", "dev", &ns.device, "root"])
                .args(tbf(rate_mbps)))?;
        }
        self.rate_mbps = rate_mbps;
        Ok(())
    }
}

impl Drop for WanLink {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end in it, and with it the pair.
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", &ns.name]).output();
        }
    }
}

fn check_rate(mbps: f64) -> Result<(), WanError> {
    if mbps.is_finite() && (0.1..=10_000.0).contains(&mbps) {
        Ok(())
    } else {
        Err(WanError::BadRate(mbps))
    }
}

/// tbf arguments: the burst must hold at least one timer tick of traffic.
pub(crate) fn tbf(mbps: f64) -> Vec<String> {
    let kbit = (mbps * 1000.0).round() as u64;
    let burst = (kbit * 1000 / 8 / 100).max(32 * 1024);
    // A 50 ms queue, as a WiFi access point or a WAN router holds: a longer one (tc's
    // examples use 400 ms) makes every connection sit behind its own standing queue.
    ["tbf", "rate", &format!("{kbit}kbit"), "burst", &burst.to_string(), "latency", "50ms"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

pub(crate) fn run(cmd: &mut Command) -> Result<(), WanError> {
    let text = format!("{:?}", cmd).replace('"', "");
    let out = cmd.output().map_err(|e| WanError::Command { command: text.clone(), detail: e.to_string() })?;
    if !out.status.success() {
        return Err(WanError::Command {
            command: text,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tbf_arguments() {
        assert_eq!(tbf(38.0), ["tbf", "rate", "38000kbit", "burst", "47500", "latency", "50ms"]);
        assert_eq!(tbf(5.0)[4], "32768");
        assert!(check_rate(0.0).is_err() && check_rate(f64::NAN).is_err() && check_rate(25.0).is_ok());
    }
}
