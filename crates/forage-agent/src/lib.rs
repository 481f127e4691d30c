//! The forage guest agent protocol, version 1.
//!
//! The agent runs inside every forage guest image and listens on TCP port
//! [`AGENT_PORT`]; the host reaches it through a user-mode-network port forward bound to
//! loopback. It is how applications get into a guest without baking them into the image.
//!
//! One request at a time per connection; every message is one JSON object on one line.
//!
//! ```text
//! host                                   guest agent
//!  | {"v":1,"op":"ping"}                    |
//!  |<------------ {"ok":true,"version":1,...}|
//!  | {"v":1,"op":"put","path":P,"mode":M,"size":N}
//!  | N raw bytes                            |
//!  |<------------------------- {"ok":true}  |
//!  | {"v":1,"op":"exec","argv":[..],"timeout_s":T}
//!  |<-- {"ok":true,"code":C,"stdout":..,"stderr":..,"timed_out":false}
//!  | {"v":1,"op":"spawn","argv":[..],"log":L}
//!  |<-------------------- {"ok":true,"pid":N}|
//! ```
//!
//! A request with an unknown `v` or `op` gets `{"ok":false,"error":...}`; the connection
//! stays usable. `docs/guest-agent.md` is the reference.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

pub mod app;

use serde::{Deserialize, Serialize};

