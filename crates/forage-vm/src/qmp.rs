//! A small asynchronous QMP client (QEMU Machine Protocol) over a unix socket.
//!
//! ```text
//! client                          QEMU
//!   |<------------- {"QMP":{version,capabilities}}   greeting
//!   | {"execute":"qmp_capabilities","id":0} ------->|
//!   |<------------------------ {"return":{},"id":0} |
//!   | {"execute":CMD,"arguments":{..},"id":N} ----->|
//!   |<------ {"return":..,"id":N} | {"error":{class,desc},"id":N}
//!   |<------ {"event":NAME,"data":{..},"timestamp":{..}}   at any time
//! ```
//!
//! Written by hand (serde_json) rather than with the `qapi` crate: that crate's schema is
//! newer than QEMU 7.2 and only passively maintained; forage needs a dozen commands.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot};

#[derive(Debug, thiserror::Error, Clone)]
pub enum QmpError {
    #[error("QMP socket {path} did not accept a connection within {waited:?}: {reason}")]
    Connect { path: PathBuf, waited: Duration, reason: String },
    #[error("QMP socket {path}: QEMU closed the connection")]
    Disconnected { path: PathBuf },
    #[error("QMP socket {path}: {detail}")]
    Protocol { path: PathBuf, detail: String },
    #[error("QEMU ({socket}) refused {command}: {class}: {desc}")]
    Command { socket: PathBuf, command: String, class: String, desc: String },
    #[error("QMP socket {path}: QEMU did not answer {command} within {waited:?} (its main loop is stuck)")]
    NoAnswer { path: PathBuf, command: String, waited: Duration },
}

/// An asynchronous event sent by QEMU.
#[derive(Debug, Clone)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
}

const GREETING_WAIT: Duration = Duration::from_secs(5);

/// Every command forage sends answers at once (migrations run in the background and are
/// polled): a QEMU silent this long is stuck, and the caller hears so instead of waiting
/// for ever.
const ANSWER_WAIT: Duration = Duration::from_secs(120);

/// Commands waiting for their answer; `None` once the connection is gone (a command sent
/// after that fails at once: the check and the insert are under one lock).
type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Result<Value, QmpError>>>>>>;

pub struct Qmp {
    path: PathBuf,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    events: broadcast::Sender<QmpEvent>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Qmp {
    /// Connect to `path`, retrying until `wait` has passed (QEMU creates the socket shortly
    /// after it starts), read the greeting and enter command mode.
    pub async fn connect(path: &Path, wait: Duration) -> Result<Self, QmpError> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if start.elapsed() >= wait => {
                    return Err(QmpError::Connect {
                        path: path.to_path_buf(),
                        waited: start.elapsed(),
                        reason: e.to_string(),
                    })
                }
                // QEMU opens its socket some 50 ms after it starts: a restore waits for it,
                // so look often at first.
                Err(_) if start.elapsed() < Duration::from_secs(1) => {
                    tokio::time::sleep(Duration::from_millis(2)).await
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read);
        // QEMU greets one client at a time; others wait silently in the backlog.
        let mut greeting = Vec::new();
        let n = tokio::time::timeout(GREETING_WAIT, lines.read_until(b'\n', &mut greeting))
            .await
            .map_err(|_| QmpError::Protocol {
                path: path.to_path_buf(),
                detail: format!("no greeting within {GREETING_WAIT:?} (another client holds the socket?)"),
            })?
            .map_err(|e| QmpError::Protocol { path: path.to_path_buf(), detail: e.to_string() })?;
        match (n > 0).then(|| serde_json::from_str::<Value>(&String::from_utf8_lossy(&greeting))) {
            Some(Ok(v)) if v.get("QMP").is_some() => {}
            other => {
                return Err(QmpError::Protocol {
                    path: path.to_path_buf(),
                    detail: format!("expected a QMP greeting, got {other:?}"),
                })
            }
        }
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let (events, _) = broadcast::channel(256);
        let reader = tokio::spawn(read_loop(lines, pending.clone(), events.clone(), path.to_path_buf()));
        let qmp = Self {
            path: path.to_path_buf(),
            writer: tokio::sync::Mutex::new(write),
            pending,
            next_id: AtomicU64::new(0),
            events,
            reader,
        };
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Subscribe to events sent from now on.
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    /// Run one command and return its `return` value.
    pub async fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let (tx, rx) = oneshot::channel();
        match self.pending.lock().expect("pending map").as_mut() {
            Some(waiting) => waiting.insert(id, tx),
            None => return Err(self.disconnected()),
        };
        let forget = || self.pending.lock().expect("pending map").as_mut().map(|w| w.remove(&id));
        let mut line = msg.to_string();
        line.push('\n');
        let sent = self.writer.lock().await.write_all(line.as_bytes()).await;
        if sent.is_err() {
            forget();
            return Err(self.disconnected());
        }
        let answer = match tokio::time::timeout(ANSWER_WAIT, rx).await {
            Ok(a) => a,
            Err(_) => {
                forget();
                return Err(QmpError::NoAnswer {
                    path: self.path.clone(),
                    command: command.to_string(),
                    waited: ANSWER_WAIT,
                });
            }
        };
        match answer {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(QmpError::Command { class, desc, .. })) => {
                Err(QmpError::Command { socket: self.path.clone(), command: command.to_string(), class, desc })
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(self.disconnected()),
        }
    }

