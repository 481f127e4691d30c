//! VM handoff with real guests between cloudlets (`forage serve`) in two network
//! namespaces joined by a shaped veth pair. A device holds a cached-VM instance of a
//! stateful service on cloudlet A; the service's request counter and working set must
//! survive every move:
//! 1. A -> B, B holding the same service VM (the fast path); the device is told the new
//!    endpoint; A is left with nothing;
//! 2. B -> C, C holding nothing (memory and disk sent whole, with the boot files);
//! 3. a new instance on A, the link cut in the middle of its handoff: the handoff fails,
//!    the VM runs on at A with its state, B removes its partial state; with the link
//!    back, the retry moves it;
//! 4. the destination killed in the middle of a handoff: the same, B's leftovers are
//!    removed when it starts again; the instance B already ran (from 3) answers its device
//!    all along, and B's restarted daemon lists it again;
//! 5. synthesized instances move too (early start and pipelined): A -> B (B holds the base
//!    VM) -> C (holds nothing), their state carried on, the device told each time;
//! 6. the last word lost (debug builds inject it): B resumes but its HandoffDone is lost
//!    (A asks, the VM runs at B only), or B drops the commit (A asks, resumes its own copy);
//! 7. no lost write: 20 handoffs A -> B -> A ... of a guest that keeps writing its
//!    memory; each time the destination's memory and disk before it resumes equal the
//!    source's once stopped, page by page (the debug build's FORAGE_HANDOFF_PROBE);
//! 8. `forage drain` moves every instance of A to B;
//! 9. device-initiated: the device asks its instance to follow it to B;
//! 10. the load policy: A under (configured) memory pressure moves a new instance to B,
//!     which announces room over mDNS.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use forage_client::ServiceEndpoint;
use forage_testkit::guest::*;
use forage_testkit::wan::{Netns, WanLink};

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const EXE: &str = env!("CARGO_BIN_EXE_forage");

fn forage_at(data: &Path, args: &[&str]) -> String {
    let out = Command::new(EXE).arg("--data-dir").arg(data).args(args).output().unwrap();
    assert!(out.status.success(), "forage {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn forage_in(ns: &Netns, data: &Path, args: &[&str]) -> Output {
    ns.command(EXE).arg("--data-dir").arg(data).args(args).output().unwrap()
}

/// One request line to the service at `endpoint` (its relay, with the device's token),
/// from inside `ns`.
fn ask(ns: &Netns, endpoint: &ServiceEndpoint, line: &str) -> String {
    let (ep, line) = (endpoint.clone(), line.to_string());
    ns.run(move || forage_client::service::request_line(&ep, &line, Duration::from_secs(60)))
        .unwrap()
        .unwrap_or_else(|e| panic!("{}: {e}", endpoint.addr))
}

/// A device holding a synthesized instance: the endpoint, the process and its output.
fn synthesize(
    ns: &Netns,
    device: &Path,
    ovl: &Path,
    cloudlet: &str,
    early: bool,
) -> (ServiceEndpoint, Kill, BufReader<std::process::ChildStdout>) {
    let mut cmd = ns.command(EXE);
    cmd.arg("--data-dir").arg(device).arg("synthesize").arg(ovl).args(["--cloudlet", cloudlet, "--hold", "--json"]);
    if !early {
        cmd.arg("--no-early-start");
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let report: forage_client::SynthesisReport =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("synthesize printed {line:?}: {e}"));
    (report.service, Kill(child), out)
}

/// The device's line saying where its instance went.
fn heard_move(out: &mut BufReader<std::process::ChildStdout>) -> forage_client::MovedNotice {
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("the device printed {line:?}: {e}"))
}

/// Where a handoff report says the instance went: the device keeps its token.
fn moved_to(report: &serde_json::Value, was: &ServiceEndpoint) -> ServiceEndpoint {
    ServiceEndpoint {
        addr: report["endpoint"].as_str().unwrap().into(),
        token: was.token.clone(),
        ca_sha256: report["ca_sha256"].as_str().unwrap().into(),
    }
}

fn serve(ns: &Netns, data: &Path, port: u16, api: u16, name: &str) -> Kill {
    serve_with(ns, data, port, api, name, &[], &["--no-advertise"])
}

