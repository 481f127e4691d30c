//! The shim itself (`forage-shim DIR/shim.json`): serves one instance's view over FUSE
//! and its service relay, answers its daemon on the control socket, and outlives the
//! daemon (it runs in a session of its own).

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use forage_assembly::{Assembly, Mount};
use forage_format::Manifest;
use forage_proto::asynchronous::{read, write};
use forage_proto::service::TOKEN_BYTES;
use forage_proto::{ErrorCode, ProtoError};
use forage_synth::cow::CowView;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use crate::protocol::{
    ChunkBytes, RelaySpec, ShimCall, ShimHello, ShimMessage, ShimReply, ShimSpec, ShimStatus, ViewSpec, SHIM_FORMAT,
};
use crate::relay::Relay;
use crate::ShimError;

/// How long a read of the view may wait for its chunk (only early start waits).
const READ_WAIT: Duration = Duration::from_secs(10);

/// The view the shim serves.
enum View {
    Cow(Box<CowView>),
    Overlay { assembly: Arc<Assembly>, mount: Option<Mount> },
}

impl View {
    fn assembly(&self) -> &Arc<Assembly> {
        match self {
            View::Cow(v) => &v.assembly,
            View::Overlay { assembly, .. } => assembly,
        }
    }
}

impl Drop for View {
    fn drop(&mut self) {
        if let View::Overlay { assembly, mount } = self {
            assembly.fail("the shim ends");
            drop(mount.take());
        }
    }
}

struct Shim {
    spec: ShimSpec,
    view: Option<View>,
    relay: Option<Relay>,
    hello: ShimHello,
    fetches: tokio::sync::Mutex<mpsc::UnboundedReceiver<u32>>,
    /// Set once the QEMU of the instance is known.
    qemu: std::sync::Mutex<Option<u32>>,
}

/// Serve `spec` until told to shut down, the instance's QEMU exits, or (early start, the
/// overlay incomplete) the daemon goes away.
pub async fn run(spec: ShimSpec) -> Result<(), ShimError> {
    if spec.format > SHIM_FORMAT {
        return Err(ShimError::Spec(format!("shim format {} is newer than this shim ({SHIM_FORMAT})", spec.format)));
    }
    let (fetch_tx, fetch_rx) = mpsc::unbounded_channel();
    let view = match &spec.view {
        None => None,
        Some(v) => Some(open_view(&spec, v, fetch_tx)?),
    };
    let relay = match &spec.relay {
        None => None,
        Some(r) => Some(start_relay(r).await?),
    };
    let (memory, disk) = match &view {
        Some(View::Cow(v)) => (Some(v.snapshot.memory_path()), Some(v.snapshot.disk_paths()[0].clone())),
        Some(View::Overlay { mount: Some(m), .. }) => (Some(m.memory_path()), Some(m.disk_path())),
        _ => (None, None),
    };
    let ca_sha256 = match &spec.relay {
        Some(r) => Some(
            forage_trust::CloudletTrust::open_or_init(&r.trust, "cloudlet").map_err(ShimError::Trust)?.ca_fingerprint(),
        ),
        None => None,
    };
    let hello = ShimHello {
        format: SHIM_FORMAT,
        instance: spec.instance.clone(),
        pid: std::process::id(),
        memory,
        disk,
        relay: relay.as_ref().map(|r| r.addr.to_string()),
        ca_sha256,
    };
    let _ = std::fs::remove_file(&spec.control);
    let listener =
        UnixListener::bind(&spec.control).map_err(|source| ShimError::Io { path: spec.control.clone(), source })?;
    let _ = std::fs::set_permissions(&spec.control, std::fs::Permissions::from_mode(0o600));
    let shim = Arc::new(Shim {
        spec,
        view,
        relay,
        hello,
        fetches: tokio::sync::Mutex::new(fetch_rx),
        qemu: std::sync::Mutex::new(None),
    });
    tracing::info!(instance = shim.spec.instance, "shim serving");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| ShimError::Io { path: "SIGTERM".into(), source })?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((conn, _)) = accepted else { continue };
                match serve(&shim, conn).await {
                    Ok(Ending::Shutdown) => break,
                    Ok(Ending::Disconnected) => {
                        tracing::info!(instance = shim.spec.instance, "the daemon went away");
                        if shim.qemu.lock().unwrap_or_else(|p| p.into_inner()).is_none() {
                            tracing::info!(instance = shim.spec.instance, "no QEMU was ever handed to this shim: nothing to keep serving");
                            break;
                        }
                        if shim.needs_its_daemon() {
                            tracing::warn!(instance = shim.spec.instance, "the overlay is incomplete and its segments come through the daemon: stopping the instance");
                            shim.stop_qemu();
                            break;
                        }
                    }
                    Err(e) => tracing::warn!(instance = shim.spec.instance, "control connection: {e}"),
                }
            }
            _ = shim.qemu_gone() => {
                tracing::info!(instance = shim.spec.instance, "the instance's QEMU exited or its folder was removed");
                shim.stop_qemu();
                break;
            }
            _ = term.recv() => break,
        }
    }
    let _ = std::fs::remove_file(&shim.spec.control);
    Ok(())
}