    fn disconnected(&self) -> QmpError {
        QmpError::Disconnected { path: self.path.clone() }
    }
}

async fn read_loop(
    mut lines: BufReader<tokio::net::unix::OwnedReadHalf>,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
    path: PathBuf,
) {
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match lines.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        // QEMU may quote bytes that are not UTF-8 (a file name, a guest's string): such a
        // line is read with replacement characters, never the end of the connection.
        let line = String::from_utf8_lossy(&buf);
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            tracing::warn!(socket = %path.display(), %line, "unreadable QMP message");
            continue;
        };
        if let Some(name) = v.get("event").and_then(Value::as_str) {
            tracing::debug!(event = name, data = %v["data"], "QMP event");
            let _ =
                events.send(QmpEvent { name: name.to_string(), data: v.get("data").cloned().unwrap_or(Value::Null) });
            continue;
        }
        let Some(id) = v.get("id").and_then(Value::as_u64) else {
            continue;
        };
        let Some(tx) = pending.lock().expect("pending map").as_mut().and_then(|w| w.remove(&id)) else {
            continue;
        };
        let result = if let Some(r) = v.get("return") {
            Ok(r.clone())
        } else {
            let err = &v["error"];
            Err(QmpError::Command {
                socket: PathBuf::new(),
                command: String::new(),
                class: err["class"].as_str().unwrap_or("?").to_string(),
                desc: err["desc"].as_str().unwrap_or("?").to_string(),
            })
        };
        let _ = tx.send(result);
    }
    // Connection gone: fail whatever still waits.
    let waiting = pending.lock().expect("pending map").take();
    for (_, tx) in waiting.into_iter().flatten() {
        let _ = tx.send(Err(QmpError::Disconnected { path: path.clone() }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A fake QEMU that greets, answers each command by name, and emits one event.
    async fn fake_qemu(listener: UnixListener) {
        let (stream, _) = listener.accept().await.unwrap();
        let (r, mut w) = stream.into_split();
        w.write_all(b"{\"QMP\":{\"version\":{},\"capabilities\":[]}}\n").await.unwrap();
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let v: Value = serde_json::from_str(&line).unwrap();
            let id = v["id"].clone();
            let reply = match v["execute"].as_str().unwrap() {
                "query-status" => {
                    w.write_all(b"{\"event\":\"STOP\",\"data\":{},\"timestamp\":{}}\n").await.unwrap();
                    json!({"return": {"status": "paused"}, "id": id})
                }
                "bogus" => json!({"error": {"class": "CommandNotFound", "desc": "no bogus"}, "id": id}),
                "quit" => return,
                _ => json!({"return": {}, "id": id}),
            };
            w.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn commands_errors_events_and_disconnect() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("q.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        tokio::spawn(fake_qemu(listener));
        let qmp = Qmp::connect(&sock, Duration::from_secs(2)).await.unwrap();
        let mut events = qmp.events();
        let status = qmp.execute("query-status", None).await.unwrap();
        assert_eq!(status["status"], "paused");
        assert_eq!(events.recv().await.unwrap().name, "STOP");
        match qmp.execute("bogus", None).await {
            Err(QmpError::Command { command, class, .. }) => {
                assert_eq!(command, "bogus");
                assert_eq!(class, "CommandNotFound");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(qmp.execute("quit", None).await, Err(QmpError::Disconnected { .. })));
    }

    #[tokio::test]
    async fn missing_socket_times_out_with_its_path() {
        let err = Qmp::connect(Path::new("/nonexistent/q.sock"), Duration::from_millis(100)).await.err().unwrap();
        assert!(err.to_string().contains("/nonexistent/q.sock"));
    }
}
