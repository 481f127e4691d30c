//! How a device reaches its instance's service (protocol version 2).
//!
//! The cloudlet relays each instance's service port on its service address. The relay
//! speaks TLS 1.3 with the cloudlet's server certificate (the device checks that it
//! chains to the CA whose SHA-256 it was given, so nobody in between reads or changes the
//! service's traffic), and the first line the device sends inside it is
//!
//! ```text
//! FORAGE-SERVICE 2 <token: 32 hex digits>\n
//! ```
//!
//! The token is the instance's secret, given only to the device that owns the instance
//! (and to devices that joined it) in Ready or Moved, over their mutually authenticated
//! channel. A connection without the right token within [`PREAMBLE_WAIT_S`] is closed
//! unheard; after it, bytes pass through unchanged in both directions.

use serde::{Deserialize, Serialize};

pub const PREAMBLE_PREFIX: &str = "FORAGE-SERVICE 2 ";
/// Bytes of the token (hex: twice as many digits).
pub const TOKEN_BYTES: usize = 16;
/// The whole preamble line, newline included.
pub const PREAMBLE_LEN: usize = PREAMBLE_PREFIX.len() + TOKEN_BYTES * 2 + 1;
/// Seconds a relay waits for the preamble.
pub const PREAMBLE_WAIT_S: u64 = 10;

/// Where and how a device reaches its service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEndpoint {
    /// `host:port` of the relay (empty: the instance has no service port).
    pub addr: String,
    /// The instance's secret, hex.
    pub token: String,
    /// SHA-256 of the cloudlet's CA certificate, hex: the relay's certificate chains to it.
    pub ca_sha256: String,
}

impl ServiceEndpoint {
    /// The preamble line a device sends first.
    pub fn preamble(&self) -> String {
        format!("{PREAMBLE_PREFIX}{}\n", self.token)
    }
}

/// The token a preamble carries, or why it is not one. `line` is what arrived, at most
/// [`PREAMBLE_LEN`] bytes.
pub fn parse_preamble(line: &[u8]) -> Result<[u8; TOKEN_BYTES], &'static str> {
    let rest = line.strip_prefix(PREAMBLE_PREFIX.as_bytes()).ok_or("not a forage service preamble")?;
    let hex = rest.strip_suffix(b"\n").ok_or("the preamble does not end its line")?;
    if hex.len() != TOKEN_BYTES * 2 {
        return Err("the token is not 32 hex digits");
    }
    let mut token = [0u8; TOKEN_BYTES];
    for (i, pair) in hex.chunks(2).enumerate() {
        let digit = |b: u8| (b as char).to_digit(16).ok_or("the token is not hex");
        token[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Ok(token)
}

/// Equal tokens, compared in time that does not depend on where they differ.
pub fn same_token(a: &[u8; TOKEN_BYTES], b: &[u8; TOKEN_BYTES]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preambles_parse_and_nothing_else_does() {
        let ep = ServiceEndpoint {
            addr: "127.0.0.1:1".into(),
            token: "00112233445566778899aabbccddeeff".into(),
            ca_sha256: String::new(),
        };
        let line = ep.preamble();
        assert_eq!(line.len(), PREAMBLE_LEN);
        let t = parse_preamble(line.as_bytes()).unwrap();
        assert_eq!(t[0], 0x00);
        assert_eq!(t[15], 0xff);
        assert!(same_token(&t, &t));
        let mut other = t;
        other[7] ^= 1;
        assert!(!same_token(&t, &other));
        for bad in [
            "",
            "GET / HTTP/1.1\r\n",
            "FORAGE-SERVICE 2 xyz\n",
            "FORAGE-SERVICE 2 00112233445566778899aabbccddeeff",
            "FORAGE-SERVICE 1 00112233445566778899aabbccddeeff\n",
            "FORAGE-SERVICE 2 00112233445566778899aabbccddeefg\n",
        ] {
            assert!(parse_preamble(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }
}
