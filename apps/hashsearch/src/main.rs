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
//! count                  ->  ok served=<count> preloaded=<bytes> working=<bytes>
//! grow <mib>             ->  ok working=<bytes>
//! churn <kib>            ->  ok hot=<bytes>
//! anything else          ->  error <reason>
//! ```
//!
//! `grow` and `churn` make it a stateful backend whose memory keeps changing (the VM
//! handoff bench): `grow` adds records (player state as JSON lines, 128 bytes each) to
//! its working set, `churn` keeps rewriting the first `kib` of them every 100 ms (a hot
//! set, as a game server updates its active players; 0 stops).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sha2::{Digest, Sha256};

const MAX_BITS: u32 = 28;
static PRELOADED: AtomicU64 = AtomicU64::new(0);
const MAX_LINE: u64 = 4096;
/// The working set: blocks of 1 MiB of 128-byte records.
static WORKING: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
/// Bytes of the working set rewritten every 100 ms.
static HOT: AtomicU64 = AtomicU64::new(0);
const RECORD: usize = 128;
const BLOCK: usize = 1 << 20;
/// Largest working set (the guest is small).
const MAX_WORKING_MIB: usize = 1024;

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
        ["count"] => format!(
            "ok served={} preloaded={} working={}",
            served.load(Ordering::SeqCst),
            PRELOADED.load(Ordering::SeqCst),
            working_bytes()
        ),
        ["grow", mib] => match mib.parse::<usize>() {
            Ok(n) if working_bytes() as usize / BLOCK + n <= MAX_WORKING_MIB => format!("ok working={}", grow(n)),
            _ => format!("error the working set is at most {MAX_WORKING_MIB} MiB"),
        },
        ["churn", kib] => match kib.parse::<u64>() {
            Ok(k) => {
                let hot = (k * 1024).min(working_bytes());
                if HOT.swap(hot, Ordering::SeqCst) == 0 && hot > 0 {
                    std::thread::spawn(churn);
                }
                format!("ok hot={hot}")
            }
            Err(_) => "error usage: churn <kib>".to_string(),
        },
        ["search", text, bits] => match bits.parse::<u32>() {
            Ok(bits) if bits <= MAX_BITS => {
                let start = Instant::now();
                let (nonce, hash) = search(text.as_bytes(), bits);
                let n = served.fetch_add(1, Ordering::SeqCst) + 1;
                format!("ok nonce={nonce} hash={} served={n} ms={}", hex::encode(hash), start.elapsed().as_millis())
            }
            _ => format!("error bits must be a number from 0 to {MAX_BITS}"),
        },
        _ => "error usage: search <text> <bits> | count | grow <mib> | churn <kib>".to_string(),
    }
}

fn working_bytes() -> u64 {
    (WORKING.lock().unwrap_or_else(|p| p.into_inner()).len() * BLOCK) as u64
}

/// One record: a player's state as a JSON line padded to 128 bytes.
fn record(out: &mut [u8], id: u64, version: u64) {
    let mut x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ version.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 29;
    let line = format!(
        "{{\"id\":{id},\"user\":\"player-{id:06}\",\"score\":{},\"level\":{},\"x\":{}.{:02},\"y\":-{}.{:02},\"v\":{version}}}",
        x % 1_000_000,
        1 + (x >> 20) % 99,
        (x >> 8) % 5000,
        x % 100,
        (x >> 16) % 5000,
        (x >> 4) % 100
    );
    let n = line.len().min(RECORD - 1);
    out[..n].copy_from_slice(&line.as_bytes()[..n]);
    out[n..RECORD - 1].fill(b' ');
    out[RECORD - 1] = b'\n';
}

/// Add `mib` MiB of records; the working set's size after.
fn grow(mib: usize) -> u64 {
    let mut w = WORKING.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..mib {
        let first = (w.len() * BLOCK / RECORD) as u64;
        let mut block = vec![0u8; BLOCK];
        for (i, r) in block.chunks_mut(RECORD).enumerate() {
            record(r, first + i as u64, 0);
        }
        w.push(block);
    }
    (w.len() * BLOCK) as u64
}

/// Rewrite the hot records every 100 ms until `churn 0`.
fn churn() {
    let mut version = 1;
    loop {
        let hot = HOT.load(Ordering::SeqCst) as usize;
        if hot == 0 {
            return;
        }
        {
            let mut w = WORKING.lock().unwrap_or_else(|p| p.into_inner());
            let mut left = hot;
            for (b, block) in w.iter_mut().enumerate() {
                let take = left.min(BLOCK);
                for (i, r) in block[..take].chunks_mut(RECORD).enumerate() {
                    record(r, ((b * BLOCK) / RECORD + i) as u64, version);
                }
                left -= take;
                if left == 0 {
                    break;
                }
            }
        }
        version += 1;
        std::thread::sleep(std::time::Duration::from_millis(100));
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
        // (The working set is process-wide: another test may have grown it.)
        assert!(answer("count", &served).starts_with("ok served=1 preloaded=0 working="));
        assert!(answer("search abc 99", &served).starts_with("error"));
        assert!(answer("frobnicate", &served).starts_with("error"));
        assert!(answer("count", &served).starts_with("ok served=1 "));
    }

    #[test]
    fn the_working_set_grows_and_its_hot_part_keeps_changing() {
        let served = AtomicU64::new(0);
        assert_eq!(answer("grow 2", &served), format!("ok working={}", 2 * BLOCK));
        assert!(answer("grow 5000", &served).starts_with("error"));
        let before = WORKING.lock().unwrap()[0][..RECORD].to_vec();
        assert!(before.starts_with(b"{\"id\":0,") && before.ends_with(b"\n"), "{}", String::from_utf8_lossy(&before));
        assert_eq!(answer("churn 4", &served), "ok hot=4096");
        std::thread::sleep(std::time::Duration::from_millis(350));
        assert_eq!(answer("churn 0", &served), "ok hot=0");
        let after = WORKING.lock().unwrap()[0][..RECORD].to_vec();
        assert_ne!(before, after, "the hot records changed");
        assert!(answer("count", &served).ends_with(&format!("working={}", 2 * BLOCK)));
    }
}
