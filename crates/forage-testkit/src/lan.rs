//! An emulated LAN: network namespaces (the hosts) on one Linux bridge, for multicast.
//! A host's port can be made lossy: a `tc tbf` queue on the bridge's side of its veth
//! drops what exceeds its rate (netem and the police action are missing here), so
//! traffic to that host loses packets and its drop counter says how many.
//!
//! Needs root; everything is removed when the [`Lan`] is dropped. Addresses
//! (10.214.0.0/24) exist only inside the namespaces.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::wan::{run, tbf, Netns, WanError};

static NEXT: AtomicU32 = AtomicU32::new(0);

#[derive(Debug)]
pub struct Lan {
    pub bridge: String,
    pub hosts: Vec<Netns>,
    /// The bridge-side end of each host's veth.
    ports: Vec<String>,
}

impl Lan {
    pub fn create(hosts: usize) -> Result<Self, WanError> {
        let id = format!("fl{}x{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let mut lan = Self { bridge: format!("{id}b"), hosts: Vec::new(), ports: Vec::new() };
        run(Command::new("ip").args(["link", "add", &lan.bridge, "type", "bridge", "mcast_snooping", "0"]))?;
        run(Command::new("ip").args(["link", "set", &lan.bridge, "up"]))?;
        for i in 0..hosts {
            let ns = Netns {
                name: format!("{id}h{i}"),
                addr: Ipv4Addr::new(10, 214, 0, 1 + i as u8),
                device: format!("{id}q{i}"),
            };
            let port = format!("{id}p{i}");
            run(Command::new("ip").args(["netns", "add", &ns.name]))?;
            lan.hosts.push(ns.clone());
            run(Command::new("ip").args(["link", "add", &port, "type", "veth", "peer", "name", &ns.device]))?;
            lan.ports.push(port.clone());
            run(Command::new("ip").args(["link", "set", &port, "master", &lan.bridge]))?;
            run(Command::new("ip").args(["link", "set", &port, "up"]))?;
            run(Command::new("ip").args(["link", "set", &ns.device, "netns", &ns.name]))?;
            let n = ["-n", ns.name.as_str()];
            // udpcast receivers find the sender through the broadcast address: set it.
            run(Command::new("ip").args(n).args([
                "addr",
                "add",
                &format!("{}/24", ns.addr),
                "brd",
                "+",
                "dev",
                &ns.device,
            ]))?;
            run(Command::new("ip").args(n).args(["link", "set", &ns.device, "up"]))?;
            run(Command::new("ip").args(n).args(["link", "set", "lo", "up"]))?;
            run(Command::new("ip").args(n).args(["route", "add", "224.0.0.0/4", "dev", &ns.device]))?;
        }
        Ok(lan)
    }

    /// Traffic from the bridge to host `i` goes through a `rate_mbps` token bucket with a
    /// short queue: what exceeds it is dropped.
    pub fn make_lossy(&self, i: usize, rate_mbps: f64) -> Result<(), WanError> {
        run(Command::new("tc").args(["qdisc", "add", "dev", &self.ports[i], "root"]).args(tbf(rate_mbps)))
    }

    /// Packets dropped on the way to host `i` (its port's qdisc counter).
    pub fn dropped(&self, i: usize) -> u64 {
        let out = Command::new("tc").args(["-s", "qdisc", "show", "dev", &self.ports[i]]).output();
        let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        text.split("dropped ")
            .skip(1)
            .filter_map(|s| s.split(|c: char| !c.is_ascii_digit()).next()?.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &ns.name]).output();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).output();
    }
}
