//! A real link: bytes sent across it take the time the rate says, and changing the rate
//! changes it. (Functional check of the emulator with loose bounds, not a benchmark.)

use std::time::{Duration, Instant};

use forage_testkit::wan::WanLink;

/// Send `bytes` from namespace a to a receiver in namespace b (which counts them and
/// answers with the count); the time it took.
fn send(link: &WanLink, bytes: u64) -> Duration {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from((link.b.addr, 5001));
    let listener = link.b.run(|| std::net::TcpListener::bind(addr)).unwrap().unwrap();
    let receiver = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 65536];
        let mut n = 0u64;
        loop {
            match c.read(&mut buf).unwrap() {
                0 => break,
                k => n += k as u64,
            }
        }
        c.write_all(n.to_string().as_bytes()).unwrap();
    });
    let t = Instant::now();
    let counted = link
        .a
        .run(move || {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            let chunk = vec![b'x'; 65536];
            let mut left = bytes;
            while left > 0 {
                let k = left.min(chunk.len() as u64) as usize;
                c.write_all(&chunk[..k]).unwrap();
                left -= k as u64;
            }
            c.shutdown(std::net::Shutdown::Write).unwrap();
            let mut answer = String::new();
            c.read_to_string(&mut answer).unwrap();
            answer
        })
        .unwrap();
    receiver.join().unwrap();
    assert_eq!(counted, bytes.to_string());
    t.elapsed()
}

#[test]
fn link_is_shaped_to_its_rate() {
    let mut link = WanLink::create(16.0).expect("emulated link (needs root)");

    let bytes = 4_000_000u64; // 32 Mbit: 2 s at 16 Mbit/s
    let slow = send(&link, bytes);
    assert!(
        slow > Duration::from_millis(1500) && slow < Duration::from_secs(6),
        "16 Mbit/s link moved 4 MB in {slow:?}"
    );
    link.set_rate(128.0).unwrap();
    let fast = send(&link, bytes);
    // 8x the rate; at least twice as fast even on a loaded machine.
    assert!(fast < slow / 2, "at 128 Mbit/s: {fast:?}, at 16: {slow:?}");
    let names = (link.a.name.clone(), link.b.name.clone());
    drop(link);
    let list =
        String::from_utf8(std::process::Command::new("ip").args(["netns", "list"]).output().unwrap().stdout).unwrap();
    assert!(!list.contains(&names.0) && !list.contains(&names.1), "namespaces left behind: {list}");
}
