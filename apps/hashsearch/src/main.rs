//! hashsearch: the sample service backend forage installs into guests.
//!
//! It answers, over TCP, a hash-heavy search worth offloading from a phone: find the
//! smallest nonce such that SHA-256(`text` || nonce as decimal) starts with `bits` zero
//! bits. It also counts the requests it has served, so a VM that was saved and resumed
//! can show that its state carried on.
//!
//! Protocol, one line each way:
//! ```text
//! search <text> <bits>   ->  ok nonce=<n> hash=<hex> served=<count> ms=<elapsed>
//! count                  ->  ok served=<count> preloaded=<bytes>
//! anything else          ->  error <reason>
//! ```

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};

const MAX_BITS: u32 = 28;
static PRELOADED: AtomicU64 = AtomicU64::new(0);
const MAX_LINE: u64 = 4096;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port: u16 = args.get(1).and_then(|p| p.parse().ok()).unwrap_or(8080);
    // `--preload FILE`: keep a data set in memory (as a real backend keeps its model).
    if let Some(path) = args.iter().position(|a| a == "--preload").and_then(|i| args.get(i + 1)) {
        let n = preload(path).unwrap_or_else(|e| {
            eprintln!("hashsearch: cannot preload {path}: {e}");
            std::process::exit(1);
        });
        PRELOADED.store(n as u64, Ordering::SeqCst);
    }
    let listener = TcpListener::bind(("0.0.0.0", port)).unwrap_or_else(|e| {
        eprintln!("hashsearch: cannot listen on port {port}: {e}");
        std::process::exit(1);
    });
    eprintln!("hashsearch: listening on port {port}");
    let served = Arc::new(AtomicU64::new(0));
    for conn in listener.incoming().flatten() {
        let served = served.clone();
        std::thread::spawn(move || {
            let _ = serve(conn, &served);
        });
    }
}

/// Read a data set into a page-aligned buffer kept for the life of the process (as a
/// backend keeps a model in memory; aligned as numerical libraries align their buffers).
fn preload(path: &str) -> std::io::Result<usize> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len() as usize;
    let layout = std::alloc::Layout::from_size_align(len.max(1), 4096).map_err(std::io::Error::other)?;
    // SAFETY: the layout has non-zero size; the buffer is leaked on purpose (it lives as
    // long as the process) and only written through this exclusive slice.
    let buf = unsafe {
        let p = std::alloc::alloc_zeroed(layout);
        if p.is_null() {
            return Err(std::io::Error::other("out of memory"));
        }
        std::slice::from_raw_parts_mut(p, len)
    };
    f.read_exact(buf)?;
    Ok(len)
}

fn serve(conn: TcpStream, served: &AtomicU64) -> std::io::Result<()> {
    let mut out = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if std::io::Read::take(&mut reader, MAX_LINE).read_line(&mut line)? == 0 {
            return Ok(());
        }
        let answer = answer(line.trim(), served);
        writeln!(out, "{answer}")?;
    }
}

fn answer(line: &str, served: &AtomicU64) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["count"] => format!("ok served={} preloaded={}", served.load(Ordering::SeqCst), PRELOADED.load(Ordering::SeqCst)),
        ["search", text, bits] => match bits.parse::<u32>() {
            Ok(bits) if bits <= MAX_BITS => {
                let start = Instant::now();
                let (nonce, hash) = search(text.as_bytes(), bits);
                let n = served.fetch_add(1, Ordering::SeqCst) + 1;
                format!(
                    "ok nonce={nonce} hash={} served={n} ms={}",
                    hex::encode(hash),
                    start.elapsed().as_millis()
                )
            }
            _ => format!("error bits must be a number from 0 to {MAX_BITS}"),
        },
        _ => "error usage: search <text> <bits> | count".to_string(),
    }
}

/// The smallest nonce whose hash has `bits` leading zero bits.
fn search(text: &[u8], bits: u32) -> (u64, [u8; 32]) {
    let prefix = Sha256::new_with_prefix(text);
    for nonce in 0u64.. {
        let hash: [u8; 32] = prefix.clone().chain_update(nonce.to_string()).finalize().into();
        if leading_zero_bits(&hash) >= bits {
            return (nonce, hash);
        }
    }
    unreachable!("the nonce space is not exhausted before a match")
}

fn leading_zero_bits(hash: &[u8]) -> u32 {
    let mut n = 0;
    for b in hash {
        if *b == 0 {
            n += 8;
        } else {
            return n + b.leading_zeros();
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_finds_a_hash_with_enough_zero_bits() {
        let (nonce, hash) = search(b"forage", 12);
        assert!(leading_zero_bits(&hash) >= 12);
        let again: [u8; 32] = Sha256::digest(format!("forage{nonce}")).into();
        assert_eq!(again, hash);
        // Smallest: no earlier nonce qualifies.
        for n in 0..nonce {
            let h: [u8; 32] = Sha256::digest(format!("forage{n}")).into();
            assert!(leading_zero_bits(&h) < 12);
        }
    }

    #[test]
    fn answers_count_requests_and_refuse_nonsense() {
        let served = AtomicU64::new(0);
        assert!(answer("search abc 4", &served).contains("served=1"));
        assert_eq!(answer("count", &served), "ok served=1 preloaded=0");
        assert!(answer("search abc 99", &served).starts_with("error"));
        assert!(answer("frobnicate", &served).starts_with("error"));
        assert!(answer("count", &served).starts_with("ok served=1 "));
    }
}
