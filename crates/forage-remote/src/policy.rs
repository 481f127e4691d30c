//! Where a cloudlet may fetch overlays from. A device names the URL, so without a policy
//! it could make the cloudlet request anything the cloudlet can reach (its own API on
//! loopback, the management network, cloud metadata at 169.254.169.254): a server-side
//! request forgery. The default is https to public addresses only, no redirects; the
//! operator lists networks (and allows plain http) for overlay servers on the LAN.
//!
//! The check is made on the addresses the name resolves to, and the connection is made to
//! exactly those addresses (the policy is the HTTP client's resolver), so a name cannot
//! resolve to a public address for the check and a private one for the connection.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use ipnet::IpNet;

/// Which URLs may be fetched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchPolicy {
    /// `http://` URLs too, to addresses in `allow` only (never across the internet in
    /// the clear).
    pub allow_http: bool,
    /// Networks allowed besides public addresses (loopback, private, link-local ones are
    /// refused unless listed here).
    pub allow: Vec<IpNet>,
    /// Any URL at all (the device side, fetching what its own user named).
    pub any: bool,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("only https:// overlay URLs are fetched by this cloudlet")]
    Scheme,
    #[error("the overlay URL's host is not allowed by this cloudlet (public addresses only, unless its operator lists the network)")]
    Address,
    #[error("the overlay URL's host does not resolve")]
    Resolve,
    #[error("not a URL with a host")]
    NotAUrl,
}

/// A URL's scheme and `host:port`, before resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlTarget {
    pub https: bool,
    pub netloc: String,
}

impl FetchPolicy {
    /// Fetch anything (the device fetching for its own user).
    pub fn any() -> Self {
        Self { any: true, ..Self::default() }
    }

    /// The scheme and the host's addresses, before any connection.
    pub fn check_url(&self, url: &str) -> Result<(), PolicyError> {
        if self.any {
            return Ok(());
        }
        let target = self.target(url)?;
        self.resolve(&target.netloc, target.https).map(|_| ())
    }

    /// Where `url` points, as this policy reads it (no resolution): its scheme must be
    /// allowed and it must name a host. Pure, so the fuzzer can run it.
    pub fn target(&self, url: &str) -> Result<UrlTarget, PolicyError> {
        let (scheme, rest) = url.split_once("://").ok_or(PolicyError::NotAUrl)?;
        let https = match scheme.to_ascii_lowercase().as_str() {
            "https" => true,
            "http" if self.allow_http || self.any => false,
            _ => return Err(PolicyError::Scheme),
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        if hostport.is_empty() {
            return Err(PolicyError::NotAUrl);
        }
        // `[v6]:port`, `[v6]`, `host:port`, `host`.
        let has_port = match hostport.rfind(']') {
            Some(close) => hostport[close..].contains(':'),
            None => hostport.contains(':'),
        };
        let netloc =
            if has_port { hostport.to_string() } else { format!("{hostport}:{}", if https { 443 } else { 80 }) };
        Ok(UrlTarget { https, netloc })
    }

    /// May a connection go to `ip` (for a URL of `scheme`)?
    pub fn allows(&self, ip: IpAddr, https: bool) -> bool {
        if self.any {
            return true;
        }
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        if self.allow.iter().any(|n| n.contains(&ip)) {
            return true;
        }
        https && is_public(ip)
    }

    /// Resolve `host:port` and keep the addresses this policy allows.
    pub fn resolve(&self, netloc: &str, https: bool) -> Result<Vec<SocketAddr>, PolicyError> {
        let all: Vec<SocketAddr> = netloc.to_socket_addrs().map_err(|_| PolicyError::Resolve)?.collect();
        if all.is_empty() {
            return Err(PolicyError::Resolve);
        }
        let ok: Vec<SocketAddr> = all.into_iter().filter(|a| self.allows(a.ip(), https)).collect();
        if ok.is_empty() {
            return Err(PolicyError::Address);
        }
        Ok(ok)
    }
}

/// Globally routable: not loopback, private, link-local, shared (CGNAT), multicast,
/// broadcast, documentation, benchmarking, reserved or unspecified.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            !(a.is_unspecified()
                || a.is_loopback()
                || a.is_private()
                || a.is_link_local()
                || a.is_multicast()
                || a.is_broadcast()
                || a.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64/10 shared
                || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18/15 benchmarking
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0/24 protocol assignments
                || o[0] >= 240)
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            !(a.is_unspecified()
                || a.is_loopback()
                || a.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link local
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || a.to_ipv4_mapped().is_some_and(|v4| !is_public(IpAddr::V4(v4))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_to_public_addresses_by_default() {
        let p = FetchPolicy::default();
        assert_eq!(p.check_url("http://example.org/a.ovl"), Err(PolicyError::Scheme));
        assert_eq!(p.check_url("file:///etc/passwd"), Err(PolicyError::Scheme));
        assert_eq!(p.check_url("https:///x"), Err(PolicyError::NotAUrl));
        for inside in [
            "https://127.0.0.1/a.ovl",
            "https://user@127.0.0.1:8443/a",
            "https://[::1]:443/a",
            "https://169.254.169.254/latest",
            "https://10.0.0.1",
        ] {
            assert_eq!(p.check_url(inside), Err(PolicyError::Address), "{inside}");
        }
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "224.0.0.1",
        ] {
            assert!(!p.allows(bad.parse().unwrap(), true), "{bad} allowed");
        }
        assert!(p.allows("93.184.216.34".parse().unwrap(), true));
        assert!(!p.allows("93.184.216.34".parse().unwrap(), false), "plain http goes nowhere public");
        assert_eq!(p.resolve("127.0.0.1:443", true), Err(PolicyError::Address));
    }

    #[test]
    fn the_operator_lists_networks() {
        let p = FetchPolicy { allow_http: true, allow: vec!["127.0.0.1/32".parse().unwrap()], any: false };
        p.check_url("http://127.0.0.1:8000/a.ovl").unwrap();
        assert_eq!(p.check_url("http://127.0.0.2:8000/a.ovl"), Err(PolicyError::Address));
        assert!(p.allows("127.0.0.1".parse().unwrap(), false));
        assert!(!p.allows("127.0.0.2".parse().unwrap(), false));
        assert_eq!(p.resolve("127.0.0.1:8000", false).unwrap().len(), 1);
    }
}
