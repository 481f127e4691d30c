//! The daemon's side: start a shim for an instance, or find the one a previous daemon
//! started, and call it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forage_format::Space;
use forage_proto::asynchronous::{read, write};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};

use crate::protocol::{ChunkBytes, ShimCall, ShimHello, ShimMessage, ShimReply, ShimSpec, ShimStatus, SPEC_FILE};
use crate::ShimError;

/// Calls waiting for their reply; `None` once the connection is gone (a call made after
/// that is answered Gone at once, not left waiting: the check and the insert are under
/// one lock, as the reader's clearing is).
type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<ShimReply>>>>>;

/// A connection to one instance's shim.
pub struct ShimClient {
    pub hello: ShimHello,
    control: PathBuf,
    calls: mpsc::UnboundedSender<(ShimCall, oneshot::Sender<ShimReply>)>,
    fetches: Mutex<Option<mpsc::UnboundedReceiver<u32>>>,
    closed: watch::Receiver<bool>,
}

/// The `forage-shim` binary: `$FORAGE_SHIM`, else beside this program (or one folder up:
/// test binaries live in `target/*/deps/`), else on `PATH`.
pub fn shim_exe() -> Result<PathBuf, ShimError> {
    if let Some(p) = std::env::var_os("FORAGE_SHIM").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::current_exe().map_err(|source| ShimError::Io { path: "/proc/self/exe".into(), source })?;
    let mut places: Vec<PathBuf> = me.ancestors().skip(1).take(2).map(|d| d.join("forage-shim")).collect();
    places.extend(std::env::var_os("PATH").iter().flat_map(std::env::split_paths).map(|d| d.join("forage-shim")));
    places.into_iter().find(|p| p.is_file()).ok_or(ShimError::NotFound)
}

