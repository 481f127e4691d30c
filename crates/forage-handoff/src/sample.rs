//! Adaptation on the VM's own data. As a handoff starts, a sample of the VM's modified
//! chunks goes through each candidate mode, in parallel threads, and the P and R measured
//! there become the lookup table the [`crate::adapt::Adapter`] scales. A table profiled on
//! another workload only knows how modes relate on *that* data: on hashsearch the
//! reference table chose bsdiff, which bought nothing there and cost 10-18% of the time.
//!
//! The candidates are the modes on the given table's Pareto frontier (no other mode is
//! both faster and smaller), cut to the fastest and the smallest level of each delta and
//! codec ([`candidates`]): 8 of the reference table's 96. The levels between differ by a
//! few per cent, and measuring all of them (16 modes) left a sample of only 256 KiB in
//! the same time, too small to rank modes that differ by 5-10% (see [`candidates`]). A
//! time budget bounds the sample further (modes not measured in time are left out).

use std::time::{Duration, Instant};

use crate::adapt::{Codec, Delta, LookupTable, Mode};
use crate::encode::{profile, SampleChunk};

/// The modes of `table` that no other mode beats on both P and R, fastest first.
pub fn frontier(table: &LookupTable) -> Vec<Mode> {
    let mut modes = table.modes.clone();
    modes.sort_by(|a, b| a.1.p.total_cmp(&b.1.p).then(a.1.r.total_cmp(&b.1.r)));
    let mut best_r = f64::INFINITY;
    let mut out = Vec::new();
    for (m, prof) in modes {
        if prof.r < best_r {
            best_r = prof.r;
            out.push(m);
        }
    }
    out
}

/// The modes of `table`'s [`frontier`] that are the fastest or the smallest of their
/// delta and codec, fastest first: none+bzip2-1 and none+bzip2-9, not the seven levels
/// between. bzip2's levels differ only in block size (100-900 KB), which a sample smaller
/// than a segment cannot tell apart: on 256 KiB, bzip2-3 to bzip2-9 give the same bytes,
/// while a pipeline segment (1 MiB) gives bzip2-9 its 900 KB blocks. Measuring the eight
/// levels on 256 KiB cost what two levels cost on a whole segment, and ranked
/// none+bzip2-9 under 5% ahead of none+zstd-1 on the Debian app where on the wire it sent
/// 9-10% less (docs/handoff-bench.md, step 10).
///
/// A codec the table puts off its frontier still has its fastest level measured (without
/// a delta, before bsdiff's modes): the table was measured on other data, and the VM's own
/// may rank codecs otherwise. On the reference table (the bench app's memory) LZMA made
/// 20-35% more bytes than bzip2-9; on the Debian app's memory its level 1 makes 17% fewer,
/// at 1.1x bzip2-9's speed (docs/handoff-bench.md, step 11).
pub fn candidates(table: &LookupTable) -> Vec<Mode> {
    let front = frontier(table);
    let kind = |m: &Mode| (m.delta, std::mem::discriminant(&m.codec));
    let mut out: Vec<Mode> = front
        .iter()
        .enumerate()
        .filter(|(i, m)| {
            let same = |n: &&Mode| kind(n) == kind(m);
            front.iter().position(|n| same(&n)) == Some(*i) || front.iter().rposition(|n| same(&n)) == Some(*i)
        })
        .map(|(_, m)| *m)
        .collect();
    for codec in [Codec::Zstd(1), Codec::Gzip(1), Codec::Bzip2(1), Codec::Lzma(1)] {
        let codec_of = std::mem::discriminant(&codec);
        if !out.iter().any(|m| std::mem::discriminant(&m.codec) == codec_of) {
            // Before bsdiff's modes, the slow ones the time budget may leave out.
            let at = out.iter().position(|m| m.delta == Delta::Bsdiff).unwrap_or(out.len());
            out.insert(at, Mode { delta: Delta::None, codec });
        }
    }
    out
}

