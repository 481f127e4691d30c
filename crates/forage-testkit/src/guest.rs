//! Real guests for the integration tests: the tiny image, built from Debian packages
//! into `target/tmp/forage-test-data` (shared by every test binary, cached across runs),
//! helpers to boot it, ask its service, pair with a cloudlet, and check that a cloudlet
//! left nothing behind.
//!
//! Set `FORAGE_SKIP_VM_TESTS=1` for a quick run without QEMU: the VM tests then return
//! early and say so.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use forage_datadir::DataDir;
use forage_image::{GuestImage, ReadyGuest, RunPaths};

pub const READY: Duration = Duration::from_secs(180);

pub fn skip_vm_tests() -> bool {
    let skip = std::env::var("FORAGE_SKIP_VM_TESTS").is_ok_and(|v| v == "1");
    if skip {
        eprintln!("FORAGE_SKIP_VM_TESTS=1: not booting a VM");
    }
    skip
}

/// `target/`: test binaries run from `target/PROFILE/deps/`.
fn target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.ancestors().nth(3).expect("target/PROFILE/deps/BIN").to_path_buf()
}

/// The test data folder, shared by every test binary.
pub fn data_dir() -> DataDir {
    DataDir::at(target_dir().join("tmp").join("forage-test-data"))
}

/// The `forage` binary of this build (`target/PROFILE/forage`).
pub fn forage_exe() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let p = exe.ancestors().nth(2).expect("target/PROFILE").join("forage");
    assert!(
        p.is_file(),
        "{} is missing: build it (`cargo build -p forage`, or run the workspace's tests)",
        p.display()
    );
    p
}

/// The cloudlet's log on the test's output when `RUST_LOG` is set (e.g.
/// `RUST_LOG=forage_cloudlet=debug cargo test ... -- --nocapture`).
pub fn logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// The tiny image, built once per test binary.
pub fn image() -> GuestImage {
    static IMAGE: OnceLock<GuestImage> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let opts = forage_image::BuildOptions::new(
                forage_image::locate_guest_binary("forage-agent").expect("run `make guest` first"),
            );
            forage_image::build(&data_dir(), forage_image::TINY, &opts).expect("image builds").image
        })
        .clone()
}

pub fn sample_app() -> forage_agent::app::AppPackage {
    let dir = forage_image::locate_guest_binary("apps/hashsearch").expect("run `make guest` first");
    forage_agent::app::AppPackage::open(&dir).unwrap()
}

/// A run folder for one test, with a short socket path.
pub fn run_paths(test: &str) -> RunPaths {
    let dir = data_dir().vms().join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    RunPaths { dir: dir.join("run"), qmp_socket: data_dir().runtime_dir().unwrap().join(format!("{test}.qmp")) }
}

pub async fn boot(test: &str, guest_ports: &[u16]) -> (ReadyGuest, RunPaths) {
    let run = run_paths(test);
    let accel = forage_vm::accel::detect().accel;
    let g = image().boot(test, &run, guest_ports, accel, READY).await.expect("guest boots");
    (g, run)
}

