//! Finding 3, the other half: running out of file descriptors makes `accept` fail; the
//! cloudlet logs it and goes on accepting (before, `serve` returned and every instance
//! died). In a test binary of its own: it lowers this process's descriptor limit.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepting_survives_running_out_of_descriptors() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let rig = Rig::new("fds", |c| {
        c.set_limits(forage_cloudlet::Limits {
            connections_per_source: 10_000,
            connections: 10_000,
            ..Default::default()
        });
    })
    .await;
    rig.still_serves().await;
    // Down to a few descriptors more than are open now (the limit `serve` raised to).
    let open = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
    let low = open + 24;
    setrlimit(Resource::Nofile, Rlimit { current: Some(low), maximum: getrlimit(Resource::Nofile).maximum }).unwrap();
    // Connect until this process has no descriptor left: the cloudlet's accepts fail too.
    let mut held = Vec::new();
    while let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(rig.addr)).await {
        held.push(s);
        if held.len() > 200 {
            break;
        }
    }
    assert!(held.len() < 200, "the limit did not bite");
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(held);
    setrlimit(Resource::Nofile, Rlimit { current: Some(4096), maximum: getrlimit(Resource::Nofile).maximum }).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    rig.still_serves().await;
}
