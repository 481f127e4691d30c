//! A small typed client of the QEMU guest agent (`qemu-ga`, QGA) over the unix socket of
//! the VM's virtio-serial channel ([`crate::GuestAgentSpec`]).
//!
//! ```text
//! host (this client)                      qemu-ga in the guest
//!   | 0xFF {"execute":"guest-sync-delimited","arguments":{"id":N}}
//!   |<----------------------------- 0xFF {"return":N}     stale output before it is dropped
//!   | {"execute":"guest-ping"} ------------------------->|
//!   |<------------------------------------ {"return":{}} |
//!   | {"execute":"guest-exec","arguments":{"path":..,"arg":[..],"capture-output":true}}
//!   |<------------------------------- {"return":{"pid":P}}
//!   | {"execute":"guest-exec-status","arguments":{"pid":P}}   (until "exited")
//!   |<-- {"return":{"exited":true,"exitcode":0,"out-data":BASE64,..}}
//! ```
//!
//! Unlike QMP there is no greeting, and the agent may not be running yet (or may have been
//! restarted, or a previous client left an answer unread): every connection starts with
//! `guest-sync-delimited`, whose 0xFF marks let the client skip whatever came before, and a
//! command that timed out makes the next call synchronize again. The chardev serves one
//! client at a time.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// How long one synchronization attempt waits for the agent's answer.
const SYNC_ATTEMPT: Duration = Duration::from_secs(3);
/// How long an ordinary command may take.
const COMMAND_WAIT: Duration = Duration::from_secs(60);
/// Longest answer line accepted (guest-file-read chunks and exec output are base64).
const MAX_ANSWER: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QgaError {
    #[error("guest agent socket {path}: cannot connect")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "guest agent on {path} did not answer {command} within {waited:?} (is qemu-guest-agent running in the guest?)"
    )]
    NoAnswer { path: PathBuf, command: String, waited: Duration },
    #[error("guest agent socket {path}: connection lost")]
    Disconnected {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("guest agent on {path} sent an unreadable answer to {command}: {detail}")]
    Protocol { path: PathBuf, command: String, detail: String },
    #[error("the guest agent on {path} refused {command}: {class}: {desc}")]
    Command { path: PathBuf, command: String, class: String, desc: String },
    #[error("`{command}` in the guest (via {path}) did not finish within {waited:?}")]
    ExecTimeout { path: PathBuf, command: String, waited: Duration },
}

/// `guest-fsfreeze-status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FreezeStatus {
    Thawed,
    Frozen,
}

/// One file system of a `guest-fstrim` answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TrimmedPath {
    pub path: String,
    /// Bytes trimmed (absent when the guest kernel does not say).
    #[serde(default)]
    pub trimmed: Option<u64>,
    #[serde(default)]
    pub minimum: Option<u64>,
    /// Set when this file system could not be trimmed.
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Deserialize)]
struct FstrimAnswer {
    #[serde(default)]
    paths: Vec<TrimmedPath>,
}

#[derive(Deserialize)]
struct ExecStarted {
    pid: i64,
}

/// `guest-exec-status`, output decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecStatus {
    pub exited: bool,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The agent dropped output beyond its buffer (16 MiB per stream in 7.2).
    pub truncated: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawExecStatus {
    exited: bool,
    #[serde(default)]
    exitcode: Option<i32>,
    #[serde(default)]
    signal: Option<i32>,
    #[serde(default)]
    out_data: Option<String>,
    #[serde(default)]
    err_data: Option<String>,
    #[serde(default)]
    out_truncated: bool,
    #[serde(default)]
    err_truncated: bool,
}

#[derive(Deserialize)]
struct FileRead {
    #[serde(rename = "buf-b64")]
    buf_b64: String,
    eof: bool,
}

/// A connection to a guest's qemu-ga, synchronized.
pub struct GuestAgent {
    path: PathBuf,
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    next_sync: u64,
    /// A command timed out: its answer may still arrive, so synchronize first.
    needs_sync: bool,
}