/// P and R of each of `modes` on `chunks`, measured by `threads` threads at once (each
/// mode on one thread, so P stays per core); modes not started within `budget` are left
/// out. The table keeps `modes`' order.
pub fn measure(
    modes: &[Mode],
    chunks: &[SampleChunk],
    chunk_bytes: u64,
    threads: usize,
    budget: Duration,
) -> LookupTable {
    let t0 = Instant::now();
    let threads = threads.clamp(1, modes.len().max(1));
    let measured: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|k| {
                s.spawn(move || {
                    let mut out = Vec::new();
                    for (i, m) in modes.iter().enumerate().skip(k).step_by(threads) {
                        if t0.elapsed() > budget {
                            break;
                        }
                        out.extend(profile(&[*m], chunks, chunk_bytes).modes.into_iter().map(|mp| (i, mp)));
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
    });
    let mut measured = measured;
    measured.sort_by_key(|(i, _)| *i);
    LookupTable { chunk_bytes, modes: measured.into_iter().map(|(_, mp)| mp).collect() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapt::{parse_mode, Profile};

    fn m(s: &str) -> Mode {
        parse_mode(s).unwrap()
    }

    #[test]
    fn the_frontier_drops_modes_that_are_slower_and_larger() {
        let table = LookupTable {
            chunk_bytes: 4096,
            modes: vec![
                (m("none+none"), Profile { p: 1e-6, r: 1.0 }),
                (m("xor+zstd1"), Profile { p: 1e-5, r: 0.3 }),
                (m("bsdiff+zstd1"), Profile { p: 5e-5, r: 0.35 }),
                (m("xor+lzma9"), Profile { p: 1e-3, r: 0.2 }),
            ],
        };
        assert_eq!(frontier(&table), vec![m("none+none"), m("xor+zstd1"), m("xor+lzma9")]);
        let n = frontier(&LookupTable::reference()).len();
        assert!((2..30).contains(&n), "a short list of the 96: {n}");
    }

    #[test]
    fn candidates_keep_the_fastest_and_the_smallest_level_of_each_codec() {
        let table = LookupTable {
            chunk_bytes: 4096,
            modes: vec![
                (m("none+zstd1"), Profile { p: 1e-5, r: 0.30 }),
                (m("none+bzip2-1"), Profile { p: 1.7e-4, r: 0.22 }),
                (m("none+bzip2-4"), Profile { p: 1.8e-4, r: 0.21 }),
                (m("none+bzip2-6"), Profile { p: 1.85e-4, r: 0.205 }),
                (m("none+bzip2-9"), Profile { p: 1.9e-4, r: 0.20 }),
                (m("bsdiff+bzip2-9"), Profile { p: 4.8e-4, r: 0.19 }),
                (m("none+lzma9"), Profile { p: 2e-3, r: 0.25 }),
            ],
        };
        assert_eq!(
            candidates(&table),
            vec![
                m("none+zstd1"),
                m("none+bzip2-1"),
                m("none+bzip2-9"),
                m("none+gzip1"),
                m("none+lzma1"),
                m("bsdiff+bzip2-9")
            ],
            "bzip2's middle levels are left out; codecs off the frontier (lzma) or absent (gzip) keep their fastest level"
        );
        let reference = LookupTable::reference();
        let (all, cut) = (frontier(&reference), candidates(&reference));
        assert!(cut.len() < all.len() && cut.len() >= 4, "{cut:?} of {all:?}");
        assert_eq!(cut.first(), all.first(), "the fastest stays");
        assert_eq!(cut.last(), all.last(), "the smallest stays");
    }

    #[test]
    fn a_sample_measures_each_mode_on_its_own_data() {
        // Chunks a few bytes away from their base: xor makes them nearly all zeros.
        let chunks: Vec<SampleChunk> = (0..32u32)
            .map(|i| {
                let base: Vec<u8> = (0..4096u32).map(|j| ((j * 31 + i * 7) % 253) as u8).collect();
                let mut new = base.clone();
                new[(i as usize * 97) % 4096] ^= 0x5a;
                (new, Some(base))
            })
            .collect();
        let modes = [m("none+none"), m("none+zstd1"), m("xor+zstd1")];
        let t = measure(&modes, &chunks, 4096, 2, Duration::from_secs(60));
        assert_eq!(t.modes.iter().map(|(m, _)| *m).collect::<Vec<_>>(), modes.to_vec(), "every mode, in order");
        let r = |s: &str| t.get(&m(s)).unwrap().r;
        assert!(r("xor+zstd1") < r("none+zstd1") / 4.0, "{t:?}");
        assert!((r("none+none") - 1.0).abs() < 1e-9);
        let none = measure(&modes, &chunks, 4096, 2, Duration::ZERO);
        assert!(none.modes.len() <= 2, "the budget is kept: {none:?}");
    }
}
