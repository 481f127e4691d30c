//! A device driven by hand for the synthesis tests, and a plain HTTP server of one file.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use forage_client::OverlayFile;
use forage_proto::asynchronous::{read, write};
use forage_proto::{DeviceMessage as Message, Offer};
use forage_testkit::guest::credentials;

/// A hand-driven device speaking the protocol, to control what is sent when.
pub struct RawDevice {
    pub stream: forage_client::CloudletStream,
    pub ov: OverlayFile,
}

impl RawDevice {
    /// Hello with early start, offering `ovl` (for `base_digest`, or its own base).
    pub async fn start(addr: SocketAddr, ovl: &Path, base_digest: Option<&str>) -> (Self, Message) {
        Self::start_with(addr, ovl, base_digest, true).await
    }

    pub async fn start_with(
        addr: SocketAddr,
        ovl: &Path,
        base_digest: Option<&str>,
        early_start: bool,
    ) -> (Self, Message) {
        let ov = OverlayFile::open(ovl).await.unwrap();
        let mut stream = forage_client::connect(addr, credentials(), None).await.unwrap();
        let offer = Offer {
            base_digest: base_digest.unwrap_or(&ov.manifest.base.digest).into(),
            manifest_bytes: ov.prefix.len() as u64,
            overlay_bytes: ov.bytes,
            overlay_digest: ov.digest.clone(),
            signature: ov.signature.clone(),
        };
        write(
            &mut stream,
            &Message::Hello {
                versions: (2, 2),
                device: "raw".into(),
                offers: vec![offer],
                early_start,
                store_and_forward: false,
            },
        )
        .await
        .unwrap();
        let welcome = read(&mut stream).await.unwrap();
        (Self { stream, ov }, welcome)
    }

    pub async fn send_manifest(&mut self) {
        write(&mut self.stream, &Message::Manifest { bytes: self.ov.prefix.clone() }).await.unwrap();
    }

    pub fn segment(&self, i: u32) -> Message {
        use std::os::unix::fs::FileExt;
        let mut at = self.ov.prefix.len() as u64;
        for s in &self.ov.manifest.segments[..i as usize] {
            at += s.compressed_len;
        }
        let mut data = vec![0u8; self.ov.manifest.segments[i as usize].compressed_len as usize];
        std::fs::File::open(&self.ov.path).unwrap().read_exact_at(&mut data, at).unwrap();
        Message::Segment { index: i, bytes: data }
    }

    pub async fn send_segment(&mut self, i: u32) {
        let m = self.segment(i);
        write(&mut self.stream, &m).await.unwrap();
    }
}

/// A minimal HTTP/1.1 server of one file, with byte ranges or without.
pub fn serve_file(path: PathBuf, ranges: bool) -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let p = path.clone();
            std::thread::spawn(move || serve_conn(conn, &p, ranges));
        }
    });
    addr
}

fn serve_conn(mut c: std::net::TcpStream, path: &Path, ranges: bool) {
    use std::io::{BufRead, BufReader, Write};
    let mut r = BufReader::new(c.try_clone().unwrap());
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut range = None;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                range = Some(v.trim().to_string());
            }
        }
        let data = std::fs::read(path).unwrap();
        let (status, body) = match range.filter(|_| ranges) {
            Some(rg) => {
                let (a, b) = rg.split_once('-').unwrap();
                let a: usize = a.parse().unwrap();
                let b: usize =
                    if b.is_empty() { data.len() - 1 } else { b.parse::<usize>().unwrap().min(data.len() - 1) };
                ("206 Partial Content", data[a..=b].to_vec())
            }
            None => ("200 OK", data),
        };
        if write!(c, "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n", body.len()).is_err()
            || c.write_all(&body).is_err()
        {
            return;
        }
    }
}
