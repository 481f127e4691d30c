//! The cloudlet's side of an instance's service port. Guest ports are forwarded by QEMU
//! to loopback only (the guest agent's port included, which must never face devices); a
//! [`ServiceProxy`] on the cloudlet's service address relays the service port and notes
//! when bytes last went through, which is what the idle timeout measures.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::Stop;

pub(crate) struct ServiceProxy {
    pub addr: SocketAddr,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last byte relayed (or of the start).
    last: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl ServiceProxy {
    /// Listen on `listen` (any free port) and relay every connection to `target`.
    pub async fn start(listen: Ipv4Addr, target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind((listen, 0)).await?;
        let addr = listener.local_addr()?;
        let epoch = Instant::now();
        let last = Arc::new(AtomicU64::new(0));
        let l = last.clone();
        let accept = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    a = listener.accept() => match a {
                        Ok((client, _)) => {
                            let l = l.clone();
                            conns.spawn(async move {
                                if let Ok(guest) = TcpStream::connect(target).await {
                                    relay(client, guest, epoch, l).await;
                                }
                            });
                        }
                        Err(e) => {
                            tracing::warn!("service proxy {addr}: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    },
                    Some(_) = conns.join_next() => {}
                }
            }
        });
        Ok(Self {
            addr,
            epoch,
            last,
            tasks: vec![accept],
        })
    }

    /// Count from now (the instance is handed to its device).
    pub fn touch(&self) {
        self.last
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Ask `stop` to end the instance once no byte went through for `timeout`.
    pub fn watch_idle(&mut self, timeout: Duration, stop: Arc<Stop>) {
        let (epoch, last) = (self.epoch, self.last.clone());
        self.tasks.push(tokio::spawn(async move {
            loop {
                let idle = epoch
                    .elapsed()
                    .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
                if idle >= timeout {
                    stop.request(
                        forage_proto::ErrorCode::Idle,
                        format!(
                            "the instance was idle for {}s (no traffic to its service)",
                            timeout.as_secs()
                        ),
                    );
                    return;
                }
                tokio::time::sleep((timeout - idle).max(Duration::from_millis(200))).await;
            }
        }));
    }
}

impl Drop for ServiceProxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn relay(client: TcpStream, guest: TcpStream, epoch: Instant, last: Arc<AtomicU64>) {
    let (cr, cw) = client.into_split();
    let (gr, gw) = guest.into_split();
    tokio::join!(pump(cr, gw, epoch, last.clone()), pump(gr, cw, epoch, last));
}

/// Copy one direction until EOF or an error, noting the time of every piece.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    epoch: Instant,
    last: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                last.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}