impl ShimClient {
    /// Write `spec` into its folder, start the shim in a session of its own (it outlives
    /// this process) and connect to it once it serves.
    pub async fn spawn(spec: &ShimSpec) -> Result<Self, ShimError> {
        use std::os::unix::process::CommandExt;
        let exe = shim_exe()?;
        let spec_path = spec.dir.join(SPEC_FILE);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ShimError::Io { path, source }
        };
        std::fs::create_dir_all(&spec.dir).map_err(io(&spec.dir))?;
        std::fs::write(&spec_path, serde_json::to_vec_pretty(spec).expect("a spec serializes"))
            .map_err(io(&spec_path))?;
        let log_path = spec.dir.join("shim.log");
        let log = std::fs::File::create(&log_path).map_err(io(&log_path))?;
        let err = log.try_clone().map_err(io(&log_path))?;
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg(&spec_path).stdin(std::process::Stdio::null()).stdout(log).stderr(err);
        // One malloc arena, as the daemon (forage's main): the shim answers every FUSE
        // request on a new thread, and glibc's per-thread arenas would keep what each freed.
        cmd.env("MALLOC_ARENA_MAX", "1");
        // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| rustix::process::setsid().map(|_| ()).map_err(std::io::Error::from));
        }
        let mut child = cmd.spawn().map_err(|source| ShimError::Io { path: exe.clone(), source })?;
        let pid = child.id();
        // Reap it when it ends (while this process lives; afterwards init does).
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        let t = Instant::now();
        loop {
            match Self::connect(&spec.control).await {
                Ok(c) => return Ok(c),
                Err(e) if t.elapsed() > Duration::from_secs(30) || !forage_vm::process::alive(pid) => {
                    let tail = forage_vm::process::tail_lines(&log_path, 5);
                    return Err(ShimError::Start {
                        log: log_path,
                        detail: if tail.is_empty() { e.to_string() } else { tail },
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// Connect to the shim serving on `control` (started by this daemon or an earlier one).
    pub async fn connect(control: &Path) -> Result<Self, ShimError> {
        let stream = UnixStream::connect(control)
            .await
            .map_err(|source| ShimError::Io { path: control.to_path_buf(), source })?;
        let (mut rd, mut wr) = stream.into_split();
        let hello = match tokio::time::timeout(Duration::from_secs(10), read::<ShimMessage>(&mut rd)).await {
            Ok(Ok(ShimMessage::Hello(h))) => h,
            Ok(Ok(_)) => return Err(ShimError::Protocol("the shim did not say Hello first".into())),
            Ok(Err(e)) => return Err(ShimError::Protocol(e.to_string())),
            Err(_) => return Err(ShimError::Protocol("the shim said nothing for 10 s".into())),
        };
        let (calls, mut call_rx) = mpsc::unbounded_channel::<(ShimCall, oneshot::Sender<ShimReply>)>();
        let (fetch_tx, fetch_rx) = mpsc::unbounded_channel();
        let (closed_tx, closed) = watch::channel(false);
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let p = pending.clone();
        tokio::spawn(async move {
            let mut next = 0u64;
            while let Some((call, reply)) = call_rx.recv().await {
                next += 1;
                match p.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                    Some(waiting) => waiting.insert(next, reply),
                    None => break, // the shim is gone: `reply` dropped, the caller hears Gone
                };
                if write(&mut wr, &ShimMessage::Call { id: next, call }).await.is_err() {
                    // The shim is gone: this call and every later one hear Gone.
                    *p.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    break;
                }
            }
        });
        tokio::spawn(async move {
            loop {
                match read::<ShimMessage>(&mut rd).await {
                    Ok(ShimMessage::Reply { id, reply }) => {
                        let tx = pending.lock().unwrap_or_else(|e| e.into_inner()).as_mut().and_then(|w| w.remove(&id));
                        if let Some(tx) = tx {
                            let _ = tx.send(reply);
                        }
                    }
                    Ok(ShimMessage::Fetch { segment }) => {
                        let _ = fetch_tx.send(segment);
                    }
                    Ok(ShimMessage::Error { message, .. }) => tracing::warn!("shim: {message}"),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            // Every call still waiting, and every later one, learns that the shim is gone
            // (its sender drops).
            *pending.lock().unwrap_or_else(|e| e.into_inner()) = None;
            let _ = closed_tx.send(true);
        });
        Ok(Self { hello, control: control.to_path_buf(), calls, fetches: Mutex::new(Some(fetch_rx)), closed })
    }

    /// The shim's control socket.
    pub fn control(&self) -> &Path {
        &self.control
    }

    /// The segments the view asks for (early start): taken once.
    pub fn take_fetches(&self) -> Option<mpsc::UnboundedReceiver<u32>> {
        self.fetches.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Resolves when the connection to the shim is gone.
    pub async fn closed(&self) {
        let mut c = self.closed.clone();
        let _ = c.wait_for(|closed| *closed).await;
    }

    pub async fn call(&self, call: ShimCall) -> Result<ShimReply, ShimError> {
        let (tx, rx) = oneshot::channel();
        self.calls.send((call, tx)).map_err(|_| ShimError::Gone)?;
        match rx.await.map_err(|_| ShimError::Gone)? {
            ShimReply::Failed { message } => Err(ShimError::Failed(message)),
            r => Ok(r),
        }
    }

    async fn done(&self, call: ShimCall) -> Result<(), ShimError> {
        match self.call(call).await? {
            ShimReply::Done | ShimReply::Repeated => Ok(()),
            other => Err(ShimError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    async fn chunks(&self, call: ShimCall) -> Result<Vec<u64>, ShimError> {
        match self.call(call).await? {
            ShimReply::Chunks { indices } => Ok(indices),
            other => Err(ShimError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// A segment of the overlay as it arrived; false if it was there already.
    pub async fn add_segment(&self, index: u32, bytes: Vec<u8>) -> Result<bool, ShimError> {
        match self.call(ShimCall::AddSegment { index, bytes }).await? {
            ShimReply::Done => Ok(true),
            ShimReply::Repeated => Ok(false),
            other => Err(ShimError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    pub async fn fail(&self, why: impl Into<String>) -> Result<(), ShimError> {
        self.done(ShimCall::Fail { why: why.into() }).await
    }

    pub async fn status(&self) -> Result<ShimStatus, ShimError> {
        match self.call(ShimCall::Status).await? {
            ShimReply::Status(s) => Ok(s),
            other => Err(ShimError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    pub async fn written_chunks(&self, space: Space) -> Result<Vec<u64>, ShimError> {
        self.chunks(ShimCall::WrittenChunks { space }).await
    }

    pub async fn mark(&self) -> Result<u64, ShimError> {
        match self.call(ShimCall::Mark).await? {
            ShimReply::Mark { generation } => Ok(generation),
            other => Err(ShimError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    pub async fn written_since(&self, space: Space, mark: u64) -> Result<Vec<u64>, ShimError> {
        self.chunks(ShimCall::WrittenSince { space, mark }).await
    }

    pub async fn write(&self, space: Space, chunks: Vec<ChunkBytes>) -> Result<(), ShimError> {
        self.done(ShimCall::Write { space, chunks }).await
    }

    pub async fn read(&self, space: Space, indices: Vec<u64>) -> Result<Vec<ChunkBytes>, ShimError> {
        match self.call(ShimCall::Read { space, indices }).await? {
            ShimReply::Data { chunks } => Ok(chunks),
            other => Err(ShimError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    pub async fn wait_device_state(&self, timeout: Duration) -> Result<PathBuf, ShimError> {
        match self.call(ShimCall::WaitDeviceState { timeout_ms: timeout.as_millis() as u64 }).await? {
            ShimReply::DeviceState { path } => Ok(path),
            other => Err(ShimError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    pub async fn watch_qemu(&self, pid: u32) -> Result<(), ShimError> {
        self.done(ShimCall::WatchQemu { pid }).await
    }

    /// Keep serving after QEMU exits (a save whose files are read through the view).
    pub async fn unwatch_qemu(&self) -> Result<(), ShimError> {
        self.done(ShimCall::UnwatchQemu).await
    }

    pub async fn touch_relay(&self) -> Result<(), ShimError> {
        self.done(ShimCall::TouchRelay).await
    }

    /// Unmount, close the relay, end. The instance's QEMU must be stopped first.
    pub async fn shutdown(&self) -> Result<(), ShimError> {
        let r = self.done(ShimCall::Shutdown).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.closed()).await;
        r
    }
}
