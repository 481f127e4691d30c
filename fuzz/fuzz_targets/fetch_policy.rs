//! Overlay URLs come from devices: the fetch policy's reading of a URL (scheme, host,
//! port) and its address rules. Nothing is resolved here.
#![no_main]
use forage_remote::FetchPolicy;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(url) = std::str::from_utf8(data) else { return };
    let strict = FetchPolicy::default();
    let lab = FetchPolicy { allow_http: true, allow: vec!["10.0.0.0/8".parse().unwrap()], any: false };
    for policy in [&strict, &lab] {
        if let Ok(t) = policy.target(url) {
            assert!(policy.allow_http || t.https, "plain http accepted by a policy that refuses it");
            if let Ok(addr) = t.netloc.parse::<std::net::SocketAddr>() {
                let allowed = policy.allows(addr.ip(), t.https);
                if addr.ip().is_loopback() && policy.allow.iter().all(|n| !n.contains(&addr.ip())) {
                    assert!(!allowed, "loopback allowed: {url}");
                }
            }
        }
    }
});
