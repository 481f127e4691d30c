//! A Debian disk image as an operator or a cloud ships one (MBR, ext4 root, GRUB for BIOS
//! boot, Debian's cloud kernel, cloud-init, qemu-guest-agent; no forage agent), built from
//! Debian packages by `scripts/debian-disk-image.sh`, becomes a base with
//! `forage base create --disk` (qcow2, converted; booted by SeaBIOS and its own GRUB;
//! configured by a cloud-init NoCloud seed). Then it is an overlay source: resumed by hand
//! (`forage vm restore --base`), changed through qemu-guest-agent (a file and a service),
//! saved, `forage overlay create --from-vm`, synthesized on a cloudlet, and the service
//! answers with the changed file. Hostile disk files are refused first, each in one line
//! with nothing left behind.
//!
//! In the default suite; the slowest VM test under TCG (one Debian boot with cloud-init:
//! the base in 2 to 2.5 minutes here; the whole test 206 s from an empty test data
//! folder, 66 s of which built the disk, downloading its .debs into the folder's cache). The
//! cloudlet starts the shim binary: `cargo build -p forage-shim` first when running this
//! test alone (the workspace's tests build it). `FORAGE_SKIP_VM_TESTS=1` skips it.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use forage_datadir::DataDir;
use forage_synth::BaseVm;
use forage_testkit::guest::*;
use forage_vm::qga::GuestAgent;

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

/// The Debian disk image, built once into the test data dir (its .debs cached beside
/// forage's own debian-12 build's).
fn debian_disk(data: &DataDir) -> PathBuf {
    let dir = data.root().join("cache").join("disk-images");
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("debian-12-grub.raw");
    if !img.exists() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/debian-disk-image.sh");
        let t = Instant::now();
        let out = Command::new("bash")
            .arg(script)
            .arg(&img)
            .arg(data.root().join("cache").join("mmdebstrap"))
            .output()
            .unwrap();
        assert!(out.status.success(), "building the disk image: {}", String::from_utf8_lossy(&out.stderr));
        eprintln!("{} in {:.0} s", String::from_utf8_lossy(&out.stdout).trim(), t.elapsed().as_secs_f64());
    }
    img
}

/// `forage base create NAME --disk FILE ARGS` must fail with one line containing `says`,
/// and leave no base and no partial folder.
fn refused(data: &DataDir, name: &str, file: &Path, args: &[&str], says: &str) {
    let out = forage(&["base", "create", name, "--disk", file.to_str().unwrap()]).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(!out.status.success() && last.starts_with("error: ") && last.contains(says), "{says}: {err}");
    let leftovers: Vec<_> = std::fs::read_dir(data.bases())
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(!leftovers.iter().any(|n| n == name || n.starts_with(&format!(".{name}."))), "{leftovers:?}");
}

fn hostile_disks_are_refused(data: &DataDir) {
    let dir = data.work().join("hostile-disks");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let qemu_img = |args: &[&str]| assert!(Command::new("qemu-img").args(args).status().unwrap().success());
    let backed = dir.join("backed.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/shadow", backed.to_str().unwrap(), "1G"]);
    refused(data, "hostile", &backed, &[], "names a backing file");
    let huge = dir.join("huge.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", huge.to_str().unwrap(), "100T"]);
    refused(data, "hostile", &huge, &[], "over the cap");
    let raw = dir.join("plain.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    refused(data, "hostile", &raw, &["--format", "qcow2"], "is not qcow2");
    let vmdk = dir.join("disk.vmdk");
    std::fs::write(&vmdk, b"# Disk DescriptorFile\nRW 2048 FLAT \"/etc/shadow\" 0\n").unwrap();
    refused(data, "hostile", &vmdk, &["--format", "raw"], "VMDK descriptor");
    refused(data, "../escape", &raw, &[], "invalid name");
    let _ = std::fs::remove_dir_all(&dir);
}

/// What the operator changes by hand: a file, and a service on port 8080 that answers
/// any line with `ok ` and the file (Python comes with cloud-init), synced to the disk as
/// an operator would before saving (else it may still be only in the page cache, which the
/// memory carries: the service would answer all the same). The guest's network
/// is checked (cloud-init's DHCP), set by hand if it is missing.
const CHANGE: &str = r#"set -e
echo "$1" > /srv/hello
cat > /usr/local/bin/hello-server <<'PY'
import socketserver
class H(socketserver.StreamRequestHandler):
    def handle(self):
        self.rfile.readline()
        self.wfile.write(("ok " + open("/srv/hello").read().strip() + "\n").encode())
socketserver.TCPServer.allow_reuse_address = True
socketserver.TCPServer(("0.0.0.0", 8080), H).serve_forever()
PY
systemd-run --unit=hello python3 /usr/local/bin/hello-server
sync
if ! ip -4 addr | grep -q 10.0.2.15; then
  dev=$(ls /sys/class/net | grep -v '^lo$' | head -n1)
  ip link set "$dev" up && ip addr add 10.0.2.15/24 dev "$dev"
fi
for i in $(seq 60); do
  python3 -c 'import socket; s = socket.create_connection(("127.0.0.1", 8080)); s.sendall(b"x\n"); print(s.recv(200).decode().strip())' && exit 0
  sleep 1
