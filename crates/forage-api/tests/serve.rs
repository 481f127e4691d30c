//! `serve` on a real socket: answers HTTP/1.1 and stops on shutdown.

mod common;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn serve_answers_on_a_socket_and_shuts_down() {
    let fx = common::fixture();
    let ctx = forage_api::ApiContext::new(fx.state.clone(), "socket-cloudlet", "1.2.3", "kvm", fx.control.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(forage_api::serve(listener, ctx, async {
        let _ = stopped.await;
    }));

    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    let body = reply.split("\r\n\r\n").nth(1).unwrap();
    let status: forage_api::StatusView = serde_json::from_str(body).unwrap();
    assert_eq!((status.name.as_str(), status.accel.as_str()), ("socket-cloudlet", "kvm"));

    stop.send(()).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), server)
        .await
        .expect("serve did not stop on shutdown")
        .unwrap()
        .unwrap();
}
