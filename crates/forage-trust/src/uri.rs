//! What a pairing QR code says, so that a phone (or `forage pair --uri`) needs nothing
//! typed: where the cloudlet listens, its name, and the one-time code.
//!
//! ```text
//! forage://pair?cloudlet=10.0.0.5:7878&name=field-1&code=POOZX-BTV6V-HPU3D-QWLCO-FRI
//! ```
//!
//! Every value is plain (an address, a checked name, base32 and dashes): nothing is
//! percent-encoded. The code still pins the cloudlet's CA, so a QR code pointing at
//! another host gets no further than a typed address would.

use std::net::SocketAddr;

use crate::code::PairingCode;
use crate::peer::check_peer_name;
use crate::TrustError;

const PREFIX: &str = "forage://pair?";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairingUri {
    pub cloudlet: SocketAddr,
    pub name: String,
    pub code: String,
}

impl std::fmt::Display for PairingUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PREFIX}cloudlet={}&name={}&code={}", self.cloudlet, self.name, self.code)
    }
}

impl std::str::FromStr for PairingUri {
    type Err = TrustError;

    fn from_str(text: &str) -> Result<Self, TrustError> {
        let bad = |why: &str| {
            TrustError::Code(format!("not a pairing URI ({why}): it reads {PREFIX}cloudlet=ADDR&name=NAME&code=CODE"))
        };
        let query = text.trim().strip_prefix(PREFIX).ok_or_else(|| bad("wrong scheme"))?;
        let (mut cloudlet, mut name, mut code) = (None, None, None);
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').ok_or_else(|| bad("a field without a value"))?;
            let slot = match key {
                "cloudlet" => &mut cloudlet,
                "name" => &mut name,
                "code" => &mut code,
                _ => return Err(bad("an unknown field")),
            };
            if slot.replace(value).is_some() {
                return Err(bad("a field twice"));
            }
        }
        let cloudlet =
            cloudlet.ok_or_else(|| bad("no cloudlet"))?.parse().map_err(|_| bad("cloudlet is not ADDR:PORT"))?;
        let name = check_peer_name(name.ok_or_else(|| bad("no name"))?)?.to_string();
        let code = code.ok_or_else(|| bad("no code"))?;
        PairingCode::parse(code)?;
        Ok(Self { cloudlet, name, code: code.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uri_round_trips_and_hostile_ones_are_refused() {
        let code = "POOZX-BTV6V-HPU3D-QWLCO-FRI";
        let uri = PairingUri { cloudlet: "10.0.0.5:7878".parse().unwrap(), name: "field-1".into(), code: code.into() };
        let text = uri.to_string();
        assert_eq!(text, format!("forage://pair?cloudlet=10.0.0.5:7878&name=field-1&code={code}"));
        assert_eq!(text.parse::<PairingUri>().unwrap(), uri);
        let v6 = PairingUri { cloudlet: "[fd00::5]:7878".parse().unwrap(), ..uri.clone() };
        assert_eq!(v6.to_string().parse::<PairingUri>().unwrap(), v6);
        for hostile in [
            "https://pair?cloudlet=10.0.0.5:7878&name=a&code=POOZX-BTV6V-HPU3D-QWLCO-FRI",
            "forage://pair?cloudlet=10.0.0.5&name=a&code=POOZX-BTV6V-HPU3D-QWLCO-FRI",
            "forage://pair?cloudlet=10.0.0.5:7878&name=a/../b&code=POOZX-BTV6V-HPU3D-QWLCO-FRI",
            "forage://pair?cloudlet=10.0.0.5:7878&name=a&code=NOT-A-CODE",
            "forage://pair?cloudlet=10.0.0.5:7878&name=a&name=b&code=POOZX-BTV6V-HPU3D-QWLCO-FRI",
            "forage://pair?cloudlet=10.0.0.5:7878&name=a&code=POOZX-BTV6V-HPU3D-QWLCO-FRI&x=1",
            "forage://pair?cloudlet=10.0.0.5:7878&name=a",
        ] {
            assert!(hostile.parse::<PairingUri>().is_err(), "{hostile}");
        }
    }
}