pub const PROTOCOL_VERSION: u32 = 1;
/// The guest TCP port the agent listens on.
pub const AGENT_PORT: u16 = 7000;
/// Largest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;
/// Largest file accepted by `put`.
pub const MAX_PUT: u64 = 1 << 30;
/// Output of `exec` kept per stream; the rest is dropped and flagged.
pub const MAX_OUTPUT: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    Ping,
    Put { path: String, mode: u32, size: u64 },
    Exec { argv: Vec<String>, timeout_s: u64 },
    Spawn { argv: Vec<String>, log: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Request {
    pub v: u32,
    #[serde(flatten)]
    pub op: Op,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timed_out: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

impl Response {
    pub fn failure(msg: impl Into<String>) -> Self {
        Self { ok: false, error: Some(msg.into()), ..Self::default() }
    }
}

/// Parse one request line (untrusted bytes from the network).
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    if line.len() > MAX_LINE {
        return Err(format!("request line over {MAX_LINE} bytes"));
    }
    let req: Request = serde_json::from_slice(line).map_err(|e| format!("bad request: {e}"))?;
    if req.v != PROTOCOL_VERSION {
        return Err(format!("protocol version {} not supported (agent speaks {PROTOCOL_VERSION})", req.v));
    }
    Ok(req)
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("guest agent at {addr} did not answer within {waited:?}")]
    Unreachable { addr: SocketAddr, waited: Duration },
    #[error("guest agent at {addr}: connection failed")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("guest agent at {addr} refused {op}: {message}")]
    Refused { addr: SocketAddr, op: &'static str, message: String },
    #[error("guest agent at {addr} sent an unreadable answer: {detail}")]
    Protocol { addr: SocketAddr, detail: String },
    #[error("cannot read {path}")]
    Local {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed in the guest at {addr} with code {code}: {stderr}")]
    CommandFailed { addr: SocketAddr, command: String, code: i32, stderr: String },
}

/// Output of a command run in the guest.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

/// A connection to a guest agent.
pub struct AgentClient {
    addr: SocketAddr,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl AgentClient {
    /// Connect and ping, retrying until `wait` has passed: right after boot or restore the
    /// port forward accepts connections before the agent is listening.
    pub fn connect(addr: SocketAddr, wait: Duration) -> Result<Self, AgentError> {
        let start = Instant::now();
        loop {
            match Self::try_connect(addr) {
                Ok(c) => return Ok(c),
                Err(_) if start.elapsed() < wait => std::thread::sleep(Duration::from_millis(200)),
                Err(_) => return Err(AgentError::Unreachable { addr, waited: start.elapsed() }),
            }
        }
    }

    fn try_connect(addr: SocketAddr) -> Result<Self, AgentError> {
        Self::try_connect_within(addr, Duration::from_secs(5))
    }

    /// One try: connect and ping, the answer awaited for up to `answer`. With QEMU's
    /// user-mode network a connection to a forwarded port is accepted on the host at
    /// once, whether the guest is there or not; a guest whose NIC is not up yet leaves
    /// the ping unanswered until the network stack's retransmission (seconds), so a
    /// caller waiting for a guest that is about to answer tries again with short waits.
    pub fn try_connect_within(addr: SocketAddr, answer: Duration) -> Result<Self, AgentError> {
        let io = |source| AgentError::Io { addr, source };
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(io)?;
        stream.set_read_timeout(Some(answer)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut client = Self { addr, reader: BufReader::new(stream), writer };
        client.ping()?;
        // Long enough for big puts; exec sets its own from the command's timeout.
        client.reader.get_ref().set_read_timeout(Some(Duration::from_secs(600))).map_err(io)?;
        Ok(client)
    }

    pub fn ping(&mut self) -> Result<Response, AgentError> {
        self.call(Op::Ping, "ping", &[])
    }

    /// Copy a local file into the guest at `guest_path` (parents are created).
    pub fn put_file(&mut self, local: &Path, guest_path: &str) -> Result<(), AgentError> {
        use std::os::unix::fs::PermissionsExt;
        let local_err = |source| AgentError::Local { path: local.display().to_string(), source };
        let data = std::fs::read(local).map_err(local_err)?;
        let mode = std::fs::metadata(local).map_err(local_err)?.permissions().mode() & 0o7777;
        self.put_bytes(&data, guest_path, mode)
    }

    pub fn put_bytes(&mut self, data: &[u8], guest_path: &str, mode: u32) -> Result<(), AgentError> {
        let op = Op::Put { path: guest_path.to_string(), mode, size: data.len() as u64 };
        self.call(op, "put", data).map(|_| ())
    }

    /// Run a command in the guest and wait for it (at most `timeout`).
    pub fn exec(&mut self, argv: &[&str], timeout: Duration) -> Result<ExecOutput, AgentError> {
        let op = Op::Exec { argv: argv.iter().map(|s| s.to_string()).collect(), timeout_s: timeout.as_secs().max(1) };
        // The agent answers by the command's timeout; a silent guest must not hang us.
        let wait = timeout.max(Duration::from_secs(1)) + Duration::from_secs(30);
        let _ = self.reader.get_ref().set_read_timeout(Some(wait));
        let r = self.call(op, "exec", &[]);
        let _ = self.reader.get_ref().set_read_timeout(Some(Duration::from_secs(600)));
        let r = r?;
        Ok(ExecOutput {
            code: r.code.unwrap_or(-1),
            stdout: r.stdout.unwrap_or_default(),
            stderr: r.stderr.unwrap_or_default(),
            timed_out: r.timed_out.unwrap_or(false),
        })
    }

    /// Like [`exec`](Self::exec), but a non-zero exit is an error.
    pub fn exec_ok(&mut self, argv: &[&str], timeout: Duration) -> Result<ExecOutput, AgentError> {
        let out = self.exec(argv, timeout)?;
        if out.code != 0 || out.timed_out {
            return Err(AgentError::CommandFailed {
                addr: self.addr,
                command: argv.join(" "),
                code: out.code,
                stderr: if out.timed_out {
                    format!("timed out after {timeout:?}")
                } else {
                    out.stderr.trim().to_string()
                },
            });
        }
        Ok(out)
    }

    /// Whether something in the guest listens on TCP `port` (from `/proc/net/tcp*`: the
    /// guest's busybox `nc` has no `-z`).
    pub fn listening(&mut self, port: u16) -> Result<bool, AgentError> {
        let out = self.exec(&["cat", "/proc/net/tcp", "/proc/net/tcp6"], Duration::from_secs(5))?;
        Ok(listens_in(&out.stdout, port))
    }

    /// Start a long-running program in the guest, detached, its output going to `log`.
    pub fn spawn(&mut self, argv: &[&str], log: &str) -> Result<u32, AgentError> {
        let op = Op::Spawn { argv: argv.iter().map(|s| s.to_string()).collect(), log: log.to_string() };
        Ok(self.call(op, "spawn", &[])?.pid.unwrap_or(0))
    }

    fn call(&mut self, op: Op, name: &'static str, payload: &[u8]) -> Result<Response, AgentError> {
        let addr = self.addr;
        let io = |source| AgentError::Io { addr, source };
        let mut line = serde_json::to_vec(&Request { v: PROTOCOL_VERSION, op }).expect("requests serialize");
        line.push(b'\n');
        self.writer.write_all(&line).map_err(io)?;
        self.writer.write_all(payload).map_err(io)?;
        self.writer.flush().map_err(io)?;
        let mut answer = Vec::new();
        let n = (&mut self.reader).take(MAX_OUTPUT as u64 * 8).read_until(b'\n', &mut answer).map_err(io)?;
        if n == 0 {
            return Err(AgentError::Protocol { addr, detail: "connection closed".into() });
        }
        let resp: Response =
            serde_json::from_slice(&answer).map_err(|e| AgentError::Protocol { addr, detail: e.to_string() })?;
        if !resp.ok {
            return Err(AgentError::Refused { addr, op: name, message: resp.error.unwrap_or_default() });
        }
        Ok(resp)
    }
}

/// Whether `/proc/net/tcp` text shows a socket listening (state 0A) on local `port`.
pub fn listens_in(proc_net_tcp: &str, port: u16) -> bool {
    let want = format!(":{port:04X}");
    proc_net_tcp.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_sockets_are_found_in_proc_net_tcp() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue\n   0: 00000000:1F90 00000000:0000 0A 00000000:00000000\n   1: 0100007F:1B58 0100007F:9C40 01 00000000:00000000\n";
        assert!(listens_in(text, 8080));
        assert!(!listens_in(text, 7000), "an established connection is not a listener");
        assert!(!listens_in(text, 80));
    }

    #[test]
    fn requests_round_trip() {
        let reqs = [
            Op::Ping,
            Op::Put { path: "/data/x".into(), mode: 0o755, size: 3 },
            Op::Exec { argv: vec!["sh".into(), "-c".into(), "true".into()], timeout_s: 5 },
            Op::Spawn { argv: vec!["/bin/app".into()], log: "/data/app.log".into() },
        ];
        for op in reqs {
            let req = Request { v: 1, op };
            let line = serde_json::to_vec(&req).unwrap();
            assert_eq!(parse_request(&line).unwrap(), req);
        }
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason() {
        assert!(parse_request(b"{\"v\":2,\"op\":\"ping\"}").unwrap_err().contains("version 2"));
        assert!(parse_request(b"{\"v\":1,\"op\":\"reboot\"}").unwrap_err().contains("bad request"));
        assert!(parse_request(b"\xff\xfe").is_err());
        assert!(parse_request(&vec![b' '; MAX_LINE + 1]).unwrap_err().contains("over"));
    }
}
