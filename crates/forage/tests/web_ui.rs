//! The cloudlet manager (the web UI `forage serve` serves on its API address) in headless
//! Chromium, against real cloudlets: two `forage serve` in two network namespaces joined
//! by a shaped link, a device in the first one, the browser beside it (`browser`).
//!
//! 1. the page loads read-only; its first load's weight is written down;
//! 2. sign-in with the API token sets an HttpOnly, SameSite=Strict cookie;
//! 3. an instance a device starts appears without a reload; changes without the cookie,
//!    with a wrong CSRF token, or from another origin are refused and change nothing;
//!    it is stopped from the page, and is gone from the host;
//! 4. a one-time code made on the page pairs a device: its QR code, read off the
//!    screenshot, says the same code;
//! 5. a handoff started from the page: its chart gets points while it runs;
//! 6. every view is written as a PNG at 1280x800 and at 800 px wide.
//!
//! Screenshots and the page weight go to `target/web-ui/`.

mod browser;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::Locator;
use forage_client::ServiceEndpoint;
use forage_testkit::guest::*;
use forage_testkit::wan::{Netns, WanLink};

const EXE: &str = env!("CARGO_BIN_EXE_forage");
const VIEWS: [(&str, char); 6] =
    [("overview", '1'), ("instances", '2'), ("sessions", '3'), ("devices", '4'), ("handoffs", '5'), ("network", '6')];

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn forage_at(data: &Path, args: &[&str]) -> String {
    let out = Command::new(EXE).arg("--data-dir").arg(data).args(args).output().unwrap();
    assert!(out.status.success(), "forage {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn serve(ns: &Netns, data: &Path, name: &str) -> Kill {
    let log = std::fs::File::create(data.join("serve.log")).unwrap();
    let child = ns
        .command(EXE)
        .arg("--data-dir")
        .arg(data)
        .args(["serve", "--listen", &format!("{}:7878", ns.addr), "--api", "127.0.0.1:7879", "--name", name])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Kill(child)
}

/// A device in `ns` holding a cached-VM instance of the test's service; its endpoint.
fn offload(ns: &Netns, device: &Path, cloudlet: &str) -> (ServiceEndpoint, Kill) {
    let mut child = ns
        .command(EXE)
        .arg("--data-dir")
        .arg(device)
        .args(["offload", "--service", "ui-hs", "--cloudlet", cloudlet, "--request", "count", "--hold", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let report: forage_client::ProvisionReport =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("offload printed {line:?}: {e}"));
    (report.service, Kill(child))
}

/// One request through the forwarder to a cloudlet's API; (status, body).
fn http(api: std::net::SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut r = ureq::request(method, &format!("http://{api}{path}"));
    for (k, v) in headers {
        r = r.set(k, v);
    }
    match r.call() {
        Ok(a) => (a.status(), a.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(s, a)) => (s, a.into_string().unwrap_or_default()),
        Err(e) => panic!("{method} {path}: {e}"),
    }
}

fn instances(api: std::net::SocketAddr, all: bool) -> forage_api::InstanceList {
    let (status, body) = http(api, "GET", &format!("/v1/instances?all={all}"), &[]);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn the_cloudlet_manager_in_chromium() {
    let root = std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")));
    if let Some(why) = browser::missing() {
        eprintln!("skipped: {why}");
        return;
    }
    if skip_vm_tests() || !root {
        eprintln!("skipped: needs QEMU and root (network namespaces)");
        return;
    }
    let t0 = Instant::now();
    // Cloudlet A: the test data folder (its image), a base and a service VM of hashsearch;
    // B holds the same service VM (its package).
    let data = data_dir();
    image();
    let a = data.root().to_path_buf();
    let app_dir = forage_image::locate_guest_binary("apps/hashsearch").expect("make guest");
    let _ = forage_synth::BaseVm::remove(&data, "uitest");
    let _ = forage_service::Repository::new(&data).remove("ui-hs");
    forage_at(&a, &["base", "create", "uitest", "--image", "tiny", "--settle-s", "3"]);
    forage_at(&a, &["service", "create", "ui-hs", "--base", "uitest", "--app", &app_dir.to_string_lossy()]);
    let work = data.root().join("web-ui-test");
    let _reaper = Reaper::new(&[work.clone(), data.work()]);
    let _ = std::fs::remove_dir_all(&work);
    let (b, device, tablet) = (work.join("b"), work.join("device"), work.join("tablet"));
    for d in [&b, &device, &tablet] {
        std::fs::create_dir_all(d).unwrap();
    }
    let pkg = work.join("ui-hs.fsvc");
    forage_at(&a, &["service", "export", "ui-hs", "-o", &pkg.to_string_lossy()]);
    std::fs::create_dir_all(b.join("images")).unwrap();
    assert!(Command::new("cp")
        .arg("-r")
        .arg(data.images().join("tiny"))
        .arg(b.join("images"))
        .status()
        .unwrap()
        .success());
    forage_at(&b, &["service", "import", &pkg.to_string_lossy(), "--id", "ui-hs"]);
    let link = WanLink::create(20.0).expect("namespaces");
    let (addr_a, addr_b) = (format!("{}:7878", link.a.addr), format!("{}:7878", link.b.addr));
    let bundle = work.join("a-for-b.json");
    forage_at(
        &b,
        &["pair", "--bundle", &bundle.to_string_lossy(), "--name", "ui-a", "--as-cloudlet", "--addr", &addr_b],
    );
    forage_at(&a, &["pair", "import", &bundle.to_string_lossy()]);
    for name in ["ui-phone", "ui-tablet"] {
        let _ = Command::new(EXE).arg("--data-dir").arg(&a).args(["pair", "revoke", name]).output();
    }
    let dev_bundle = work.join("phone.json");
    forage_at(&a, &["pair", "--bundle", &dev_bundle.to_string_lossy(), "--name", "ui-phone", "--addr", &addr_a]);
    forage_at(&device, &["pair", "import", &dev_bundle.to_string_lossy()]);
    let _serve_a = serve(&link.a, &a, "cloudlet-a");
    let _serve_b = serve(&link.b, &b, "cloudlet-b");
    let api_a = browser::forward_into(&link.a, "127.0.0.1:7879".parse().unwrap());
    let api_b = browser::forward_into(&link.b, "127.0.0.1:7879".parse().unwrap());
    let t = Instant::now();
    while ureq::get(&format!("http://{api_a}/v1/status")).call().is_err() {
        assert!(t.elapsed() < Duration::from_secs(30), "cloudlet A's API did not answer");
        std::thread::sleep(Duration::from_millis(200));
    }
    let token = forage_api::token::read(&forage_daemon::api_token_path(&data)).unwrap();
    let out = std::env::current_exe().unwrap().ancestors().nth(3).unwrap().join("web-ui");
    std::fs::create_dir_all(&out).unwrap();
    eprintln!("set up in {:.0} s", t0.elapsed().as_secs_f64());

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let t1 = Instant::now();
        let web = browser::Browser::start(&link.a).await;
        let page = "http://127.0.0.1:7879/";
        web.client.goto(page).await.unwrap();
        web.wait_for("#live-dot.live", Duration::from_secs(20)).await;
        // The feed is open before its first message: the caller's rights come in "hello",
        // before the first "status".
        web.until("return S.status !== null", Duration::from_secs(10)).await;

        // 1. Read-only on loopback; the first load's weight.
        assert_eq!(web.client.find(Locator::Css("#who-text")).await.unwrap().text().await.unwrap(), "read-only");
        assert!(web.js::<bool>("return document.querySelector('#pair-make').disabled").await);
        let rows: Vec<(String, u64, u64)> = web
            .js("const e = performance.getEntriesByType('navigation').concat(performance.getEntriesByType('resource'))
                   .filter(e => !e.name.includes('/v1/'));
                 return e.map(x => [x.name.replace(location.origin, ''), x.transferSize, x.encodedBodySize]);")
            .await;
        let (transfer, body): (u64, u64) = rows.iter().fold((0, 0), |s, r| (s.0 + r.1, s.1 + r.2));
        let mut report = format!("first load of {page}: {transfer} bytes transferred ({body} bytes of files)\n");
        for (name, t, b) in &rows {
            report.push_str(&format!("  {name:<16} {t:>7} {b:>7}\n"));
        }
        std::fs::write(out.join("page-weight.txt"), &report).unwrap();
        eprint!("{report}");
        // The icon is asked for twice (the header's image and the tab's icon): one file.
        let files: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        assert_eq!(files.len(), 5, "the page and its four files, nothing else: {rows:?}");
        assert!(body < 100_000, "{body} bytes");

        // 2. Sign in with the API token.
        web.client.find(Locator::Css("#signin-open")).await.unwrap().click().await.unwrap();
        web.client.find(Locator::Css("#signin-token")).await.unwrap().send_keys("not the token").await.unwrap();
        web.client.find(Locator::Css("#signin-form button[type=submit]")).await.unwrap().click().await.unwrap();
        web.until(
            "return document.querySelector('#signin-error').textContent.includes('not this cloudlet')",
            Duration::from_secs(5),
        )
        .await;
        let field = web.client.find(Locator::Css("#signin-token")).await.unwrap();
        field.clear().await.unwrap();
        field.send_keys(&format!("{token}\n")).await.unwrap();
        web.until("return document.querySelector('#who-text').textContent === 'signed in'", Duration::from_secs(10))
            .await;
        let cookies = web.client.get_all_cookies().await.unwrap();
        let session = cookies.iter().find(|c| c.name() == "forage_session").expect("the session cookie");
        assert_eq!(session.http_only(), Some(true));
        assert_eq!(session.same_site().map(|s| s.to_string()).as_deref(), Some("Strict"));
        let cookie = format!("forage_session={}", session.value());
        assert!(
            !web.js::<bool>("return document.cookie.includes('forage_session')").await,
            "HttpOnly: no script reads it"
        );

        // 3. A device starts an instance: it appears without a reload.
        web.js::<()>("window.__same_page = 'yes'").await;
        web.client.find(Locator::Css("a[data-view=instances]")).await.unwrap().click().await.unwrap();
        let (endpoint, phone) = offload(&link.a, &device, &addr_a);
        let id =
            instances(api_a, false).instances.into_iter().find(|i| i.endpoint == endpoint.addr).expect("listed").id;
        let row = format!("tr[data-instance-id='{id}']");
        web.wait_for(&row, Duration::from_secs(10)).await;
        assert_eq!(web.js::<String>("return window.__same_page").await, "yes", "no reload");
        let shown = web.client.find(Locator::Css(&row)).await.unwrap().text().await.unwrap();
        assert!(shown.contains("cached vm") && shown.contains("ui-phone") && shown.contains(&endpoint.addr), "{shown}");

        // Changes without the cookie, with a wrong CSRF token or from another origin.
        let csrf: String = web.js("return S.csrf").await;
        let stop_path = format!("/v1/instances/{id}");
        for (headers, status) in [
            (vec![], 401),
            (vec![("cookie", cookie.as_str())], 403),
            (vec![("cookie", cookie.as_str()), ("x-csrf-token", "0000")], 403),
            (vec![("cookie", cookie.as_str()), ("x-csrf-token", &csrf[..63])], 403),
            (vec![("cookie", cookie.as_str()), ("x-csrf-token", csrf.as_str()), ("origin", "http://127.0.0.1:9")], 403),
            (vec![("cookie", "forage_session=forged"), ("x-csrf-token", csrf.as_str())], 401),
        ] {
            let shown = format!("{headers:?}");
            let (got, body) = http(api_a, "DELETE", &stop_path, &headers);
            assert_eq!(got, status, "{shown}: {body}");
        }
        let from_page: u16 = web
            .js_async(&format!(
                "const done = arguments[0]; fetch('{stop_path}', {{method: 'DELETE'}}).then(r => done(r.status))"
            ))
            .await;
        assert_eq!(from_page, 403, "the page's own cookie without the CSRF token");
        let (bad_reconnect, body) = http(api_a, "GET", "/v1/events", &[("last-event-id", "'; DROP TABLE")]);
        assert_eq!(bad_reconnect, 400, "{body}");
        let still = instances(api_a, false);
        let record = still.instances.iter().find(|i| i.id == id).expect("refused changes changed nothing");
        assert!(Path::new(&format!("/proc/{}", record.qemu_pid)).exists());
        let (pid, dir) = (record.qemu_pid, record.dir.clone());

        // Stopped from the page: gone from the page and from the host.
        let stop = format!("{row} button[data-action=stop]");
        web.client.find(Locator::Css(&stop)).await.unwrap().click().await.unwrap();
        web.client.find(Locator::Css(&stop)).await.unwrap().click().await.unwrap();
        web.until(&format!("return !document.querySelector(\"{row}\")"), Duration::from_secs(30)).await;
        let t = Instant::now();
        while (Path::new(&format!("/proc/{pid}")).exists() || Path::new(&dir).exists())
            && t.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "QEMU {pid} still runs");
        assert!(!Path::new(&dir).exists(), "{dir} is still there");
        let after = instances(api_a, true).instances.into_iter().find(|i| i.id == id).unwrap();
        assert_eq!(after.status, forage_api::InstanceStatus::Stopped);
        drop(phone);

        // 4. A one-time code made on the page pairs a device; its QR code says the same.
        web.client.find(Locator::Css("a[data-view=devices]")).await.unwrap().click().await.unwrap();
        web.client.find(Locator::Css("#pair-make")).await.unwrap().click().await.unwrap();
        web.until("return document.querySelector('#pair-code').textContent.length > 20", Duration::from_secs(10)).await;
        let code = web.client.find(Locator::Css("#pair-code")).await.unwrap().text().await.unwrap();
        let qr = web.client.find(Locator::Css("#pair-qr")).await.unwrap().screenshot().await.unwrap();
        std::fs::write(out.join("pairing-qr.png"), &qr).unwrap();
        let uri: forage_trust::PairingUri = browser::read_qr(&qr).parse().unwrap();
        assert_eq!(
            (uri.code.as_str(), uri.cloudlet.to_string(), uri.name.as_str()),
            (code.as_str(), addr_a.clone(), "cloudlet-a")
        );
        let paired = link
            .a
            .command(EXE)
            .arg("--data-dir")
            .arg(&tablet)
            .args(["pair", "--uri", &uri.to_string(), "--name", "ui-tablet"])
            .output()
            .unwrap();
        assert!(paired.status.success(), "{}", String::from_utf8_lossy(&paired.stderr));
        web.wait_for("tr[data-credential='ui-tablet']", Duration::from_secs(10)).await;

        // 5. A handoff from the page: its chart gets points while it runs.
        web.client.find(Locator::Css("a[data-view=instances]")).await.unwrap().click().await.unwrap();
        let (endpoint, _phone) = offload(&link.a, &device, &addr_a);
        let (ep, ns) = (endpoint.clone(), link.a.clone());
        let grown = ns
            .run(move || forage_client::service::request_line(&ep, "grow 24", Duration::from_secs(120)))
            .unwrap()
            .unwrap();
        assert!(grown.starts_with("ok"), "{grown}");
        let id = instances(api_a, false).instances.into_iter().find(|i| i.endpoint == endpoint.addr).unwrap().id;
        let row = format!("tr[data-instance-id='{id}']");
        web.wait_for(&format!("{row} button[data-action=handoff]"), Duration::from_secs(10))
            .await
            .click()
            .await
            .unwrap();
        web.client.find(Locator::Css("#handoff-to")).await.unwrap().send_keys(&format!("{addr_b}\n")).await.unwrap();
        let mut seen: Vec<(String, u64)> = Vec::new();
        let t = Instant::now();
        loop {
            let now: (String, u64) = web
                .js("const s = document.querySelector('#handoff-chart svg');
                     return s ? [s.dataset.status, Number(s.dataset.points)] : ['', 0]")
                .await;
            if seen.last() != Some(&now) {
                seen.push(now.clone());
            }
            if now.0 == "done" || now.0 == "failed" {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(300), "the handoff did not end: {seen:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("chart (status, points) as it changed: {seen:?}");
        let running: Vec<u64> = seen.iter().filter(|s| s.0 == "running").map(|s| s.1).collect();
        assert!(running.iter().filter(|&&n| n > 0).count() >= 3, "points arrived while it ran: {seen:?}");
        assert_eq!(seen.last().unwrap().0, "done", "{seen:?}");
        assert!(seen.last().unwrap().1 >= *running.iter().max().unwrap());
        // The chart says done when the handoff's outcome is known; A's record of the
        // instance ends just after.
        let t = Instant::now();
        while instances(api_a, false).instances.iter().any(|i| i.id == id) && t.elapsed() < Duration::from_secs(20) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(instances(api_a, false).instances.iter().all(|i| i.id != id), "gone from A");
        // B names what it received itself; it ran nothing before.
        let at_b = instances(api_b, false).instances;
        assert_eq!(at_b.len(), 1, "running on B: {at_b:?}");

        // The sessions' bars, and the network as mDNS shows it.
        let bars: u32 = web.js("return document.querySelectorAll('#sessions svg.breakdown rect.answer').length").await;
        assert!(bars >= 2, "first-response bars: {bars}");
        web.until("return S.cloudlets.cloudlets.some(c => c.name === 'cloudlet-b')", Duration::from_secs(30)).await;

        // 6. Every view at 1280x800 and at 800 px wide, with an instance running.
        let (endpoint, _tablet_phone) = offload(&link.a, &device, &addr_a);
        let id = instances(api_a, false).instances.into_iter().find(|i| i.endpoint == endpoint.addr).unwrap().id;
        web.wait_for(&format!("tr[data-instance-id='{id}']"), Duration::from_secs(10)).await;
        let mut shots = Vec::new();
        for (w, h) in [(1280, 800), (800, 1100)] {
            web.viewport(w, h).await;
            for (view, key) in VIEWS {
                shots.push(web.screenshot(view, key, &out).await);
            }
        }
        // The meters are as full as they say (the policy drops inline style attributes).
        web.client.find(Locator::Css("body")).await.unwrap().send_keys("1").await.unwrap();
        // Once the overview is laid out (a bar not yet drawn has no width: -1).
        let mut meters: Vec<(f64, f64)> = Vec::new();
        for _ in 0..100 {
            meters = web
                .js("return [...document.querySelectorAll('#ov-load .bar')].map(b => {
                       const w = b.getBoundingClientRect().width;
                       return [w > 0 ? b.firstChild.getBoundingClientRect().width / w * 100 : -1,
                               Number(b.getAttribute('aria-valuenow'))]; })")
                .await;
            if meters.len() == 4 && meters.iter().all(|(drawn, _)| *drawn >= 0.0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(meters.len(), 4, "load 1, 5, 15 min and memory");
        assert!(meters.iter().all(|(drawn, said)| (drawn - said.min(100.0)).abs() < 2.0), "{meters:?}");
        let wide: bool = web.js("return document.documentElement.scrollWidth <= window.innerWidth").await;
        assert!(wide, "nothing wider than 800 px but the tables' own scrolling");
        for s in &shots {
            eprintln!("screenshot {}", s.display());
        }
        web.close().await;
        eprintln!("browser part took {:.0} s", t1.elapsed().as_secs_f64());
    });
}
