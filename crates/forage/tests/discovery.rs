//! Discovery with zero configuration: two cloudlets (`forage serve`) in two network
//! namespaces joined by a veth pair announce `_cloudlet._tcp` over multicast DNS, and
//! `forage discover` in either namespace lists both, with their TXT metadata.

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
    let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")));
    if !root || Command::new("ip").arg("-V").output().is_err() {
        eprintln!("skipped: needs root and iproute2 for network namespaces");
        return;
    }
    let link = forage_wan::WanLink::create(100.0).expect("namespaces");
    let exe = env!("CARGO_BIN_EXE_forage");
    let data = tempfile::tempdir().unwrap();
    let mut cloudlets = Vec::new();
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
}
