//! Headless Chromium for the web UI's tests, driven over WebDriver: Debian's
//! `chromedriver` (the `chromium-driver` package, the same build as `chromium`) started
//! inside a network namespace, so the browser sees that namespace's loopback, where a
//! cloudlet's API listens; the test reaches chromedriver (and the API) through a small
//! TCP forwarder whose far ends are opened inside the namespace.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use forage_testkit::wan::Netns;

/// Why the browser tests cannot run here, if they cannot.
pub fn missing() -> Option<String> {
    for tool in ["chromium", "chromedriver"] {
        let found = std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
        if !found {
            return Some(format!("{tool} is not installed (scripts/deps.sh installs chromium and chromium-driver)"));
        }
    }
    None
}

/// Accepts on loopback here and connects each connection to `target` inside `ns`.
pub fn forward_into(ns: &Netns, target: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let here = listener.local_addr().unwrap();
    let ns = ns.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let far = match ns.run(|| TcpStream::connect_timeout(&target, Duration::from_secs(5))) {
                Ok(Ok(s)) => s,
                _ => continue,
            };
            for (mut from, mut to) in [(client.try_clone().unwrap(), far.try_clone().unwrap()), (far, client)] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    here
}

pub struct Browser {
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Chromium, headless, at 1280x800, in `ns`.
    pub async fn start(ns: &Netns) -> Browser {
        let port = 9515;
        let driver = ns
            .command("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver");
        let addr = forward_into(ns, SocketAddr::from(([127, 0, 0, 1], port)));
        let t = Instant::now();
        while ureq::get(&format!("http://{addr}/status")).call().is_err() {
            assert!(t.elapsed() < Duration::from_secs(30), "chromedriver did not answer within 30 s");
            std::thread::sleep(Duration::from_millis(200));
        }
        let profile = tempfile::tempdir().unwrap();
        let args = vec![
            "--headless=new".to_string(),
            // As root, Chromium's own sandbox cannot start; the test runs it in a namespace
            // of its own, reaching only the cloudlets' loopback and test link.
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--hide-scrollbars".into(),
            "--force-device-scale-factor=1".into(),
            "--window-size=1280,800".into(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), "chrome".into());
        caps.insert("goog:chromeOptions".into(), serde_json::json!({ "binary": "/usr/bin/chromium", "args": args }));
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://{addr}"))
            .await
            .expect("a WebDriver session with Chromium");
        Browser { client, driver, _profile: profile }
    }

    /// Waits until `css` matches, up to `within`.
    pub async fn wait_for(&self, css: &str, within: Duration) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(within)
            .every(Duration::from_millis(100))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css} did not appear within {within:?}: {e}"))
    }

    /// Runs `script` (a function body) in the page and returns what it returns, as `T`.
    pub async fn js<T: serde::de::DeserializeOwned>(&self, script: &str) -> T {
        let v = self.client.execute(script, vec![]).await.unwrap_or_else(|e| panic!("{script}: {e}"));
        serde_json::from_value(v).unwrap_or_else(|e| panic!("{script}: {e}"))
    }

    /// Runs `script` (a function body whose last argument is the callback) to its end.
    pub async fn js_async<T: serde::de::DeserializeOwned>(&self, script: &str) -> T {
        let v = self.client.execute_async(script, vec![]).await.unwrap_or_else(|e| panic!("{script}: {e}"));
        serde_json::from_value(v).unwrap_or_else(|e| panic!("{script}: {e}"))
    }

    /// Waits until `script` returns true, up to `within`.
    pub async fn until(&self, script: &str, within: Duration) {
        let t = Instant::now();
        while !self.js::<bool>(script).await {
            assert!(t.elapsed() < within, "not true within {within:?}: {script}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sets the viewport to `width` x `height` CSS pixels.
    pub async fn viewport(&self, width: u32, height: u32) {
        self.client.set_window_size(width, height).await.unwrap();
        // The window's outer size and the viewport may differ: correct once.
        let (iw, ih): (u32, u32) = self.js("return [window.innerWidth, window.innerHeight]").await;
        if (iw, ih) != (width, height) {
            self.client.set_window_size(2 * width - iw, 2 * height - ih).await.unwrap();
        }
    }

    /// Shows `view` (by its keyboard shortcut) and writes a screenshot of the viewport.
    pub async fn screenshot(&self, view: &str, key: char, out: &Path) -> PathBuf {
        self.client.find(Locator::Css("body")).await.unwrap().send_keys(&key.to_string()).await.unwrap();
        self.until(&format!("return !document.querySelector('#view-{view}').hidden"), Duration::from_secs(5)).await;
        self.js::<()>("window.scrollTo(0, 0)").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let png = self.client.screenshot().await.unwrap();
        let size: String = self.js("return window.innerWidth + 'x' + window.innerHeight").await;
        let path = out.join(format!("{view}-{size}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// The text a QR code in a PNG says (the first one found).
pub fn read_qr(png: &[u8]) -> String {
    let decoder = png::Decoder::new(std::io::Cursor::new(png));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let (w, h) = (info.width as usize, info.height as usize);
    let mut image = rqrr::PreparedImage::prepare_from_greyscale(w, h, |x, y| {
        let p = &buf[(y * w + x) * channels..];
        // Luma of RGB(A) or grey.
        if channels >= 3 {
            ((p[0] as u32 * 299 + p[1] as u32 * 587 + p[2] as u32 * 114) / 1000) as u8
        } else {
            p[0]
        }
    });
    let grids = image.detect_grids();
    assert!(!grids.is_empty(), "no QR code in the {w}x{h} image");
    grids[0].decode().expect("a readable QR code").1
}
