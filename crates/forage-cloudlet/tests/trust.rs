//! Trust against a cloudlet on loopback (no VM needed): pairing by code, then each refusal
//! of `docs/security.md`: no credentials, wrong and used codes, revoked, expired, another
//! cloudlet's credentials, a replayed session. Each is refused with a clear error and no
//! session is started.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use forage_client::ClientError;
use forage_proto::asynchronous::{read, write};
use forage_proto::{DeviceMessage as Message, ErrorCode, Provision};
use forage_trust::{DeviceTrust, PeerKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn cloudlet(dir: &std::path::Path, name: &str) -> (Arc<forage_cloudlet::Cloudlet>, SocketAddr) {
    let data = forage_datadir::DataDir::at(dir.join(name));
    let c = Arc::new(
        forage_cloudlet::Cloudlet::open(name.into(), data, forage_vm::Accel::Tcg, Ipv4Addr::LOCALHOST).unwrap(),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(forage_cloudlet::serve(l, c.clone()));
    (c, addr)
}

/// Ask for something that needs a session: an unknown service (NotFound proves the
/// session got past the handshake).
async fn ask(addr: SocketAddr, creds: &Arc<rustls::ClientConfig>) -> Result<(), ClientError> {
    match forage_client::provision(addr, creds, "t", Provision::CachedVm { service: "none".into(), join: false }, None)
        .await
    {
        Err(ClientError::Refused { code: ErrorCode::NotFound, .. }) => Ok(()),
        Err(e) => Err(e),
        Ok(_) => panic!("an unknown service was provisioned"),
    }
}

fn sessions(c: &forage_cloudlet::Cloudlet) -> usize {
    c.state.list_sessions(1000).unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairing_and_every_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let (c, addr) = cloudlet(dir.path(), "trusty").await;
    let device = DeviceTrust::new(&dir.path().join("device"));

    // Pairing by code, then a session.
    let code = c.trust.new_code(forage_trust::Grant::new(PeerKind::Device, Duration::from_secs(3600))).unwrap();
    let rec = forage_client::pair(addr, &code.text, "phone", &device).await.expect("pairing");
    assert_eq!(rec.cloudlet, "trusty");
    let creds = device.for_cloudlet(addr, None).unwrap().client_config().unwrap();
    ask(addr, &creds).await.expect("a paired device gets a session");
    assert_eq!(sessions(&c), 1);
    let device_name = c.state.list_sessions(10).unwrap()[0].device.clone();
    assert!(device_name.starts_with("phone"), "records name the device by its certificate: {device_name}");

    // The same code again, and a wrong one: refused.
    let other = DeviceTrust::new(&dir.path().join("other"));
    for bad in [code.text.clone(), format!("{}AAAAAAAAAA", &code.text[..14])] {
        match forage_client::pair(addr, &bad, "intruder", &other).await {
            Err(ClientError::Refused { code: ErrorCode::Pairing, message, .. }) => {
                assert!(message.contains("code"), "{message}")
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a used or wrong code paired"),
        }
    }
    assert!(other.peers().is_empty());

    // No credentials: a TLS connection without a certificate may pair, nothing else.
    let prefix: [u8; 8] = hex::decode(&c.trust.ca_fingerprint()[..16]).unwrap().try_into().unwrap();
    let anon = forage_trust::pairing_client_config(prefix).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut s = tokio_rustls::TlsConnector::from(anon)
        .connect(rustls::pki_types::ServerName::try_from(forage_trust::SERVER_NAME).unwrap(), tcp)
        .await
        .unwrap();
    write(
        &mut s,
        &Message::Hello {
            versions: (2, 2),
            device: "anon".into(),
            offers: vec![],
            early_start: false,
            store_and_forward: false,
        },
    )
    .await
    .unwrap();
    match read(&mut s).await.unwrap() {
        Message::Error { code: ErrorCode::Unpaired, message } => assert!(message.contains("not paired"), "{message}"),
        m => panic!("unexpected {m:?}"),
    }

    // Expired credentials.
    let short = DeviceTrust::new(&dir.path().join("short"));
    let b = c.trust.issue_bundle("brief", PeerKind::Device, Duration::ZERO, None).unwrap();
    short.import_bundle(&serde_json::to_vec(&b).unwrap()).unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let e = ask(addr, &short.for_cloudlet(addr, None).unwrap().client_config().unwrap()).await.unwrap_err();
    assert!(matches!(e, ClientError::Tls { .. } | ClientError::Proto { .. }), "{e}");

    // Another cloudlet's credentials.
    let (c2, addr2) = cloudlet(dir.path(), "stranger").await;
    let foreign = DeviceTrust::new(&dir.path().join("foreign"));
    let b = c2.trust.issue_bundle("phone", PeerKind::Device, Duration::from_secs(3600), None).unwrap();
    foreign.import_bundle(&serde_json::to_vec(&b).unwrap()).unwrap();
    let fcreds = foreign.for_cloudlet(addr2, None).unwrap().client_config().unwrap();
    ask(addr2, &fcreds).await.expect("they work where they were issued");
    let e = ask(addr, &fcreds).await.unwrap_err();
    assert!(matches!(e, ClientError::Tls { .. } | ClientError::Proto { .. }), "{e}");

    // A replayed session: the bytes of a real one, sent again on a new connection.
    let recorded = record_client_bytes(addr, &creds).await;
    let before = sessions(&c);
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&recorded).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sessions(&c), before, "a replayed session started a session");

    // Revoked: the next connection is refused.
    assert!(c.trust.revoke("phone").unwrap() >= 1);
    let e = ask(addr, &creds).await.unwrap_err();
    assert!(matches!(e, ClientError::Tls { .. } | ClientError::Proto { .. }), "{e}");
    assert_eq!(sessions(&c), before, "refused connections start no session");
}

/// Run one session through a recording relay; returns what the device sent.
async fn record_client_bytes(addr: SocketAddr, creds: &Arc<rustls::ClientConfig>) -> Vec<u8> {
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let recorder = tokio::spawn(async move {
        let (mut dev, _) = relay.accept().await.unwrap();
        let mut up = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut dr, mut dw) = dev.split();
        let (mut ur, mut uw) = up.split();
        let mut seen = Vec::new();
        let to_cloudlet = async {
            let mut buf = [0u8; 4096];
            loop {
                match dr.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        seen.extend_from_slice(&buf[..n]);
                        if uw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = uw.shutdown().await;
        };
        let to_device = async {
            let _ = tokio::io::copy(&mut ur, &mut dw).await;
            let _ = dw.shutdown().await;
        };
        tokio::join!(to_cloudlet, to_device);
        seen
    });
    ask(relay_addr, creds).await.expect("a session through the relay");
    recorder.await.unwrap()
}