/// One request line to a service, retried until it answers.
pub fn request(port: u16, line: &str) -> String {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let start = Instant::now();
    loop {
        match forage_agent::app::request_line(addr, line, Duration::from_secs(60)) {
            Ok(a) => return a,
            Err(e) if start.elapsed() > Duration::from_secs(60) => {
                panic!("service on port {port}: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

pub fn field(answer: &str, key: &str) -> u64 {
    answer
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {answer:?}"))
        .parse()
        .unwrap()
}

/// The heartbeat numbers on a serial console.
pub fn ticks(serial: &Path) -> Vec<u64> {
    std::fs::read_to_string(serial)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("forage-tick ")?.parse().ok())
        .collect()
}

pub async fn wait_ticks(serial: &Path, n: usize) -> Vec<u64> {
    let start = Instant::now();
    loop {
        let t = ticks(serial);
        if t.len() >= n {
            return t;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no heartbeat on {}", serial.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Kills, when dropped (the test passed or panicked), every QEMU and instance shim whose
/// command line mentions one of its folders: instances outlive their daemon by design, a
/// test's must not outlive the test.
pub struct Reaper(Vec<PathBuf>);

impl Reaper {
    pub fn new(folders: &[PathBuf]) -> Self {
        Self(folders.to_vec())
    }

    fn pids(&self, program: &str) -> Vec<i32> {
        let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
        dir.flatten()
            .filter_map(|e| {
                let pid: i32 = e.file_name().to_str()?.parse().ok()?;
                let cmd = String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).ok()?).into_owned();
                let ours = cmd.contains(program) && self.0.iter().any(|f| cmd.contains(&*f.to_string_lossy()));
                ours.then_some(pid)
            })
            .collect()
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        // QEMU first (killed), then its shim (terminated: it unmounts its view).
        for (program, signal) in
            [("qemu-system", rustix::process::Signal::Kill), ("forage-shim", rustix::process::Signal::Term)]
        {
            for pid in self.pids(program) {
                if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                    let _ = rustix::process::kill_process(pid, signal);
                }
            }
        }
        let t = Instant::now();
        while !self.pids("forage-shim").is_empty() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Is any QEMU process running whose command line mentions `needle`?
pub fn qemu_running_with(needle: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let zombie = stat.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z'));
        let cmd = String::from_utf8_lossy(&cmd);
        !zombie && cmd.contains("qemu-system") && cmd.contains(needle)
    })
}

/// Wait (briefly) for QEMU processes mentioning `needle` to be gone.
pub async fn assert_no_qemu_with(needle: &str) {
    for _ in 0..50 {
        if !qemu_running_with(needle) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("a QEMU for {needle} is still running");
}

fn session_dirs(data: &DataDir) -> usize {
    std::fs::read_dir(data.work())
        .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("session-")).count())
        .unwrap_or(0)
}

/// Run `script` with `sh -c` in the guest whose agent answers behind `port`: its stdout
/// (panics if it fails: a test helper).
pub async fn guest_sh(port: u16, script: &str) -> String {
    let script = script.to_string();
    forage_substrate::dock::with_agent(port, Duration::from_secs(30), move |a| {
        a.exec_ok(&["sh", "-c", &script], Duration::from_secs(30))
    })
    .await
    .unwrap()
    .stdout
}

/// What is left in a cloudlet's session folders (two levels), and the end of their shim
/// logs: to tell which session and which process kept them.
fn leftovers(data: &DataDir) -> String {
    let mut out = String::new();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for e in std::fs::read_dir(data.work()).into_iter().flatten().flatten() {
        if !e.file_name().to_string_lossy().starts_with("session-") {
            continue;
        }
        let dir = e.path();
        out += &format!("\n{}:", dir.display());
        for f in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let inner: Vec<String> = std::fs::read_dir(f.path())
                .into_iter()
                .flatten()
                .flatten()
                .map(|g| g.file_name().to_string_lossy().into_owned())
                .collect();
            out += &format!("\n  {} {:?}", f.file_name().to_string_lossy(), inner);
        }
        let mounted: Vec<&str> = mounts.lines().filter(|l| l.contains(&*dir.to_string_lossy())).collect();
        out += &format!("\n  mounts: {mounted:?}");
        out += &format!("\n  shim.log: {}", forage_vm::process::tail_lines(&dir.join("shim.log"), 8));
    }
    out
}

/// A cloudlet's sessions left nothing behind: no session folder, QEMU or FUSE mount.
pub async fn assert_cleaned_up(data: &DataDir) {
    let t = Instant::now();
    while session_dirs(data) > 0 && t.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if session_dirs(data) > 0 {
        panic!("session files left on the cloudlet: {}", leftovers(data));
    }
    assert_no_qemu_with(&data.work().to_string_lossy()).await;
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(&data.work().to_string_lossy().to_string()), "a FUSE mount is left: {mounts}");
}

static CREDENTIALS: OnceLock<std::sync::Arc<rustls::ClientConfig>> = OnceLock::new();

/// Pair this test's device with `cloudlet` (a bundle, as over USB); [`credentials`] then
/// returns them.
pub fn pair_with(cloudlet: &forage_cloudlet::Cloudlet, device: &str) -> std::sync::Arc<rustls::ClientConfig> {
    let dir = data_dir().root().join("test-device-trust").join(device);
    let _ = std::fs::remove_dir_all(&dir);
    // The test data folder outlives a run: a name is held by one credential at a time.
    if cloudlet.trust.issued().iter().any(|i| i.name == device && i.revoked_unix.is_none()) {
        cloudlet.trust.revoke(device).unwrap();
    }
    let bundle = cloudlet
        .trust
        .issue_bundle(device, forage_trust::PeerKind::Device, forage_trust::DEFAULT_VALIDITY, None)
        .unwrap();
    let devices = forage_trust::DeviceTrust::new(&dir);
    devices.import_bundle(&serde_json::to_vec(&bundle).unwrap()).unwrap();
    let config =
        devices.for_cloudlet("127.0.0.1:1".parse().unwrap(), Some(&cloudlet.name)).unwrap().client_config().unwrap();
    let _ = CREDENTIALS.set(config.clone());
    config
}

/// The credentials of the first [`pair_with`] of this test binary.
pub fn credentials() -> &'static std::sync::Arc<rustls::ClientConfig> {
    CREDENTIALS.get().expect("pair_with first")
}

/// Synthesize `overlay` on a cloudlet of `data` served in this process (named `cloudlet`,
/// with a device `device` paired to it, as over USB) and return its service's first
/// answer. Every QEMU and shim the cloudlet started under `data`'s work folder is killed
/// before this returns.
pub async fn synthesize_in_process(data: &DataDir, cloudlet: &str, device: &str, overlay: &Path) -> String {
    let accel = forage_vm::accel::detect().accel;
    let _reaper = Reaper::new(&[data.work()]);
    let cloudlet = std::sync::Arc::new(
        forage_cloudlet::Cloudlet::open(cloudlet.into(), data.clone(), accel, Ipv4Addr::LOCALHOST)
            .expect("the cloudlet opens"),
    );
    let credentials = pair_with(&cloudlet, device);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
    let addr = listener.local_addr().expect("bound");
    let server = tokio::spawn(forage_cloudlet::serve(listener, cloudlet.clone()));
    let opts =
        forage_client::SynthesisOptions { device: device.into(), credentials: Some(credentials), ..Default::default() };
    let (report, session) = forage_client::synthesize(overlay, addr, &opts).await.expect("synthesis");
    session.close().await;
    server.abort();
    report.answer
}
