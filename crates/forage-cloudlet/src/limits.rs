//! What one peer, and everyone together, may hold of a cloudlet: connections (counted
//! from accept, before TLS, globally and per source address) and sessions (counted after
//! authentication, globally and per credential). A [`Slot`] is held for as long as the
//! connection or session lives and gives its place back when dropped.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Substrate activations at once on one cloudlet (each decodes and copies guest memory,
/// and QEMU restores it: CPU and disk bound); more are answered `busy` (`substrate`).
pub(crate) const ACTIVATIONS_AT_ONCE: usize = 2;

/// The limits a cloudlet enforces (defaults fit a small edge server).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open device connections, all sources together.
    pub connections: usize,
    /// Open connections from one address (an IPv6 /64 counts as one).
    pub connections_per_source: usize,
    /// The TLS handshake must be done within this.
    pub handshake: Duration,
    /// Sessions (synthesis, provisioning, handoff) at once.
    pub sessions: usize,
    /// Sessions at once of one credential.
    pub sessions_per_peer: usize,
    /// What one VM handed over by a peer cloudlet may take.
    pub vm: forage_vm::HostCapacity,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections: 512,
            connections_per_source: 32,
            handshake: Duration::from_secs(10),
            sessions: 64,
            sessions_per_peer: 8,
            vm: forage_vm::HostCapacity::detect(),
        }
    }
}

/// Counts of holders per key, with a cap per key and a cap in all.
#[derive(Debug)]
pub(crate) struct Counter<K: Eq + Hash> {
    inner: Mutex<(usize, HashMap<K, usize>)>,
    total: usize,
    each: usize,
}

/// A place taken in a [`Counter`]; given back on drop.
pub(crate) struct Slot<K: Eq + Hash + Clone> {
    counter: Arc<Counter<K>>,
    key: K,
}

/// Why no place was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    All(usize),
    This(usize),
}

impl<K: Eq + Hash + Clone> Counter<K> {
    pub fn new(total: usize, each: usize) -> Arc<Self> {
        Arc::new(Self { inner: Mutex::new((0, HashMap::new())), total, each })
    }

    pub fn take(self: &Arc<Self>, key: K) -> Result<Slot<K>, Full> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.0 >= self.total {
            return Err(Full::All(self.total));
        }
        let n = g.1.entry(key.clone()).or_insert(0);
        if *n >= self.each {
            return Err(Full::This(self.each));
        }
        *n += 1;
        g.0 += 1;
        Ok(Slot { counter: self.clone(), key })
    }

    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.inner.lock().unwrap().0
    }
}

impl<K: Eq + Hash + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut g = self.counter.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.0 -= 1;
        if let Some(n) = g.1.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                g.1.remove(&self.key);
            }
        }
    }
}

pub(crate) use forage_trust::source_key;

/// Raise this process's open-file limit to its hard limit (each connection, QEMU socket
/// and FUSE mount is a descriptor); returns the new soft limit.
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if let Some(hard) = l.maximum {
        if l.current.is_none_or(|c| c < hard) {
            l.current = Some(hard);
            if let Err(e) = setrlimit(Resource::Nofile, l) {
                tracing::warn!("cannot raise the open-file limit to {hard}: {e}");
            }
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    #[test]
    fn slots_are_capped_per_key_and_in_all_and_given_back() {
        let c = Counter::new(3, 2);
        let a1 = c.take("a").unwrap();
        let _a2 = c.take("a").unwrap();
        assert_eq!(c.take("a").err(), Some(Full::This(2)));
        let _b1 = c.take("b").unwrap();
        assert_eq!(c.take("c").err(), Some(Full::All(3)));
        drop(a1);
        assert_eq!(c.held(), 2);
        c.take("c").expect("a place was given back");
    }

    #[test]
    fn ipv6_sources_count_by_their_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        let m: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(source_key(m), "10.0.0.1".parse::<IpAddr>().unwrap());
    }
}
