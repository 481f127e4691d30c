//! Talking to a guest's service over its forwarded port: one request line, one answer line.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Send `line` to the service at `addr` and return its answer. Retries the connection
/// until `wait` has passed: after a boot or restore the forward accepts before the guest
/// answers.
pub fn request(addr: SocketAddr, line: &str, wait: Duration) -> anyhow::Result<String> {
    let start = Instant::now();
    loop {
        match try_request(addr, line) {
            Ok(a) => return Ok(a),
            Err(e) if start.elapsed() >= wait => return Err(e.context(format!("service at {addr} did not answer"))),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn try_request(addr: SocketAddr, line: &str) -> anyhow::Result<String> {
    Ok(forage_agent::app::request_line(addr, line, Duration::from_secs(120))?)
}

/// The value of `key=` in an answer like `ok nonce=1 served=2`.
pub fn field<'a>(answer: &'a str, key: &str) -> Option<&'a str> {
    answer
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields() {
        assert_eq!(field("ok nonce=12 served=3", "served"), Some("3"));
        assert_eq!(field("ok nonce=12", "served"), None);
    }
}
