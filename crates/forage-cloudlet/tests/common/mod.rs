//! A cloudlet on loopback for the tests of this crate, a paired device, and the pieces of
//! the protocol a hostile peer sends by hand.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forage_cloudlet::Cloudlet;
use forage_datadir::DataDir;
use forage_proto::asynchronous::{read, write};
use forage_proto::{DeviceMessage as Message, ErrorCode, Offer, PairingMessage, PeerMessage, Provision};
use forage_trust::PeerKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct Rig {
    pub dir: tempfile::TempDir,
    pub data: DataDir,
    pub cloudlet: Arc<Cloudlet>,
    pub addr: SocketAddr,
    /// A paired device's credentials.
    pub device: Arc<rustls::ClientConfig>,
}

impl Rig {
    /// A cloudlet named `name` serving on 127.0.0.1 (any port), changed by `tweak` before
    /// it serves, and a device paired with it as "tester".
    pub async fn new(name: &str, tweak: impl FnOnce(&mut Cloudlet)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::at(dir.path().join("data"));
        let mut c =
            Cloudlet::open(name.into(), data.clone(), forage_vm::Accel::Tcg, std::net::Ipv4Addr::LOCALHOST).unwrap();
        tweak(&mut c);
        let cloudlet = Arc::new(c);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(forage_cloudlet::serve(listener, cloudlet.clone()));
        let mut rig = Self { dir, data, cloudlet, addr, device: Arc::new(empty_client()) };
        rig.device = rig.credentials("tester", PeerKind::Device);
        rig
    }

    /// Credentials issued by bundle (as over USB) to `name`.
    pub fn credentials(&self, name: &str, kind: PeerKind) -> Arc<rustls::ClientConfig> {
        let b = self.cloudlet.trust.issue_bundle(name, kind, forage_trust::DEFAULT_VALIDITY, None).unwrap();
        let keep = forage_trust::DeviceTrust::new(&self.dir.path().join("peers").join(name));
        keep.import_bundle(&serde_json::to_vec(&b).unwrap()).unwrap();
        keep.for_cloudlet(self.addr, Some(&self.cloudlet.name)).unwrap().client_config().unwrap()
    }

    /// A paired device still gets a session: an unknown service is answered NotFound.
    pub async fn still_serves(&self) {
        match forage_client::provision(self.addr, &self.device, "tester", unknown_service(), None).await {
            Err(forage_client::ClientError::Refused { code: ErrorCode::NotFound, .. }) => {}
            other => panic!("the cloudlet no longer serves a good device: {:?}", other.map(|r| r.0)),
        }
    }

    /// As [`Self::still_serves`], from source address `ip` (another host of loopback).
    pub async fn serves_from(&self, ip: IpAddr) {
        let mut s = tls_from(self.addr, ip, self.device.clone()).await;
        hello(&mut s, vec![]).await;
        write(&mut s, &Message::Provision { request: unknown_service() }).await.unwrap();
        assert!(matches!(read::<Message>(&mut s).await.unwrap(), Message::Error { code: ErrorCode::NotFound, .. }));
    }

    /// Every path under the test's folder but outside the data folder.
    pub fn outside_data(&self) -> Vec<PathBuf> {
        let mut all = Vec::new();
        walk(self.dir.path(), &self.data.root().to_path_buf(), &mut all);
        all.sort();
        all
    }
}

fn walk(dir: &Path, skip: &PathBuf, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if &p == skip {
            continue;
        }
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&p, skip, out);
        }
        out.push(p);
    }
}

fn empty_client() -> rustls::ClientConfig {
    forage_trust::pairing_client_config([0; 8]).unwrap().as_ref().clone()
}

pub fn unknown_service() -> Provision {
    Provision::CachedVm { service: "no-such-service".into(), join: false }
}

/// Hello (version 2) with `offers`; the cloudlet's answer.
pub async fn hello(s: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin), offers: Vec<Offer>) -> Message {
    let h =
        Message::Hello { versions: (2, 2), device: "d".into(), offers, early_start: false, store_and_forward: false };
    write(s, &h).await.unwrap();
    read(s).await.unwrap()
}

/// TLS to the cloudlet from source address `ip`.
pub async fn tls_from(
    addr: SocketAddr,
    ip: IpAddr,
    config: Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(ip, 0)).unwrap();
    let tcp = sock.connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(forage_trust::SERVER_NAME).unwrap();
    tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.unwrap()
}

/// A pairing connection (no client certificate), from `src` if given.
pub async fn pairing_connection(
    addr: SocketAddr,
    prefix: [u8; 8],
    src: Option<IpAddr>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    tls_from(addr, src.unwrap_or("127.0.0.1".parse().unwrap()), forage_trust::pairing_client_config(prefix).unwrap())
        .await
}