/// A daemon with more `args` and `env` (the debug build's FORAGE_FAULTS and
/// FORAGE_HANDOFF_PROBE).
fn serve_with(ns: &Netns, data: &Path, port: u16, api: u16, name: &str, env: &[(&str, &str)], args: &[&str]) -> Kill {
    let log = std::fs::File::options().create(true).append(true).open(data.join("serve.log")).unwrap();
    let child = ns
        .command(EXE)
        .envs(env.iter().copied())
        .arg("--data-dir")
        .arg(data)
        .args([
            "serve",
            "--listen",
            &format!("{}:{port}", ns.addr),
            "--api",
            &format!("127.0.0.1:{api}"),
            "--name",
            name,
        ])
        .args(args)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Kill(child)
}

/// A device holding a cached-VM instance: the endpoint, and the process (which prints
/// where the instance went when it moves).
fn offload(ns: &Netns, device: &Path, cloudlet: &str) -> (ServiceEndpoint, Kill, BufReader<std::process::ChildStdout>) {
    let mut child = ns
        .command(EXE)
        .arg("--data-dir")
        .arg(device)
        .args(["offload", "--service", "ho-hs", "--cloudlet", cloudlet, "--hold", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("offload printed {line:?}: {e}"));
    (serde_json::from_value(v["service"].clone()).unwrap(), Kill(child), out)
}

fn handoff(
    ns: &Netns,
    data: &Path,
    endpoint: &ServiceEndpoint,
    to: &str,
    api: u16,
) -> Result<serde_json::Value, String> {
    let out =
        forage_in(ns, data, &["handoff", &endpoint.addr, "--to", to, "--api", &format!("127.0.0.1:{api}"), "--json"]);
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The 4 KiB pages in which two files differ (a length difference counts as a page).
fn differing_pages(a: &Path, b: &Path) -> Vec<u64> {
    use std::io::Read;
    let open = |p: &Path| {
        BufReader::with_capacity(1 << 20, std::fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
    };
    let (mut fa, mut fb) = (open(a), open(b));
    let (mut pa, mut pb) = ([0u8; 4096], [0u8; 4096]);
    let mut differ = Vec::new();
    for page in 0.. {
        let (na, nb) = (read_page(&mut fa, &mut pa), read_page(&mut fb, &mut pb));
        if na == 0 && nb == 0 {
            break;
        }
        if na != nb || pa[..na] != pb[..nb] {
            differ.push(page);
        }
    }
    return differ;

    fn read_page(f: &mut impl Read, page: &mut [u8; 4096]) -> usize {
        let mut n = 0;
        while n < page.len() {
            match f.read(&mut page[n..]).unwrap() {
                0 => break,
                k => n += k,
            }
        }
        n
    }
}

fn session_dirs(data: &Path) -> usize {
    std::fs::read_dir(data.join("work"))
        .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("session-")).count())
        .unwrap_or(0)
}

fn wait_no_sessions(data: &Path, within: Duration) {
    wait_sessions(data, 0, within)
}

fn wait_sessions(data: &Path, n: usize, within: Duration) {
    let t = Instant::now();
    while session_dirs(data) > n && t.elapsed() < within {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(session_dirs(data), n, "session folders in {}", data.display());
}

fn pair_cloudlets(issuer: &Path, client: &Path, name: &str, addr: &str, work: &Path) {
    let bundle = work.join(format!("{name}.json"));
    forage_at(
        issuer,
        &["pair", "--bundle", &bundle.to_string_lossy(), "--name", name, "--as-cloudlet", "--addr", addr],
    );
    forage_at(client, &["pair", "import", &bundle.to_string_lossy()]);
}

#[test]
fn a_running_instance_moves_between_namespaced_cloudlets() {
    let root = std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")));
    if skip_vm_tests() || !root {
        eprintln!("skipped: needs QEMU and root (network namespaces)");
        return;
    }
    // Cloudlet A: the test data dir (its image), a base and a service VM of hashsearch.
    let data = data_dir();
    image();
    let a = data.root().to_path_buf();
    let app_dir = forage_image::locate_guest_binary("apps/hashsearch").expect("make guest");
    let _ = forage_synth::BaseVm::remove(&data, "hotest");
    let _ = forage_service::Repository::new(&data).remove("ho-hs");
    forage_at(&a, &["base", "create", "hotest", "--image", "tiny", "--settle-s", "3"]);
    forage_at(&a, &["service", "create", "ho-hs", "--base", "hotest", "--app", &app_dir.to_string_lossy()]);
    // B holds the same service VM (its package); C holds nothing at all.
    let work: PathBuf = data.root().join("handoff-test");
    // Instances outlive their daemons (by design): this test's must not outlive the test.
    let _reaper = Reaper::new(&[work.clone(), data.work()]);
    let _ = std::fs::remove_dir_all(&work);
    let (b, c, device) = (work.join("b"), work.join("c"), work.join("device"));
    for d in [&b, &c, &device] {
        std::fs::create_dir_all(d).unwrap();
    }
    let pkg = work.join("ho-hs.fsvc");
    forage_at(&a, &["service", "export", "ho-hs", "-o", &pkg.to_string_lossy()]);
    std::fs::create_dir_all(b.join("images")).unwrap();
    let copied = Command::new("cp").arg("-r").arg(data.images().join("tiny")).arg(b.join("images")).status().unwrap();
    assert!(copied.success());
    forage_at(&b, &["service", "import", &pkg.to_string_lossy(), "--id", "ho-hs"]);

    let mut link = WanLink::create(50.0).expect("namespaces");
    let (addr_a, addr_b, addr_c) =
        (format!("{}:7878", link.a.addr), format!("{}:7878", link.b.addr), format!("{}:7880", link.b.addr));
    pair_cloudlets(&b, &a, "cloudlet-a", &addr_b, &work);
    pair_cloudlets(&c, &b, "cloudlet-b", &addr_c, &work);
    let dev_bundle = work.join("device.json");
    // A (the test data folder) outlives a run, and a name is held by one credential.
    let _ = Command::new(EXE).arg("--data-dir").arg(&a).args(["pair", "revoke", "phone"]).output();
    forage_at(&a, &["pair", "--bundle", &dev_bundle.to_string_lossy(), "--name", "phone", "--addr", &addr_a]);
    forage_at(&device, &["pair", "import", &dev_bundle.to_string_lossy()]);
    let daemon_a = serve(&link.a, &a, 7878, 7879, "cloudlet-a");
    let daemon_b = serve(&link.b, &b, 7878, 7879, "cloudlet-b");
    let _daemon_c = serve(&link.b, &c, 7880, 7881, "cloudlet-c");
    std::thread::sleep(Duration::from_secs(2));

    // 1. With the base: A -> B. The service's state comes along.
    let (endpoint, mut dev, mut dev_out) = offload(&link.a, &device, &addr_a);
    for i in 0..3 {
        assert!(ask(&link.a, &endpoint, &format!("search move{i} 8")).starts_with("ok "));
    }
    assert!(ask(&link.a, &endpoint, "grow 8").starts_with("ok working="));
    assert!(ask(&link.a, &endpoint, "churn 64").starts_with("ok hot="));
    let before = ask(&link.a, &endpoint, "count");
    let served = field(&before, "served");
    let r = handoff(&link.a, &a, &endpoint, &addr_b, 7879).unwrap_or_else(|e| panic!("handoff A -> B: {e}"));
    assert_eq!(r["has_base"], true, "{r}");
    let at_b = moved_to(&r, &endpoint);
    assert!(at_b.addr.starts_with(&link.b.addr.to_string()), "{r}");
    assert!(r["modified_bytes"].as_u64().unwrap() >= 8 << 20, "the working set counts as modified: {r}");
    assert!(r["bytes"].as_u64().unwrap() < r["modified_bytes"].as_u64().unwrap(), "dedup, delta and compression: {r}");
    assert!(
        r["downtime_s"].as_f64().unwrap() > 0.0 && r["total_s"].as_f64().unwrap() >= r["downtime_s"].as_f64().unwrap(),
        "{r}"
    );
    // The device was told where its service went.
    let mut line = String::new();
    dev_out.read_line(&mut line).unwrap();
    let moved: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("the device printed {line:?}: {e}"));
    assert_eq!((moved["moved_to"].as_str(), moved["endpoint"].as_str()), (Some(&*addr_b), Some(&*at_b.addr)));
    let told: ServiceEndpoint = serde_json::from_value(moved["service"].clone()).unwrap();
    assert_eq!(told, at_b, "the device was given the new relay, its CA and its own token");
    assert!(dev.0.wait().unwrap().success());
    let after = ask(&link.a, &at_b, "count");
    assert_eq!(field(&after, "served"), served, "the counter moved: {before} -> {after}");
    assert_eq!(field(&after, "working"), 8 << 20, "{after}");
    assert!(ask(&link.a, &at_b, "search moved 8").contains(&format!("served={}", served + 1)));
    // Nothing is left at A.
    wait_no_sessions(&a, Duration::from_secs(20));

    // 2. Without the base: B -> C (a second move of the same instance).
    let r = handoff(&link.b, &b, &at_b, &addr_c, 7879).unwrap_or_else(|e| panic!("handoff B -> C: {e}"));
    assert_eq!(r["has_base"], false, "{r}");
    assert!(r["boot_file_bytes"].as_u64().unwrap() > 0, "{r}");
    let at_c = moved_to(&r, &at_b);
    let after = ask(&link.a, &at_c, "count");
    assert_eq!(field(&after, "served"), served + 1, "{after}");
    assert_eq!(field(&after, "working"), 8 << 20, "{after}");
    wait_no_sessions(&b, Duration::from_secs(20));

    // 3. The link cut in the middle of a handoff.
    let (endpoint, _dev2, mut dev2_out) = offload(&link.a, &device, &addr_a);
    assert!(ask(&link.a, &endpoint, "search cut 8").starts_with("ok "));
    assert!(ask(&link.a, &endpoint, "grow 16").starts_with("ok "));
    let before = ask(&link.a, &endpoint, "count");
    link.set_rate(1.0).unwrap();
    let attempt = {
        let (ns_name, a, endpoint, addr_b) = (link.a.clone(), a.clone(), endpoint.clone(), addr_b.clone());
        std::thread::spawn(move || handoff(&ns_name, &a, &endpoint, &addr_b, 7879))
    };
    // Cut once segments flow (B has a session folder with the rebuild under way).
    let t = Instant::now();
    while session_dirs(&b) == 0 && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    let down =
        Command::new("ip").args(["-n", &link.a.name, "link", "set", "dev", &link.a.device, "down"]).status().unwrap();
    assert!(down.success());
    let failed = attempt.join().unwrap().expect_err("a handoff over a cut link fails");
    assert!(failed.contains("handoff") && failed.contains("keeps running here"), "{failed}");
    // The VM runs on at A with its state; B removed what it had received.
    Command::new("ip").args(["-n", &link.a.name, "link", "set", "dev", &link.a.device, "up"]).status().unwrap();
    link.set_rate(50.0).unwrap();
    let still = ask(&link.a, &endpoint, "count");
    assert_eq!(field(&still, "served"), field(&before, "served"), "{before} -> {still}");
    assert!(ask(&link.a, &endpoint, "search still-here 8").starts_with("ok "));
    wait_no_sessions(&b, Duration::from_secs(60));
    // The retry moves it.
    let r = handoff(&link.a, &a, &endpoint, &addr_b, 7879).unwrap_or_else(|e| panic!("retry: {e}"));
    let at_b = moved_to(&r, &endpoint);
    let after = ask(&link.a, &at_b, "count");
    assert_eq!(field(&after, "served"), field(&before, "served") + 1, "{after}");
    assert_eq!(field(&after, "working"), 16 << 20, "{after}");
    let mut line = String::new();
    dev2_out.read_line(&mut line).unwrap();
    assert!(line.contains(&at_b.addr), "the device heard of the move: {line:?}");
    wait_no_sessions(&a, Duration::from_secs(20));

    // 4. The destination killed in the middle of a handoff.
    let (endpoint, _dev3, _dev3_out) = offload(&link.a, &device, &addr_a);
    assert!(ask(&link.a, &endpoint, "grow 16").starts_with("ok "));
    let before = ask(&link.a, &endpoint, "count");
    link.set_rate(1.0).unwrap();
    let attempt = {
        let (ns, a, endpoint, addr_b) = (link.a.clone(), a.clone(), endpoint.clone(), addr_b.clone());
        std::thread::spawn(move || handoff(&ns, &a, &endpoint, &addr_b, 7879))
    };
    let t = Instant::now();
    while session_dirs(&b) == 0 && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    drop(daemon_b);
    let t = Instant::now();
    let failed = attempt.join().unwrap().expect_err("a handoff to a destination that dies fails");
    assert!(t.elapsed() < Duration::from_secs(30), "noticed at once, not by a timeout: {failed}");
    assert!(failed.contains("keeps running here"), "{failed}");
    link.set_rate(50.0).unwrap();
    assert_eq!(field(&ask(&link.a, &endpoint, "count"), "served"), field(&before, "served"));
    // B's daemon is gone; the instance it ran answers its device.
    let b_served = field(&ask(&link.a, &at_b, "count"), "served");
    // B starts again: what the dead daemon left is removed, the instance it ran is
    // adopted (listed, still answering); the retry works.
    assert!(session_dirs(&b) > 1, "the killed destination left its partial state");
    let daemon_b = serve(&link.b, &b, 7878, 7879, "cloudlet-b");
    std::thread::sleep(Duration::from_secs(2));
    wait_sessions(&b, 1, Duration::from_secs(10));
    let listed = forage_in(&link.b, &b, &["instances", "--api", "127.0.0.1:7879", "--json"]);
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    let listed: forage_api::InstanceList = serde_json::from_slice(&listed.stdout).unwrap();
    assert!(
        listed.instances.iter().any(|i| i.endpoint == at_b.addr && i.status == forage_api::InstanceStatus::Running),
        "{listed:?}"
    );
    assert!(
        ask(&link.a, &at_b, "search after-restart 8").contains(&format!("served={}", b_served + 1)),
        "it kept its state across the restart"
    );
    let r = handoff(&link.a, &a, &endpoint, &addr_b, 7879)
        .unwrap_or_else(|e| panic!("retry after the destination's restart: {e}"));
    let after = ask(&link.a, &moved_to(&r, &endpoint), "count");
    assert_eq!(field(&after, "served"), field(&before, "served"), "{after}");
    assert_eq!(field(&after, "working"), 16 << 20, "{after}");

    // 5. Synthesized instances: the overlay of the same app on the base A holds; B gets
    //    the base VM, C has nothing.
    let ovl = work.join("ho.ovl");
    forage_at(
        &a,
        &[
            "overlay",
            "create",
            "--base",
            "hotest",
            "--app",
            &app_dir.to_string_lossy(),
            "--order",
            "offset",
            "-o",
            &ovl.to_string_lossy(),
        ],
    );
    let base_pkg = work.join("hotest.fbase");
    forage_at(&a, &["base", "export", "hotest", &base_pkg.to_string_lossy()]);
    forage_at(&b, &["base", "import", &base_pkg.to_string_lossy()]);
    for early in [true, false] {
        let (endpoint, _dev, mut out) = synthesize(&link.a, &device, &ovl, &addr_a, early);
        assert!(ask(&link.a, &endpoint, &format!("search synth-{early} 8")).starts_with("ok "));
        assert!(ask(&link.a, &endpoint, "grow 4").starts_with("ok "));
        let before = field(&ask(&link.a, &endpoint, "count"), "served");
        let r = handoff(&link.a, &a, &endpoint, &addr_b, 7879)
            .unwrap_or_else(|e| panic!("synthesized (early {early}) A -> B: {e}"));
        assert_eq!(r["has_base"], true, "B holds the base VM: {r}");
        let at_b = moved_to(&r, &endpoint);
        assert_eq!(heard_move(&mut out).endpoint, at_b.addr, "the device heard of the move");
        assert_eq!(field(&ask(&link.a, &at_b, "count"), "served"), before, "early {early}: the counter moved");
        let r = handoff(&link.b, &b, &at_b, &addr_c, 7879)
            .unwrap_or_else(|e| panic!("synthesized (early {early}) B -> C: {e}"));
        assert_eq!(r["has_base"], false, "{r}");
        let at_c = moved_to(&r, &at_b);
        let after = ask(&link.a, &at_c, "count");
        assert_eq!(field(&after, "served"), before, "early {early}: {after}");
        assert_eq!(field(&after, "working"), 4 << 20, "early {early}: {after}");
        assert!(ask(&link.a, &at_c, "search moved-twice 8").contains(&format!("served={}", before + 1)));
        wait_no_sessions(&a, Duration::from_secs(20));
    }

    // 6. At most one copy when the last word is lost. B resumes the VM but its
    //    HandoffDone never reaches A: A asks, learns that it runs at B, and stops its own.
    let serve_b = |env: &[(&str, &str)], args: &[&str]| serve_with(&link.b, &b, 7878, 7879, "cloudlet-b", env, args);
    drop(daemon_b);
    let daemon_b = serve_b(&[("FORAGE_FAULTS", "handoff-done-lost")], &["--no-advertise"]);
    std::thread::sleep(Duration::from_secs(2));
    let (endpoint, _dev4, mut dev4_out) = offload(&link.a, &device, &addr_a);
    assert!(ask(&link.a, &endpoint, "grow 4").starts_with("ok "));
    let before = field(&ask(&link.a, &endpoint, "count"), "served");
    let r = handoff(&link.a, &a, &endpoint, &addr_b, 7879)
        .unwrap_or_else(|e| panic!("a handoff whose HandoffDone is lost: {e}"));
    let at_b = moved_to(&r, &endpoint);
    assert_eq!(heard_move(&mut dev4_out).endpoint, at_b.addr, "the device heard of the move");
    assert_eq!(field(&ask(&link.a, &at_b, "count"), "served"), before, "{r}");
    wait_no_sessions(&a, Duration::from_secs(20));
    let gone = {
        let ep = endpoint.clone();
        link.a.run(move || forage_client::service::request_line(&ep, "count", Duration::from_secs(5))).unwrap()
    };
    assert!(gone.is_err(), "A's copy must be gone: {gone:?}");
    // B drops the commit: A asks, learns that it runs nowhere else, and resumes its own.
    drop(daemon_b);
    let daemon_b = serve_b(&[("FORAGE_FAULTS", "handoff-commit-lost")], &["--no-advertise"]);
    std::thread::sleep(Duration::from_secs(2));
    let at_b_before = session_dirs(&b);
    let (endpoint, _dev5, _dev5_out) = offload(&link.a, &device, &addr_a);
    assert!(ask(&link.a, &endpoint, "grow 4").starts_with("ok "));
    let before = field(&ask(&link.a, &endpoint, "count"), "served");
    let failed = handoff(&link.a, &a, &endpoint, &addr_b, 7879).expect_err("a handoff whose commit is lost fails");
    assert!(failed.contains("keeps running here"), "{failed}");
    assert_eq!(field(&ask(&link.a, &endpoint, "count"), "served"), before, "A's copy runs on with its state");
    wait_sessions(&b, at_b_before, Duration::from_secs(30));

    // 7. No lost write: 20 handoffs A -> B -> A ... of an instance whose guest rewrites
    //    1 MiB of its memory every 100 ms; each time, the memory and disk the destination
    //    rebuilt equal, page by page, the source's once QEMU stopped the VM for good.
    let probe = work.join("probe");
    let probe_env = [("FORAGE_HANDOFF_PROBE", probe.to_str().unwrap())];
    drop(daemon_a);
    // A (the test data folder) outlives a run, and a name is held by one credential.
    let _ = Command::new(EXE).arg("--data-dir").arg(&a).args(["pair", "revoke", "cloudlet-b"]).output();
    pair_cloudlets(&a, &b, "cloudlet-b", &addr_a, &work);
    let daemon_a = serve_with(&link.a, &a, 7878, 7879, "cloudlet-a", &probe_env, &["--no-advertise"]);
    drop(daemon_b);
    let daemon_b = serve_b(&probe_env, &["--no-advertise"]);
    std::thread::sleep(Duration::from_secs(2));
    let (mut at, _dev7, _dev7_out) = offload(&link.a, &device, &addr_a);
    assert!(ask(&link.a, &at, "grow 8").starts_with("ok "));
    assert!(ask(&link.a, &at, "churn 1024").starts_with("ok hot="));
    for run in 0..20 {
        let (ns, data, to) = if run % 2 == 0 { (&link.a, &a, &addr_b) } else { (&link.b, &b, &addr_a) };
        let r = handoff(ns, data, &at, to, 7879).unwrap_or_else(|e| panic!("run {run}: {e}"));
        let id = r["instance"].as_str().unwrap();
        for what in ["memory", "disk"] {
            let side = |s: &str| probe.join(format!("{id}.{s}.{what}"));
            let differ = differing_pages(&side("source"), &side("destination"));
            assert!(
                differ.is_empty(),
                "run {run}: {} {what} pages differ, first {:?}: {r}",
                differ.len(),
                &differ[..8.min(differ.len())]
            );
            let _ = std::fs::remove_file(side("source"));
            let _ = std::fs::remove_file(side("destination"));
        }
        at = moved_to(&r, &at);
        assert!(ask(&link.a, &at, "count").starts_with("ok "), "run {run}: the moved instance answers");
    }
    eprintln!("20 handoffs under writes: memory and disk equal page by page every time");
    let stopped = forage_in(&link.a, &a, &["stop", &at.addr, "--api", "127.0.0.1:7879"]);
    assert!(stopped.status.success(), "{}", String::from_utf8_lossy(&stopped.stderr));

    // 8. Drain: every instance of A moves to B (B as it normally runs, announcing itself).
    drop(daemon_b);
    let _daemon_b = serve_b(&[], &[]);
    std::thread::sleep(Duration::from_secs(2));
    let out = forage_in(&link.a, &a, &["drain", "--to", &addr_b, "--api", "127.0.0.1:7879", "--json"]);
    assert!(out.status.success(), "drain: {}", String::from_utf8_lossy(&out.stderr));
    let drained: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(drained["moved"].as_array().map(Vec::len), Some(1), "A ran one instance: {drained}");
    let at_b = moved_to(&drained["moved"][0], &endpoint);
    assert_eq!(field(&ask(&link.a, &at_b, "count"), "served"), before, "drained with its state");
    wait_no_sessions(&a, Duration::from_secs(20));

    // 9. Device-initiated: the device asks its instance to follow it to B (`follow
    //    HOST:PORT` on the held command's stdin); a request it cannot carry out is
    //    refused and the instance stays.
    let (endpoint, mut dev8, mut dev8_out) = offload(&link.a, &device, &addr_a);
    assert!(ask(&link.a, &endpoint, "grow 4").starts_with("ok "));
    let before = field(&ask(&link.a, &endpoint, "count"), "served");
    let stdin = dev8.0.stdin.as_mut().unwrap();
    // Not an address; an address A holds no pairing for (B's SSH port): neither is tried
    // with another cloudlet's credentials.
    stdin.write_all(format!("follow nowhere\nfollow {}:22\n", link.b.addr).as_bytes()).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(field(&ask(&link.a, &endpoint, "count"), "served"), before, "a bad Follow changes nothing");
    stdin.write_all(format!("follow {addr_b}\n").as_bytes()).unwrap();
    let moved = heard_move(&mut dev8_out);
    assert_eq!(moved.moved_to, addr_b, "{moved:?}");
    assert_eq!(field(&ask(&link.a, &moved.service, "count"), "served"), before, "it followed with its state");
    wait_no_sessions(&a, Duration::from_secs(20));
    let log = std::fs::read_to_string(a.join("serve.log")).unwrap();
    assert!(log.contains("reason=device"), "A logs why it moved");

    // 10. The load policy: A, restarted with a memory threshold its host exceeds, moves a
    //    new instance to B, which announces room (mDNS) and is paired; its device hears.
    drop(daemon_a);
    let _daemon_a = serve_with(
        &link.a,
        &a,
        7878,
        7879,
        "cloudlet-a",
        &[],
        &["--move-when-memory-above", "0", "--move-check-s", "1"],
    );
    std::thread::sleep(Duration::from_secs(1));
    let (_endpoint, _dev6, mut dev6_out) = offload(&link.a, &device, &addr_a);
    let moved = heard_move(&mut dev6_out);
    assert_eq!(moved.moved_to, addr_b, "{moved:?}");
    let at_b: ServiceEndpoint = moved.service.clone();
    assert!(ask(&link.a, &at_b, "search followed 8").starts_with("ok "));
    wait_no_sessions(&a, Duration::from_secs(20));
    let log = std::fs::read_to_string(a.join("serve.log")).unwrap();
    assert!(log.contains("load policy: moving an instance") && log.contains("reason=load"), "A logs why it moved");
}
