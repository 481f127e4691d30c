//! Multicast of a substrate (UDP, TTL 1, Debian's udpcast) from one host to three on one
//! bridge, each a network namespace; traffic to the third goes through a small tc token
//! bucket that drops packets. All three end with the sender's exact file, verified and in
//! their own pool.

use std::process::{Command, Stdio};

use forage_datadir::DataDir;
use forage_substrate::Pool;
use forage_testkit::{guest, lan::Lan, synthetic};

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

#[test]
fn multicast_to_three_hosts_one_lossy_ends_with_identical_verified_substrates() {
    if !is_root() || Command::new("udp-sender").arg("--help").output().is_err() {
        eprintln!("needs root and udpcast (scripts/deps.sh): skipped");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let lan = Lan::create(4).expect("namespaces on a bridge");
    lan.make_lossy(3, 4.0).unwrap();
    let data: Vec<DataDir> = (0..4).map(|i| DataDir::at(t.path().join(format!("host{i}")))).collect();
    let sender = Pool::open(&data[0]).unwrap();
    let (file, _) = synthetic::substrate(t.path(), "pushed", 128);
    let staged = sender.staging("pushed").unwrap();
    std::fs::copy(&file, &staged).unwrap();
    sender.insert("pushed", &staged).unwrap();
    let want = forage_vm::snapshot::sha256_file(&file).unwrap();

    let forage = guest::forage_exe();
    let receivers: Vec<_> = (1..4)
        .map(|i| {
            let h = &lan.hosts[i];
            h.command(&forage)
                .arg("--data-dir")
                .arg(data[i].root())
                .args(["substrate", "receive", "--interface", &h.device, "--wait", "120", "--json"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let h0 = &lan.hosts[0];
    let push = h0
        .command(&forage)
        .arg("--data-dir")
        .arg(data[0].root())
        .args(["substrate", "push", "pushed", "--receivers", "3", "--interface", &h0.device, "--wait", "60", "--json"])
        .output()
        .unwrap();
    assert!(push.status.success(), "push: {}", String::from_utf8_lossy(&push.stderr));
    for (i, r) in receivers.into_iter().enumerate() {
        let out = r.wait_with_output().unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "receiver {}: {said} {}", i + 1, String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_str(said.trim()).unwrap();
        assert_eq!(report["sha256"], want.as_str(), "receiver {}", i + 1);
        let pool = Pool::open(&data[i + 1]).unwrap();
        let got = pool.entry("pushed").unwrap().path;
        forage_substrate::format::verify(&got).expect("verified in the receiver's pool");
        assert_eq!(forage_vm::snapshot::sha256_file(&got).unwrap(), want);
    }
    assert!(lan.dropped(3) > 0, "the lossy host really lost packets");
    eprintln!("dropped on the way to the lossy host: {}", lan.dropped(3));
    for d in &data {
        let _ = std::fs::remove_dir_all(Pool::open(d).unwrap().memory_dir());
    }
}
