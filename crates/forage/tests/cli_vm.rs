//! The operator's flow with the real binary: `forage vm boot` supervises in one process,
//! `forage vm save` acts from another, `forage vm restore` brings the VM back.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use forage_testkit::guest::*;

fn forage(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_forage"));
    c.arg("--data-dir").arg(data_dir().root()).args(args);
    c
}

/// Start a supervising command and return it with its first JSON event.
fn start_supervised(args: &[&str]) -> (Child, serde_json::Value, BufReader<std::process::ChildStdout>) {
    let mut child = forage(args).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let event: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    (child, event, out)
}

fn next_event(out: &mut BufReader<std::process::ChildStdout>) -> serde_json::Value {
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

fn port_of(endpoint: &serde_json::Value) -> u16 {
    endpoint.as_str().unwrap().rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn boot_save_restore_stop_from_the_command_line() {
    if skip_vm_tests() {
        return;
    }
    image(); // built (or cached) in the test data dir
    let app = forage_image::locate_guest_binary("apps/hashsearch").unwrap();
    let _ = forage(&["vm", "rm", "cli"]).output();

    let (mut boot, ev, mut boot_out) =
        start_supervised(&["vm", "boot", "cli", "--app", app.to_str().unwrap(), "--json"]);
    assert_eq!(ev["event"], "running", "{ev}");
    assert_eq!(field(&request(port_of(&ev["service"]), "search cli 8"), "served"), 1);

    let out = forage(&["vm", "exec", "cli", "--", "cat", "/data/apps/hashsearch/app.json"]).output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("hashsearch"));
    let out = forage(&["vm", "exec", "cli", "--", "sh", "-c", "exit 3"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("code 3"));

    let save = forage(&["vm", "save", "cli", "--json"]).output().unwrap();
    assert!(save.status.success(), "{}", String::from_utf8_lossy(&save.stderr));
    let saved: serde_json::Value = serde_json::from_slice(&save.stdout).unwrap();
    assert_eq!(saved["event"], "saved");
    assert_eq!(next_event(&mut boot_out)["saved"], true);
    assert!(boot.wait().unwrap().success());

    // Saving again, or a VM that is not running, is refused with a reason.
    let again = forage(&["vm", "save", "cli"]).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not running"));

    let (mut restored, ev, mut restored_out) = start_supervised(&["vm", "restore", "cli", "--json"]);
    assert_eq!(ev["event"], "running", "{ev}");
    assert_eq!(field(&request(port_of(&ev["service"]), "count"), "served"), 1);

    let list = forage(&["vm", "list", "--json"]).output().unwrap();
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let row = list.as_array().unwrap().iter().find(|r| r["name"] == "cli").unwrap();
    assert_eq!(row["state"], "running");

    assert!(forage(&["vm", "stop", "cli"]).status().unwrap().success());
    assert_eq!(next_event(&mut restored_out)["saved"], false);
    assert!(restored.wait().unwrap().success());
    assert!(forage(&["vm", "rm", "cli"]).status().unwrap().success());
}

#[test]
fn qemu_dies_with_its_supervisor() {
    if skip_vm_tests() {
        return;
    }
    image();
    let _ = forage(&["vm", "rm", "orphan"]).output();
    let (mut boot, ev, _out) = start_supervised(&["vm", "boot", "orphan", "--json"]);
    assert_eq!(ev["event"], "running", "{ev}");
    let qemu_pid = ev["pid"].as_u64().unwrap();
    assert!(std::path::Path::new(&format!("/proc/{qemu_pid}")).exists());
    boot.kill().unwrap(); // SIGKILL: no cleanup code runs in forage
    boot.wait().unwrap();
    let gone = (0..50).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let stat = std::fs::read_to_string(format!("/proc/{qemu_pid}/stat")).unwrap_or_default();
        stat.is_empty() || stat.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z'))
    });
    assert!(gone, "QEMU {qemu_pid} outlived its supervisor");
    let _ = forage(&["vm", "rm", "orphan"]).output();
}
