//! The tiny image's bench app: hashsearch shipped with a data set in a tarball that its
//! install step unpacks and deletes (as the paper's apps downloaded and deleted their
//! install packages), and that the service preloads into memory.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use serde_json::json;

/// The bench app: hashsearch shipped with a data set in a tarball that the install step
/// unpacks and deletes, and that the service preloads into memory.
pub fn bench_app(work: &Path, data_mib: u64) -> anyhow::Result<PathBuf> {
    let sample = forage_image::locate_guest_binary("apps/hashsearch")?;
    let dir = work.join("app");
    let stage = work.join("payload");
    std::fs::create_dir_all(&dir)?;
    std::fs::create_dir_all(&stage)?;
    std::fs::copy(sample.join("hashsearch"), dir.join("hashsearch"))?;
    std::fs::write(stage.join("data.bin"), dataset(data_mib << 20))?;
    let ok = Command::new("tar")
        .arg("czf")
        .arg(dir.join("payload.tar.gz"))
        .arg("-C")
        .arg(&stage)
        .arg("data.bin")
        .status()
        .context("running tar")?;
    anyhow::ensure!(ok.success(), "tar failed");
    std::fs::write(
        dir.join("app.json"),
        json!({
            "format": 1, "name": "hashsearch-bench", "port": 8080,
            "install": ["sh", "-c", "tar xzf payload.tar.gz && rm payload.tar.gz"],
            "start": ["./hashsearch", "8080", "--preload", "data.bin"],
            "probe": "search bench 12",
        })
        .to_string(),
    )?;
    Ok(dir)
}

/// A deterministic data set that compresses like text (about 3:1).
fn dataset(len: u64) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "cloudlet",
        "overlay",
        "synthesis",
        "handoff",
        "edge",
        "vm",
        "base",
        "chunk",
        "segment",
        "delta",
        "mobile",
        "offload",
        "latency",
        "fluid",
        "object",
        "speech",
        "face",
    ];
    let mut out = Vec::with_capacity(len as usize);
    let mut x: u64 = 0x2545F4914F6CDD1D;
    while (out.len() as u64) < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(WORDS[(x % WORDS.len() as u64) as usize].as_bytes());
        out.extend_from_slice(format!(" {} ", x % 10_000).as_bytes());
    }
    out.truncate(len as usize);
    out
}
