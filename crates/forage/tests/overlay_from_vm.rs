//! A launch VM prepared by hand: `forage vm restore lv --base B` (disk on a qcow2 layer
//! over the base's), the app installed through the guest, `forage vm save lv`, then
//! `forage overlay create --base B --from-vm lv`; the overlay synthesizes on a cloudlet
//! and its service answers. Then `--interactive` on the same base: its serial console on
//! the terminal, the overlay made when the session ends.

use std::io::BufRead;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::Duration;

use forage_agent::AgentClient;
use forage_synth::BaseVm;
use forage_testkit::guest::*;

fn forage(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_forage"));
    c.arg("--data-dir").arg(data_dir().root()).args(args);
    c
}

fn json_line(out: &mut impl BufRead) -> serde_json::Value {
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlay_from_a_hand_made_launch_vm_synthesizes_and_answers() {
    if skip_vm_tests() {
        return;
    }
    let data = data_dir();
    let accel = forage_vm::accel::detect().accel;
    let _ = BaseVm::remove(&data, "fromvm");
    let _ = forage(&["vm", "rm", "handmade"]).output();
    BaseVm::create(&data, "fromvm", &image(), accel, Duration::from_secs(3)).await.expect("base");

    let mut restored =
        forage(&["vm", "restore", "handmade", "--base", "fromvm", "--json"]).stdout(Stdio::piped()).spawn().unwrap();
    let mut out = std::io::BufReader::new(restored.stdout.take().unwrap());
    let ev = json_line(&mut out);
    assert_eq!(ev["event"], "running", "{ev}");
    let agent: u16 = ev["agent"].as_str().unwrap().rsplit(':').next().unwrap().parse().unwrap();
    let app = sample_app();
    let app2 = app.clone();
    let d2 = data.clone();
    tokio::task::spawn_blocking(move || {
        let mut a = AgentClient::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, agent)), Duration::from_secs(60))?;
        forage_image::app_debs::install_app(&d2, &mut a, &app2)?;
        anyhow::Ok(())
    })
    .await
    .unwrap()
    .expect("app installed by hand");
    let save = forage(&["vm", "save", "handmade", "--json"]).output().unwrap();
    assert!(save.status.success(), "{}", String::from_utf8_lossy(&save.stderr));
    assert_eq!(json_line(&mut out)["saved"], true);
    assert!(restored.wait().unwrap().success());

    let ovl = data.work().join("handmade.ovl");
    let (port, probe) = (app.manifest().port.to_string(), app.manifest().probe.clone().unwrap_or("count".into()));
    let made = forage(&[
        "overlay",
        "create",
        "--base",
        "fromvm",
        "--from-vm",
        "handmade",
        "--port",
        &port,
        "--probe",
        &probe,
        "--order",
        "offset",
        "-o",
        ovl.to_str().unwrap(),
        "--json",
    ])
    .output()
    .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let made: serde_json::Value = serde_json::from_slice(&made.stdout).unwrap();
    let tracking = made["disk_tracking"].as_str().unwrap();
    assert!(tracking.contains("qcow2 layer"), "{made}");
    assert!(made["modified_disk_chunks"].as_u64().unwrap() > 0, "installing wrote the disk: {made}");
    assert!(made["bytes"].as_u64().unwrap() < made["modified_bytes"].as_u64().unwrap(), "{made}");

    let answer = synthesize_in_process(&data, "fromvm-cloudlet", "fromvm-tester", &ovl).await;
    assert!(answer.starts_with("ok "), "{answer}");

    // --interactive: the base's serial console on the terminal (here a pipe); the end of
    // input ends the session, and the overlay is made of what the VM became.
    let iovl = data.work().join("interactive.ovl");
    let mut session =
        forage(&["overlay", "create", "--base", "fromvm", "--interactive", "-o", iovl.to_str().unwrap(), "--json"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
    let stdin = session.stdin.take().unwrap();
    let mut console = std::io::BufReader::new(session.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("forage-tick") {
        line.clear();
        assert!(console.read_line(&mut line).unwrap() > 0, "the console ended before the guest spoke");
    }
    drop(stdin); // end of the session
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut console, &mut rest).unwrap();
    assert!(session.wait().unwrap().success());
    let made: serde_json::Value = serde_json::from_str(rest.lines().last().unwrap()).unwrap();
    assert!(made["disk_tracking"].as_str().unwrap().contains("qcow2 layer"), "{made}");
    assert!(made["modified_memory_chunks"].as_u64().unwrap() > 0, "the guest ran: {made}");
    assert!(iovl.exists());
    let _ = std::fs::remove_file(&iovl);

    assert!(forage(&["vm", "rm", "handmade"]).status().unwrap().success());
    BaseVm::remove(&data, "fromvm").unwrap();
    let _ = std::fs::remove_file(&ovl);
}