fn open_view(spec: &ShimSpec, v: &ViewSpec, fetch: mpsc::UnboundedSender<u32>) -> Result<View, ShimError> {
    match v {
        ViewSpec::Cow { saved, readahead } => {
            let snap = forage_vm::Snapshot::open(saved).map_err(ShimError::Snapshot)?;
            Ok(View::Cow(Box::new(
                CowView::mount(&snap, &spec.dir.join("view"), *readahead).map_err(ShimError::CowView)?,
            )))
        }
        ViewSpec::Overlay { manifest, base_memory, base_disk, readahead, packages } => {
            let bytes = std::fs::read(manifest).map_err(|source| ShimError::Io { path: manifest.clone(), source })?;
            let manifest =
                Manifest::decode(&bytes).map_err(|source| ShimError::Manifest { path: manifest.clone(), source })?;
            let (work, mnt) = (spec.dir.join("assembly"), spec.dir.join("mnt"));
            for d in [&work, &mnt] {
                std::fs::create_dir_all(d).map_err(|source| ShimError::Io { path: d.clone(), source })?;
            }
            let fetch = Box::new(move |s: u32| {
                let _ = fetch.send(s);
            });
            let assembly = Arc::new(
                Assembly::new(manifest, base_memory, base_disk, packages.as_deref(), &work, fetch)
                    .map_err(ShimError::Assembly)?,
            );
            let mount = Mount::new(assembly.clone(), &mnt, *readahead).map_err(ShimError::Assembly)?;
            Ok(View::Overlay { assembly, mount: Some(mount) })
        }
    }
}

async fn start_relay(r: &RelaySpec) -> Result<Relay, ShimError> {
    let token: [u8; TOKEN_BYTES] = hex::decode(&r.token)
        .ok()
        .and_then(|t| t.try_into().ok())
        .ok_or_else(|| ShimError::Spec("the relay's token is not 32 hex digits".into()))?;
    let trust = forage_trust::CloudletTrust::open_or_init(&r.trust, "cloudlet").map_err(ShimError::Trust)?;
    let tls = trust.relay_server_config().map_err(ShimError::Trust)?;
    let listen = std::net::SocketAddr::from((r.listen, r.port));
    Relay::start(listen, r.target, tls, token)
        .await
        .map_err(|source| ShimError::Io { path: PathBuf::from(listen.to_string()), source })
}

enum Ending {
    Shutdown,
    Disconnected,
}

impl Shim {
    /// Early start whose overlay has not all arrived: its segments come from the device
    /// through the daemon.
    fn needs_its_daemon(&self) -> bool {
        matches!(&self.view, Some(View::Overlay { assembly, .. }) if !assembly.is_complete())
    }