impl GuestAgent {
    /// Connect to `socket` and synchronize with the agent, retrying until `wait` has passed
    /// (the agent starts some seconds into the guest's boot).
    pub async fn connect(socket: &Path, wait: Duration) -> Result<Self, QgaError> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(socket).await {
                Ok(s) => break s,
                Err(source) if start.elapsed() >= wait => {
                    return Err(QgaError::Connect { path: socket.to_path_buf(), source })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let (read, writer) = stream.into_split();
        let mut agent = Self {
            path: socket.to_path_buf(),
            reader: BufReader::new(read),
            writer,
            next_sync: sync_seed(),
            needs_sync: true,
        };
        agent.sync(wait.saturating_sub(start.elapsed())).await?;
        Ok(agent)
    }

    /// `guest-sync-delimited`, retried until the agent answers with our id or `wait` passes.
    pub async fn sync(&mut self, wait: Duration) -> Result<(), QgaError> {
        let start = Instant::now();
        loop {
            self.next_sync = self.next_sync.wrapping_add(1) & 0x7fff_ffff;
            let id = self.next_sync;
            let msg = json!({"execute": "guest-sync-delimited", "arguments": {"id": id}});
            let mut bytes = vec![0xFF];
            bytes.extend_from_slice(msg.to_string().as_bytes());
            bytes.push(b'\n');
            self.send(&bytes).await?;
            let attempt = SYNC_ATTEMPT.min(wait.saturating_sub(start.elapsed()).max(Duration::from_millis(200)));
            let deadline = Instant::now() + attempt;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, self.read_message()).await {
                    Ok(Ok(v)) if v.get("return").and_then(Value::as_u64) == Some(id) => {
                        self.needs_sync = false;
                        return Ok(());
                    }
                    Ok(Ok(_)) => continue, // stale output of an earlier client or command
                    Ok(Err(e)) => return Err(e),
                    Err(_) => break,
                }
            }
            if start.elapsed() >= wait {
                return Err(QgaError::NoAnswer {
                    path: self.path.clone(),
                    command: "guest-sync-delimited".into(),
                    waited: start.elapsed(),
                });
            }
        }
    }

    /// Run one command and return its `return` value, waiting at most `wait`.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        wait: Duration,
    ) -> Result<Value, QgaError> {
        if self.needs_sync {
            self.sync(Duration::from_secs(10)).await?;
        }
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string().into_bytes();
        line.push(b'\n');
        self.send(&line).await?;
        let answer = match tokio::time::timeout(wait, self.read_message()).await {
            Ok(r) => r?,
            Err(_) => {
                self.needs_sync = true;
                return Err(QgaError::NoAnswer { path: self.path.clone(), command: command.to_string(), waited: wait });
            }
        };
        if let Some(r) = answer.get("return") {
            return Ok(r.clone());
        }
        let err = &answer["error"];
        if err.is_object() {
            return Err(QgaError::Command {
                path: self.path.clone(),
                command: command.to_string(),
                class: err["class"].as_str().unwrap_or("?").to_string(),
                desc: err["desc"].as_str().unwrap_or("?").to_string(),
            });
        }
        Err(self.protocol(command, format!("neither return nor error: {answer}")))
    }

    async fn typed<T: DeserializeOwned>(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        wait: Duration,
    ) -> Result<T, QgaError> {
        let v = self.execute(command, arguments, wait).await?;
        serde_json::from_value(v).map_err(|e| self.protocol(command, e.to_string()))
    }

    /// `guest-ping`: the agent is there and answers.
    pub async fn ping(&mut self) -> Result<(), QgaError> {
        self.execute("guest-ping", None, COMMAND_WAIT).await.map(|_| ())
    }

    /// `guest-fsfreeze-freeze`: flush and freeze every mounted file system; returns how many.
    pub async fn fsfreeze_freeze(&mut self) -> Result<u32, QgaError> {
        self.typed("guest-fsfreeze-freeze", None, Duration::from_secs(120)).await
    }

    /// `guest-fsfreeze-thaw`; returns how many file systems were thawed.
    pub async fn fsfreeze_thaw(&mut self) -> Result<u32, QgaError> {
        self.typed("guest-fsfreeze-thaw", None, COMMAND_WAIT).await
    }

    pub async fn fsfreeze_status(&mut self) -> Result<FreezeStatus, QgaError> {
        self.typed("guest-fsfreeze-status", None, COMMAND_WAIT).await
    }

    /// `guest-fstrim`: discard the free blocks of every mounted file system.
    pub async fn fstrim(&mut self, minimum: Option<u64>) -> Result<Vec<TrimmedPath>, QgaError> {
        let args = minimum.map(|m| json!({ "minimum": m }));
        let a: FstrimAnswer = self.typed("guest-fstrim", args, Duration::from_secs(300)).await?;
        Ok(a.paths)
    }

    /// `guest-exec` with output captured; returns the guest pid.
    pub async fn exec_start(&mut self, path: &str, args: &[&str]) -> Result<i64, QgaError> {
        let arguments = json!({ "path": path, "arg": args, "capture-output": true });
        let started: ExecStarted = self.typed("guest-exec", Some(arguments), COMMAND_WAIT).await?;
        Ok(started.pid)
    }

    /// `guest-exec-status` of a pid from [`exec_start`](Self::exec_start).
    pub async fn exec_status(&mut self, pid: i64) -> Result<ExecStatus, QgaError> {
        let raw: RawExecStatus = self.typed("guest-exec-status", Some(json!({ "pid": pid })), COMMAND_WAIT).await?;
        let decode = |command: &str, data: Option<String>| -> Result<Vec<u8>, QgaError> {
            data.map(|d| base64::engine::general_purpose::STANDARD.decode(d))
                .transpose()
                .map(Option::unwrap_or_default)
                .map_err(|e| self.protocol(command, format!("output is not base64: {e}")))
        };
        Ok(ExecStatus {
            exited: raw.exited,
            exit_code: raw.exitcode,
            signal: raw.signal,
            stdout: decode("guest-exec-status", raw.out_data)?,
            stderr: decode("guest-exec-status", raw.err_data)?,
            truncated: raw.out_truncated || raw.err_truncated,
        })
    }

    /// Run a program in the guest and wait for it to end (at most `timeout`).
    pub async fn run(&mut self, path: &str, args: &[&str], timeout: Duration) -> Result<ExecStatus, QgaError> {
        let pid = self.exec_start(path, args).await?;
        let start = Instant::now();
        loop {
            let status = self.exec_status(pid).await?;
            if status.exited {
                return Ok(status);
            }
            if start.elapsed() > timeout {
                return Err(QgaError::ExecTimeout {
                    path: self.path.clone(),
                    command: std::iter::once(path).chain(args.iter().copied()).collect::<Vec<_>>().join(" "),
                    waited: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Read a whole file of the guest (`guest-file-open`, `-read` in 1 MiB pieces, `-close`).
    pub async fn read_file(&mut self, guest_path: &str) -> Result<Vec<u8>, QgaError> {
        let handle: i64 =
            self.typed("guest-file-open", Some(json!({ "path": guest_path, "mode": "r" })), COMMAND_WAIT).await?;
        let mut out = Vec::new();
        let result = loop {
            let piece: Result<FileRead, _> =
                self.typed("guest-file-read", Some(json!({ "handle": handle, "count": 1 << 20 })), COMMAND_WAIT).await;
            match piece {
                Ok(p) => match base64::engine::general_purpose::STANDARD.decode(&p.buf_b64) {
                    Ok(bytes) => {
                        out.extend_from_slice(&bytes);
                        if p.eof || bytes.is_empty() {
                            break Ok(());
                        }
                    }
                    Err(e) => break Err(self.protocol("guest-file-read", e.to_string())),
                },
                Err(e) => break Err(e),
            }
        };
        let closed = self.execute("guest-file-close", Some(json!({ "handle": handle })), COMMAND_WAIT).await;
        result?;
        closed?;
        Ok(out)
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), QgaError> {
        let r = async {
            self.writer.write_all(bytes).await?;
            self.writer.flush().await
        }
        .await;
        r.map_err(|source| QgaError::Disconnected { path: self.path.clone(), source })
    }

    /// The next JSON object from the agent; 0xFF delimiters and blank lines are skipped.
    async fn read_message(&mut self) -> Result<Value, QgaError> {
        use tokio::io::AsyncReadExt;
        loop {
            let mut line = Vec::new();
            let n = (&mut self.reader)
                .take(MAX_ANSWER)
                .read_until(b'\n', &mut line)
                .await
                .map_err(|source| QgaError::Disconnected { path: self.path.clone(), source })?;
            if n == 0 {
                return Err(QgaError::Disconnected {
                    path: self.path.clone(),
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                });
            }
            let text: Vec<u8> = line.into_iter().filter(|&b| b != 0xFF).collect();
            let text = String::from_utf8_lossy(&text);
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            return serde_json::from_str(text).map_err(|e| self.protocol("(answer)", format!("{e}: {text:.200}")));
        }
    }

    fn protocol(&self, command: &str, detail: String) -> QgaError {
        QgaError::Protocol { path: self.path.clone(), command: command.to_string(), detail }
    }
}

/// A sync id unlikely to match an answer left by an earlier client.
fn sync_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    (nanos ^ (std::process::id() as u64) << 16) & 0x3fff_ffff
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A fake qemu-ga: leaves a stale answer first, then answers sync with 0xFF, and a few
    /// commands as 7.2's agent does.
    async fn fake_agent(listener: UnixListener) {
        let (stream, _) = listener.accept().await.unwrap();
        let (r, mut w) = stream.into_split();
        w.write_all(b"{\"return\": 12345}\n").await.unwrap(); // left over from someone else
        let mut reader = BufReader::new(r);
        let mut polls = 0;
        loop {
            let mut raw = Vec::new();
            if reader.read_until(b'\n', &mut raw).await.unwrap_or(0) == 0 {
                return;
            }
            raw.retain(|&b| b != 0xFF);
            let v: Value = match serde_json::from_slice(&raw) {
                Ok(v) => v,
                Err(_) => continue,
            };
            let reply = match v["execute"].as_str().unwrap() {
                "guest-sync-delimited" => {
                    w.write_all(&[0xFF]).await.unwrap();
                    json!({"return": v["arguments"]["id"]})
                }
                "guest-ping" => json!({"return": {}}),
                "guest-fsfreeze-freeze" => json!({"return": 1}),
                "guest-fsfreeze-status" => json!({"return": "frozen"}),
                "guest-fstrim" => json!({"return": {"paths": [{"path": "/", "trimmed": 4096, "minimum": 0}]}}),
                "guest-exec" => json!({"return": {"pid": 77}}),
                "guest-exec-status" => {
                    polls += 1;
                    if polls < 2 {
                        json!({"return": {"exited": false}})
                    } else {
                        json!({"return": {"exited": true, "exitcode": 3, "out-data": "aGVsbG8K", "err-data": ""}})
                    }
                }
                "guest-file-open" => json!({"return": 5}),
                "guest-file-read" => json!({"return": {"count": 2, "buf-b64": "aGk=", "eof": true}}),
                "guest-file-close" => json!({"return": {}}),
                other => {
                    json!({"error": {"class": "CommandNotFound", "desc": format!("The command {other} has not been found")}})
                }
            };
            w.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn sync_skips_stale_output_and_commands_are_typed() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qga.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        tokio::spawn(fake_agent(listener));
        let mut ga = GuestAgent::connect(&sock, Duration::from_secs(5)).await.unwrap();
        ga.ping().await.unwrap();
        assert_eq!(ga.fsfreeze_freeze().await.unwrap(), 1);
        assert_eq!(ga.fsfreeze_status().await.unwrap(), FreezeStatus::Frozen);
        let trimmed = ga.fstrim(None).await.unwrap();
        assert_eq!(trimmed[0].path, "/");
        assert_eq!(trimmed[0].trimmed, Some(4096));
        let out = ga.run("/bin/sh", &["-c", "echo hello; exit 3"], Duration::from_secs(5)).await.unwrap();
        assert_eq!((out.exit_code, out.stdout.as_slice()), (Some(3), &b"hello\n"[..]));
        assert_eq!(ga.read_file("/etc/x").await.unwrap(), b"hi");
        match ga.execute("guest-reboot-now", None, Duration::from_secs(5)).await {
            Err(QgaError::Command { class, command, .. }) => {
                assert_eq!(class, "CommandNotFound");
                assert_eq!(command, "guest-reboot-now");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_absent_agent_is_reported_with_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("silent.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        // Accepts, never answers: QEMU's chardev when qemu-ga is not running in the guest.
        tokio::spawn(async move {
            let (_s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let err = GuestAgent::connect(&sock, Duration::from_millis(700)).await.err().unwrap();
        assert!(matches!(err, QgaError::NoAnswer { .. }), "{err:?}");
        assert!(err.to_string().contains("silent.sock"));
    }
}
