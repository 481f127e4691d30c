//! An instance's service relay. Guest ports are forwarded by QEMU to loopback only (the
//! guest agent's port included, which must never face devices); the relay listens on the
//! cloudlet's service address and passes to the guest's service port the connections of
//! devices that hold the instance's token, inside TLS (`forage_proto::service`). It notes
//! when bytes last went through (what the idle timeout measures) and how many went each
//! way. Connections that do not present the token are closed unheard and do not count as
//! use.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forage_proto::service::{parse_preamble, same_token, PREAMBLE_LEN, PREAMBLE_WAIT_S, TOKEN_BYTES};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Connections one relay serves at once.
const MAX_CONNECTIONS: usize = 256;

pub struct Relay {
    pub addr: SocketAddr,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last byte relayed (or of the start).
    last: Arc<AtomicU64>,
    admitted: Arc<AtomicU64>,
    traffic: Arc<Traffic>,
    task: JoinHandle<()>,
}

/// Bytes relayed each way, in all.
#[derive(Debug, Default)]
struct Traffic {
    to_guest: AtomicU64,
    from_guest: AtomicU64,
}

impl Relay {
    /// Listen on `listen` (port 0: any free one) and relay to `target` every connection
    /// that completes a TLS handshake (`tls`: the cloudlet's relay configuration) and
    /// presents `token` within the preamble wait.
    pub async fn start(
        listen: SocketAddr,
        target: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        token: [u8; TOKEN_BYTES],
    ) -> std::io::Result<Self> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(listen)?;
        let listener: TcpListener = socket.listen(128)?;
        let addr = listener.local_addr()?;
        let epoch = Instant::now();
        let (last, admitted) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let traffic = Arc::new(Traffic::default());
        let (l, a, t) = (last.clone(), admitted.clone(), traffic.clone());
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((client, peer)) => {
                            if conns.len() >= MAX_CONNECTIONS {
                                tracing::debug!(%peer, "service relay {addr}: too many connections");
                                continue;
                            }
                            let (l, a, t, acceptor) = (l.clone(), a.clone(), t.clone(), acceptor.clone());
                            conns.spawn(async move {
                                match admit(client, &acceptor, &token).await {
                                    Ok(device) => {
                                        a.fetch_add(1, Ordering::Relaxed);
                                        if let Ok(guest) = TcpStream::connect(target).await {
                                            relay(device, guest, epoch, l, t).await;
                                        }
                                    }
                                    Err(why) => tracing::debug!(%peer, "service relay {addr}: refused: {why}"),
                                }
                            });
                        }
                        Err(e) => {
                            tracing::warn!("service relay {addr}: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    },
                    Some(_) = conns.join_next() => {}
                }
            }
        });
        Ok(Self { addr, epoch, last, admitted, traffic, task })
    }

    /// Count idleness from now.
    pub fn touch(&self) {
        self.last.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Milliseconds since a byte last went through (or since the start or a touch).
    pub fn idle_ms(&self) -> u64 {
        (self.epoch.elapsed().as_millis() as u64).saturating_sub(self.last.load(Ordering::Relaxed))
    }

    /// Connections admitted (token presented), in all.
    pub fn admitted(&self) -> u64 {
        self.admitted.load(Ordering::Relaxed)
    }

    /// Bytes relayed to the guest's service and from it, in all.
    pub fn traffic(&self) -> (u64, u64) {
        (self.traffic.to_guest.load(Ordering::Relaxed), self.traffic.from_guest.load(Ordering::Relaxed))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The TLS handshake and the preamble, within the preamble wait: the device's stream if
/// its token is the instance's.
async fn admit(
    client: TcpStream,
    acceptor: &tokio_rustls::TlsAcceptor,
    token: &[u8; TOKEN_BYTES],
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, &'static str> {
    let checked = async {
        let mut tls = acceptor.accept(client).await.map_err(|_| "TLS handshake failed")?;
        let mut line = [0u8; PREAMBLE_LEN];
        tls.read_exact(&mut line).await.map_err(|_| "closed before the preamble")?;
        let theirs = parse_preamble(&line)?;
        if !same_token(&theirs, token) {
            return Err("wrong token");
        }
        Ok(tls)
    };
    tokio::time::timeout(Duration::from_secs(PREAMBLE_WAIT_S), checked).await.map_err(|_| "no preamble in time")?
}

async fn relay(
    device: impl AsyncRead + AsyncWrite + Unpin,
    guest: TcpStream,
    epoch: Instant,
    last: Arc<AtomicU64>,
    traffic: Arc<Traffic>,
) {
    let (dr, dw) = tokio::io::split(device);
    let (gr, gw) = guest.into_split();
    tokio::join!(pump(dr, gw, epoch, &last, &traffic.to_guest), pump(gr, dw, epoch, &last, &traffic.from_guest));
}

/// Copy one direction until EOF or an error, noting the time and size of every piece.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    epoch: Instant,
    last: &AtomicU64,
    bytes: &AtomicU64,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                last.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                bytes.fetch_add(n as u64, Ordering::Relaxed);
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::atomic::AtomicUsize;

    /// A guest service: echoes one line; counts the connections that reached it.
    async fn echo() -> (SocketAddr, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let reached = Arc::new(AtomicUsize::new(0));
        let r = reached.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                r.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 256];
                    if let Ok(n) = s.read(&mut buf).await {
                        let _ = s.write_all(&buf[..n]).await;
                    }
                });
            }
        });
        (addr, reached)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_the_token_reaches_the_service() {
        let dir = tempfile::tempdir().unwrap();
        let trust = forage_trust::CloudletTrust::open_or_init(dir.path(), "c").unwrap();
        let (target, reached) = echo().await;
        let mut token = [0u8; TOKEN_BYTES];
        token[3] = 7;
        let relay = Relay::start("127.0.0.1:0".parse().unwrap(), target, trust.relay_server_config().unwrap(), token)
            .await
            .unwrap();
        let endpoint = forage_proto::ServiceEndpoint {
            addr: relay.addr.to_string(),
            token: hex::encode(token),
            ca_sha256: trust.ca_fingerprint(),
        };
        let good = endpoint.clone();
        let ask = |ep: forage_proto::ServiceEndpoint| {
            tokio::task::spawn_blocking(move || {
                forage_client::service::request_line(&ep, "hello", Duration::from_secs(15))
            })
        };

        // Plain TCP, as before the relay had TLS: nothing comes back, nothing reaches the guest.
        let raw = tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(proxy_addr(&good)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            let _ = s.write_all(b"hello\n");
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            buf
        });
        assert!(!String::from_utf8_lossy(&raw.await.unwrap()).contains("hello"));
        // TLS with a wrong token, and TLS with the right token but another CA expected.
        let mut wrong = endpoint.clone();
        wrong.token = "00".repeat(16);
        assert!(matches!(ask(wrong).await.unwrap(), Err(forage_client::service::ServiceError::NoAnswer { .. })));
        let mut other_ca = endpoint.clone();
        other_ca.ca_sha256 = "ab".repeat(32);
        assert!(matches!(ask(other_ca).await.unwrap(), Err(forage_client::service::ServiceError::Tls { .. })));
        assert_eq!(reached.load(Ordering::SeqCst), 0, "a connection without the token reached the guest");
        assert_eq!(relay.traffic(), (0, 0), "refused connections carry nothing");
        // The device that holds the token.
        assert_eq!(ask(endpoint.clone()).await.unwrap().unwrap(), "hello");
        assert_eq!(reached.load(Ordering::SeqCst), 1);
        assert_eq!(relay.admitted(), 1);
        // "hello\n" each way (the line the device sent, echoed).
        let t = Instant::now();
        while relay.traffic() != (6, 6) && t.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(relay.traffic(), (6, 6));
    }

    fn proxy_addr(ep: &forage_proto::ServiceEndpoint) -> SocketAddr {
        ep.addr.parse().unwrap()
    }
}
