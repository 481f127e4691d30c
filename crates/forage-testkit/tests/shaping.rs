//! A real link: bytes sent across it take the time the rate says, and changing the rate
//! changes it. (Functional check of the emulator with loose bounds, not a benchmark.)

use std::time::{Duration, Instant};

use forage_testkit::wan::WanLink;

const RECEIVER: &str = r#"
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001)); s.listen(1); print("ready", flush=True)
for _ in range(2):
    c, _ = s.accept(); n = 0
    while True:
        b = c.recv(65536)
        if not b: break
        n += len(b)
    c.sendall(str(n).encode()); c.close()
"#;

const SENDER: &str = r#"
import socket, sys
c = socket.create_connection((sys.argv[1], 5001)); c.sendall(b"x" * int(sys.argv[2]))
c.shutdown(socket.SHUT_WR); print(c.recv(64).decode())
"#;

fn send(link: &WanLink, bytes: u64) -> Duration {
    let t = Instant::now();
    let out =
        link.a.command("python3").args(["-c", SENDER, &link.b.addr.to_string(), &bytes.to_string()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), bytes.to_string());
    t.elapsed()
}

#[test]
fn link_is_shaped_to_its_rate() {
    let mut link = WanLink::create(16.0).expect("emulated link (needs root)");
    let mut rx = link
        .b
        .command("python3")
        .args(["-c", RECEIVER, &link.b.addr.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(rx.stdout.as_mut().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), "ready");

    let bytes = 4_000_000u64; // 32 Mbit: 2 s at 16 Mbit/s
    let slow = send(&link, bytes);
    assert!(
        slow > Duration::from_millis(1500) && slow < Duration::from_secs(6),
        "16 Mbit/s link moved 4 MB in {slow:?}"
    );
    link.set_rate(128.0).unwrap();
    let fast = send(&link, bytes);
    assert!(fast < slow / 3, "at 128 Mbit/s: {fast:?}, at 16: {slow:?}");
    rx.wait().unwrap();
    let names = (link.a.name.clone(), link.b.name.clone());
    drop(link);
    let list =
        String::from_utf8(std::process::Command::new("ip").args(["netns", "list"]).output().unwrap().stdout).unwrap();
    assert!(!list.contains(&names.0) && !list.contains(&names.1), "namespaces left behind: {list}");
}
