//! The etcd client while the cluster has no leader: a member that is up but answers 503
//! (or does not answer in time) is asked again until a leader is elected, within the
//! client's election wait; endpoints that cannot even be connected to fail the call at
//! once. The members here are small scripted HTTP servers on loopback, because a real
//! election cannot be timed by a test: the three-member case against real etcd is
//! `crates/forage/tests/cluster.rs`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forage_cluster::{Etcd, EtcdError};

/// A member answering each request with the next of `answers` (the last one repeated):
/// its URL and how many requests it got.
fn member(answers: Vec<(u16, &'static str)>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let n = seen.fetch_add(1, Ordering::SeqCst);
            let (status, body) = answers[n.min(answers.len() - 1)];
            read_request(&mut stream);
            let reason = if status == 200 { "OK" } else { "Service Unavailable" };
            let _ = write!(
                stream,
                "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, count)
}

/// Reads one request: its headers and the body their content-length announces.
fn read_request(stream: &mut TcpStream) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let Ok(n) = stream.read(&mut buf) else { return };
        if n == 0 {
            return;
        }
        got.extend_from_slice(&buf[..n]);
        let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        if got.len() >= end + 4 + length {
            return;
        }
    }
}

/// A URL nothing listens on (a port bound and let go).
fn nobody() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}

const LEADER_CHANGED: &str =
    r#"{"error":"etcdserver: leader changed","code":14,"message":"etcdserver: leader changed"}"#;

#[tokio::test]
async fn a_member_without_a_leader_is_asked_again_until_one_is_elected() {
    let (up, asked) = member(vec![(503, LEADER_CHANGED), (503, LEADER_CHANGED), (200, "{}")]);
    let etcd = Etcd::new(vec![nobody(), up]);
    let began = Instant::now();
    etcd.put("/forage/test", b"v", 0).await.expect("the put once a leader is elected");
    assert_eq!(asked.load(Ordering::SeqCst), 3);
    // Two pauses of 200 ms between the three rounds.
    assert!(began.elapsed() >= Duration::from_millis(400), "{:?}", began.elapsed());
}

#[tokio::test]
async fn a_call_fails_at_once_when_no_member_can_be_connected_to() {
    let etcd = Etcd::new(vec![nobody(), nobody()]);
    let began = Instant::now();
    let err = etcd.put("/forage/test", b"v", 0).await.expect_err("no member");
    assert!(matches!(err, EtcdError::Unavailable { .. }), "{err:?}");
    assert!(began.elapsed() < Duration::from_secs(1), "asked again: {:?}", began.elapsed());
}

#[tokio::test]
async fn a_member_that_never_serves_is_given_up_after_the_election_wait() {
    let (up, asked) = member(vec![(503, LEADER_CHANGED)]);
    let mut etcd = Etcd::new(vec![up, nobody()]);
    etcd.election_wait = Duration::from_secs(1);
    let began = Instant::now();
    let err = etcd.put("/forage/test", b"v", 0).await.expect_err("no leader ever");
    let took = began.elapsed();
    assert!(err.to_string().starts_with("etcd unavailable (no quorum or no member reachable among"), "{err}");
    assert!(took >= Duration::from_millis(700) && took < Duration::from_secs(3), "{took:?}");
    assert!(asked.load(Ordering::SeqCst) >= 4, "asked {} times", asked.load(Ordering::SeqCst));
}