done
exit 1
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_disk_image_becomes_a_base_and_an_overlay_source() {
    if skip_vm_tests() {
        return;
    }
    let t0 = Instant::now();
    let data = data_dir();
    std::fs::create_dir_all(data.work()).unwrap();
    hostile_disks_are_refused(&data);
    let raw = debian_disk(&data);
    let _ = BaseVm::remove(&data, "diskb");
    let _ = forage(&["vm", "rm", "dv"]).output();

    // The image as a cloud ships it: qcow2.
    let qcow2 = data.work().join("debian-12-grub.qcow2");
    let st = Command::new("qemu-img").args(["convert", "-q", "-O", "qcow2"]).arg(&raw).arg(&qcow2).status().unwrap();
    assert!(st.success());
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBhvkOmCvyUOcS27TbbzVn3oRc5mX/OVmu1R7Lz4Y1k test@forage";
    let key_file = data.work().join("admin.pub");
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    let t = Instant::now();
    let made = forage(&[
        "base",
        "create",
        "diskb",
        "--disk",
        qcow2.to_str().unwrap(),
        "--format",
        "qcow2",
        "--ssh-key",
        key_file.to_str().unwrap(),
        "--memory-mib",
        "512",
        "--json",
    ])
    .output()
    .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let _ = std::fs::remove_file(&qcow2);
    let made: serde_json::Value = serde_json::from_slice(&made.stdout).unwrap();
    eprintln!("base from the disk image in {:.0} s: {made}", t.elapsed().as_secs_f64());
    assert_eq!((made["input_format"].as_str(), made["guest_agent"].as_bool()), (Some("qcow2"), Some(true)), "{made}");
    assert_eq!(made["disk_introspection"], true);
    assert!(made["guest_agent_said"].as_str().unwrap().contains("cloud-init says \"status: done\""), "{made}");
    let base = BaseVm::open(&data, "diskb").unwrap();
    let spec = &base.snapshot().manifest().spec;
    assert!(spec.boot.is_none(), "booted by its own bootloader");
    assert_eq!(spec.cdrom.as_ref().map(|c| c.medium.is_none()), Some(true), "seed ejected before the save");
    assert_eq!(base.cpu_needs().accel, forage_vm::accel::detect().accel);

    // Resumed by hand, changed through qemu-ga, saved.
    let mut restored =
        forage(&["vm", "restore", "dv", "--base", "diskb", "--json"]).stdout(Stdio::piped()).spawn().unwrap();
    let mut out = std::io::BufReader::new(restored.stdout.take().unwrap());
    let ev = json_line(&mut out);
    assert_eq!(ev["event"], "running", "{ev}");
    let record = forage_image::vms::VmPaths::new(&data, "dv").unwrap().load().unwrap();
    let socket = record.spec.guest_agent.clone().expect("the qemu-ga channel").socket;
    let mut ga = GuestAgent::connect(&socket, Duration::from_secs(60)).await.expect("qemu-ga answers");
    let who = ga
        .run("/bin/sh", &["-c", "id -un admin && cat /home/admin/.ssh/authorized_keys"], Duration::from_secs(60))
        .await
        .unwrap();
    let who = String::from_utf8_lossy(&who.stdout).to_string();
    assert!(who.starts_with("admin\n") && who.contains(key), "cloud-init's user and key: {who}");
    let state = format!("changed-by-hand-{}", std::process::id());
    let changed = ga.run("/bin/sh", &["-c", CHANGE, "change", &state], Duration::from_secs(180)).await.unwrap();
    let said = String::from_utf8_lossy(&changed.stdout).to_string();
    assert!(said.contains(&format!("ok {state}")), "{said} {}", String::from_utf8_lossy(&changed.stderr));
    drop(ga);
    let save = forage(&["vm", "save", "dv", "--json"]).output().unwrap();
    assert!(save.status.success(), "{}", String::from_utf8_lossy(&save.stderr));
    assert_eq!(json_line(&mut out)["saved"], true);
    assert!(restored.wait().unwrap().success());

    let ovl = data.work().join("diskb.ovl");
    let args = ["--base", "diskb", "--from-vm", "dv", "--port", "8080", "--probe", "hello", "--order", "offset"];
    let made =
        forage(&["overlay", "create"]).args(args).args(["-o", ovl.to_str().unwrap(), "--json"]).output().unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let made: serde_json::Value = serde_json::from_slice(&made.stdout).unwrap();
    assert!(made["disk_tracking"].as_str().unwrap().contains("qcow2 layer"), "{made}");
    assert!(made["modified_disk_chunks"].as_u64().unwrap() > 0, "the change wrote the disk: {made}");

    // Synthesized on a cloudlet: the service answers with the changed file.
    let answer = synthesize_in_process(&data, "disk-cloudlet", "disk-tester", &ovl).await;
    assert_eq!(answer, format!("ok {state}"));

    assert!(forage(&["vm", "rm", "dv"]).status().unwrap().success());
    BaseVm::remove(&data, "diskb").unwrap();
    let _ = std::fs::remove_file(&ovl);
    eprintln!("disk image test: {:.0} s", t0.elapsed().as_secs_f64());
}