    fn stop_qemu(&self) {
        if let Some(pid) = *self.qemu.lock().unwrap_or_else(|p| p.into_inner()) {
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::Kill);
            }
        }
    }

    /// Resolves when the instance's QEMU has exited, or when the instance's folder is gone
    /// (removed under us: nothing this shim serves is valid any more).
    async fn qemu_gone(&self) {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if !self.spec.dir.exists() {
                return;
            }
            let pid = *self.qemu.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(pid) = pid {
                if !forage_vm::process::alive(pid) {
                    return;
                }
            }
        }
    }

    fn status(&self) -> ShimStatus {
        let (complete, failure, stats) = match &self.view {
            Some(v) => (v.assembly().is_complete(), v.assembly().failure(), v.assembly().stats()),
            None => (true, None, Default::default()),
        };
        ShimStatus {
            complete,
            failure,
            stats,
            relay_idle_ms: self.relay.as_ref().map(|r| r.idle_ms()),
            relay_connections: self.relay.as_ref().map_or(0, |r| r.admitted()),
            relay_bytes_to_guest: self.relay.as_ref().map_or(0, |r| r.traffic().0),
            relay_bytes_from_guest: self.relay.as_ref().map_or(0, |r| r.traffic().1),
        }
    }

    fn assembly(&self) -> Result<&Arc<Assembly>, String> {
        self.view.as_ref().map(View::assembly).ok_or_else(|| "this shim serves no view".to_string())
    }

    /// One call, on a blocking thread (the assembly's operations block).
    fn answer(&self, call: ShimCall) -> Result<ShimReply, String> {
        match call {
            ShimCall::AddSegment { index, bytes } => match self.assembly()?.add_segment(index, &bytes) {
                Ok(true) => Ok(ShimReply::Done),
                Ok(false) => Ok(ShimReply::Repeated),
                Err(e) => {
                    self.assembly()?.fail(e.to_string());
                    Err(e.to_string())
                }
            },
            ShimCall::Fail { why } => {
                self.assembly()?.fail(why);
                Ok(ShimReply::Done)
            }
            ShimCall::Status => Ok(ShimReply::Status(self.status())),
            ShimCall::WrittenChunks { space } => {
                Ok(ShimReply::Chunks { indices: self.assembly()?.written_chunks(space) })
            }
            ShimCall::Mark => Ok(ShimReply::Mark { generation: self.assembly()?.mark().0 }),
            ShimCall::WrittenSince { space, mark } => Ok(ShimReply::Chunks {
                indices: self.assembly()?.written_since(space, forage_assembly::WriteMark(mark)),
            }),
            ShimCall::Write { space, chunks } => {
                let a = self.assembly()?;
                for c in chunks {
                    a.write(space, c.index * forage_format::CHUNK_SIZE as u64, &c.bytes, READ_WAIT)
                        .map_err(|e| e.to_string())?;
                }
                Ok(ShimReply::Done)
            }
            ShimCall::Read { space, indices } => {
                let a = self.assembly()?;
                let chunks = indices
                    .into_iter()
                    .map(|index| {
                        a.read(
                            space,
                            index * forage_format::CHUNK_SIZE as u64,
                            forage_format::CHUNK_SIZE as u64,
                            READ_WAIT,
                        )
                        .map(|bytes| ChunkBytes { index, bytes })
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?;
                Ok(ShimReply::Data { chunks })
            }
            ShimCall::WaitDeviceState { timeout_ms } => Ok(ShimReply::DeviceState {
                path: self
                    .assembly()?
                    .wait_device_state(Duration::from_millis(timeout_ms))
                    .map_err(|e| e.to_string())?,
            }),
            ShimCall::WatchQemu { pid } => {
                *self.qemu.lock().unwrap_or_else(|p| p.into_inner()) = Some(pid);
                Ok(ShimReply::Done)
            }
            ShimCall::UnwatchQemu => {
                *self.qemu.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Ok(ShimReply::Done)
            }
            ShimCall::TouchRelay => {
                if let Some(r) = &self.relay {
                    r.touch();
                }
                Ok(ShimReply::Done)
            }
            ShimCall::Shutdown => Ok(ShimReply::Done),
        }
    }
}

/// One connection of the daemon: Hello, then its calls in order (waiting for the device
/// state on a side task), and the view's fetches as they come.
async fn serve(shim: &Arc<Shim>, conn: UnixStream) -> Result<Ending, ProtoError> {
    let (mut rd, mut wr) = conn.into_split();
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<ShimMessage>();
    let _ = out_tx.send(ShimMessage::Hello(shim.hello.clone()));
    let writer = async {
        while let Some(m) = out_rx.recv().await {
            write(&mut wr, &m).await?;
        }
        Ok::<_, ProtoError>(())
    };
    let fetches = {
        let (shim, out) = (shim.clone(), out_tx.clone());
        async move {
            let mut rx = shim.fetches.lock().await;
            while let Some(segment) = rx.recv().await {
                if out.send(ShimMessage::Fetch { segment }).is_err() {
                    break;
                }
            }
            // No view that fetches (or its sender is gone): nothing ends here.
            std::future::pending::<()>().await
        }
    };
    let calls = async {
        loop {
            let (id, call) = match read::<ShimMessage>(&mut rd).await {
                Ok(ShimMessage::Call { id, call }) => (id, call),
                Ok(other) => {
                    let _ = out_tx.send(ShimMessage::Error {
                        code: ErrorCode::Protocol,
                        message: format!("{} is not a call", forage_proto::Protocol::name(&other)),
                    });
                    continue;
                }
                Err(ProtoError::Closed) => return Ok(Ending::Disconnected),
                Err(e) => return Err(e),
            };
            let shutdown = matches!(call, ShimCall::Shutdown);
            let waits = matches!(call, ShimCall::WaitDeviceState { .. });
            let (s, out) = (shim.clone(), out_tx.clone());
            let task = tokio::task::spawn_blocking(move || {
                let reply = s.answer(call).unwrap_or_else(|message| ShimReply::Failed { message });
                let _ = out.send(ShimMessage::Reply { id, reply });
            });
            if !waits {
                let _ = task.await;
            }
            if shutdown {
                return Ok(Ending::Shutdown);
            }
        }
    };
    tokio::pin!(writer);
    let ending = tokio::select! {
        e = calls => e,
        _ = fetches => unreachable!("the fetches never end"),
        w = &mut writer => { w?; Ok(Ending::Disconnected) }
    };
    // Let the last reply (Shutdown's) go out.
    drop(out_tx);
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    ending
}