/// Pair as `name` with `secret` from source address `ip`: the cloudlet's answer.
pub async fn pair_from(addr: SocketAddr, prefix: [u8; 8], ip: IpAddr, secret: Vec<u8>, name: &str) -> PairingMessage {
    let (_, csr) = forage_trust::new_csr("x").unwrap();
    let mut s = pairing_connection(addr, prefix, Some(ip)).await;
    write(&mut s, &PairingMessage::PairRequest { secret, name: name.into(), csr }).await.unwrap();
    read(&mut s).await.unwrap()
}

/// A peer cloudlet's opening (PeerHello): the cloudlet's answer.
pub async fn peer_hello(s: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin)) -> PeerMessage {
    write(s, &PeerMessage::PeerHello { versions: (2, 2), cloudlet: "peer".into() }).await.unwrap();
    read(s).await.unwrap()
}

/// CBOR of a map with text keys.
pub fn cbor_map(entries: Vec<(&str, ciborium::Value)>) -> Vec<u8> {
    let v = ciborium::Value::Map(entries.into_iter().map(|(k, v)| (ciborium::Value::Text(k.into()), v)).collect());
    let mut out = Vec::new();
    ciborium::into_writer(&v, &mut out).unwrap();
    out
}

/// A frame: `u32 LE length | u8 kind | payload`.
pub fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = ((payload.len() + 1) as u32).to_le_bytes().to_vec();
    f.push(kind);
    f.extend_from_slice(payload);
    f
}

/// The offer a device makes for the overlay file `ovl`.
pub fn offer_for(ovl: &Path) -> Offer {
    let r = forage_format::OverlayReader::open(std::fs::File::open(ovl).unwrap()).unwrap();
    let bytes = std::fs::metadata(ovl).unwrap().len();
    Offer {
        base_digest: r.manifest().base.digest.clone(),
        manifest_bytes: (forage_format::container::HEADER_LEN as u64) + r.header().manifest_len,
        overlay_bytes: bytes,
        overlay_digest: r.header().digest(),
        signature: vec![],
    }
}

/// An overlay prefix (header + manifest) around `body` as the manifest bytes.
pub fn prefix_with(body: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    let mut out = forage_format::container::MAGIC.to_vec();
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&sha2::Sha256::digest(body));
    out.extend_from_slice(body);
    out
}

/// Offer `offer`, then ask the cloudlet to fetch the overlay from `url`: its refusal.
pub async fn url_refusal(rig: &Rig, offer: &Offer, url: &str) -> String {
    let mut s = forage_client::connect(rig.addr, &rig.device, None).await.unwrap();
    assert!(matches!(hello(&mut s, vec![offer.clone()]).await, Message::Welcome { chosen: Some(_), .. }));
    write(&mut s, &Message::OverlayUrl { url: url.into() }).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(30), read::<Message>(&mut s)).await.unwrap().unwrap() {
        Message::Error { code: ErrorCode::BadOverlay, message } => message,
        other => panic!("{url}: {other:?}"),
    }
}

/// Until the cloudlet's work folder holds no session folder.
pub async fn wait_no_sessions(data: &DataDir) {
    let t = Instant::now();
    loop {
        let n = std::fs::read_dir(data.work())
            .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("session-")).count())
            .unwrap_or(0);
        if n == 0 {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "session files left");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A plain HTTP server on loopback that counts requests: `/redirect` answers 302 to
/// `/followed`, anything else 500 with a body that must never reach a device.
pub struct HttpServer {
    pub port: u16,
    requests: Arc<AtomicUsize>,
    followed: Arc<AtomicUsize>,
}

impl HttpServer {
    pub async fn start() -> Self {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (requests, followed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (r, f) = (requests.clone(), followed.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else { return };
                let (r, f) = (r.clone(), f.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let req = String::from_utf8_lossy(&buf[..n]).to_string();
                    r.fetch_add(1, Ordering::SeqCst);
                    let answer = if req.starts_with("GET /redirect") {
                        format!("HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{port}/followed\r\nContent-Length: 11\r\n\r\nSECRET-BODY")
                    } else {
                        if req.starts_with("GET /followed") {
                            f.fetch_add(1, Ordering::SeqCst);
                        }
                        "HTTP/1.1 500 Oops\r\nContent-Length: 11\r\n\r\nSECRET-BODY".to_string()
                    };
                    let _ = s.write_all(answer.as_bytes()).await;
                });
            }
        });
        Self { port, requests, followed }
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn followed(&self) -> usize {
        self.followed.load(Ordering::SeqCst)
    }
}
