//! Sending one substrate to many cloudlet hosts at once: UDP multicast with loss recovery,
//! by Debian's `udpcast` (`udp-sender`, `udp-receiver`) rather than code of our own. It is
//! maintained, made for exactly this (one image to a room of machines), and recovers loss
//! by receivers' negative acknowledgements per slice, so one lossy receiver slows the
//! slice down but every receiver ends with every byte.
//!
//! ```text
//! receivers: forage substrate receive --interface IF      (udp-receiver, joins, waits)
//! sender:    forage substrate push NAME --receivers N --interface IF
//!            udp-sender: HELLO on the rendezvous port, receivers CONNECT; once N have,
//!            data goes out to a multicast group (TTL 1), slice by slice, each slice
//!            retransmitted to whoever reports it incomplete
//! receivers: the file is verified whole (format and checksum, `format::verify`) and
//!            only then taken into the pool; a bad copy is deleted and refused.
//! ```

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::format::{self, DecodeError, SubstrateManifest};
use crate::pool::{Pool, PoolError};

/// udpcast's default rendezvous ports are 9000 and 9001; forage uses its own pair.
pub const DEFAULT_PORTBASE: u16 = 9310;

#[derive(Debug, Clone)]
pub struct Channel {
    /// Network interface to send or listen on.
    pub interface: String,
    /// Even port: udpcast uses it and the next one.
    pub portbase: u16,
    /// Unicast to a single receiver (udpcast's point-to-point mode), the peer that
    /// multicast is measured against.
    pub unicast: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("{program} not found: install Debian's udpcast (scripts/deps.sh)")]
    Missing { program: &'static str },
    #[error("{program} failed ({status}): {said}")]
    Failed { program: &'static str, status: String, said: String },
    #[error("no receiver joined within {0:?}")]
    Timeout(Duration),
    #[error("the received substrate is refused: {0}")]
    Refused(#[source] DecodeError),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    pub name: String,
    pub bytes: u64,
    pub receivers: usize,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReceiveReport {
    pub name: String,
    pub bytes: u64,
    pub seconds: f64,
    pub sha256: String,
}

fn check_portbase(p: u16) -> u16 {
    p & !1
}

async fn run(program: &'static str, mut cmd: tokio::process::Command, limit: Duration) -> Result<String, PushError> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => PushError::Missing { program },
        _ => PushError::Io { path: program.into(), source: e },
    })?;
    let out = match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(r) => r.map_err(|source| PushError::Io { path: program.into(), source })?,
        Err(_) => return Err(PushError::Timeout(limit)),
    };
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        let tail: Vec<&str> = said.lines().rev().take(3).collect();
        return Err(PushError::Failed { program, status: out.status.to_string(), said: tail.join(" / ") });
    }
    Ok(said)
}

/// Multicast substrate `name` to `receivers` hosts listening on `ch` (TTL 1): returns
/// once every receiver has the whole file.
pub async fn push(
    pool: &Pool,
    name: &str,
    receivers: usize,
    ch: &Channel,
    wait: Duration,
) -> Result<PushReport, PushError> {
    let (file, _) = pool.get(name)?;
    let bytes = std::fs::metadata(&file).map_err(|source| PushError::Io { path: file.clone(), source })?.len();
    let start = Instant::now();
    let mut cmd = tokio::process::Command::new("udp-sender");
    cmd.arg("--file")
        .arg(&file)
        .args(["--interface", &ch.interface])
        .args(["--portbase", &check_portbase(ch.portbase).to_string()])
        .args(["--ttl", "1", "--nokbd"])
        .args(["--min-receivers", &receivers.max(1).to_string()])
        .args(["--max-wait", &wait.as_secs().max(1).to_string()]);
    if ch.unicast {
        cmd.arg("--pointopoint");
    }
    run("udp-sender", cmd, wait + Duration::from_secs(600)).await?;
    Ok(PushReport { name: name.into(), bytes, receivers, seconds: start.elapsed().as_secs_f64() })
}

/// Receive one multicast substrate on `ch`, verify it whole, and take it into the pool
/// (under the name its manifest gives). A copy that does not verify is deleted.
pub async fn receive(
    pool: &Pool,
    ch: &Channel,
    wait: Duration,
) -> Result<(SubstrateManifest, ReceiveReport), PushError> {
    let partial = pool.temp_file("receiving");
    let start = Instant::now();
    let mut cmd = tokio::process::Command::new("udp-receiver");
    cmd.arg("--file")
        .arg(&partial)
        .args(["--interface", &ch.interface])
        .args(["--portbase", &check_portbase(ch.portbase).to_string()])
        .args(["--nokbd"]);
    let got = run("udp-receiver", cmd, wait).await;
    let result = got.and_then(|_| accept(pool, &partial, start));
    let _ = std::fs::remove_file(&partial);
    result
}

fn accept(pool: &Pool, partial: &Path, start: Instant) -> Result<(SubstrateManifest, ReceiveReport), PushError> {
    let manifest = format::verify(partial).map_err(PushError::Refused)?;
    let bytes = std::fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
    let sha256 = forage_vm::snapshot::sha256_file(partial)
        .map_err(|source| PushError::Io { path: partial.to_path_buf(), source })?;
    pool.insert(&manifest.name, partial)?;
    let report = ReceiveReport { name: manifest.name.clone(), bytes, seconds: start.elapsed().as_secs_f64(), sha256 };
    Ok((manifest, report))
}
