//! Discovery with zero configuration: two cloudlets (`forage serve`) in two network
//! namespaces joined by a veth pair announce `_cloudlet._tcp` over multicast DNS, and
//! `forage discover` in either namespace lists both, with their TXT metadata; so does the
//! standard tool, `avahi-browse` (against a private D-Bus and avahi-daemon in one of the
//! namespaces); malformed mDNS packets do not stop either daemon.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn two_cloudlets_in_two_namespaces_are_discovered() {
    let root = std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")));
    if !root || Command::new("ip").arg("-V").output().is_err() {
        eprintln!("skipped: needs root and iproute2 for network namespaces");
        return;
    }
    let link = forage_testkit::wan::WanLink::create(100.0).expect("namespaces");
    let exe = env!("CARGO_BIN_EXE_forage");
    let data = tempfile::tempdir().unwrap();
    let mut cloudlets: Vec<Kill> = Vec::new();
    for (ns, name) in [(&link.a, "cloudlet-a"), (&link.b, "cloudlet-b")] {
        let child = ns
            .command(exe)
            .arg("--data-dir")
            .arg(data.path().join(name))
            .args(["serve", "--listen", &format!("{}:7878", ns.addr), "--no-api", "--name", name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        cloudlets.push(Kill(child));
    }
    std::thread::sleep(Duration::from_secs(1));
    for ns in [&link.a, &link.b] {
        let out = ns.command(exe).args(["discover", "--json", "--timeout", "3"]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let found: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let names: Vec<&str> = found.as_array().unwrap().iter().filter_map(|f| f["name"].as_str()).collect();
        assert_eq!(names, ["cloudlet-a", "cloudlet-b"], "from {}: {found}", ns.name);
        for f in found.as_array().unwrap() {
            assert_eq!(f["addr"].as_str().unwrap().rsplit(':').next(), Some("7878"));
            assert!(f["cores"].as_u64().unwrap() >= 1 && f["rtt_ms"].as_f64().is_some(), "{f}");
        }
    }

    // Garbage on the mDNS port, multicast and unicast, from the other namespace.
    let targets =
        [std::net::SocketAddr::from(([224, 0, 0, 251], 5353)), std::net::SocketAddr::from((link.a.addr, 5353))];
    link.b
        .run(|| {
            let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            let mut x: u64 = 0x9E3779B97F4A7C15;
            for i in 0..400usize {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let len = [0, 1, 11, 12, 13, 40, 512, 1400][i % 8];
                let mut p: Vec<u8> = (0..len).map(|k| (x >> (k % 56)) as u8).collect();
                if p.len() >= 12 {
                    // A plausible header claiming far more records than follow.
                    p[2] = if i % 2 == 0 { 0x84 } else { 0 };
                    p[4..12].copy_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x7f, 0xff, 0x00, 0x01]);
                }
                for t in targets {
                    let _ = sock.send_to(&p, t);
                }
            }
        })
        .expect("into the namespace");
    std::thread::sleep(Duration::from_millis(500));
    for c in &mut cloudlets {
        assert!(c.0.try_wait().unwrap().is_none(), "a cloudlet died of malformed mDNS packets");
    }
    let out = link.b.command(exe).args(["discover", "--json", "--timeout", "3"]).output().unwrap();
    let found: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(found.as_array().map(Vec::len), Some(2), "after the garbage: {found}");

    // avahi-browse sees both announcements.
    let lines = avahi_browse(&link.a);
    for (name, ns) in [("cloudlet-a", &link.a), ("cloudlet-b", &link.b)] {
        let line = lines
            .iter()
            .find(|l| l.starts_with("=;") && l.split(';').nth(3) == Some(name))
            .unwrap_or_else(|| panic!("avahi-browse did not resolve {name}: {lines:?}"));
        let f: Vec<&str> = line.split(';').collect();
        assert_eq!((f[7], f[8]), (&*ns.addr.to_string(), "7878"), "{line}");
        assert!(f[9].contains("\"txtvers=1\"") && f[9].contains("\"api=1-1\""), "{line}");
    }
}

/// `avahi-browse -rtp _cloudlet._tcp` in `ns`, against a private system bus and an
/// avahi-daemon of its own there (nothing of the host's is used or changed).
fn avahi_browse(ns: &forage_testkit::wan::Netns) -> Vec<String> {
    for tool in ["avahi-daemon", "avahi-browse", "dbus-daemon"] {
        assert!(
            Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().unwrap().status.success(),
            "{tool} is missing: apt-get install avahi-daemon avahi-utils dbus (scripts/deps.sh does)"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let bus = dir.path().join("bus");
    let conf = std::fs::read_to_string("/usr/share/dbus-1/system.conf").unwrap();
    let conf = conf
        .replace(
            "<listen>unix:path=/run/dbus/system_bus_socket</listen>",
            &format!("<listen>unix:path={}</listen>", bus.display()),
        )
        .replace("<pidfile>/run/dbus/pid</pidfile>", "")
        .replace("<user>messagebus</user>", "")
        .replace("<includedir>system.d</includedir>", "<includedir>/usr/share/dbus-1/system.d</includedir>");
    std::fs::write(dir.path().join("bus.conf"), conf).unwrap();
    std::fs::write(dir.path().join("avahi.conf"), "[server]\nuse-ipv4=yes\nuse-ipv6=no\nenable-dbus=yes\n[publish]\ndisable-publishing=yes\n[wide-area]\nenable-wide-area=no\n").unwrap();
    let address = format!("unix:path={}", bus.display());
    let _dbus = Kill(
        Command::new("dbus-daemon")
            .arg(format!("--config-file={}", dir.path().join("bus.conf").display()))
            .arg("--nofork")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for _ in 0..50 {
        if bus.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _avahi = Kill(
        ns.command("avahi-daemon")
            .args(["--no-drop-root", "--no-chroot", "--no-rlimits", "--no-proc-title", "-f"])
            .arg(dir.path().join("avahi.conf"))
            .env("DBUS_SYSTEM_BUS_ADDRESS", &address)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = Vec::new();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_secs(1));
        let out = ns
            .command("avahi-browse")
            .args(["-rtp", "_cloudlet._tcp"])
            .env("DBUS_SYSTEM_BUS_ADDRESS", &address)
            .output()
            .unwrap();
        lines = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
        if lines.iter().filter(|l| l.starts_with("=;")).count() >= 2 {
            break;
        }
    }
    lines
}
